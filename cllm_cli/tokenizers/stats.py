"""Token statistics of texts under a tokenizer (cllm_tokenize --stats)."""
from __future__ import annotations

import collections
from typing import Any, Iterable

from cllm_cli.tokenizers.base import Tokenizer


def token_stats(tokenizer: Tokenizer, texts: Iterable[tuple[str, str]],
                top: int) -> dict[str, Any]:
    """Counts over `texts`, (name, text) pairs: {"files", "tokens", "unknown", "unknown_rate",
    "distinct", "vocab_size", "top": [[token, count], ...], "unknown_top": [[word, count],
    ...]}. Unknown words are counted under their own spelling in unknown_top and as <unk> in
    top."""
    counts: collections.Counter[int] = collections.Counter()
    missing: collections.Counter[str] = collections.Counter()
    names = []
    for name, text in texts:
        names.append(name)
        ids = tokenizer.encode(text)
        counts.update(ids.tolist())
        if (ids == tokenizer.unk_id).any():
            missing.update(tokenizer.unknown_pieces(text))
    total = sum(counts.values())
    unknown = counts.get(tokenizer.unk_id, 0)
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top]
    return {"files": list(names), "tokens": total, "unknown": unknown,
            "unknown_rate": unknown / total if total else 0.0,
            "distinct": len(counts), "vocab_size": len(tokenizer),
            "top": [[tokenizer.token_text(i), c] for i, c in ranked],
            "unknown_top": [[t, c] for t, c in missing.most_common(top)]}

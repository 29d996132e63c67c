"""A CLLM tokenizer as llama.cpp's tokenizer.ggml.* keys, which gguf_export.py writes.

    gguf_vocabulary(tokenizer, n_rows) -> GGUFVocab    the keys' values, or ConversionError

A bpe tokenizer.json becomes one of two of llama.cpp's tokenizer models; word and char
models are refused (llama.cpp has no word-level tokenizer).

- "gpt2", byte-level BPE (GPT-2's, SmolLM's, Qwen2's, Llama 3's tokenizer.json): tokens and
  merges as the file has them, special ids CONTROL, and tokenizer.ggml.pre naming the
  pre-tokenizer the way llama.cpp knows it (PRE_TOKENIZERS); another pre-tokenizer, or a
  normalizer, is refused by name, as llama.cpp would split the text differently.
- "llama", llama.cpp's SPM tokenizer, for a BPE model with byte_fallback that writes spaces
  as "▁" (Llama 2's, TinyLlama's and Mistral's tokenizer.json): the normalizer
  Prepend("▁") + Replace(" ", "▁") with no pre-tokenizer, or the Metaspace pre-tokenizer
  ("▁", any prepend_scheme, split or not) with no normalizer; the decoder Replace("▁", " "),
  ByteFallback, Fuse, then Strip(" ", 1, 0) exactly when a "▁" is put first. Token types:
  BYTE for <0x00> .. <0xFF> (all 256 are needed: llama.cpp writes every character it has no
  token for as them), UNKNOWN for the model's unk_token, CONTROL for the other special added
  tokens, NORMAL for the rest. add_space_prefix says whether a "▁" is put first;
  add_bos_token / add_eos_token whether the post-processor (TemplateProcessing) puts the
  bos / eos token around a text (no post-processor: neither). Added tokens that are not
  special are refused (llama.cpp matches them in text with other spaces around them), and so
  are those the BPE model does not hold (llama.cpp would build them from text).

How llama.cpp's SPM tokenizer splits a text, and why these scores give the library's ids:
llama.cpp puts " " first (add_space_prefix), writes every space as "▁", cuts the whole text
into characters, then again and again joins the two neighbours whose joined text is a token
of the highest score (the leftmost of equal ones); a character that is no token becomes its
bytes' <0xNN> tokens. The library's BPE joins the neighbours that a merge joins, the merge of
the lowest rank first (the leftmost of equal ones). So a token's score is minus one minus
the rank of the first merge that makes it, and a token no merge makes scores below all of
them. llama.cpp then joins what the library joins, in the same order, when (checked here,
and refused otherwise, naming the token or merge):
- two neighbours that join into a token U but that no merge joins never meet: the library
  splits U's own text into U (the neighbours a text becomes are those its own text would be
  split into);
- a token that several merges make (a list converted from a sentencepiece model has every
  split of a token) is made from every pair of pieces llama.cpp could join into it;
- no token is a <0xNN> token joined to another piece: llama.cpp holds a byte it has no
  token for as that byte, not as the text <0xNN>;
- with Metaspace's split, no token llama.cpp can build has a "▁" after its first
  character (the library never joins across a "▁"; llama.cpp would).
The order of a token's several merges never changes a split when they are next to each
other in the list, of two that overlap (x + y and y + z) the left one comes first, and every
token llama.cpp can build from it ranks after all of them. A tokenizer the library's BpeTrainer made (one merge per token)
meets that too. Llama 2's own tokenizer.json, converted from its sentencepiece model, does
not ('-' + '---' and '---' + '-' both make '----', the right one first): there llama.cpp
joins as the sentencepiece model does, by score, and a rare text may split otherwise than
the library splits it (none of 274 texts did in llama-tokenize, on a rebuild of that file). Such a file is
written, with a note counting the merge orders llama.cpp does not follow.
transformers' GGUF reader rebuilds a BPE model from the scores (every split of a token a
merge, by score), which the same conditions make split text as the tokenizer.json does.

One more difference is returned as a note: the Metaspace pre-tokenizer puts no "▁" before
a text that starts with a space (or "▁"), while llama.cpp always puts " " first; so
llama.cpp reads such a text with one "▁" more. The normalizer form has no such exception in
llama.cpp; transformers' GGUF reader always takes Metaspace's rule.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import gguf
import tokenizers

from cllm_cli.errors import ConversionError
from cllm_cli.tokenizers import BPETokenizer, Tokenizer

SPACE = "\u2581"        # "▁", how a space is written in the vocabulary
BYTE_TOKENS = tuple(f"<0x{b:02X}>" for b in range(256))
MAX_SCORED_MERGES = 1 << 24         # float32 scores count exactly up to here

# the splitting regular expressions of byte-level BPE tokenizers, by llama.cpp's name of them
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
                r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+"
                 r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {"gpt-2": "ByteLevel (GPT-2's)", "smollm": "single digits, then ByteLevel",
                  "qwen2": "Qwen2's split, then ByteLevel", "llama-bpe": "Llama 3's split, then ByteLevel"}
WHAT_IS_READ = (f"a byte-level BPE tokenizer.json (model BPE, no normalizer, a pre-tokenizer "
                f"llama.cpp knows: {'; '.join(PRE_TOKENIZERS.values())}) or a byte-fallback BPE "
                f"one that writes spaces as {SPACE} (Llama 2's)")


@dataclass
class GGUFVocab:
    """The values of the tokenizer.ggml.* keys; None: the key is not written."""
    model: str                          # "gpt2" or "llama"
    pre: str                            # llama.cpp's name of the pre-tokenizer
    tokens: list[str]                   # one per row of the embedding
    types: list[int]                    # gguf.TokenType of each
    special: dict[str, int]             # "bos", "eos", "unk", "pad" -> id
    add_bos: bool
    scores: list[float] | None = None   # "llama"
    merges: list[str] | None = None     # "gpt2"
    add_eos: bool | None = None
    add_space_prefix: bool | None = None
    notes: list[str] = field(default_factory=list)    # what llama.cpp reads differently


def gguf_vocabulary(tokenizer: Tokenizer, n_rows: int) -> GGUFVocab:
    """The tokenizer.ggml.* keys of `tokenizer` for a model of n_rows embedding rows (rows
    past the tokenizer's ids are "[PAD<id>]" tokens of type UNUSED, as llama.cpp's converter
    lists them); ConversionError (one line) when llama.cpp cannot split text as it does."""
    if not isinstance(tokenizer, BPETokenizer):
        raise ConversionError(f"--format gguf needs a bpe tokenizer; llama.cpp has no "
                              f"{tokenizer.kind}-level tokenizer")
    library = tokenizers.Tokenizer.from_str(tokenizer.json_bytes.decode("utf-8"))
    spec = json.loads(library.to_str())     # every setting written, defaults included
    model = spec.get("model") or {}
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        return _spm_vocabulary(tokenizer, spec, library.model, n_rows)
    return _byte_level_vocabulary(tokenizer, spec, n_rows)


def _rows(tokenizer: Tokenizer, n_rows: int) -> list[str | None]:
    return [tokenizer.id_to_token(i) if i < len(tokenizer) else None for i in range(n_rows)]


def _merge_pairs(model: dict[str, Any]) -> list[tuple[str, str]]:
    """The merges as (left, right), from either form the library writes ("a b" or [a, b])."""
    pairs = []
    for merge in model.get("merges") or []:
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        pairs.append((left, right))
    return pairs


# -- byte-level BPE: llama.cpp's "gpt2" -----------------------------------------------------

def _pre_tokenizer(pre: Any) -> str | None:
    """llama.cpp's name (PRE_TOKENIZERS) of a tokenizer.json's pre_tokenizer, None when it
    is none of them."""
    if not isinstance(pre, dict):
        return None
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    if not isinstance(steps, list) or not all(isinstance(s, dict) for s in steps) or not steps:
        return None
    last, first = steps[-1], steps[:-1]
    if last.get("type") != "ByteLevel":
        return None
    if not first:
        return "gpt-2" if last.get("use_regex", True) else None
    if len(first) != 1:
        return None
    step = first[0]
    if step.get("type") == "Digits" and step.get("individual_digits") \
            and last.get("use_regex", True):
        return "smollm"
    pattern = (step.get("pattern") or {}).get("Regex")
    if step.get("type") == "Split" and not last.get("use_regex", True) \
            and step.get("behavior") == "Isolated" and not step.get("invert") \
            and isinstance(pattern, str):
        return {_QWEN2_SPLIT: "qwen2", _LLAMA3_SPLIT: "llama-bpe"}.get(pattern)
    return None


def _byte_level_vocabulary(tokenizer: Tokenizer, spec: dict[str, Any], n_rows: int) -> GGUFVocab:
    model = spec.get("model") or {}
    pre = _pre_tokenizer(spec.get("pre_tokenizer"))
    if model.get("type") != "BPE" or pre is None or spec.get("normalizer") is not None:
        raise ConversionError(f"--format gguf needs {WHAT_IS_READ}")
    added = spec.get("added_tokens") or []
    special = {t["id"] for t in added if t.get("special")}
    # an added token that is not special is found in text by the library before the BPE
    # runs; llama.cpp does that for USER_DEFINED tokens only (a NORMAL one it reaches by
    # merges alone, and decodes as byte-level text)
    plain = {t["id"] for t in added if not t.get("special")}
    tokens: list[str] = []
    types: list[int] = []
    for i, token in enumerate(_rows(tokenizer, n_rows)):
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL if i in special
                         else gguf.TokenType.USER_DEFINED if i in plain
                         else gguf.TokenType.NORMAL)
    ids = {"bos": tokenizer.bos_id, "eos": tokenizer.eos_id, "unk": tokenizer.unk_id,
           "pad": tokenizer.pad_id}
    return GGUFVocab(model="gpt2", pre=pre, tokens=tokens, types=types,
                     special={k: i for k, i in ids.items() if i >= 0}, add_bos=False,
                     merges=[" ".join(pair) for pair in _merge_pairs(model)])


# -- byte-fallback BPE with "▁" for spaces: llama.cpp's "llama" (SPM) ---------------------------

def _refuse(why: str) -> ConversionError:
    return ConversionError(f"--format gguf: this byte-fallback BPE tokenizer.json cannot be "
                           f"llama.cpp's SPM tokenizer: {why}")


def _steps(part: Any, key: str) -> list[Any]:
    """The steps of a normalizer / pre-tokenizer / decoder: its Sequence's, or itself."""
    if part is None:
        return []
    if isinstance(part, dict) and part.get("type") == "Sequence":
        return list(part.get(key) or [])
    return [part]


def _kinds(steps: list[Any]) -> str:
    """The types of the steps, for a message."""
    return ", ".join(str(s.get("type") if isinstance(s, dict) else s) for s in steps) or "none"


def _replaces(step: Any, old: str, new: str) -> bool:
    return (isinstance(step, dict) and step.get("type") == "Replace"
            and step.get("pattern") == {"String": old} and step.get("content") == new)


def _spaces(spec: dict[str, Any]) -> tuple[bool, bool, list[str]]:
    """(whether a "▁" is put first, whether the text is split before each "▁", notes) of the
    tokenizer's normalizer and pre-tokenizer; refused unless one of the two forms of the
    module's docstring."""
    normalizer, pre = _steps(spec.get("normalizer"), "normalizers"), spec.get("pre_tokenizer")
    forms = (f"Metaspace('{SPACE}') and no normalizer, or no pre-tokenizer and the normalizer "
             f"Replace(' ', '{SPACE}') with or without Prepend('{SPACE}')")
    if normalizer and pre is None:
        prepends = [s for s in normalizer if isinstance(s, dict) and s.get("type") == "Prepend"]
        replace = [s for s in normalizer if _replaces(s, " ", SPACE)]
        if len(replace) == 1 and len(prepends) <= 1 and len(normalizer) == 1 + len(prepends) \
                and all(p.get("prepend") == SPACE for p in prepends):
            return bool(prepends), False, []
        raise _refuse(f"it has the normalizer {_kinds(normalizer)}; llama.cpp's SPM tokenizer "
                      f"needs {forms}")
    if not normalizer and isinstance(pre, dict) and pre.get("type") == "Metaspace":
        if pre.get("replacement") != SPACE:
            raise _refuse(f"its Metaspace pre-tokenizer writes spaces as "
                          f"{pre.get('replacement')!r}, llama.cpp as '{SPACE}'")
        prepend = pre.get("prepend_scheme", "always") != "never"
        notes = [f"llama.cpp puts a '{SPACE}' before a text that starts with a space (or "
                 f"'{SPACE}'), where this tokenizer's Metaspace pre-tokenizer puts none: "
                 f"llama.cpp reads such a text with one '{SPACE}' more"] if prepend else []
        return prepend, bool(pre.get("split", True)), notes
    pres = _kinds(_steps(pre, "pretokenizers"))
    found = (f"the normalizer {_kinds(normalizer)} and the pre-tokenizer {pres}" if normalizer and pre
             else f"the pre-tokenizer {pres}" if pre else "neither a normalizer nor a pre-tokenizer")
    raise _refuse(f"it has {found}; llama.cpp's SPM tokenizer needs {forms}")


def _check_decoder(spec: dict[str, Any], prepend: bool) -> None:
    """The decoder must turn ids into text as llama.cpp does: "▁" -> " ", <0xNN> -> bytes,
    and the first space taken off when a "▁" was put first."""
    steps = _steps(spec.get("decoder"), "decoders")
    want = [lambda s: _replaces(s, SPACE, " "), lambda s: s.get("type") == "ByteFallback",
            lambda s: s.get("type") == "Fuse"]
    if prepend:
        want.append(lambda s: s.get("type") == "Strip" and s.get("content") == " "
                    and s.get("start") == 1 and s.get("stop") == 0)
    if len(steps) != len(want) or not all(isinstance(s, dict) and ok(s) for s, ok in zip(steps, want)):
        strip = ", Strip(' ', 1, 0)" if prepend else ""
        raise _refuse(f"its decoder ({_kinds(steps)}) is not Replace('{SPACE}', ' '), ByteFallback, "
                      f"Fuse{strip}, which is how llama.cpp turns ids into text")


def _bos_eos(spec: dict[str, Any], tokenizer: Tokenizer) -> tuple[bool, bool, int]:
    """(add_bos, add_eos, bos id) from the post-processor; llama.cpp can put only one token
    before a text and the end-of-text token after it."""
    post = spec.get("post_processor")
    if post is None:
        return False, False, tokenizer.bos_id
    if post.get("type") != "TemplateProcessing":
        raise _refuse(f"its post-processor {post.get('type')} is not a TemplateProcessing")
    single = post.get("single") or []
    at = [i for i, s in enumerate(single) if "Sequence" in s]
    ids = {name: (entry.get("ids") or []) for name, entry in (post.get("special_tokens") or {}).items()}

    def one_id(step: dict[str, Any]) -> int:
        name = step["SpecialToken"]["id"]
        if len(ids.get(name, [])) != 1:
            raise _refuse(f"its post-processor puts {name!r}, which is not one token, around "
                          f"a text")
        return int(ids[name][0])

    if len(at) != 1 or at[0] > 1 or len(single) - at[0] > 2:
        raise _refuse("its post-processor puts more around a text than one token before "
                      "and one after")
    before = [one_id(s) for s in single[:at[0]]]
    after = [one_id(s) for s in single[at[0] + 1:]]
    if after and after[0] != tokenizer.eos_id:
        raise _refuse(f"its post-processor puts id {after[0]} after a text, and llama.cpp "
                      f"puts only the end-of-text token ({tokenizer.eos_id}) there")
    return bool(before), bool(after), before[0] if before else tokenizer.bos_id


def _scores(tokens: Iterable[str], merges: list[tuple[str, str]], split: bool,
            own_split: Callable[[str], list[str]]) -> tuple[dict[str, float], list[str]]:
    """({token: score} for the tokens some merge makes, notes) (the module's docstring says
    how, and what is checked); own_split(text) is the BPE model's split of a text.
    ConversionError naming the first token or merge that breaks a condition; the merge orders
    llama.cpp does not follow are counted in a note."""
    if len(merges) >= MAX_SCORED_MERGES:
        raise _refuse(f"it has {len(merges):,} merges, more than float32 scores can order "
                      f"({MAX_SCORED_MERGES:,})")
    rank = {pair: r for r, pair in enumerate(merges)}     # the library keeps a pair's last rank
    byte_tokens = set(BYTE_TOKENS)
    built: dict[str, list[tuple[str, str]]] = {}    # token -> the splits llama.cpp can join
    live: list[tuple[int, str, str, str]] = []      # (rank, token, left, right) of such merges

    def piece(text: str) -> bool:
        return len(text) == 1 or text in built or text in byte_tokens

    for token in sorted(set(tokens), key=len):      # pieces before what they build
        splits = [(token[:k], token[k:]) for k in range(1, len(token))
                  if piece(token[:k]) and piece(token[k:])]
        if not splits:
            continue
        built[token] = splits
        if split and SPACE in token[1:]:
            raise _refuse(f"token {token!r} has a '{SPACE}' after its first character: its "
                          f"Metaspace pre-tokenizer splits the text there, llama.cpp does not")
        for left, right in splits:
            if left in byte_tokens or right in byte_tokens:
                raise _refuse(f"token {token!r} is {left!r} + {right!r}, and llama.cpp holds "
                              f"a byte it has no token for as that byte, not as <0xNN>")
            if (left, right) in rank:
                live.append((rank[left, right], token, left, right))
        # llama.cpp joins two neighbours whose text is a token, the library only those a merge
        # joins; such neighbours never meet when the model splits the token's own text into
        # that one token (the stretch of any text they would cover goes through the joins
        # that its text alone goes through)
        unjoined = [pair for pair in splits if pair not in rank]
        if unjoined and own_split(token) != [token]:
            left, right = unjoined[0]
            raise _refuse(f"llama.cpp would join {left!r} + {right!r} into {token!r}, which no "
                          f"merge does, and the merges split {token!r} itself into "
                          f"{' + '.join(map(repr, own_split(token)))}")
    live.sort()
    unfollowed: list[str] = []
    first: dict[str, int] = {}
    last: dict[str, int] = {}
    for i, (_, token, _, _) in enumerate(live):
        first.setdefault(token, i)
        last[token] = i
    for token, i in first.items():
        if last[token] == i:
            continue
        # a token that several merges make: their order among themselves must never matter
        group = [m for m in live[i:last[token] + 1] if m[1] == token]
        other = next((t for _, t, _, _ in live[i:last[token] + 1] if t != token), None)
        if other is not None:
            unfollowed.append(f"the merges that make {token!r} are not next to each other "
                              f"(one that makes {other!r} comes between them)")
        if len(group) != len(built[token]):
            left, right = next(p for p in built[token] if p not in rank)
            raise _refuse(f"several merges make {token!r}, but none joins {left!r} + {right!r}, "
                          f"which llama.cpp would")
        # x + y and y + z both make the token: of the neighbours x, y, z llama.cpp joins the
        # left pair, the library the pair of the lower rank
        lefts = {left: (r, right) for r, _, left, right in group}
        for r, _, left, right in group:
            if right in lefts and lefts[right][0] < r:
                unfollowed.append(f"merges {left!r} + {right!r} and {right!r} + "
                                  f"{lefts[right][1]!r} both make {token!r}, the right one "
                                  f"first")
    # what is built from a token that several merges make comes after all of them (every
    # token built here has a merge by now: its own text is split into it)
    for token, splits in built.items():
        for part in {p for pair in splits for p in pair}:
            if part in first and first[part] != last[part] \
                    and live[first[token]][0] <= live[last[part]][0]:
                unfollowed.append(f"{token!r} is built from {part!r}, which several merges "
                                  f"make, and ranks before the last of them")
    notes = [f"llama.cpp's tokenizer, which joins by score as sentencepiece does, cannot "
             f"follow {len(unfollowed):,} of the merges' orders (as in a tokenizer.json "
             f"converted from a sentencepiece model; first: {unfollowed[0]}), so it may split "
             f"a rare text otherwise"] if unfollowed else []
    return {token: -1.0 - live[i][0] for token, i in first.items()}, notes


def _spm_vocabulary(tokenizer: Tokenizer, spec: dict[str, Any], bpe: tokenizers.models.Model,
                    n_rows: int) -> GGUFVocab:
    model = spec["model"]
    for key, off in (("dropout", None), ("continuing_subword_prefix", None),
                     ("end_of_word_suffix", None), ("ignore_merges", False)):
        if model.get(key, off) not in (off, ""):
            raise _refuse(f"its BPE model sets {key} ({model[key]!r})")
    added = spec.get("added_tokens") or []
    plain = [t.get("content") for t in added if not t.get("special")]
    if plain:
        raise _refuse(f"added token {plain[0]!r} is not special (the library and llama.cpp "
                      f"find it in text, and put spaces around it differently)")
    # llama.cpp builds a text's pieces into any token of the file, the library only into
    # those of its BPE model
    vocab = model.get("vocab") or {}
    outside = [t.get("content") for t in added if vocab.get(t.get("content")) != t.get("id")]
    if outside:
        raise _refuse(f"added token {outside[0]!r} is not in its BPE model's vocabulary, and "
                      f"llama.cpp would make it from text")
    prepend, split, notes = _spaces(spec)
    _check_decoder(spec, prepend)
    add_bos, add_eos, bos_id = _bos_eos(spec, tokenizer)
    rows = _rows(tokenizer, n_rows)
    present = set(rows)
    missing = [b for b in BYTE_TOKENS if b not in present]
    if missing:
        raise _refuse(f"{len(missing)} of the 256 byte tokens <0x00> .. <0xFF> are missing "
                      f"({missing[0]} first), and llama.cpp writes every character it has no "
                      f"token for as them")

    def own_split(text: str) -> list[str]:
        return [t.value for t in bpe.tokenize(text)]

    scores, unfollowed = _scores((t for t in rows if t is not None), _merge_pairs(model), split,
                                 own_split)
    notes += unfollowed
    lowest = -1.0 - len(model.get("merges") or [])
    unk = model.get("unk_token")
    unk_id = vocab.get(unk, -1) if unk is not None else tokenizer.unk_id
    byte_tokens = set(BYTE_TOKENS)
    special = {t["id"] for t in added if t.get("special")}
    tokens: list[str] = []
    types: list[int] = []
    for i, token in enumerate(rows):
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(token)
        types.append(gguf.TokenType.BYTE if token in byte_tokens
                     else gguf.TokenType.UNKNOWN if i == unk_id
                     else gguf.TokenType.CONTROL if i in special
                     else gguf.TokenType.NORMAL)
    ids = {"bos": bos_id, "eos": tokenizer.eos_id, "unk": unk_id, "pad": tokenizer.pad_id}
    return GGUFVocab(model="llama", pre="default", tokens=tokens, types=types,
                     special={k: i for k, i in ids.items() if i >= 0},
                     scores=[scores.get(t, lowest) for t in tokens],
                     add_bos=add_bos, add_eos=add_eos, add_space_prefix=prepend, notes=notes)

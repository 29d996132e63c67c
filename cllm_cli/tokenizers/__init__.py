"""Tokenizers: text <-> ids, and the file each kind keeps its vocabulary in. Second stage of
the data's path: files -> tokenizers -> dataset -> batches.

    Tokenizer          what every kind offers; Tokenizer.load / Tokenizer.build pick the kind
    WordTokenizer      "word": lower-cased words and single punctuation marks (word.py)
    CharTokenizer      "char": every distinct character (char.py)
    BPETokenizer       "bpe": byte-level BPE of the `tokenizers` library (bpe.py)
    TOKENIZERS         kind name -> class; TOKENIZER_KINDS are its keys, in order
    tokenizer_class    the class of a kind, DataError for an unknown one
    load_tokenizer     a tokenizer file of a given kind, or of the kind that recognises it
    detect_kind        the kind of a tokenizer file
    tokenizer_source   where a BPE tokenizer's files are: tokenizer.json, or vocab.json + merges.txt
    token_stats        token counts of texts (stats.py)
    replace_undecodable  text with the bytes that are not UTF-8 (lone surrogates) -> U+FFFD

Import from here. The modules below import only base.py and vocab.py, never this package
face, so none of them imports a module that imports it back; the registry, which names every
kind, is filled here, after all of them.
"""
from cllm_cli.tokenizers.base import (
    BOS,
    EOS,
    PAD,
    SPECIALS,
    TOKENIZERS,
    UNK,
    Tokenizer,
    detect_kind,
    load_tokenizer,
    replace_undecodable,
    tokenizer_class,
)
from cllm_cli.tokenizers.bpe import BPETokenizer
from cllm_cli.tokenizers.bpe_files import tokenizer_source
from cllm_cli.tokenizers.char import CharTokenizer
from cllm_cli.tokenizers.stats import token_stats
from cllm_cli.tokenizers.vocab import VocabTokenizer
from cllm_cli.tokenizers.word import WordTokenizer

TOKENIZERS.update({"word": WordTokenizer, "char": CharTokenizer, "bpe": BPETokenizer})
TOKENIZER_KINDS = tuple(TOKENIZERS)

__all__ = [
    "BOS", "EOS", "PAD", "SPECIALS", "UNK", "TOKENIZERS", "TOKENIZER_KINDS",
    "BPETokenizer", "CharTokenizer", "Tokenizer", "VocabTokenizer", "WordTokenizer",
    "detect_kind", "load_tokenizer", "replace_undecodable", "token_stats", "tokenizer_class", "tokenizer_source",
]

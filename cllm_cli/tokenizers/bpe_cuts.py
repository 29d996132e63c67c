"""Where a text may be cut into pieces that byte-level BPE encodes to the same ids as the whole
text: between lines (a run of newlines between printable characters), and in a line longer
than LINE_CHARS at the end of a word or number (or before a space between words), where
GPT-2's pre-tokenizer always ends a piece. The same places in a file's bytes cut it into
blocks (corpus/files.read_blocks)."""
from __future__ import annotations

import re
from typing import Callable

LINE_CHARS = 1 << 18        # no newline place within this: cut at the end of a word instead

# A run of newlines between two characters that are letters, digits or ASCII punctuation
# (white space neither for Python nor for the library's regex): safe to cut before its last
# newline (group 1).
CUT = re.compile(r"[\w!-~]\n*(\n)[\w!-~]")
# The same places in a file's bytes, for blocks (files.read_blocks): a run of line ends
# ("\r\n", "\n" or a lone "\r", which become "\n") between two printable ASCII characters,
# cut before its last line end (group 1).
BLOCK_CUT = re.compile(rb"[!-~](?:\r\n|\n|\r(?!\n))*(\r\n|\n|\r(?!\n))(?=[!-~])")
# The end of a word or number: after an ASCII letter followed by an ASCII non-letter, or an
# ASCII digit followed by an ASCII non-digit, or before a single space between two characters
# that are not white space (GPT-2's regex always ends a piece there: no piece goes on past a
# character that is not white space with a space, and " x" starts one). Python's \S is never
# white space for the library (whose \s lacks only \x1c..\x1f of Python's).
WORD_CUT = re.compile(r"[A-Za-z](?=[\x00-@\[-`{-\x7f])|[0-9](?=[\x00-/:-\x7f])|\S(?= \S)")
# In bytes: the character before the space ends in a printable ASCII byte or a continuation
# byte, the one after it starts with a printable ASCII byte or a lead byte, and neither is one
# of the white-space characters beyond ASCII (U+0085, U+00A0, U+1680, U+2000..U+200A,
# U+2028, U+2029, U+202F, U+205F, U+3000).
_WIDE_SPACE = rb"\xc2[\x85\xa0]|\xe1\x9a\x80|\xe2\x80[\x80-\x8a\xa8\xa9\xaf]|\xe2\x81\x9f|\xe3\x80\x80"
BLOCK_WORD_CUT = re.compile(
    rb"[A-Za-z](?=[\x00-@\[-`{-\x7f])|[0-9](?=[\x00-/:-\x7f])"
    rb"|[!-~\x80-\xbf](?<!\xc2\x85)(?<!\xc2\xa0)(?<!\xe1\x9a\x80)(?<!\xe2\x81\x9f)(?<!\xe3\x80\x80)"
    rb"(?<!\xe2\x80[\x80-\x8a\xa8\xa9\xaf])(?= [!-~\xc2-\xf4])(?! (?:" + _WIDE_SPACE + rb"))")


def whole_file(data: bytes) -> int:
    """block_cut of a tokenizer whose texts cannot be cut: no place."""
    return 0


def cut_points(text: str, size: int) -> list[int]:
    """Offsets (after 0, before len) where `text` may be cut into pieces of about `size`."""
    cuts, start = [], size
    while start < len(text):
        m = CUT.search(text, start, start + LINE_CHARS)
        if m is not None:
            cut = m.start(1)
        else:                            # a long line: the end of a word
            m = WORD_CUT.search(text, start)
            if m is None:
                break
            cut = m.end()
        cuts.append(cut)
        start = cut + size
    return cuts


def last_place(data: bytes, pattern: re.Pattern[bytes],
               place_of: Callable[[re.Match[bytes]], int], window: int) -> int:
    """The last place of `pattern` in `data` (0: none), looked for near its end first."""
    while True:
        start = max(0, len(data) - window)
        place = 0
        for m in pattern.finditer(data, start):
            place = place_of(m)
        if place or start == 0:
            return place
        window *= 8

"""Tests of cllm_cli/files.py: which files a corpus is made of, and reading their text."""
import os

import pytest
from helpers import write

from cllm_cli.corpus.files import collect_files, decode_block, read_blocks, read_text
from cllm_cli.errors import DataError
from cllm_cli.fileio import char_cut
from cllm_cli.tokenizers import TOKENIZERS

# ---------------------------------------------------------------------------------------
# collect_files
# ---------------------------------------------------------------------------------------

def test_collect_directory_recursive_sorted(tmp_path):
    for name in ["b.txt", "a.txt", "sub/c.txt", "sub/deeper/a.txt", "z.txt", "notes.md"]:
        write(tmp_path / "corpus" / name, "x")
    files = collect_files([tmp_path / "corpus"])
    rel = [p.relative_to(tmp_path / "corpus").as_posix() for p in files]
    assert rel == ["a.txt", "b.txt", "sub/c.txt", "sub/deeper/a.txt", "z.txt"]


def test_collect_leaves_out_hidden_files_and_directories(tmp_path):
    """As a shell's * does: .git and the ._ files macOS writes beside a copy are no text;
    a pattern that names hidden files takes them, and a hidden DATA directory is read."""
    for name in ["a.txt", "._a.txt", ".git/notes.txt", "sub/.cache/b.txt", "sub/b.txt"]:
        write(tmp_path / ".corpus" / name, "x")
    rel = [p.relative_to(tmp_path / ".corpus").as_posix()
           for p in collect_files([tmp_path / ".corpus"])]
    assert rel == ["a.txt", "sub/b.txt"]
    assert [p.name for p in collect_files([tmp_path / ".corpus"], pattern="._*")] == ["._a.txt"]
    hidden = write(tmp_path / ".given.txt", "x")
    assert collect_files([hidden]) == [hidden]        # a file given by name is taken


def test_collect_file_taken_whatever_its_name(tmp_path):
    md = write(tmp_path / "notes.md", "x")
    noext = write(tmp_path / "README", "x")
    assert collect_files([md, noext]) == [md, noext]


def test_collect_keeps_argument_order_and_removes_duplicates(tmp_path):
    a = write(tmp_path / "d" / "a.txt", "x")
    b = write(tmp_path / "d" / "b.txt", "x")
    c = write(tmp_path / "c.txt", "x")
    files = collect_files([c, tmp_path / "d", a, str(tmp_path / "d" / ".." / "c.txt")])
    assert files == [c, a, b]


def test_collect_reads_a_file_with_two_hard_links_once(tmp_path):
    a = write(tmp_path / "d" / "a.txt", "x")
    os.link(a, tmp_path / "d" / "b.txt")
    assert collect_files([tmp_path / "d"]) == [a]
    assert collect_files([tmp_path / "d" / "b.txt", a]) == [tmp_path / "d" / "b.txt"]


def test_collect_glob_pattern(tmp_path):
    write(tmp_path / "a.txt", "x")
    write(tmp_path / "b.md", "x")
    write(tmp_path / "s" / "c.md", "x")
    files = collect_files([tmp_path], pattern="*.md")
    assert [p.name for p in files] == ["b.md", "c.md"]


@pytest.mark.parametrize("pattern", ["/etc/*", "../*.txt", "**/../*.txt", "sub/../../*"])
def test_collect_glob_pattern_stays_below_the_directory(tmp_path, pattern):
    """A pattern that is absolute or climbs out with '..' is refused in one line: pathlib
    raises NotImplementedError for the one, and reads files outside the directory for the
    other."""
    write(tmp_path / "outside.txt", "x")
    write(tmp_path / "corpus" / "sub" / "a.txt", "x")
    with pytest.raises(DataError, match="pattern of file names below the directory"):
        collect_files([tmp_path / "corpus"], pattern=pattern)


def test_collect_excludes_checkpoint_dir(tmp_path):
    write(tmp_path / "a.txt", "x")
    write(tmp_path / "checkpoints" / "vocab.txt", "<pad>\t0\n")
    write(tmp_path / "checkpoints" / "deep" / "x.txt", "x")
    files = collect_files([tmp_path], exclude_dir=tmp_path / "checkpoints")
    assert [p.name for p in files] == ["a.txt"]
    # without the exclusion they would be found
    assert len(collect_files([tmp_path])) == 3


def test_collect_only_checkpoint_dir_matches_is_an_error(tmp_path):
    write(tmp_path / "ck" / "vocab.txt", "x")
    with pytest.raises(DataError, match="no files matching"):
        collect_files([tmp_path], exclude_dir=tmp_path / "ck")


def test_collect_missing_path(tmp_path):
    with pytest.raises(DataError, match="no such file or directory: .*nowhere"):
        collect_files([tmp_path / "nowhere"])


def test_collect_directory_without_matches(tmp_path):
    write(tmp_path / "a.md", "x")
    with pytest.raises(DataError, match=r"no files matching '\*\.txt'"):
        collect_files([tmp_path])


# ---------------------------------------------------------------------------------------
# read_text
# ---------------------------------------------------------------------------------------

def test_read_text_nul_byte_offset(tmp_path):
    f = write(tmp_path / "bin.txt", b"abc\x00def")
    with pytest.raises(DataError) as e:
        read_text(f)
    assert str(e.value) == f"{f}: not a text file (NUL byte at offset 3)"


@pytest.mark.parametrize("raw, offset", [
    (b"h\xc3\xa9llo \xff rest", 7),        # stray byte after a valid 2-byte sequence
    (b"ab\xe2\x82", 2),                      # truncated 3-byte sequence at the end
    (b"\xc0\xafxyz", 0),                     # overlong encoding
    (b"ok\xed\xa0\x80", 2),                  # UTF-16 surrogate
])
def test_read_text_invalid_utf8_offset(tmp_path, raw, offset):
    f = write(tmp_path / "bad.txt", raw)
    with pytest.raises(DataError) as e:
        read_text(f)
    assert str(e.value) == f"{f}: not valid UTF-8 (bad byte at offset {offset})"


def test_read_text_reports_first_bad_byte(tmp_path):
    f = write(tmp_path / "both.txt", b"a\xffb\x00")
    with pytest.raises(DataError, match="not valid UTF-8 .*offset 1"):
        read_text(f)
    g = write(tmp_path / "both2.txt", b"a\x00b\xff")
    with pytest.raises(DataError, match="NUL byte at offset 1"):
        read_text(g)


def test_read_text_replace_mode(tmp_path):
    f = write(tmp_path / "bad.txt", b"a\xffb\x00c")
    assert read_text(f, encoding_errors="replace") == "a\ufffdb\ufffdc"


def test_read_text_bom_and_newlines(tmp_path):
    f = write(tmp_path / "w.txt", b"\xef\xbb\xbfone\r\ntwo\rthree\n")
    assert read_text(f) == "one\ntwo\nthree\n"


def test_read_text_unreadable(tmp_path):
    with pytest.raises(DataError, match=r"cannot read \("):
        read_text(tmp_path)           # a directory
    with pytest.raises(DataError, match="cannot read"):
        read_text(tmp_path / "missing.txt")


# --- reading in blocks ----------------------------------------------------------------------


AWKWARD = ("\ufeffThe café's ΟΔΟΣ ΣΑΣ\r\ndon't\r\rstop:\n\n汉字🙂 a\tb\r\n\r\n"
           "x\u2028y\u00a0z  end\r").encode("utf-8")


def blocks_of(path, cut, size):
    return list(read_blocks(path, cut, size))


@pytest.mark.parametrize("kind", ["word", "char", "bpe"])
@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 7, 11, 64])
def test_blocks_join_to_the_whole_text(tmp_path, kind, size):
    """Every raw read boundary of sizes 1..11 falls somewhere inside a word, a multi-byte
    character and a CRLF of AWKWARD; the blocks' texts still join to the whole file's text,
    and no block ends between "\\r" and "\\n" or inside a character."""
    path = write(tmp_path / "a.txt", "")
    path.write_bytes(AWKWARD)
    blocks = blocks_of(path, TOKENIZERS[kind].block_cut, size)
    assert b"".join(data for _, data, _, _ in blocks) == AWKWARD
    assert [last for *_, last in blocks] == [False] * (len(blocks) - 1) + [True]
    texts = [decode_block(path, data, offset) for offset, data, _, _ in blocks]
    assert "".join(texts) == read_text(path)
    for offset, data, _, last in blocks:
        end = offset + len(data)
        if not last:
            assert not (AWKWARD[end - 1:end] == b"\r" and AWKWARD[end:end + 1] == b"\n")
            assert not 0x80 <= AWKWARD[end] < 0xC0
    if kind == "word":      # cut after white space only
        assert all(data[-1:] in (b" ", b"\n") for _, data, _, last in blocks if not last)
    if size <= 4:
        assert len(blocks) >= 3, "premise: the file is cut"


def test_a_raw_boundary_inside_a_character_or_crlf_moves_back(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes("ab\r\nc汉d".encode("utf-8"))        # 汉 is bytes 5..7
    assert [data for _, data, _, _ in blocks_of(path, char_cut, 3)] == \
        [b"ab", b"\r\n", b"c", "汉".encode(), b"d"]
    assert [data for _, data, _, _ in blocks_of(path, char_cut, 7)] == \
        [b"ab\r\nc", "汉".encode(), b"d"]


@pytest.mark.parametrize("kind", ["word", "char", "bpe"])
@pytest.mark.parametrize("fault", [b"\x00", b"\xff", b"\xe2\x82", b"\xc3(", b"\xed\xa0\x80"])
def test_faults_in_a_later_block_keep_their_offset(tmp_path, kind, fault):
    """A NUL or bad UTF-8 far into the file, read in small blocks, is reported as reading the
    whole file reports it; with a NUL and a bad byte, the first one wins."""
    text = ("word é " * 50 + "\n\n").encode("utf-8")
    path = tmp_path / "a.txt"
    for data in (text + fault + text, text + fault + b"\x00" + text,
                 text + b"\x00" + text + fault):
        path.write_bytes(data)
        with pytest.raises(DataError) as whole:
            read_text(path)
        for size in (3, 16, 100):
            with pytest.raises(DataError) as blocked:
                for offset, block, _, _ in read_blocks(path, TOKENIZERS[kind].block_cut, size):
                    decode_block(path, block, offset)
            assert str(blocked.value) == str(whole.value)
        replaced = "".join(decode_block(path, block, offset, "replace") for offset, block, _, _
                           in read_blocks(path, TOKENIZERS[kind].block_cut, 5))
        assert replaced == read_text(path, "replace")


def test_block_size_is_kept_where_the_text_allows(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes(b"one two three four\n" * 5000)
    blocks = blocks_of(path, TOKENIZERS["word"].block_cut, 4096)
    assert len(blocks) > 20 and max(len(d) for _, d, _, _ in blocks) <= 4096


def test_a_file_that_changes_while_read_is_refused(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes(b"one two\n" * 100)
    reader = read_blocks(path, len, 16)
    next(reader)
    with open(path, "ab") as f:
        f.write(b"more\n")
    with pytest.raises(DataError, match="changed while being read"):
        list(reader)

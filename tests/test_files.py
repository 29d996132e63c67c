"""Tests of cllm_cli/files.py: which files a corpus is made of, and reading their text."""
import pytest

from cllm_cli.files import DataError, collect_files, read_text
from helpers import write


# ---------------------------------------------------------------------------------------
# collect_files
# ---------------------------------------------------------------------------------------

def test_collect_directory_recursive_sorted(tmp_path):
    for name in ["b.txt", "a.txt", "sub/c.txt", "sub/deeper/a.txt", "z.txt", "notes.md"]:
        write(tmp_path / "corpus" / name, "x")
    files = collect_files([tmp_path / "corpus"])
    rel = [p.relative_to(tmp_path / "corpus").as_posix() for p in files]
    assert rel == ["a.txt", "b.txt", "sub/c.txt", "sub/deeper/a.txt", "z.txt"]


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


def test_collect_glob_pattern(tmp_path):
    write(tmp_path / "a.txt", "x")
    write(tmp_path / "b.md", "x")
    write(tmp_path / "s" / "c.md", "x")
    files = collect_files([tmp_path], pattern="*.md")
    assert [p.name for p in files] == ["b.md", "c.md"]


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

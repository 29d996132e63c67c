"""train_model --tensorboard: the event files read back with a TFRecord reader of our own
(lengths and masked CRC-32C checked) and tensorboardX's protobuf classes, against the metrics
file of the same run; rank 0 alone writes under mpiexec; the missing extra and an unwritable
directory refused before the corpus is read; a resumed run's file; a stop signal and kill -9."""
import errno
import json
import os
import re
import signal
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers import ROOT, TINY_RUN, assert_bit_identical, assert_one_error_line, call, corpus_text, finish
from tensorboardX.proto.event_pb2 import Event, SessionLog

from cllm_cli.cli.train import main

# TINY_RUN with its output shown (samples and the header are printed, not only the summary)
TINY = [a for a in TINY_RUN if a != "--quiet"]
TAGS = {"loss": "train/loss", "epoch": "train/epoch", "lr": "train/lr",
        "grad_norm": "train/grad_norm", "tokens_per_s": "train/tokens_per_s",
        "exchange_bytes": "train/exchange_bytes", "exchange_seconds": "train/exchange_seconds",
        "val_loss": "val/loss", "val_ppl": "val/ppl", "val_bpb": "val/bpb"}
SAMPLE_TAG = "sample/text_summary"


# --- reading event files ------------------------------------------------------------------------

def _crc32c_table():
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1      # Castagnoli, reflected
        table.append(crc)
    return table


CRC32C_TABLE = _crc32c_table()


def crc32c(data):
    crc = 0xFFFFFFFF
    for byte in data:
        crc = CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc(data):
    """TFRecord's masked CRC: the CRC-32C rotated right by 15 bits plus a constant."""
    crc = crc32c(data)
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def test_crc32c_known_values():
    # the check value of CRC-32C (RFC 3720's iSCSI CRC) and of an empty input
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(b"") == 0
    assert crc32c(bytes(32)) == 0x8A9136AA      # RFC 3720 B.4: 32 bytes of zeros


def read_records(path, partial_tail=False):
    """The payloads of a TFRecord file: uint64 length, uint32 masked CRC of the length, the
    payload, uint32 masked CRC of the payload (little-endian). A cut-off last record is an
    error unless partial_tail (a process killed outright)."""
    data = path.read_bytes()
    records, at = [], 0
    while at < len(data):
        if len(data) - at < 12:
            assert partial_tail, f"{path}: {len(data) - at} stray bytes at the end"
            break
        header = data[at:at + 8]
        (length,), (header_crc,) = struct.unpack("<Q", header), struct.unpack("<I", data[at + 8:at + 12])
        assert header_crc == masked_crc(header), f"{path}: bad length CRC at offset {at}"
        end = at + 12 + length + 4
        if end > len(data):
            assert partial_tail, f"{path}: the record at offset {at} is cut off"
            break
        payload = data[at + 12:at + 12 + length]
        (payload_crc,) = struct.unpack("<I", data[end - 4:end])
        assert payload_crc == masked_crc(payload), f"{path}: bad payload CRC at offset {at}"
        records.append(payload)
        at = end
    return records


def read_events(path, partial_tail=False):
    events = [Event.FromString(r) for r in read_records(path, partial_tail)]
    assert events[0].file_version == "brain.Event:2", events[0]
    return events


def event_files(directory):
    """The event files of `directory` in the order TensorBoard reads them (by name)."""
    files = sorted(p for p in directory.iterdir() if "tfevents" in p.name)
    assert sorted(directory.iterdir()) == files, "only event files in the directory"
    return files


def session_start(events):
    """The step of the file's session start (from there on earlier files are dropped)."""
    starts = [e.step for e in events if e.HasField("session_log")]
    assert len(starts) == 1 and events[1].session_log.status == SessionLog.START, events[:2]
    return starts[0]


def contents(events):
    """{(tag, step): value}: scalars as floats, texts as str; no (tag, step) twice."""
    seen = {}
    for e in events:
        for v in e.summary.value:
            assert (v.tag, e.step) not in seen, f"{v.tag} at step {e.step} twice"
            if v.HasField("tensor"):
                assert v.metadata.plugin_data.plugin_name == "text", v
                seen[v.tag, e.step] = v.tensor.string_val[0].decode("utf-8")
            else:
                seen[v.tag, e.step] = v.simple_value
    return seen


def tensorboard_view(files):
    """What TensorBoard shows of these files: each file's session start drops what the files
    read before it hold from that step on."""
    shown = {}
    for path in files:
        events = read_events(path)
        start = session_start(events)
        shown = {key: value for key, value in shown.items() if key[1] < start}
        shown.update(contents(events))
    return shown


def metrics(path):
    """{(tag, step): value} of a metrics file, as float32 (what an event holds); the last
    record of a step wins, as for cllm_plot; null values (skipped steps) left out."""
    expected = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        for key, value in record.items():
            if key != "step" and value is not None:
                expected[TAGS[key], record["step"]] = float(np.float32(value))
    return expected


def samples(stdout, steps):
    lines = [line[len("sample: "):] for line in stdout.splitlines() if line.startswith("sample: ")]
    assert len(lines) == len(steps), stdout
    return {(SAMPLE_TAG, step): text for step, text in zip(steps, lines)}


# --- a run ---------------------------------------------------------------------------------------

def test_the_events_hold_what_the_metrics_file_holds(corpus, tmp_path, capsys):
    tb, m = tmp_path / "tb", tmp_path / "m.jsonl"
    code, out, err = call(capsys, main, corpus, "--checkpoint-dir", tmp_path / "ck", *TINY,
                          "--eval-interval", "2", "--sample-every", "2", "--metrics-file", m,
                          "--tensorboard", tb)
    assert code == 0, err
    [path] = event_files(tb)
    events = read_events(path)
    assert session_start(events) == 1
    got = contents(events)
    expected = metrics(m)
    assert {tag for tag, _ in expected} == {"train/loss", "train/epoch", "train/lr",
                                            "train/grad_norm", "train/tokens_per_s", "val/loss",
                                            "val/ppl", "val/bpb"}
    assert sorted({step for tag, step in expected if tag == "train/loss"}) == [1, 2, 3, 4]
    assert sorted({step for tag, step in expected if tag == "val/bpb"}) == [2, 4]
    expected.update(samples(out, steps=[2, 4]))
    assert got == expected
    # logging changes nothing: the same run without it ends on the same bits
    code, _, err = call(capsys, main, corpus, "--checkpoint-dir", tmp_path / "plain", *TINY,
                        "--eval-interval", "2", "--sample-every", "2")
    assert code == 0, err
    assert_bit_identical(tmp_path / "plain" / "final_model.cllm",
                         tmp_path / "ck" / "final_model.cllm")


@pytest.mark.parametrize("with_option", [True, False])
def test_tensorboardx_is_imported_only_with_the_option(corpus, tmp_path, with_option):
    program = ("import sys; from cllm_cli.cli.train import main; code = main(sys.argv[1:]); "
               "print('tensorboardX imported:', 'tensorboardX' in sys.modules); sys.exit(code)")
    option = ["--tensorboard", str(tmp_path / "tb")] if with_option else []
    p = subprocess.run([sys.executable, "-c", program, str(corpus), "--checkpoint-dir",
                        str(tmp_path / "ck"), *TINY_RUN, *option],
                       cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert f"tensorboardX imported: {with_option}" in p.stdout, p.stdout
    assert (tmp_path / "tb").is_dir() == with_option


def test_a_failing_event_file_is_reported_once_and_training_goes_on(corpus, tmp_path, capsys,
                                                                     monkeypatch):
    import tensorboardX

    class FullDisk(tensorboardX.RecordWriter):
        """Its first flush (the file's start) succeeds, the next ones find the disk full."""
        flushes = 0

        def flush(self):
            FullDisk.flushes += 1
            if FullDisk.flushes > 1:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            super().flush()

    monkeypatch.setattr(tensorboardX, "RecordWriter", FullDisk)
    ck, tb, m = tmp_path / "ck", tmp_path / "tb", tmp_path / "m.jsonl"
    code, _, err = call(capsys, main, corpus, "--checkpoint-dir", ck, *TINY_RUN, "--eval-interval",
                        "2", "--metrics-file", m, "--tensorboard", tb)
    assert code == 0, err
    [path] = event_files(tb)
    assert err.splitlines() == [f"train_model: warning: cannot write the TensorBoard events {path} "
                                f"(No space left on device); events stop here"]
    assert FullDisk.flushes == 2, "no more writing after the failure"
    assert sorted(step for tag, step in metrics(m) if tag == "train/loss") == [1, 2, 3, 4]
    assert (ck / "final_model.cllm").is_file()


# --- refused before anything is read -------------------------------------------------------------

def test_without_tensorboardx_the_option_names_the_extra(corpus, tmp_path):
    # None in sys.modules makes `import tensorboardX` fail, as when it is not installed
    program = ("import sys; sys.modules['tensorboardX'] = None; "
               "from cllm_cli.cli.train import main; sys.exit(main())")
    ck, tb = tmp_path / "ck", tmp_path / "tb"
    p = subprocess.run([sys.executable, "-c", program, str(corpus), "--checkpoint-dir", str(ck),
                        *TINY_RUN, "--tensorboard", str(tb)],
                       cwd=ROOT, capture_output=True, text=True)
    assert_one_error_line(p.returncode, p.stderr, "train_model", "--tensorboard", "tensorboardX",
                          "pip install '.[tensorboard]'", status=2)
    assert not ck.exists() and not tb.exists(), "refused before anything is written"


@pytest.mark.parametrize("where, why", [("a file", "it is a file, not a directory"),
                                        ("below a file", "Not a directory")])
def test_an_unwritable_directory_is_refused_before_the_corpus_is_read(corpus, tmp_path, capsys,
                                                                       where, why):
    afile = tmp_path / "afile"
    afile.write_text("a regular file\n")
    tb = afile if where == "a file" else afile / "tb"
    ck = tmp_path / "ck"
    code, _, err = call(capsys, main, corpus, "--checkpoint-dir", ck, *TINY_RUN, "--tensorboard", tb)
    assert_one_error_line(code, err, "train_model", f"cannot write --tensorboard {tb}: {why}",
                          status=2)
    assert not ck.exists(), "refused before the checkpoint directory is made"
    assert afile.read_text() == "a regular file\n"


@pytest.mark.parametrize("name", ["vocab.txt", "dataset.bin", "final_model.cllm"])
def test_a_directory_named_as_one_of_the_runs_own_files_is_refused(corpus, tmp_path, capsys,
                                                                    name):
    """--tensorboard naming a file the run writes in --checkpoint-dir is refused before the
    corpus is read: the event directory once took the name first, and the run failed after
    tokenizing or, at final_model.cllm, after all its training."""
    ck = tmp_path / "ck"
    tb = ck / name
    code, _, err = call(capsys, main, corpus, "--checkpoint-dir", ck, *TINY_RUN, "--tensorboard", tb)
    assert_one_error_line(code, err, "train_model", f"--tensorboard {tb}", "the run writes",
                          status=2)
    assert not ck.exists(), "refused before the checkpoint directory is made"


@pytest.mark.parametrize("inside", [True, False], ids=["in the checkpoint dir", "apart"])
def test_a_run_refused_during_set_up_leaves_no_tensorboard_directory(tmp_path, capsys, inside):
    """The directories --tensorboard would make are not left behind by a run refused after
    the check (here an empty corpus): with DIR inside a new --checkpoint-dir, that directory
    too is removed as a refused run's is; the existing parent is kept."""
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    ck = tmp_path / "ck"
    tb = ck / "tb" if inside else tmp_path / "tb" / "a" / "b"
    code, _, err = call(capsys, main, empty, "--checkpoint-dir", ck, *TINY_RUN,
                        "--tensorboard", tb)
    assert_one_error_line(code, err, "train_model", "corpus is empty", status=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.txt"]


# --- resuming --------------------------------------------------------------------------------------

def test_a_resumed_run_continues_at_its_step_in_a_file_of_its_own(corpus, tmp_path, capsys):
    ck, tb, m = tmp_path / "ck", tmp_path / "tb", tmp_path / "m.jsonl"
    argv = [corpus, "--checkpoint-dir", ck, *TINY, "--eval-interval", "2", "--save-interval", "2",
            "--metrics-file", m, "--tensorboard", tb]
    code, _, err = call(capsys, main, *argv)
    assert code == 0, err
    [first] = event_files(tb)
    straight = contents(read_events(first))
    # as if the run had been killed after step 4, before its checkpoint: resume from step 2
    (ck / "checkpoint_step_4.cllm").unlink()
    (ck / "final_model.cllm").unlink()
    code, _, err = call(capsys, main, *argv, "--resume")
    assert code == 0, err
    files = event_files(tb)
    assert len(files) == 2 and files[0] == first, files
    resumed = read_events(files[1])
    assert session_start(resumed) == 3
    assert {e.step for e in resumed if e.summary.value} == {3, 4}
    # TensorBoard's view of both files is the metrics file's (the last record of a step wins)
    assert tensorboard_view(files) == metrics(m)
    # and the resumed steps give the straight run's figures (the resume is bit for bit)
    again = contents(resumed)
    for tag in ("train/loss", "train/grad_norm", "train/lr", "val/loss", "val/bpb"):
        assert again[tag, 4] == straight[tag, 4], tag


# --- many processes ----------------------------------------------------------------------------------

def on_two_ranks(*argv):
    mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    assert os.path.exists(mpiexec), "mpiexec missing: make installs the mpich wheel"
    return subprocess.run([mpiexec, "-n", "2", sys.executable, "-m", "cllm_cli.cli.train",
                           *map(str, argv), "--threads", "1"], cwd=ROOT, capture_output=True,
                          text=True)


def test_under_mpiexec_rank_0_alone_writes(corpus, tmp_path):
    tb, m = tmp_path / "tb", tmp_path / "m.jsonl"
    p = on_two_ranks(corpus, "--checkpoint-dir", tmp_path / "ck", *TINY, "--eval-interval", "2",
                     "--metrics-file", m, "--tensorboard", tb)
    assert p.returncode == 0, p.stderr
    pids = dict(re.findall(r"rank (\d) pid (\d+)", p.stdout))
    assert set(pids) == {"0", "1"}, p.stdout
    [path] = event_files(tb)
    assert path.name.endswith(f".{pids['0']}"), (path.name, pids)
    expected = metrics(m)
    assert ("train/exchange_bytes", 4) in expected
    assert contents(read_events(path)) == expected


def test_under_mpiexec_an_unwritable_directory_stops_every_rank_with_one_line(corpus, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("a regular file\n")
    p = on_two_ranks(corpus, "--checkpoint-dir", tmp_path / "ck", *TINY_RUN,
                     "--tensorboard", afile / "tb")
    assert_one_error_line(p.returncode, p.stderr, "train_model", "cannot write --tensorboard",
                          status=2)
    assert not (tmp_path / "ck").exists()


# --- stopping ------------------------------------------------------------------------------------------

# steps of a few tenths of a second, so that a signal lands inside the run
BIG = ["--embed-dim", "96", "--num-layers", "2", "--num-heads", "2", "--seq-len", "32",
       "--batch-size", "384", "--micro-batch", "4", "--max-steps", "8", "--warmup-steps", "3",
       "--tokenizer", "word", "--vocab-size", "120", "--eval-interval", "2", "--eval-tokens", "200",
       "--log-interval", "1", "--seed", "5", "--threads", "2"]


@pytest.fixture
def long_corpus(tmp_path):
    p = tmp_path / "long.txt"
    p.write_text(corpus_text(2400), encoding="utf-8")
    return p


def start(long_corpus, ck, tb, m):
    return subprocess.Popen([sys.executable, "-m", "cllm_cli.cli.train", str(long_corpus), *BIG,
                             "--checkpoint-dir", str(ck), "--metrics-file", str(m),
                             "--tensorboard", str(tb)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def read_until(proc, pattern):
    """stdout lines up to and with the first matching `pattern`; the run must still be going."""
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if re.match(pattern, line):
            return seen
    proc.wait()
    raise AssertionError(f"the run ended first:\n{''.join(seen)}{proc.stderr.read()}")


@pytest.mark.slow
def test_a_new_event_file_sorts_after_every_earlier_one(tmp_path):
    """TensorBoard reads a directory's event files in name order: a resume started within the
    same second as the run it continues (or with a clock behind it), whose pid sorts first,
    must still come after it."""
    from cllm_cli.training.tensorboard import event_file_name
    later = int(time.time()) + 100
    earlier_run = tmp_path / f"events.out.tfevents.{later}.host.99999999"
    earlier_run.write_bytes(b"")
    new = event_file_name(str(tmp_path))
    assert sorted([str(earlier_run), new])[-1] == new


def test_sigterm_closes_the_file_and_resume_continues(long_corpus, tmp_path, capsys):
    ck, tb, m = tmp_path / "ck", tmp_path / "tb", tmp_path / "m.jsonl"
    proc = start(long_corpus, ck, tb, m)
    try:
        read_until(proc, r"step 1/")
        proc.send_signal(signal.SIGTERM)
    finally:
        out, err = finish(proc)
    assert proc.returncode == 143, err
    [saved] = ck.glob("checkpoint_step_*.cllm")
    n = int(saved.stem.rsplit("_", 1)[1])
    assert 1 <= n < 8
    [first] = event_files(tb)
    got = contents(read_events(first))          # whole records only: the file was closed
    assert got == metrics(m)
    assert sorted(step for tag, step in got if tag == "train/loss") == list(range(1, n + 1))
    code, _, err = call(capsys, main, long_corpus, *BIG, "--checkpoint-dir", ck, "--resume",
                        "--quiet", "--metrics-file", m, "--tensorboard", tb)
    assert code == 0, err
    files = event_files(tb)
    assert len(files) == 2 and session_start(read_events(files[1])) == n + 1
    view = tensorboard_view(files)
    assert view == metrics(m)
    assert sorted(step for tag, step in view if tag == "train/loss") == list(range(1, 9))


@pytest.mark.slow
def test_an_evaluation_is_on_disk_when_the_process_is_killed_after_it(long_corpus, tmp_path):
    ck, tb, m = tmp_path / "ck", tmp_path / "tb", tmp_path / "m.jsonl"
    proc = start(long_corpus, ck, tb, m)
    try:
        read_until(proc, r"step 2 \| val loss")
        read_until(proc, r"step 3/")            # the evaluation's record was written before
        proc.send_signal(signal.SIGKILL)
    finally:
        finish(proc)
    assert proc.returncode == -signal.SIGKILL, "killed while it ran"
    [path] = event_files(tb)
    got = contents(read_events(path, partial_tail=True))
    expected = {key: value for key, value in metrics(m).items() if key[1] <= 2}
    assert {key: got.get(key) for key in expected} == expected

"""--init-from by Hugging Face Hub name, against a real huggingface_hub cache laid out on disk
(HF_HOME of the test's own) and read offline (HF_HUB_OFFLINE=1): the cached snapshot of the
repository's main or of a --revision is what trains, nothing cached is one line, and a local
directory of the same name wins over the Hub."""
import subprocess
import sys

import pytest
from helpers import (
    ROOT,
    assert_bit_identical,
    assert_one_error_line,
    checkout_env,
    gpt2_directory,
    sentences,
    write,
)

REPO = "cllm-test/tiny-gpt2"
MAIN, TAGGED = "a" * 40, "b" * 40       # the commits refs/main and refs/v1 point at
TRAIN = ["--max-steps", "2", "--batch-size", "4", "--micro-batch", "2", "--seq-len", "16",
         "--eval-interval", "0", "--sample-every", "0", "--threads", "1"]


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """HF_HOME holding REPO in huggingface_hub's cache layout: two snapshots (main and the tag
    v1, different weights), each a transformers directory, and the refs naming them."""
    home = tmp_path_factory.mktemp("hf_home")
    repo = home / "hub" / ("models--" + REPO.replace("/", "--"))
    text = sentences(60, seed=5, punct=".")
    for ref, commit, seed in (("main", MAIN, 0), ("v1", TAGGED, 1)):
        gpt2_directory(repo / "snapshots" / commit, text, seed=seed)
        write(repo / "refs" / ref, commit)
    return home, text


def train(tmp_path, hub_home, *argv, cwd=None):
    env = checkout_env(HF_HOME=str(hub_home), HF_HUB_OFFLINE="1")
    env.pop("HF_HUB_CACHE", None)
    return subprocess.run([sys.executable, "-m", "cllm_cli.cli.train", *map(str, argv), *TRAIN],
                          cwd=cwd or ROOT, env=env, capture_output=True, text=True)


def test_a_hub_name_trains_from_the_cached_snapshot(hub, tmp_path):
    home, text = hub
    corpus = write(tmp_path / "c.txt", text)
    by_name = train(tmp_path, home, corpus, "--init-from", REPO, "--checkpoint-dir",
                    tmp_path / "by_name")
    assert by_name.returncode == 0, by_name.stderr
    snapshot = home / "hub" / ("models--" + REPO.replace("/", "--")) / "snapshots" / MAIN
    assert f"initialised from {REPO} (from {snapshot})" in by_name.stdout
    by_path = train(tmp_path, home, corpus, "--init-from", snapshot, "--checkpoint-dir",
                    tmp_path / "by_path")
    assert by_path.returncode == 0, by_path.stderr
    assert_bit_identical(tmp_path / "by_name" / "final_model.cllm",
                         tmp_path / "by_path" / "final_model.cllm")
    for name in ("tokenizer.json", "dataset.bin"):
        assert (tmp_path / "by_name" / name).read_bytes() == (tmp_path / "by_path" / name).read_bytes()


def test_a_revision_takes_that_snapshot(hub, tmp_path):
    home, text = hub
    corpus = write(tmp_path / "c.txt", text)
    runs = {}
    for revision in ("v1", TAGGED):
        ck = tmp_path / revision
        p = train(tmp_path, home, corpus, "--init-from", REPO, "--revision", revision,
                  "--checkpoint-dir", ck)
        assert p.returncode == 0, p.stderr
        runs[revision] = ck / "final_model.cllm"
    main = tmp_path / "main"
    assert train(tmp_path, home, corpus, "--init-from", REPO, "--checkpoint-dir",
                 main).returncode == 0
    assert_bit_identical(runs["v1"], runs[TAGGED])
    assert (main / "final_model.cllm").read_bytes() != runs["v1"].read_bytes()


def test_nothing_cached_offline_is_one_line(hub, tmp_path):
    home, text = hub
    corpus = write(tmp_path / "c.txt", text)
    ck = tmp_path / "ck"
    p = train(tmp_path, home, corpus, "--init-from", "cllm-test/not-cached", "--checkpoint-dir", ck)
    assert_one_error_line(p.returncode, p.stderr, "train_model", "cllm-test/not-cached",
                          "not in the Hugging Face cache", str(home / "hub"))
    assert not ck.exists()
    p = train(tmp_path, home, corpus, "--init-from", REPO, "--revision", "v9",
              "--checkpoint-dir", ck)
    assert_one_error_line(p.returncode, p.stderr, "train_model", "revision v9")
    assert not ck.exists()


def test_a_local_directory_of_that_name_wins(hub, tmp_path):
    """cllm-test/tiny-gpt2 as a directory under the working directory is read as it is, not
    from the cache, and --revision is refused with it."""
    home, text = hub
    corpus = write(tmp_path / "c.txt", text)
    local = gpt2_directory(tmp_path / REPO, text, seed=7)
    p = train(tmp_path, home, corpus, "--init-from", REPO, "--checkpoint-dir", tmp_path / "ck",
              cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert f"initialised from {REPO} (AdamW" in p.stdout
    by_path = train(tmp_path, home, corpus, "--init-from", local, "--checkpoint-dir",
                    tmp_path / "ck2")
    assert by_path.returncode == 0, by_path.stderr
    assert_bit_identical(tmp_path / "ck" / "final_model.cllm", tmp_path / "ck2" / "final_model.cllm")
    p = train(tmp_path, home, corpus, "--init-from", REPO, "--revision", "v1",
              "--checkpoint-dir", tmp_path / "ck3", cwd=tmp_path)
    assert_one_error_line(p.returncode, p.stderr, "train_model", "--revision", "local path")


def test_revision_without_init_from_is_refused(hub, tmp_path):
    home, text = hub
    corpus = write(tmp_path / "c.txt", text)
    p = train(tmp_path, home, corpus, "--revision", "v1", "--checkpoint-dir", tmp_path / "ck")
    assert_one_error_line(p.returncode, p.stderr, "train_model", "--revision", "--init-from")

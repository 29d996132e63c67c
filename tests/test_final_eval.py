"""The final evaluation: bounded by --final-eval-tokens, its share of the split printed, and
final_model.cllm written before it, so that stopping it loses nothing."""
import os
import signal
import subprocess
import sys
import time

from helpers import ROOT, sentences, write

from cllm_cli.cli.train import main as train_main
from cllm_cli.training.config import TrainConfig

TINY = ["--tokenizer", "word", "--vocab-size", "200", "--embed-dim", "16", "--num-layers", "1",
        "--num-heads", "2", "--seq-len", "16", "--batch-size", "4", "--threads", "1"]


def test_the_default_is_bounded():
    assert 0 < TrainConfig().final_eval_tokens <= 1_000_000


def test_a_bounded_final_evaluation_says_its_share(tmp_path, capsys):
    corpus = write(tmp_path / "corpus.txt", sentences(600, 2, ".!?"))
    code = train_main([str(corpus), *TINY, "--max-steps", "2", "--val-fraction", "0.5",
                       "--final-eval-tokens", "160", "--checkpoint-dir", str(tmp_path / "run")])
    out = capsys.readouterr().out
    assert code == 0
    header = next(line for line in out.splitlines() if line.startswith("validation:"))
    assert "at the end on 10 (" in header and "% of them)" in header
    final = [line for line in out.splitlines() if line.startswith("step 2 | val loss")]
    assert len(final) == 1 and "% of the validation split" in final[0]


def test_a_stop_during_the_final_evaluation_keeps_the_final_model(tmp_path):
    corpus = write(tmp_path / "corpus.txt", sentences(60_000, 4, ".!?"))
    run = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-m", "cllm_cli.cli.train", str(corpus), *TINY,
                          "--max-steps", "1", "--val-fraction", "0.9", "--final-eval-tokens", "0",
                          "--checkpoint-dir", str(run), "--quiet"],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while not (run / "final_model.cllm").exists() and p.poll() is None:
        time.sleep(0.01)             # polls for the file, nothing is timed
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate()
    assert p.returncode == 128 + signal.SIGTERM, err
    assert "interrupted by SIGTERM" in err
    again = subprocess.run([sys.executable, "-m", "cllm_cli.cli.train", str(corpus), "--resume",
                            "--checkpoint-dir", str(run)], cwd=ROOT, capture_output=True,
                           text=True)
    assert again.returncode == 0, again.stderr
    assert "already complete" in again.stdout
    assert os.path.getsize(run / "final_model.cllm") > 0

"""Resume, Ctrl-C, NaN, your own text, torchrun and pictures: `python -m pytest tests/test_runs.py`."""

import csv
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import play
import train as train_script
import utils
from conftest import ROOT, listen_to_ctrl_c
from config import make_config
from smoll import pictures
from smoll.files import SmollError
from train import last_path, train
from utils import load_model

TINY = dict(n_layer=1, n_embd=32, n_head=2, block_size=16, batch_size=8, dropout=0.1, max_iters=30,
            eval_interval=10, eval_iters=2, device="cpu", dtype="float32")
TINY_FLAGS = [x for k, v in TINY.items() for x in (f"--{k}", str(v))]


# float16 also resumes its gradient scaler; Muon its momentum buffers beside AdamW's moments. The
# Muon run also stops inside a sequence-length warmup and resumes across its end.
@pytest.mark.parametrize("dtype, optimizer", [("float32", "adamw"), ("float16", "adamw"), ("float32", "muon")])
def test_resume_ends_exactly_where_the_uninterrupted_run_ends(tmp_path, tiny_text, monkeypatch, dtype,
                                                              optimizer):
    seq_warmup = 20 if optimizer == "muon" else 0
    config = make_config(**{**TINY, "dtype": dtype, "optimizer": optimizer, "seq_warmup": seq_warmup})
    straight = tmp_path / "straight.pth"
    train(config, tiny_text, str(straight), sample_chars=0)

    # Stop the second run at step 13, between evaluations, as a Ctrl-C would, then resume it.
    real_stop = train_script.stop_requested
    monkeypatch.setattr(train_script, "stop_requested",
                        lambda stop, step, *args: step == 13 or real_stop(stop, step, *args))
    resumed = tmp_path / "resumed.pth"
    assert train(config, tiny_text, str(resumed), sample_chars=0)["interrupted"] == 13
    assert torch.load(last_path(str(resumed)), weights_only=True)["step"] == 13
    monkeypatch.setattr(train_script, "stop_requested", real_stop)
    result = train(make_config(device="cpu", dtype=dtype), tiny_text, str(resumed), sample_chars=0,
                   resume=True)

    a = torch.load(last_path(str(straight)), weights_only=True)
    b = torch.load(last_path(str(resumed)), weights_only=True)
    assert a["step"] == b["step"] == 30 and a["scaler"] == b["scaler"]
    for key in a["model_state"]:
        torch.testing.assert_close(a["model_state"][key], b["model_state"][key], rtol=0, atol=1e-6)
    assert len(a["optimizer"]) == len(b["optimizer"]) == (2 if optimizer == "muon" else 1)
    for saved_a, saved_b in zip(a["optimizer"], b["optimizer"]):
        assert saved_a["state"].keys() == saved_b["state"].keys() and saved_a["state"]
        for key, buffers in saved_a["state"].items():
            for name, value in buffers.items():  # AdamW's moments and step; Muon's momentum
                torch.testing.assert_close(value, saved_b["state"][key][name], rtol=0, atol=1e-6)
    assert [h["val_loss"] for h in a["history"]] == [h["val_loss"] for h in b["history"]]
    assert [h["step"] for h in b["history"]] == [0, 10, 20, 30]  # no step evaluated twice
    assert result["best_step"] == a["best_step"]


def test_resume_needs_a_saved_run_and_keeps_its_hyperparameters(tmp_path, tiny_text, capsys):
    with pytest.raises(SmollError, match="does not exist"):
        train(make_config(**TINY), tiny_text, str(tmp_path / "none.pth"), resume=True)
    with pytest.raises(SystemExit):
        train_script.main(["--resume", "--out", str(tmp_path / "x.pth"), "--n_layer", "3"])
    assert "drop --n_layer" in capsys.readouterr().err
    done = tmp_path / "done.pth"
    train(make_config(**TINY), tiny_text, str(done), sample_chars=0)
    before = done.read_bytes()
    with pytest.raises(SmollError, match="already finished, at step 30"):
        train(make_config(**TINY), tiny_text, str(done), resume=True)
    assert done.read_bytes() == before  # a finished run is left as it is
    timed = tmp_path / "timed.pth"  # a timed run finishes long before max_iters
    train(make_config(**{**TINY, "time_budget": 2.0}), tiny_text, str(timed), sample_chars=0)
    before = timed.read_bytes()
    with pytest.raises(SmollError, match="already finished"):
        train(make_config(**TINY), tiny_text, str(timed), resume=True)
    assert timed.read_bytes() == before


@pytest.mark.parametrize("sent", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_saves_a_playable_checkpoint_and_says_how_to_resume(tmp_path, tiny_text, sent):
    """Ctrl-C, and SIGTERM (kill, a job scheduler, the explorer's Stop), stop a run the same way."""
    out = tmp_path / "run.pth"
    flags = [f for f in TINY_FLAGS] + ["--max_iters", "100000", "--eval_interval", "20"]
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), "--data", tiny_text,
                             "--out", str(out), *flags], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, encoding="utf-8",
                            preexec_fn=listen_to_ctrl_c)
    deadline = time.time() + 120
    for line in proc.stdout:  # wait until the run has saved twice, then press Ctrl-C
        if "step    20" in line or time.time() > deadline:
            break
    proc.send_signal(sent)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert f"python train.py --resume --out {os.path.relpath(out)}" in stdout
    state = torch.load(last_path(str(out)), weights_only=True)
    assert state["step"] >= 20 and "optimizer" in state
    result = subprocess.run([sys.executable, os.path.join(ROOT, "play.py"), "--weights", str(out),
                             "--length", "20", "--device", "cpu"], capture_output=True, text=True)
    assert result.returncode == 0 and len(result.stdout) == 21


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, tiny_text):
    out = tmp_path / "run.pth"
    config = make_config(**{**TINY, "learning_rate": 1e30, "warmup_iters": 0, "grad_clip": 0.0})
    with pytest.raises(SmollError, match="training diverged"):
        train(config, tiny_text, str(out), sample_chars=0)
    model, _, _ = load_model(str(out))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_training_and_playing_on_text_in_any_alphabet(tmp_path, capsys):
    text = ("Ça, c'est la vie: naïve façade! 東京は大きい都市です。 🙂🚀 Ñandú, Ærø, Ωμέγα.\n" * 120)
    path = tmp_path / "mixed.txt"
    path.write_text(text, encoding="utf-8")
    out = tmp_path / "mixed.pth"
    train(make_config(**TINY), str(path), str(out), sample_chars=20)
    model, tokenizer, _ = load_model(str(out))
    assert set("東京🙂ÇÆΩ") <= set(tokenizer.chars)
    capsys.readouterr()
    play.main(["--weights", str(out), "--prompt", "東京は", "--length", "30", "--seed", "0"])
    generated = capsys.readouterr().out
    assert generated.startswith("東京は") and len(generated) == len("東京は") + 30 + 1
    assert set(generated) <= set(tokenizer.chars)


def test_torchrun_with_two_gloo_processes_trains_and_saves_one_checkpoint(tmp_path, shakespeare):
    out = tmp_path / "ddp.pth"
    # A text past utils.BIG_TEXT_BYTES, so that the processes share one token file (smoll/data.py)
    big_text = tmp_path / "big.txt"
    big_text.write_text(shakespeare * (utils.BIG_TEXT_BYTES // len(shakespeare) + 1), encoding="utf-8")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               os.path.join(ROOT, "train.py"), "--data", str(big_text), "--out", str(out), *TINY_FLAGS,
               "--grad_accum", "2"]  # DDP syncs the gradients after the second micro-batch only
    for attempt in range(2):
        env = {k: v for k, v in os.environ.items() if k != "SMOLL_CACHE"}  # the token file goes beside the text
        result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                                env={**env, "OMP_NUM_THREADS": "1"})
        # In about 1 full-suite run in 10 on the 2-core machine, a gloo process aborted (SIGABRT)
        # before any smoll code reported a problem; never in 23 runs of this test alone. One retry,
        # for that abort only: any other failure, or two aborts, fails the test.
        if result.returncode == 0 or "Signal 6 (SIGABRT)" not in result.stderr:
            break
        print(f"torchrun attempt {attempt + 1} aborted (SIGABRT):\n{result.stderr[-4000:]}")
        for name in os.listdir(tmp_path):  # start the second attempt from the same empty folder
            if name not in ("tiny.txt", "big.txt"):
                shutil.rmtree(tmp_path / name) if (tmp_path / name).is_dir() else (tmp_path / name).unlink()
    assert result.returncode == 0, result.stderr[-12000:]
    assert result.stdout.count("validation loss") == 1  # only rank 0 reports
    assert sorted(os.listdir(tmp_path)) == [".smoll_cache", "big.txt", "ddp.csv", "ddp.last.pth", "ddp.png",
                                            "ddp.pth"]
    # both ranks read one memory-mapped token file, which the first rank wrote alone
    assert sorted(os.path.splitext(n)[1] for n in os.listdir(tmp_path / ".smoll_cache")) == [".bin", ".json"]
    state = torch.load(last_path(str(out)), weights_only=True)
    assert state["run"]["world_size"] == 2
    rank0, rank1 = state["rng"]
    assert not torch.equal(rank0["batch"], rank1["batch"])  # each rank draws its own batches
    load_model(str(out))


def test_every_run_writes_its_history_csv_and_loss_curve(tmp_path, tiny_text):
    pytest.importorskip("matplotlib")
    out = tmp_path / "run.pth"
    result = train(make_config(**TINY), tiny_text, str(out), sample_chars=0)
    with open(tmp_path / "run.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [0, 10, 20, 30]
    assert [float(r["val_loss"]) for r in rows] == [h["val_loss"] for h in result["history"]]
    assert (tmp_path / "run.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    checkpoint = torch.load(out, weights_only=True)
    assert checkpoint["history"] == result["history"]
    assert checkpoint["run"]["full_val_loss"] == pytest.approx(result["full_val"], abs=1e-4)
    assert {"git_commit", "device", "dtype", "torch", "train_time_s"} <= set(checkpoint["run"])


def test_training_runs_without_matplotlib(tmp_path, tiny_text, monkeypatch, capsys):
    def no_matplotlib():
        raise SmollError("drawing pictures needs matplotlib: `pip install matplotlib`.")

    monkeypatch.setattr(pictures, "import_pyplot", no_matplotlib)
    train(make_config(**TINY), tiny_text, str(tmp_path / "run.pth"), sample_chars=0)
    assert "no loss curve: drawing pictures needs matplotlib" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path)) == ["run.csv", "run.last.pth", "run.pth", "tiny.txt"]


def test_attention_maps_are_causal_distributions_and_drawn(tmp_path, tiny_text, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "run.pth"
    train(make_config(**TINY), tiny_text, str(out), sample_chars=0)
    model, tokenizer, _ = load_model(str(out))
    maps = model.attention_maps(torch.tensor([tokenizer.encode("To be or not")]))
    assert maps.shape == (1, 2, 12, 12)
    torch.testing.assert_close(maps.sum(-1), torch.ones(1, 2, 12))
    assert maps.triu(diagonal=1).abs().max() == 0  # nothing attends to the future
    picture = tmp_path / "attention.png"
    play.main(["--weights", str(out), "--attention", str(picture), "--prompt", "To be or not"])
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "1 layers x 2 heads over 12 characters" in capsys.readouterr().out


def test_attention_of_a_bigram_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        play.main(["--model", "bigram", "--attention", str(tmp_path / "a.png"), "--prompt", "To be"])
    assert "has no attention to draw" in capsys.readouterr().err


def test_eval_only_compares_checkpoints_side_by_side(tmp_path, tiny_text, capsys):
    a, b = tmp_path / "a.pth", tmp_path / "b.pth"
    train(make_config(**TINY), tiny_text, str(a), sample_chars=0)
    train(make_config(**{**TINY, "max_iters": 10}), tiny_text, str(b), sample_chars=0)
    capsys.readouterr()
    train_script.main(["--eval_only", "--weights", str(a), str(b), "--data", tiny_text])
    out = capsys.readouterr().out
    for key in ("full val loss", "git commit", "trained on", "step"):
        assert key in out
    assert "30 of 30" in out and "10 of 10" in out

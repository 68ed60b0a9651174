"""bench.py: run with `python -m pytest tests/test_bench.py`. It checks what bench.py reports,
not how fast anything is: speed is measured by running bench.py itself."""

import math

import pytest
import torch

from config import make_config
from smoll import bench
from train import train


def test_bench_reports_training_and_sampling_with_the_reference(capsys):
    bench.main(["--n_layer", "1", "--n_embd", "32", "--n_head", "2", "--block_size", "16",
                "--batch_size", "4", "--train_steps", "2", "--sample_chars", "20",
                "--reference_chars", "5", "--device", "cpu", "--dtype", "float32", "--breakdown"])
    out = capsys.readouterr().out
    for expected in ("where the step goes: forward and backward ", "AdamW's step", "device: ", "| torch ", "matmul peak (float32", "training (float32, eager, ", "attention, train.py's train_step):",
                     "% of the matmul peak", "nanoGPT-style reference (float32, eager, same size):", "smoll trains",
                     "nanoGPT-style generate (float32, no cache):",
                     "smoll with the KV cache, float32:", "smoll with the KV cache, bfloat16:",
                     "x the nanoGPT-style generate", "fastest sampling path here: ", "G parameter-tokens/s"):
        assert expected in out


def test_bench_sampling_only_reports_parameter_tokens_from_the_model_size(capsys):
    bench.main(["--n_layer", "1", "--n_embd", "32", "--n_head", "2", "--block_size", "16", "--sampling_only",
                "--sample_chars", "20", "--reference_chars", "5", "--device", "cpu", "--dtype", "float32"])
    out = capsys.readouterr().out
    assert "training (" not in out and "nanoGPT-style reference" not in out
    line = next(line for line in out.splitlines() if "smoll with the KV cache, float32:" in line)
    chars_per_s = float(line.split("float32: ")[1].split(" chars/s")[0].replace(",", ""))
    n_params = sum(p.numel() for p in bench.build_model(make_config(
        n_layer=1, n_embd=32, n_head=2, block_size=16), bench.VOCAB).parameters())
    assert f"({n_params / 1e6:.2f}M parameters)" in line
    reported = float(line.split(" | ")[1].split(" G ")[0])
    assert reported == pytest.approx(chars_per_s * n_params / 1e9, rel=0.02, abs=0.006)


def test_bench_times_train_py_s_own_train_step(monkeypatch):
    calls = []
    real_step = bench.train_step
    monkeypatch.setattr(bench, "train_step",
                        lambda run, model, scale: calls.append(run.step) or real_step(run, model, scale))
    config = make_config(n_layer=1, n_embd=32, n_head=2, block_size=16, batch_size=4, seq_warmup=5,
                         device="cpu", dtype="float32", eval_iters=1)
    t = bench.bench_training(config, bench.get_device("cpu"), steps=2)
    assert calls == [5, 5, 5]  # one untimed and two timed steps, all past the sequence-length warmup
    assert t["tokens_per_s"] == pytest.approx(4 * 16 / (t["ms_per_step"] / 1000))


def test_the_breakdown_times_the_parts_of_the_step_and_leaves_dropout_as_it_was(monkeypatch):
    config = make_config(n_layer=1, n_embd=32, n_head=2, block_size=16, batch_size=4, dropout=0.2,
                         optimizer="muon", device="cpu", dtype="float32", eval_iters=1)
    t = bench.bench_training(config, bench.get_device("cpu"), steps=2)
    passes = []
    real_timed = bench.timed
    monkeypatch.setattr(bench, "timed", lambda fn, device, repeats: passes.append(
        [m.p for m in t["run"].model.modules() if isinstance(m, torch.nn.Dropout)]) or real_timed(fn, device, repeats))
    parts = bench.step_breakdown(t["run"], t["step_model"], bench.get_device("cpu"), repeats=2)
    assert list(parts) == ["forward and backward", "the same without dropout", "AdamW's step", "Muon's step"]
    assert all(s > 0 for s in parts.values())
    assert passes[0] == [0.2, 0.2, 0.2] and passes[1] == [0.0, 0.0, 0.0]  # timed with dropout, then without
    assert all(m.p == 0.2 for m in t["run"].model.modules() if isinstance(m, torch.nn.Dropout))
    assert all(p.grad is None for p in t["run"].model.parameters())  # nothing left for a next step


def test_a_breakdown_without_training_is_refused(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--breakdown", "--sampling_only"])
    assert "--breakdown times the parts of the training step, which --sampling_only skips" in capsys.readouterr().err


def test_bench_names_the_cpu_and_its_extensions(monkeypatch):
    monkeypatch.setattr(bench, "cpu_extensions", lambda: ["AVX2", "AMX-BF16"])
    line = bench.describe_machine(bench.get_device("cpu"))
    assert line.startswith("device: ") and "(AVX2, AMX-BF16)" in line and torch.__version__ in line


@pytest.mark.parametrize("n_layer", [1, 2])
def test_window_quality_compares_the_cache_with_rerunning_the_window(n_layer, tmp_path, tiny_text):
    out = tmp_path / "m.pth"
    train(make_config(n_layer=n_layer, n_embd=32, n_head=4, block_size=16, batch_size=8, max_iters=30,
                      eval_interval=30, eval_iters=2, device="cpu", dtype="float32"),
          tiny_text, str(out), sample_chars=0)
    sliding, rerun, n = bench.window_quality(str(out), tiny_text, n_texts=3)
    assert n == 3 * 3 * 16 and math.isfinite(sliding) and math.isfinite(rerun)
    if n_layer == 1:  # one layer: relative positions make the two exactly the same computation
        assert sliding == pytest.approx(rerun, abs=1e-5)
    else:  # deeper layers differ slightly past the window
        assert sliding != pytest.approx(rerun, abs=1e-6)


def test_window_quality_names_its_own_flag_for_a_missing_file(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--window_quality", str(tmp_path / "missing.pth")])
    assert exit_info.value.code == 1
    assert "pass an existing file with --window_quality" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--train_steps", "--sample_chars", "--reference_chars"])
def test_bench_refuses_counts_below_one(flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main([flag, "0"])
    assert exit_info.value.code == 2
    assert f"{flag} must be at least 1, got 0" in capsys.readouterr().err

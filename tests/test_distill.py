"""Ensembles and distillation: `python -m pytest tests/test_distill.py`."""

import math
import os

import pytest
import torch
import torch.nn.functional as F

import train as train_script
from config import make_config
from models import build_model, cross_entropy
from smoll import eval_table
from smoll.ensemble import Ensemble, distillation_loss
from smoll.files import SmollError
from train import last_path, train
from utils import eval_loss, load_model, load_text_ids, split_data

TINY = dict(n_layer=1, n_embd=32, n_head=2, block_size=16, batch_size=8, dropout=0.1, max_iters=30,
            eval_interval=10, eval_iters=2, device="cpu", dtype="float32")


def members(n=3, vocab=11):
    """n untrained TinyGPTs of different sizes and seeds, in eval mode."""
    models = []
    for i in range(n):
        torch.manual_seed(i)
        config = make_config(n_layer=1 + i % 2, n_embd=16 * (1 + i % 2), n_head=2, block_size=12, dropout=0.0)
        models.append(build_model(config, vocab).eval())
    return models


def test_an_ensemble_predicts_the_mean_of_its_members_probabilities():
    models = members()
    idx = torch.randint(0, 11, (2, 12))
    targets = torch.randint(0, 11, (2, 12))
    log_probs, loss = Ensemble(models)(idx, targets)
    probs = torch.stack([F.softmax(m(idx)[0], dim=-1) for m in models]).mean(0)  # (B, T, V)
    torch.testing.assert_close(log_probs.exp(), probs, rtol=1e-5, atol=1e-7)
    expected = -probs.gather(-1, targets.unsqueeze(-1)).log().mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    mean_of_logits = F.softmax(torch.stack([m(idx)[0] for m in models]).mean(0), dim=-1)
    assert not torch.allclose(mean_of_logits, probs, atol=1e-4)  # it is not the other average
    # With a temperature, each member is softened before the average.
    soft = torch.stack([F.softmax(m(idx)[0] / 2.0, dim=-1) for m in models]).mean(0)
    torch.testing.assert_close(Ensemble(models).log_probs(idx, 2.0).exp(), soft, rtol=1e-5, atol=1e-7)


def test_distillation_loss_is_cross_entropy_at_weight_0_and_adds_the_kl_divergence():
    torch.manual_seed(0)
    logits, teacher_logits = torch.randn(2, 5, 7) * 3, torch.randn(2, 5, 7) * 3
    targets = torch.randint(0, 7, (2, 5))
    teacher = F.log_softmax(teacher_logits / 2.0, dim=-1)
    assert torch.equal(distillation_loss(logits, targets, teacher, weight=0.0, temperature=2.0),
                       cross_entropy(logits, targets))
    # By hand: the mean over positions of sum_v p_t (log p_t - log p_s), at temperature 2, times 4.
    p_t, log_p_s = teacher.exp(), F.log_softmax(logits / 2.0, dim=-1)
    kl = (p_t * (teacher - log_p_s)).sum(-1).mean()
    torch.testing.assert_close(distillation_loss(logits, targets, teacher, weight=0.25, temperature=2.0),
                               0.75 * cross_entropy(logits, targets) + 0.25 * 4 * kl)
    # A student that already predicts what its teacher does has nothing left to learn from it.
    same = F.log_softmax(logits, dim=-1)
    assert distillation_loss(logits, targets, same, weight=1.0).abs() < 1e-6


def test_eval_only_scores_the_ensemble_beside_its_members(tmp_path, tiny_text, capsys):
    paths = []
    for seed in (1, 2):
        paths.append(str(tmp_path / f"m{seed}.pth"))
        train(make_config(**{**TINY, "seed": seed}), tiny_text, paths[-1], sample_chars=0)
    capsys.readouterr()
    rows = eval_table.eval_only(paths, tiny_text, "cpu", ensemble=True)
    out = capsys.readouterr().out
    assert "ensemble of 2" in out and "mean of their probabilities" in out
    losses = [float(r["full val loss"].split()[0]) for r in rows]
    # -log of a mean is at most the mean of -logs at every character (Jensen), so over the split too.
    assert losses[2] <= (losses[0] + losses[1]) / 2
    # A model with itself is the model.
    model, tokenizer, config = load_model(paths[0])
    ids, _ = load_text_ids(tiny_text)
    _, val = split_data(ids, config.block_size)
    alone, _ = eval_loss(model, val, config.block_size)
    twice, _ = eval_loss(Ensemble([model, model]), val, config.block_size)
    assert twice == pytest.approx(alone, abs=1e-5) and alone == pytest.approx(losses[0], abs=1e-4)


def test_ensemble_and_teacher_flags_say_what_they_need(tmp_path, tiny_text, capsys):
    with pytest.raises(SystemExit):
        train_script.main(["--ensemble", "--data", tiny_text])
    assert "--ensemble scores several checkpoints together" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_script.main(["--eval_only", "--weights", "a.pth", "--ensemble"])
    with pytest.raises(SystemExit):
        train_script.main(["--resume", "--teacher", "a.pth", "--out", str(tmp_path / "x.pth")])
    assert "drop --teacher" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_script.main(["--teacher", "a.pth", "--distill_weight", "1.5"])
    assert "--distill_weight must be in [0, 1]" in capsys.readouterr().err


@pytest.fixture
def teacher(tmp_path, tiny_text):
    path = str(tmp_path / "teacher.pth")
    train(make_config(**{**TINY, "n_embd": 48, "seed": 7, "max_iters": 40}), tiny_text, path, sample_chars=0)
    return path


def test_a_teacher_at_weight_0_changes_nothing_and_at_weight_1_changes_the_run(tmp_path, tiny_text, teacher):
    plain, weight0, weight1 = (str(tmp_path / f"{name}.pth") for name in ("plain", "w0", "w1"))
    train(make_config(**TINY), tiny_text, plain, sample_chars=0)
    train(make_config(**TINY, distill_weight=0.0), tiny_text, weight0, sample_chars=0, teachers=[teacher])
    train(make_config(**TINY, distill_weight=1.0), tiny_text, weight1, sample_chars=0, teachers=[teacher])
    a, b, c = (torch.load(last_path(p), weights_only=True) for p in (plain, weight0, weight1))
    for key in a["model_state"]:
        assert torch.equal(a["model_state"][key], b["model_state"][key]), key
    assert not torch.equal(a["model_state"]["lm_head.weight"], c["model_state"]["lm_head.weight"])
    (saved,) = c["run"]["teachers"]
    assert saved["path"] == os.path.abspath(teacher) and len(saved["sha256"]) == 64
    teacher_time = torch.load(teacher, weights_only=True)["run"]["train_time_s"]
    assert saved["train_time_s"] == pytest.approx(teacher_time, abs=0.1) and teacher_time > 0


def test_a_distilled_run_resumes_exactly(tmp_path, tiny_text, teacher, monkeypatch):
    config = make_config(**TINY, distill_weight=0.7, distill_temperature=2.0)
    straight, resumed = str(tmp_path / "straight.pth"), str(tmp_path / "resumed.pth")
    train(config, tiny_text, straight, sample_chars=0, teachers=[teacher, teacher])
    real_stop = train_script.stop_requested
    monkeypatch.setattr(train_script, "stop_requested",
                        lambda stop, step, *args: step == 13 or real_stop(stop, step, *args))
    assert train(config, tiny_text, resumed, sample_chars=0, teachers=[teacher, teacher])["interrupted"] == 13
    monkeypatch.setattr(train_script, "stop_requested", real_stop)
    train(make_config(device="cpu", dtype="float32"), tiny_text, resumed, sample_chars=0, resume=True)
    a, b = (torch.load(last_path(p), weights_only=True) for p in (straight, resumed))
    assert a["step"] == b["step"] == 30
    for key in a["model_state"]:
        torch.testing.assert_close(a["model_state"][key], b["model_state"][key], rtol=0, atol=1e-6)
    assert [h["val_loss"] for h in a["history"]] == [h["val_loss"] for h in b["history"]]
    assert len(b["run"]["teachers"]) == 2
    model, _, _ = load_model(resumed)  # the best checkpoint is a plain one: play.py samples it
    assert model.lm_head.weight.shape[1] == 32


def test_a_resumed_run_refuses_a_changed_teacher_and_a_teacher_of_other_characters(tmp_path, tiny_text,
                                                                                  teacher, monkeypatch):
    out = str(tmp_path / "student.pth")
    monkeypatch.setattr(train_script, "stop_requested", lambda stop, step, *args: step == 5)
    train(make_config(**TINY), tiny_text, out, sample_chars=0, teachers=[teacher])
    other = tmp_path / "other.pth"
    train(make_config(**{**TINY, "max_iters": 10}), tiny_text, str(other), sample_chars=0)
    os.replace(other, teacher)  # another checkpoint now stands where the teacher was
    with pytest.raises(SmollError, match="is not the file it was: put the same checkpoint back"):
        train(make_config(device="cpu"), tiny_text, out, sample_chars=0, resume=True)

    accents = tmp_path / "accents.txt"
    accents.write_text("é à ç ü " * 400, encoding="utf-8")
    with pytest.raises(SmollError, match="knows other characters than this run's text"):
        train(make_config(**TINY), str(accents), str(tmp_path / "s2.pth"), sample_chars=0, teachers=[teacher])
    assert math.isfinite(torch.load(teacher, weights_only=True)["val_loss"])


def test_training_time_counts_a_teacher_once(tmp_path, tiny_text, teacher, capsys):
    student = str(tmp_path / "student.pth")
    train(make_config(**{**TINY, "max_iters": 10}), tiny_text, student, sample_chars=0, teachers=[teacher])
    own = {p: torch.load(p, weights_only=True)["run"]["train_time_s"] for p in (teacher, student)}
    rows = eval_table.eval_only([teacher, student], tiny_text, "cpu", ensemble=True)
    total, rest = rows[1]["training time"].split(" s (")
    assert float(total) == pytest.approx(own[teacher] + own[student], abs=1)
    assert rest == f"{own[student]:.0f} s + 1 teacher(s))"
    assert rows[2]["training time"].endswith(" s in all")
    in_all = float(rows[2]["training time"].split()[0])
    assert in_all == pytest.approx(own[teacher] + own[student], abs=1)  # not the teacher twice

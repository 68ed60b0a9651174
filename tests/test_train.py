"""Training, data, checkpoints and evaluation: run with `python -m pytest tests/test_train.py`."""

import math
import os

import pytest
import torch
import torch.nn.functional as F

import train as train_script
from smoll import speed
from config import Config, make_config
from models import Bigram, TinyGPT
from smoll.muon import Muon
from train import lr_scale, make_optimizers, train
from utils import (CharTokenizer, SmollError, batch_shape, eval_loss, get_batch, load_model,
                   save_checkpoint, split_data)


def test_batches_are_windows_and_targets_are_inputs_shifted_by_one():
    data = torch.arange(1000)
    x, y = get_batch(data, batch_size=16, block_size=32, generator=torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (16, 32)
    assert torch.equal(y, x + 1)  # data[i] == i, so the next character is the id plus one
    assert torch.equal(x[:, 1:], x[:, :-1] + 1)  # each row is one contiguous window
    assert x.min() >= 0 and y.max() <= 999


def test_split_is_first_90_percent_train_last_10_percent_val():
    data = torch.arange(1000)
    train_data, val_data = split_data(data, block_size=8)
    assert torch.equal(train_data, data[:900]) and torch.equal(val_data, data[900:])
    with pytest.raises(SmollError, match="too short"):
        split_data(data, block_size=100)


def test_lr_schedule_warms_up_then_decays_to_min_lr():
    config = make_config(warmup_iters=100, max_iters=1000, min_lr_ratio=0.1)
    assert lr_scale(0, config) == pytest.approx(1 / 101)
    assert lr_scale(100, config) == pytest.approx(1.0)  # the peak, right after warmup
    assert lr_scale(550, config) == pytest.approx(0.55)  # half-way down the cosine
    assert lr_scale(1000, config) == pytest.approx(0.1)
    scales = [lr_scale(s, config) for s in range(100, 1001)]
    assert all(a >= b for a, b in zip(scales, scales[1:]))


def test_linear_schedule_holds_the_peak_then_cools_down_in_a_straight_line():
    config = make_config(schedule="linear", cooldown=0.4, warmup_iters=100, max_iters=1100, min_lr_ratio=0.0)
    assert lr_scale(50, config) == pytest.approx(51 / 101)
    assert lr_scale(100, config) == lr_scale(700, config) == pytest.approx(1.0)  # constant for 60%
    assert lr_scale(900, config) == pytest.approx(0.5)  # half-way through the cooldown
    assert lr_scale(1100, config) == pytest.approx(0.0)
    assert lr_scale(900, make_config(schedule="linear", cooldown=0.0, max_iters=1100)) == 1.0  # no cooldown


def test_bigram_reaches_the_count_based_optimum(tmp_path, shakespeare, monkeypatch):
    """The best a bigram can do on its training text is the entropy of the bigram counts."""
    monkeypatch.setattr(train_script, "DEFAULT_OUT", {"bigram": str(tmp_path / "b.pth")})
    text_path = tmp_path / "shakespeare.txt"
    text_path.write_text(shakespeare, encoding="utf-8")
    result = train(make_config(model="bigram", device="cpu", dtype="float32"), str(text_path), sample_chars=0)

    model, tok, config = load_model(str(tmp_path / "b.pth"))
    data = torch.tensor(tok.encode(shakespeare))
    train_data, _ = split_data(data, config.block_size)
    counts = torch.zeros(tok.vocab_size, tok.vocab_size)
    counts.index_put_((train_data[:-1], train_data[1:]), torch.ones(len(train_data) - 1), accumulate=True)
    probs = counts / counts.sum(1, keepdim=True).clamp(min=1)
    optimum = -probs[train_data[:-1], train_data[1:]].log().mean().item()  # about 2.45 nats

    with torch.no_grad():
        logits, _ = model(train_data[:-1].view(1, -1))
        model_loss = F.cross_entropy(logits[0], train_data[1:]).item()
    assert optimum - 1e-4 <= model_loss <= optimum + 0.01
    assert result["full_val"] <= 2.50


def test_small_tinygpt_overfits_one_batch(shakespeare):
    torch.manual_seed(0)
    tok = CharTokenizer.from_text(shakespeare)
    data = torch.tensor(tok.encode(shakespeare[:5000]))
    x, y = get_batch(data, 4, 32, torch.Generator().manual_seed(0))
    model = TinyGPT(make_config(n_layer=2, n_embd=64, n_head=4, block_size=32, dropout=0.0), tok.vocab_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        _, loss = model(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert loss.item() < 0.1


def test_checkpoint_round_trips_through_load_model(tmp_path, tiny_config):
    torch.manual_seed(0)
    tok = CharTokenizer.from_text("abcdefgh\n ")
    model = TinyGPT(tiny_config, tok.vocab_size).eval()
    path = str(tmp_path / "m.pth")
    save_checkpoint(path, model, tiny_config, tok, step=7, val_loss=1.5)

    raw = torch.load(path, weights_only=True)
    assert raw["step"] == 7 and raw["val_loss"] == 1.5 and raw["vocab"] == tok.chars
    assert all(v.dtype == torch.float16 for v in raw["model_state"].values())  # half-size storage

    loaded, loaded_tok, loaded_config = load_model(path)
    assert isinstance(loaded, TinyGPT) and not loaded.training
    assert loaded_config == tiny_config and loaded_tok.chars == tok.chars
    # The loaded model is exactly the original with its weights rounded to float16.
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
    x = torch.randint(tok.vocab_size, (2, 16))
    assert torch.equal(model(x)[0], loaded(x)[0])


def test_checkpoint_model_type_comes_from_the_file(tmp_path):
    tok = CharTokenizer.from_text("xyz")
    path = str(tmp_path / "b.pth")
    save_checkpoint(path, Bigram(make_config(model="bigram"), 3), make_config(model="bigram"), tok, 0, 1.0)
    model, _, config = load_model(path)
    assert isinstance(model, Bigram) and config.model == "bigram"


def test_a_failed_save_leaves_the_old_checkpoint_untouched(tmp_path, tiny_config, monkeypatch):
    tok = CharTokenizer.from_text("abc")
    model = TinyGPT(tiny_config, 3)
    path = tmp_path / "m.pth"
    save_checkpoint(str(path), model, tiny_config, tok, 1, 2.0)
    before = path.read_bytes()

    def crash_mid_write(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt  # as if Ctrl-C landed during the write

    monkeypatch.setattr(torch, "save", crash_mid_write)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(str(path), model, tiny_config, tok, 2, 1.0)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["m.pth"]  # no temp file left behind


def test_load_model_gives_clear_errors(tmp_path, tiny_config):
    with pytest.raises(SmollError, match="does not exist"):
        load_model(str(tmp_path / "missing.pth"))

    good = tmp_path / "good.pth"
    save_checkpoint(str(good), TinyGPT(tiny_config, 5), tiny_config, CharTokenizer.from_text("abcde"), 0, 1.0)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(SmollError, match="not a readable smoll checkpoint"):
        load_model(str(truncated))

    text = tmp_path / "notes.pth"
    text.write_text("hello", encoding="utf-8")
    with pytest.raises(SmollError, match="not a readable smoll checkpoint"):
        load_model(str(text))

    foreign = tmp_path / "foreign.pth"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, foreign)
    with pytest.raises(SmollError, match="not a smoll checkpoint"):
        load_model(str(foreign))

    mismatched = torch.load(good, weights_only=True)
    mismatched["config"]["n_embd"] = 64
    torch.save(mismatched, tmp_path / "mismatched.pth")
    with pytest.raises(SmollError, match="does not match"):
        load_model(str(tmp_path / "mismatched.pth"))


def test_eval_loss_counts_every_position_once():
    """A bigram's loss at a position does not depend on the window, so the windowed full
    evaluation must equal the plain mean over all consecutive pairs, the last short window included."""
    torch.manual_seed(0)
    model = Bigram(make_config(model="bigram"), 11)
    torch.nn.init.normal_(model.token_embedding_table.weight)
    data = torch.randint(11, (1003,))  # 1002 targets: 143 windows of 7 and a tail of 1
    logits, _ = model(data[:-1].view(1, -1))
    expected = F.cross_entropy(logits[0], data[1:]).item()
    loss, n_scored = eval_loss(model, data, block_size=7, batch_size=10)
    assert n_scored == 1002
    assert loss == pytest.approx(expected, rel=1e-5)


def test_training_is_reproducible_and_keeps_the_previous_checkpoint(tmp_path, tiny_config, tiny_text):
    out = tmp_path / "m.pth"
    out.write_bytes(b"earlier weights")
    first = train(tiny_config, tiny_text, str(out), sample_chars=0)
    assert (tmp_path / "m.prev.pth").read_bytes() == b"earlier weights"
    weights = torch.load(out, weights_only=True)["model_state"]

    second = train(tiny_config, tiny_text, str(out), sample_chars=0)
    assert (first["best_val"], first["full_val"]) == (second["best_val"], second["full_val"])
    assert [h["val_loss"] for h in first["history"]] == [h["val_loss"] for h in second["history"]]
    again = torch.load(out, weights_only=True)["model_state"]
    assert all(torch.equal(weights[k], again[k]) for k in weights)
    assert first["full_val"] < math.log(len(set(open(tiny_text, encoding="utf-8").read())))


def test_config_layers_defaults_model_defaults_preset_and_overrides():
    assert make_config() == Config()
    bigram = make_config(model="bigram")
    assert bigram.learning_rate == 0.1 and bigram.dropout == 0.0
    cpu = make_config(preset="cpu", n_layer=5)
    assert cpu.n_layer == 5 and cpu.n_embd == 128  # the override beats the preset, the preset the default
    assert cpu.time_budget == 300 and make_config(preset="cpu_10min").time_budget == 600
    assert make_config(preset="cpu_30min").n_layer == 6 and make_config(preset="cpu_60min").time_budget == 3600


def test_on_off_flags_parse_both_ways():
    import argparse
    from config import add_config_args, config_from_args
    parser = add_config_args(argparse.ArgumentParser())
    parser.add_argument("--model", default="tinygpt")
    parser.add_argument("--preset")
    on = config_from_args(parser.parse_args(["--qk_norm", "on", "--zero_init", "true"]))
    assert on.qk_norm is True and on.zero_init is True
    off = config_from_args(parser.parse_args(["--preset", "cpu_10min", "--qk_norm", "off", "--zero_init", "0"]))
    assert off.qk_norm is False and off.zero_init is False  # a flag turns off what the preset turned on
    assert make_config(preset="cpu_10min").qk_norm is True


@pytest.mark.parametrize("overrides, message", [
    (dict(n_embd=100, n_head=6), "not divisible"),
    (dict(n_layer=0), "positive"),
    (dict(block_size=-8), "positive"),
    (dict(learning_rate=0.0), "positive"),
    (dict(learning_rate=-1e-3), "positive"),
    (dict(dropout=1.0), "dropout"),
    (dict(model="gpt5"), "unknown model"),
    (dict(preset="gpu9000"), "unknown preset"),
])
def test_bad_config_values_are_rejected_with_a_reason(overrides, message):
    with pytest.raises(ValueError, match=message):
        make_config(**overrides)


def test_lr_schedule_follows_the_time_budget():
    config = make_config(learning_rate=1e-3, warmup_iters=10, min_lr_ratio=0.1, time_budget=100.0)
    assert lr_scale(0, config, elapsed=0.0) == pytest.approx(1 / 11)  # warmup still counts steps
    assert lr_scale(10, config, elapsed=0.0) == pytest.approx(1.0)
    assert lr_scale(5000, config, elapsed=50.0) == pytest.approx(0.55)  # half the budget spent
    assert lr_scale(99999, config, elapsed=100.0) == pytest.approx(0.1)  # max_iters plays no part
    assert lr_scale(99999, config, elapsed=130.0) == pytest.approx(0.1)


def test_a_time_budget_stops_the_run_on_time(tmp_path, tiny_config, tiny_text):
    config = make_config(**{**tiny_config.__dict__, "time_budget": 3.0, "max_iters": 10,
                            "eval_interval": 50})
    result = train(config, tiny_text, str(tmp_path / "m.pth"), sample_chars=0)
    run = torch.load(tmp_path / "m.pth", weights_only=True)["run"]
    assert 2.0 < run["train_time_s"] <= 3.5  # training and its last evaluation fit the budget
    assert result["history"][-1]["step"] > 10  # max_iters does not stop a timed run
    assert result["history"][-1]["lr"] == pytest.approx(config.learning_rate * config.min_lr_ratio,
                                                        rel=0.2)  # it ends at the bottom of the schedule


def test_seq_warmup_trains_on_half_contexts_twice_as_many_first(tmp_path, tiny_config, tiny_text, monkeypatch):
    config = make_config(**{**tiny_config.__dict__, "seq_warmup": 3, "max_iters": 6, "eval_interval": 100})
    assert [batch_shape(step, config) for step in range(6)] == [(16, 8)] * 3 + [(8, 16)] * 3
    assert batch_shape(0, tiny_config) == (8, 16)  # off by default

    shapes = []
    real_get_batch = train_script.get_batch

    def recording_get_batch(data, batch_size, block_size, *args, **kwargs):
        x, y = real_get_batch(data, batch_size, block_size, *args, **kwargs)
        shapes.append(tuple(x.shape))
        return x, y

    monkeypatch.setattr(train_script, "get_batch", recording_get_batch)
    train(config, tiny_text, str(tmp_path / "m.pth"), sample_chars=0)
    assert shapes[-6:] == [(16, 8)] * 3 + [(8, 16)] * 3  # the six training steps' batches, in order


def test_muon_owns_the_blocks_matrices_and_its_step_changes_only_them():
    config = make_config(n_layer=2, n_embd=32, n_head=4, block_size=16, dropout=0.0, optimizer="muon",
                         weight_decay=0.0, muon_lr=0.02)
    torch.manual_seed(0)
    model = TinyGPT(config, 65)
    adamw, muon = make_optimizers(model, config, torch.device("cpu"))
    owned = lambda opt: {id(p) for group in opt.param_groups for p in group["params"]}
    hidden = {id(p) for p in model.blocks.parameters() if p.dim() == 2}
    assert owned(muon) == hidden  # qkv, attention and MLP projections of every block
    assert owned(adamw) == {id(p) for p in model.parameters()} - hidden  # embeddings, head, norms
    assert all(model.get_parameter(name).dim() == 2 for name in ("token_embedding.weight", "lm_head.weight"))

    x, y = torch.randint(65, (4, 16)), torch.randint(65, (4, 16))
    model(x, y)[1].backward()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    muon.step()
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) != (id(p) in hidden), name  # Muon moved its own, only
    # Its update is the orthogonalised momentum, times the lr scaled by sqrt(rows / cols) for tall
    # matrices: five Newton-Schulz steps bring the gradient's singular values close to 1 (between
    # about 0.5 and 1.5; the very smallest lag behind).
    fc = model.blocks[0].mlp.fc  # weight (128, 32)
    step = (before["blocks.0.mlp.fc.weight"] - fc.weight.detach()) / (0.02 * math.sqrt(128 / 32))
    grad_sv, step_sv = torch.linalg.svdvals(fc.weight.grad), torch.linalg.svdvals(step)
    assert grad_sv.max() / grad_sv.median() > 3  # the gradient has a few dominant directions
    assert step_sv.max() < 1.6 and (step_sv > 0.5).float().mean() > 0.9  # the step has none

    adamw.step()
    for name, p in model.named_parameters():
        if id(p) not in hidden:
            assert not torch.equal(p, before[name]), name


@pytest.mark.parametrize("nesterov, weight_decay", [(True, 0.1), (False, 0.0)])
def test_smolls_muon_steps_as_torch_optim_muon_does(nesterov, weight_decay):
    """smoll.muon.Muon orthogonalises same-shaped matrices together: the same arithmetic as
    torch.optim.Muon, matrix by matrix, with the same state, so their checkpoints are interchangeable."""
    shapes = [(96, 32), (32, 32), (32, 128), (96, 32), (32, 32), (32, 128), (7, 5)]

    def matrices():
        torch.manual_seed(0)
        return [torch.nn.Parameter(0.02 * torch.randn(*shape)) for shape in shapes]

    ours, theirs = matrices(), matrices()
    kwargs = dict(lr=0.02, weight_decay=weight_decay, nesterov=nesterov)
    optimizers = Muon(ours, **kwargs), torch.optim.Muon(theirs, **kwargs)
    for step in range(4):
        generator = torch.Generator().manual_seed(step)
        for a, b in zip(ours, theirs):
            a.grad = torch.randn(a.shape, generator=generator)
            b.grad = a.grad.clone()
        for optimizer in optimizers:
            optimizer.step()
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert all((a - start).abs().max() > 1e-3 for a, start in zip(ours, matrices()))  # they did move
    state = optimizers[0].state_dict()
    assert state["state"].keys() == optimizers[1].state_dict()["state"].keys()
    resumed = torch.optim.Muon(matrices(), **kwargs)
    resumed.load_state_dict(state)  # a checkpoint of either optimizer loads into the other
    for i in range(len(shapes)):
        torch.testing.assert_close(resumed.state_dict()["state"][i]["momentum_buffer"],
                                   optimizers[1].state_dict()["state"][i]["momentum_buffer"])


def test_bfloat16_autocast_matches_float32():
    torch.manual_seed(0)
    model = TinyGPT(make_config(n_layer=2, n_embd=64, n_head=4, block_size=32, dropout=0.0), 65)
    x, y = torch.randint(65, (4, 32)), torch.randint(65, (4, 32))
    _, loss32 = model(x, y)
    grads32 = torch.autograd.grad(loss32, list(model.parameters()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss16 = model(x, y)
    grads16 = torch.autograd.grad(loss16, list(model.parameters()))
    assert loss16.dtype == torch.float32  # the loss is computed in float32 even under autocast
    assert abs(loss16.item() - loss32.item()) < 0.01
    flat32 = torch.cat([g.flatten() for g in grads32])
    flat16 = torch.cat([g.flatten().float() for g in grads16])
    assert F.cosine_similarity(flat32, flat16, dim=0) > 0.99


def test_a_compiled_run_saves_plain_keys_and_matches_an_uncompiled_run(tmp_path, tiny_config, tiny_text):
    from torch._dynamo.utils import counters

    # With a sequence-length warmup the step takes two shapes of batch: each gets its own graph.
    config = make_config(**{**tiny_config.__dict__, "seq_warmup": 5})
    eager = train(config, tiny_text, str(tmp_path / "eager.pth"), sample_chars=0)
    graphs_before = counters["stats"]["unique_graphs"]
    compiled = train(make_config(**{**config.__dict__, "compile": "on"}), tiny_text,
                     str(tmp_path / "compiled.pth"), sample_chars=0)
    assert counters["stats"]["unique_graphs"] >= graphs_before + 2  # the step really was compiled, twice
    for name in ("compiled.pth", "compiled.last.pth"):
        keys = torch.load(tmp_path / name, weights_only=True)["model_state"]
        assert not any(k.startswith("_orig_mod.") for k in keys)
    load_model(str(tmp_path / "compiled.pth"))
    for a, b in zip(eager["history"], compiled["history"]):
        assert a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-3)


def fake_passes(monkeypatch, written_out, sdpa, compiled=None):
    """time_passes with recorded seconds per pass: by the attention the model runs, or `compiled`
    for a model that is not the run's eager one. Returns the list of what was timed."""
    timed = []

    def time_passes(run, model, batch_size, block_size, passes=2):
        if model is not run.model:
            timed.append("compiled")
            return [5.0, compiled][-passes:]  # the first pass compiles
        name = "sdpa" if run.model.blocks[0].attn.use_sdpa else "written-out"
        timed.append(name)
        return [1.0, {"written-out": written_out, "sdpa": sdpa}[name]][-passes:]

    monkeypatch.setattr(speed, "time_passes", time_passes)
    return timed


@pytest.mark.parametrize("written_out, sdpa, expected", [(0.04, 0.05, "written-out"), (0.06, 0.05, "sdpa")])
def test_the_attention_is_chosen_by_timing_and_reused(written_out, sdpa, expected, tmp_path, tiny_config,
                                                     tiny_text, monkeypatch, capsys):
    monkeypatch.setenv("SMOLL_CACHE", str(tmp_path / "cache"))
    timed = fake_passes(monkeypatch, written_out, sdpa)
    out = tmp_path / "m.pth"
    train(tiny_config, tiny_text, str(out), sample_chars=0)
    assert sorted(timed[:2]) == ["sdpa", "written-out"] and timed[2:] == [expected]  # then the step, timed
    assert f"attention: {expected}" in capsys.readouterr().out
    assert torch.load(out, weights_only=True)["run"]["attention"] == expected
    timed.clear()
    train(tiny_config, tiny_text, str(tmp_path / "again.pth"), sample_chars=0)
    assert timed == [expected]  # the same config on the same machine: the cached timings decide
    # a resumed run keeps the attention it was trained with, even if the machine now says otherwise
    real_stop = train_script.stop_requested
    monkeypatch.setattr(train_script, "stop_requested", lambda stop, step, *args: step == 13)
    stopped = tmp_path / "stopped.pth"
    assert train(tiny_config, tiny_text, str(stopped), sample_chars=0)["interrupted"] == 13
    monkeypatch.setattr(train_script, "stop_requested", real_stop)
    (tmp_path / "cache" / "training_choices.json").unlink()
    timed = fake_passes(monkeypatch, sdpa, written_out)  # now the other attention looks faster
    train(tiny_config, tiny_text, str(stopped), sample_chars=0, resume=True)
    assert torch.load(stopped, weights_only=True)["run"]["attention"] == expected and timed == [expected]


def test_a_compiled_step_no_faster_than_the_eager_one_is_dropped_unless_asked_for(
        tmp_path, tiny_config, tiny_text, monkeypatch, capsys):
    monkeypatch.setenv("SMOLL_CACHE", str(tmp_path / "cache"))
    fake_passes(monkeypatch, 0.04, 0.05, compiled=0.06)
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: Wrapped(model))  # stands in for compiling
    monkeypatch.setattr(speed, "should_compile", lambda config, device: True)  # as for a long CPU run
    train(tiny_config, tiny_text, str(tmp_path / "auto.pth"), sample_chars=0)
    assert "the compiled step (60 ms) is no faster than the eager one (40 ms) here: training uncompiled" \
        in capsys.readouterr().out
    forced = make_config(**{**tiny_config.__dict__, "compile": "on"})
    train(forced, tiny_text, str(tmp_path / "on.pth"), sample_chars=0)
    assert "training uncompiled" not in capsys.readouterr().out


def test_the_compiled_step_is_judged_against_an_eager_pass_timed_beside_it(
        tmp_path, tiny_config, tiny_text, monkeypatch, capsys):
    """The attention's timings are cached from an earlier run, maybe from a faster hour: the compiled
    step races an eager pass timed now, not them."""
    monkeypatch.setenv("SMOLL_CACHE", str(tmp_path / "cache"))
    fake_passes(monkeypatch, 0.01, 0.02)
    train(tiny_config, tiny_text, str(tmp_path / "fast_hour.pth"), sample_chars=0)  # caches 10 ms eager
    timed = fake_passes(monkeypatch, 0.08, 0.09, compiled=0.06)  # the machine is slower now: all passes are
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: Wrapped(model))
    monkeypatch.setattr(speed, "should_compile", lambda config, device: True)
    train(tiny_config, tiny_text, str(tmp_path / "slow_hour.pth"), sample_chars=0)
    out = capsys.readouterr().out
    assert "training uncompiled" not in out and "compiled the training step" in out
    assert timed[-6:] == ["written-out", "compiled"] * 3  # three rounds, in turn


class Wrapped(torch.nn.Module):
    """The same model behind another module, as torch.compile returns it."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, *args):
        return self.model(*args)

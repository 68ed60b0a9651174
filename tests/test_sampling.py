"""The KV cache and play.py's sampling modes: run with `python -m pytest tests/test_sampling.py`."""

import os
import subprocess
import sys

import pytest
import torch

import play
from conftest import ROOT
from config import make_config
from smoll.sampling.decoder import PackedLinear, pack_for_cpu_sampling
from models import KVCache, TinyGPT
from train import train

VOCAB = 20


# The CPU presets' model options: QK-norm, ReLU² and a logit cap all sit on the cached path too.
RECIPE = dict(qk_norm=True, activation="relu2", logit_cap=30.0)


def random_model(n_layer, block_size=8, **options):
    """A TinyGPT with large random weights, so that its logits are far from uniform."""
    torch.manual_seed(0)
    model = TinyGPT(make_config(n_layer=n_layer, n_embd=32, n_head=4, block_size=block_size, dropout=0.0,
                                **options), VOCAB).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.3)
    return model


def cached_logits(model, x, prompt_len=3):
    """Logits for every position of x (B, T), computed through the cache one character at a time."""
    cache = KVCache(model.block_size)
    with torch.no_grad():
        steps = [model(x[:, :prompt_len], cache=cache)[0]]
        steps += [model(x[:, t:t + 1], cache=cache)[0] for t in range(prompt_len, x.size(1))]
    return torch.cat(steps, dim=1)  # (B, T, V)


@pytest.mark.parametrize("n_layer, options", [(1, {}), (3, {}), (3, RECIPE)])
def test_cached_logits_equal_the_full_forward_within_and_past_the_window(n_layer, options):
    model = random_model(n_layer, **options)
    x = torch.randint(VOCAB, (2, 30))  # almost 4 windows of 8
    with torch.no_grad():
        full, _ = model(x)  # past block_size, each position attends to the 8 ending at itself
    torch.testing.assert_close(cached_logits(model, x), full, rtol=1e-5, atol=1e-5)


def test_within_the_window_the_cache_equals_recomputing_the_window():
    model = random_model(3)
    x = torch.randint(VOCAB, (2, 8))
    with torch.no_grad():
        reference = torch.stack([model(x[:, :t + 1])[0][:, -1] for t in range(8)], dim=1)
    torch.testing.assert_close(cached_logits(model, x), reference, rtol=1e-5, atol=1e-5)


def test_one_layer_sliding_cache_equals_recomputing_the_window_at_every_step():
    """With rotary positions, attention depends only on offsets, so a one-layer model gives the
    same logits from the cache as from rerunning the model on the last block_size characters."""
    model = random_model(1)
    x = torch.randint(VOCAB, (2, 30))
    with torch.no_grad():
        reference = torch.stack([model(x[:, max(0, t - 7):t + 1])[0][:, -1] for t in range(30)], dim=1)
    torch.testing.assert_close(cached_logits(model, x), reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n_layer", [1, 3])
def test_greedy_text_with_the_cache_equals_the_reference_decoder_within_and_past_the_window(n_layer):
    model = random_model(n_layer)
    prompt = torch.randint(VOCAB, (1, 5))
    cached = model.generate(prompt, 45, temperature=0)  # 50 characters: past 6 windows of 8
    plain = model.generate(prompt, 45, temperature=0, use_cache=False)
    assert torch.equal(cached, plain)


def test_the_reference_decoder_reads_every_character_that_can_reach_the_prediction():
    """Past the window each layer looks back block_size - 1 positions, so the last prediction of a
    3-layer model with block_size 8 depends on exactly its last 3 * 7 + 1 = 22 characters."""
    model = random_model(3)
    assert model.receptive_field == 22
    x = torch.randint(VOCAB, (2, 40))
    with torch.no_grad():
        whole = model(x)[0][:, -1]
        torch.testing.assert_close(model(x[:, -22:])[0][:, -1], whole, rtol=1e-5, atol=1e-5)
        y = x.clone()
        y[:, -23] = (y[:, -23] + 1) % VOCAB  # one character further back changes nothing
        torch.testing.assert_close(model(y)[0][:, -1], whole, rtol=1e-5, atol=1e-5)
        y[:, -22] = (y[:, -22] + 1) % VOCAB  # but the 22nd from the end does
        assert (model(y)[0][:, -1] - whole).abs().max() > 1e-4  # far above rounding (~1e-6)


def test_a_bfloat16_model_keeps_its_cache_in_float32_and_matches_its_full_forward():
    model = random_model(3).to(torch.bfloat16)
    x = torch.randint(VOCAB, (2, 30))
    cache = KVCache(model.block_size)
    with torch.no_grad():
        full, _ = model(x)
        cached = torch.cat([model(x[:, t:t + 1], cache=cache)[0] for t in range(30)], dim=1)
    assert cache.k[0].dtype == cache.v[0].dtype == torch.float32
    assert cached.dtype == torch.bfloat16
    # bfloat16 keeps about 3 significant digits; the logits here reach about 2.5
    torch.testing.assert_close(cached.float(), full.float(), rtol=0, atol=0.1)


def test_greedy_text_with_the_cache_equals_greedy_full_forward_past_the_window():
    model = random_model(3)
    idx = torch.randint(VOCAB, (1, 4))
    cached = model.generate(idx, 40, temperature=0)
    with torch.no_grad():  # the slow way: the whole text through the model for every character
        for _ in range(40):
            idx = torch.cat([idx, model(idx)[0][:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(cached, idx)


def test_sampling_with_and_without_the_cache_gives_the_same_text_for_a_seed():
    model = random_model(2)
    prompt = torch.randint(VOCAB, (1, 4))
    torch.manual_seed(7)
    cached = model.generate(prompt, 50, temperature=1.0, top_k=10, top_p=0.9)
    torch.manual_seed(7)
    plain = model.generate(prompt, 50, temperature=1.0, top_k=10, top_p=0.9, use_cache=False)
    torch.manual_seed(7)
    again = model.generate(prompt, 50, temperature=1.0, top_k=10, top_p=0.9)
    assert torch.equal(cached, plain) and torch.equal(cached, again)


def test_packed_bfloat16_linears_give_the_same_text_and_logits():
    model = random_model(2).to(torch.bfloat16)
    packed = random_model(2).to(torch.bfloat16)
    assert pack_for_cpu_sampling(random_model(2)) == 0  # float32 weights stay as they are
    n_packed = pack_for_cpu_sampling(packed)
    if n_packed == 0:
        pytest.skip("this PyTorch or CPU cannot pack bfloat16 weights for oneDNN")
    assert n_packed == 2 * 4 + 1  # qkv, proj, fc, proj per block, and the head
    assert isinstance(packed.lm_head, PackedLinear)
    assert packed.state_dict().keys() == model.state_dict().keys()
    x = torch.randint(VOCAB, (3, 20))
    with torch.no_grad():  # identical on the CI machine; the margin allows other CPUs' kernels
        torch.testing.assert_close(packed(x)[0], model(x)[0], rtol=0, atol=1e-2)
    prompt = torch.randint(VOCAB, (1, 4))
    assert torch.equal(packed.generate(prompt, 30, temperature=0), model.generate(prompt, 30, temperature=0))


def test_a_model_trains_on_long_sequences_after_sampling_past_the_window():
    """Sampling runs under no_grad; what it leaves on the model must not break training."""
    model = random_model(2)
    for use_cache in (False, True):
        model.generate(torch.randint(VOCAB, (1, 4)), 30, use_cache=use_cache)
        x = torch.randint(VOCAB, (2, 30))
        _, loss = model(x, x)
        loss.backward()
        assert model.token_embedding.weight.grad is not None


def test_a_batch_decodes_each_row_as_if_it_were_alone():
    model = random_model(2)
    prompts = torch.randint(VOCAB, (3, 5))
    batched = model.generate(prompts, 20, temperature=0)
    for row in range(3):
        assert torch.equal(batched[row], model.generate(prompts[row:row + 1], 20, temperature=0)[0])


def test_a_prompt_longer_than_the_window_is_read_in_pieces():
    model = random_model(2)
    prompt = torch.randint(VOCAB, (1, 21))  # two full windows and a bit
    with torch.no_grad():
        expected = model(prompt)[0][:, -1].argmax(-1)
    assert model.generate(prompt, 1, temperature=0)[0, -1] == expected


# ----------------------------------------------------------------------------------------------
# play.py


@pytest.fixture(scope="module")
def weights(tmp_path_factory, shakespeare):
    folder = tmp_path_factory.mktemp("sampling")
    text = folder / "tiny.txt"
    text.write_text(shakespeare[:20_000], encoding="utf-8")
    config = make_config(n_layer=2, n_embd=32, n_head=4, block_size=16, batch_size=8, max_iters=40,
                         eval_interval=20, eval_iters=2, device="cpu", dtype="float32")
    train(config, str(text), str(folder / "tiny.pth"), sample_chars=0)
    return str(folder / "tiny.pth")


def run_play(*args, stdin=None):
    return subprocess.run([sys.executable, os.path.join(ROOT, "play.py"), *args], input=stdin,
                          capture_output=True, text=True, encoding="utf-8", timeout=300)


def test_interactive_mode_answers_prompts_takes_commands_and_leaves_on_eof(weights, capsys):
    script = "/temperature 0\n/length 25\nROMEO:\n/top_k 0\n/settings\n/length -3\n/bogus\nJULIET:\n"
    result = run_play("--weights", weights, "--interactive", "--device", "cpu", stdin=script)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "temperature = 0.0" in out and "length = 25" in out and "top_k = None" in out
    assert "temperature 0.0, length 25, top_k None" in out
    assert "/length must be 0 or more, got -3." in out
    assert "unknown command /bogus" in out
    play.main(["--weights", weights, "--prompt", "ROMEO:", "--length", "25", "--temperature", "0"])
    greedy = capsys.readouterr().out
    assert greedy in out  # the interactive answer is the same greedy continuation
    assert "JULIET:" in out


def test_interactive_mode_leaves_on_quit(weights):
    result = run_play("--weights", weights, "--interactive", stdin="/quit\nthis is never answered\n")
    assert result.returncode == 0
    assert "this is never answered" not in result.stdout


def test_num_samples_prompt_file_and_verbose(weights, tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("ROMEO:\nWhat", encoding="utf-8")
    result = run_play("--weights", weights, "--prompt_file", str(prompt), "--num_samples", "3",
                      "--length", "30", "--seed", "1", "--verbose")
    assert result.returncode == 0, result.stderr
    samples = result.stdout.split("--- sample ")[1:]
    assert len(samples) == 3
    assert all(s.split("---\n", 1)[1].startswith("ROMEO:\nWhat") for s in samples)
    assert len(set(samples)) > 1  # different draws from one batch
    assert "90 characters in" in result.stderr and "characters/s" in result.stderr


def test_no_cache_gives_the_same_greedy_text(weights, capsys):
    args = ["--weights", weights, "--prompt", "The", "--length", "12", "--temperature", "0",
            "--dtype", "float32"]
    play.main(args)
    cached = capsys.readouterr().out
    play.main(args + ["--no_cache"])
    assert capsys.readouterr().out == cached


@pytest.mark.parametrize("argv, message", [
    (["--num_samples", "0"], "--num_samples must be at least 1"),
    (["--prompt", "a", "--prompt_file", "p.txt"], "not both"),
    (["--prompt_file", "no/such/prompt.txt"], "does not exist: pass an existing file with --prompt_file"),
    (["--interactive", "--num_samples", "2"], "one continuation at a time"),
])
def test_bad_sampling_options_get_a_clear_error(argv, message, weights, capsys):
    with pytest.raises(SystemExit) as exit_info:
        play.main(["--weights", weights, *argv])
    assert exit_info.value.code != 0
    assert message in capsys.readouterr().err.strip().splitlines()[-1]

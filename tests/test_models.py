"""The math of models.py: run with `python -m pytest tests/test_models.py`."""

import math

import pytest
import torch
import torch.nn.functional as F

from config import make_config
from models import (Bigram, TinyGPT, apply_rotary, build_model, causal_attention, filter_logits,
                    rotary_tables, sample_next)
from utils import CharTokenizer, SmollError

VOCAB = 65


def test_tokenizer_ids_are_sorted_characters_and_round_trip():
    tok = CharTokenizer.from_text("hello")
    assert tok.chars == ["e", "h", "l", "o"]
    assert tok.encode("hello") == [1, 0, 2, 2, 3]  # derived by hand from the sorted vocabulary
    text = "Ça va? 東京 🙂\nnaïve"
    tok = CharTokenizer.from_text(text)
    assert tok.decode(tok.encode(text)) == text
    assert tok.vocab_size == len(set(text))


def test_tokenizer_names_unknown_characters():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(SmollError, match="'z'"):
        tok.encode("abz")


@pytest.mark.parametrize("model_name", ["tinygpt", "bigram"])
def test_loss_at_init_is_about_ln_vocab(model_name):
    torch.manual_seed(0)
    config = make_config(model=model_name, n_layer=2, n_embd=64, n_head=4, block_size=32)
    model = build_model(config, VOCAB)
    x = torch.randint(VOCAB, (8, 32))
    y = torch.randint(VOCAB, (8, 32))
    logits, loss = model(x, y)
    assert logits.shape == (8, 32, VOCAB)
    assert abs(loss.item() - math.log(VOCAB)) < 0.05
    logits, loss = model(x)
    assert loss is None


def test_causal_mask_future_tokens_do_not_change_earlier_logits():
    torch.manual_seed(0)
    model = TinyGPT(make_config(n_layer=2, n_embd=32, n_head=4, block_size=16, dropout=0.0), VOCAB).eval()
    x = torch.randint(VOCAB, (2, 16))
    x2 = x.clone()
    x2[:, 10:] = (x2[:, 10:] + 1) % VOCAB  # change every token from position 10 on
    with torch.no_grad():
        a, _ = model(x)
        b, _ = model(x2)
    torch.testing.assert_close(a[:, :10], b[:, :10], rtol=0, atol=1e-6)
    assert (a[:, 10:] - b[:, 10:]).abs().max() > 1e-3  # the changed positions do see the change


def test_written_out_attention_equals_sdpa():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 4, 20, 16).unbind(0)  # each (B=2, nh=4, T=20, hs=16)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(causal_attention(q, k, v, window=20), expected, rtol=1e-5, atol=1e-5)


def test_tinygpt_with_written_out_attention_matches_sdpa_path():
    torch.manual_seed(0)
    model = TinyGPT(make_config(n_layer=2, n_embd=32, n_head=4, block_size=16), VOCAB).eval()
    x = torch.randint(VOCAB, (2, 16))
    with torch.no_grad():
        fast, _ = model(x)
        for block in model.blocks:
            block.attn.use_sdpa = False
        slow, _ = model(x)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)


def test_use_sdpa_alone_picks_the_attention_and_both_agree_in_bfloat16(monkeypatch):
    torch.manual_seed(0)
    model = TinyGPT(make_config(n_layer=2, n_embd=32, n_head=4, block_size=16), VOCAB).eval()
    x = torch.randint(VOCAB, (2, 16))
    calls = []
    real_sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or real_sdpa(*a, **k))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        fused, _ = model(x)
        assert len(calls) == 2  # the default: the fused kernel, one call per layer, on any device
        for block in model.blocks:
            block.attn.use_sdpa = False
        written_out, _ = model(x)
        assert len(calls) == 2  # the written-out path
    torch.testing.assert_close(written_out.float(), fused.float(), rtol=0, atol=0.05)  # bfloat16 rounding


def test_rotary_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    hs = 16
    cos, sin = rotary_tables(hs, torch.arange(64))
    q, k = torch.randn(2, hs).unbind(0)

    def score(i, j):  # query at position i, key at position j
        qi = apply_rotary(q.view(1, 1, 1, hs), cos[i:i + 1], sin[i:i + 1])
        kj = apply_rotary(k.view(1, 1, 1, hs), cos[j:j + 1], sin[j:j + 1])
        return (qi * kj).sum().item()

    assert score(5, 2) == pytest.approx(score(40, 37), abs=1e-4)
    assert score(5, 2) != pytest.approx(score(5, 4), abs=1e-3)
    # and rotation keeps vector lengths
    rotated = apply_rotary(q.view(1, 1, 1, hs), cos[7:8], sin[7:8])
    assert rotated.norm().item() == pytest.approx(q.norm().item(), rel=1e-5)


def test_temperature_zero_is_argmax():
    logits = torch.randn(5, VOCAB)
    assert torch.equal(sample_next(logits, temperature=0).squeeze(1), logits.argmax(-1))


def test_top_k_never_samples_outside_the_k_best():
    torch.manual_seed(0)
    logits = torch.randn(1, VOCAB).expand(4000, VOCAB)
    allowed = set(torch.topk(logits[0], 3).indices.tolist())
    drawn = set(sample_next(logits, temperature=2.0, top_k=3).flatten().tolist())
    assert drawn == allowed  # every allowed id shows up in 4000 draws, and nothing else


@pytest.mark.parametrize("top_p, allowed",
                         [(0.45, {0}), (0.79, {0, 1}), (0.85, {0, 1, 2}), (1.0, {0, 1, 2, 3, 4})])
def test_top_p_keeps_the_smallest_set_holding_p(top_p, allowed):
    torch.manual_seed(0)
    probs = torch.tensor([0.5, 0.3, 0.1, 0.06, 0.04])
    logits = probs.log().expand(4000, 5)
    drawn = set(sample_next(logits, top_p=top_p).flatten().tolist())
    assert drawn == allowed


@pytest.mark.parametrize("top_p, kept", [(0.5, 1), (0.75, 2), (0.76, 3)])
def test_top_p_at_a_boundary_keeps_the_smallest_set_that_reaches_p(top_p, kept):
    """With probabilities 0.5, 0.25 and 0.25 the best id alone holds exactly 0.5: top_p 0.5 keeps
    it alone, 0.75 is reached by two ids, and anything above needs all three."""
    logits = torch.tensor([[0.5, 0.25, 0.25]]).log()
    assert torch.isfinite(filter_logits(logits, top_p=top_p)).sum().item() == kept


def test_generate_runs_past_block_size_with_dropout_off_and_restores_mode():
    torch.manual_seed(0)
    model = TinyGPT(make_config(n_layer=1, n_embd=32, n_head=2, block_size=8, dropout=0.5), VOCAB)
    model.train()
    start = torch.zeros(1, 1, dtype=torch.long)
    a = model.generate(start, 30, temperature=0)
    b = model.generate(start, 30, temperature=0)
    assert a.shape == (1, 31)  # well past the 8-character window
    assert torch.equal(a, b)  # greedy is deterministic only if dropout is off while sampling
    assert model.training


def test_stream_yields_the_same_ids_as_generate():
    model = Bigram(make_config(model="bigram"), VOCAB)
    start = torch.tensor([[3, 4]])
    torch.manual_seed(1)
    streamed = torch.cat(list(model.stream(start, 25)), dim=1)
    torch.manual_seed(1)
    generated = model.generate(start, 25)
    assert torch.equal(generated, torch.cat([start, streamed], dim=1))

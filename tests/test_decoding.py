"""The fast decoding path: the ring-buffer KV cache, Decoder, CompiledDecoder and int8 weights.
Run with `python -m pytest tests/test_decoding.py`."""

import shutil

import pytest
import torch

from smoll.sampling import decoder as decoding
from config import make_config
from smoll.sampling.decoder import (CompiledDecoder, Decoder, Int8Linear, pack_for_cpu_sampling,
                                    quantize_for_cpu_sampling)
from models import KVCache, TinyGPT

VOCAB = 20
RECIPE = dict(qk_norm=True, activation="relu2", logit_cap=30.0)  # the CPU presets' options


def random_model(n_layer=3, block_size=8, n_embd=32, **options):
    """A TinyGPT with large random weights, so that its logits are far from uniform."""
    torch.manual_seed(0)
    model = TinyGPT(make_config(n_layer=n_layer, n_embd=n_embd, n_head=4, block_size=block_size, dropout=0.0,
                                **options), VOCAB).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.3)
    return model


def decoded_logits(model, step, x, prompt_len=3):
    """Logits for every position of x (B, T): the prompt through TinyGPT.forward and the cache,
    then one character at a time through step(idx, cache)."""
    cache = KVCache(model.block_size)
    with torch.no_grad():
        out = [model(x[:, :prompt_len], cache=cache)[0]]
        out += [step(x[:, t:t + 1], cache)[:, None] for t in range(prompt_len, x.size(1))]
    return torch.cat(out, dim=1), cache  # (B, T, V)


@pytest.mark.parametrize("options", [{}, RECIPE, dict(activation="gelu", qk_norm=True)])
def test_decoder_logits_equal_the_full_forward_within_and_past_the_window(options):
    model = random_model(**options)
    x = torch.randint(VOCAB, (3, 40))  # a batch of three, five windows of 8
    with torch.no_grad():
        full, _ = model(x)  # past block_size, each position attends to the 8 ending at itself
    logits, _ = decoded_logits(model, Decoder(model).step, x)
    torch.testing.assert_close(logits, full, rtol=1e-5, atol=1e-5)


def test_decoder_starts_without_a_prompt_and_after_one_longer_than_the_window():
    model = random_model(**RECIPE)
    x = torch.randint(VOCAB, (2, 30))
    with torch.no_grad():
        full, _ = model(x)
    for prompt_len in (0, 1, 19):  # nothing through the cache yet; one character; two windows and more
        cache = KVCache(model.block_size)
        with torch.no_grad():
            if prompt_len:
                model(x[:, :prompt_len], cache=cache)
            steps = [Decoder(model).step(x[:, t:t + 1], cache) for t in range(prompt_len, 30)]
        torch.testing.assert_close(torch.stack(steps, dim=1), full[:, prompt_len:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("options", [{}, RECIPE])
def test_greedy_text_of_the_decoder_equals_the_reference_decoder_far_past_the_window(options):
    model = random_model(**options)
    prompt = torch.randint(VOCAB, (2, 5))
    fast = model.generate(prompt, 75, temperature=0, decoder=Decoder(model))  # 80 characters: 10 windows
    assert torch.equal(fast, model.generate(prompt, 75, temperature=0, use_cache=False))
    assert torch.equal(fast, model.generate(prompt, 75, temperature=0))  # the eager cache


def test_sampled_text_for_a_seed_is_the_same_with_and_without_the_decoder():
    model = random_model(**RECIPE)
    prompt = torch.randint(VOCAB, (1, 4))
    texts = []
    for decoder in (None, Decoder(model)):
        torch.manual_seed(7)
        texts.append(model.generate(prompt, 50, temperature=0.9, top_k=10, top_p=0.9, decoder=decoder))
    assert torch.equal(*texts)


def test_the_ring_buffers_keep_their_size_and_place_as_the_window_slides():
    model = random_model()
    x = torch.randint(VOCAB, (2, 50))
    _, cache = decoded_logits(model, Decoder(model).step, x)
    assert cache.pos == 50
    assert all(cache.k[i].shape == cache.v[i].shape == (2, 4, 8, 8) for i in range(3))  # (B, nh, W, hs)
    # TinyGPT.forward, fed the same text a window at a time, leaves the same keys in the same slots.
    eager = KVCache(model.block_size)
    with torch.no_grad():
        for piece in x.split(8, dim=1):
            model(piece, cache=eager)
    for i in range(3):
        torch.testing.assert_close(cache.k[i], eager.k[i], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cache.v[i], eager.v[i], rtol=1e-5, atol=1e-5)
    pointers = [cache.k[0].data_ptr(), cache.v[0].data_ptr()]
    decoder = Decoder(model)
    with torch.no_grad():
        for t in range(20):
            decoder.step(x[:, t:t + 1], cache)
    assert [cache.k[0].data_ptr(), cache.v[0].data_ptr()] == pointers  # written in place, never moved


def test_the_eager_cache_takes_a_prompt_in_pieces_into_the_same_ring():
    model = random_model()
    x = torch.randint(VOCAB, (1, 30))
    cache = KVCache(model.block_size)
    with torch.no_grad():
        full, _ = model(x)
        pieces = [model(piece, cache=cache)[0] for piece in x.split(5, dim=1)]  # 5 at a time, past the window
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["bfloat16", "packed", "int8"])
def test_lower_precision_decoders_stay_close_to_float32(kind):
    reference = random_model(**RECIPE)
    model = random_model(**RECIPE).to(torch.bfloat16)
    if kind == "packed" and not pack_for_cpu_sampling(model):
        pytest.skip("this PyTorch or CPU cannot pack bfloat16 weights for oneDNN")
    if kind == "int8" and not quantize_for_cpu_sampling(model):
        pytest.skip("this PyTorch has no int8 weight kernel for the CPU")
    x = torch.randint(VOCAB, (2, 30))
    with torch.no_grad():
        full, _ = reference(x)
    logits, cache = decoded_logits(model, Decoder(model).step, x)
    assert cache.k[0].dtype == torch.float32  # the cache stays in float32 whatever the weights
    # bfloat16 keeps about 3 significant digits; these logits reach about 10
    assert (logits.float() - full).abs().max() < 0.05 * full.abs().max()
    assert (logits.float().argmax(-1) == full.argmax(-1)).float().mean() > 0.9


def test_int8_weights_are_each_rows_nearest_level_and_multiply_like_them():
    linear = torch.nn.Linear(48, 17, bias=False)
    with torch.no_grad():
        linear.weight[3] *= 100  # a row of large weights gets its own, coarser scale
    q = Int8Linear(linear)
    w = linear.weight.detach()
    scale = w.abs().amax(dim=1) / 127  # (17,)
    assert q.qweight.dtype == torch.int8 and q.qweight.abs().max() == 127
    torch.testing.assert_close(q.scale.float(), scale, rtol=1e-2, atol=0)  # stored in bfloat16
    dequantized = q.qweight.float() * scale[:, None]
    assert ((dequantized - w).abs() <= scale[:, None] / 2 + 1e-6).all()  # within half a step of its row
    x = torch.randn(5, 48).bfloat16()
    try:
        y = q(x)
    except RuntimeError:
        pytest.skip("this PyTorch has no int8 weight kernel for the CPU")
    expected = x.float() @ (q.qweight.float() * q.scale.float()[:, None]).t()
    torch.testing.assert_close(y.float(), expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())


def test_quantizing_keeps_float32_models_and_biased_layers_as_they_are():
    assert quantize_for_cpu_sampling(random_model()) == 0  # float32 weights: nothing to do
    model = random_model().to(torch.bfloat16)
    n = quantize_for_cpu_sampling(model)
    if n == 0:
        pytest.skip("this PyTorch has no int8 weight kernel for the CPU")
    assert n == 3 * 4 + 1  # qkv, proj, fc, proj per block, and the head
    assert isinstance(model.lm_head, Int8Linear) and type(model.blocks[0].ln_1) is torch.nn.LayerNorm


@pytest.mark.skipif(not any(shutil.which(cc) for cc in ("g++", "c++", "clang++")),
                    reason="torch.compile needs a C++ compiler for CPU code")
def test_the_compiled_decoder_writes_the_eager_text_across_the_window_in_a_batch():
    """One small model, compiled once (about 10 s on 2 cores): the fixed-shape step gives the
    eager decoder's greedy text for a batch of two, through the filling ring and far past it."""
    torch._dynamo.reset()
    model = random_model(n_layer=1, **RECIPE)
    prompt = torch.randint(VOCAB, (2, 3))
    eager = model.generate(prompt, 30, temperature=0, decoder=Decoder(model))
    compiled = model.generate(prompt, 30, temperature=0, decoder=CompiledDecoder(Decoder(model)))
    assert torch.equal(compiled, eager)
    x = torch.randint(VOCAB, (2, 20))
    with torch.no_grad():
        full, _ = model(x)
    compiled = CompiledDecoder(Decoder(model))
    logits, _ = decoded_logits(model, compiled.step, x, prompt_len=1)
    torch.testing.assert_close(logits, full, rtol=1e-4, atol=1e-4)
    assert decoding.time_steps(model, compiled, 2, torch.device("cpu"), steps=3) > 0  # how play.py times it


@pytest.mark.skipif(not any(shutil.which(cc) for cc in ("g++", "c++", "clang++")),
                    reason="torch.compile needs a C++ compiler for CPU code")
def test_one_compiled_decoder_serves_prompt_after_prompt():
    """The interactive mode reuses one decoder for every prompt, each with a fresh cache."""
    model = random_model(n_layer=1, **RECIPE)
    compiled, eager = CompiledDecoder(Decoder(model)), Decoder(model)
    for length in (12, 3):  # a long answer, then a short one that must not see the first one's slots
        prompt = torch.randint(VOCAB, (1, 2))
        assert torch.equal(model.generate(prompt, length, temperature=0, decoder=compiled),
                           model.generate(prompt, length, temperature=0, decoder=eager))

"""The fast sampling engine: what makes play.py write characters quickly on any machine.

    pick_sampling_path(model, config, device) -> (path, model, decoder, report)

Sampling writes one character at a time, and on a CPU each step costs more in starting
PyTorch's operations than in arithmetic. So this file holds:
- Decoder: TinyGPT's forward pass for one new position in few calls, on the KVCache of
  models.py, built from the model's own parameters and functions (RoPE, QK-norm, the logit cap);
- CompiledDecoder: the same step through torch.compile (CUDA graphs on a GPU);
- PackedLinear and Int8Linear: weights laid out to be read fast, in bfloat16 or int8;
- the choice of path: a few decoding steps of each candidate are timed here, the fastest is kept,
  and the timings are cached per machine, PyTorch version and model shape.
models.py's stream() is the reference: the tests check every path here against it. This file
knows nothing about text or tokenizers.
"""

import copy
import json
import os
import shutil
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from devices import DTYPES, describe_device, read_timings, resolve_dtype, synchronize, timings_path, write_timings
from models import KVCache, TinyGPT, apply_rotary, qk_norm, soft_cap
from utils import SmollError

# ----------------------------------------------------------------------------------------------
# Weights that read fast


class PackedLinear(nn.Module):
    """A bias-free nn.Linear for sampling in bfloat16 on a CPU: the same numbers, sooner.

    Sampling one character at a time multiplies every weight matrix by a single vector, so its
    speed is set by how fast the weights can be read. oneDNN, the CPU library under PyTorch's
    bfloat16 matmuls, reads them fastest in its own blocked layout. nn.Linear hands it the plain
    layout at every call; here the weight is reordered once. These are the two oneDNN ops that
    torch.compile puts in place of a frozen model's linear layers on a CPU. For inference only.
    """

    def __init__(self, linear):
        super().__init__()
        self.weight = linear.weight  # kept as it is, so that state_dict() does not change
        # the 1: laid out for one row at a time, the way sampling multiplies (more rows work too)
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 1)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x):
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")  # x @ W^T


def _check_close(y, reference, tolerance=0.02):
    """Raise AssertionError unless y is within tolerance of reference, relative to its largest value.
    (Not torch.testing.assert_close: importing it takes half a second, longer than sampling 500 characters.)"""
    error = (y.float() - reference.float()).abs().max()
    if not error <= tolerance * reference.float().abs().max().clamp_min(1.0):
        raise AssertionError(f"off by {error.item():.3g}")


def pack_for_cpu_sampling(model):
    """Swap every bfloat16 nn.Linear of a model on the CPU for a PackedLinear, in place. Call it
    after moving the model to its device and dtype. Returns how many layers were swapped: 0 where
    it does not apply (float32 weights, a GPU, or a PyTorch built without oneDNN)."""
    if not (torch.backends.mkldnn.enabled and torch.backends.mkldnn.is_available()):
        return 0
    linears = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if type(child) is nn.Linear and child.bias is None
               and child.weight.dtype == torch.bfloat16 and child.weight.device.type == "cpu"]
    try:
        packed = [PackedLinear(child) for _, _, child in linears]
        if packed:  # these are private ops: check once that they exist here and compute x @ W^T
            x = torch.randn(2, linears[0][2].in_features, dtype=torch.bfloat16)
            _check_close(packed[0](x), F.linear(x, linears[0][2].weight))
    except (RuntimeError, AttributeError, NotImplementedError, AssertionError):
        return 0  # a PyTorch without these ops, or a oneDNN that cannot pack bfloat16 here: keep nn.Linear
    for (parent, name, _), new in zip(linears, packed):
        setattr(parent, name, new)
    return len(packed)


class Int8Linear(nn.Module):
    """A bias-free nn.Linear with int8 weights, for sampling: a quarter of float32's bytes to read.

    Weight-only quantisation: each output row keeps its own scale, max|row| / 127, and the
    activations stay in floating point. PyTorch's CPU kernel for this (the one gpt-fast uses)
    takes bfloat16 activations and returns bfloat16, so this layer belongs in a bfloat16 model.
    Rounding each weight to one of 255 levels of its row costs little: bench.py --window_quality
    measures it (docs/sampling.md: Precision while sampling). For inference only.
    """

    def __init__(self, linear):
        super().__init__()
        w = linear.weight.detach().float()  # (out, in)
        scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127  # (out,): one step of the row's grid
        self.register_buffer("qweight", torch.round(w / scale[:, None]).to(torch.int8))  # (out, in)
        self.register_buffer("scale", scale.to(torch.bfloat16))
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x):
        shape = x.shape
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, shape[-1]), self.qweight, self.scale)
        return y.view(*shape[:-1], self.out_features)  # (..., out) = x @ (qweight * scale)^T


def quantize_for_cpu_sampling(model):
    """Swap every bias-free nn.Linear of a bfloat16 model on the CPU for an Int8Linear, in place.
    Returns how many layers were swapped: 0 where the kernel is missing or wrong here."""
    linears = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if type(child) is nn.Linear and child.bias is None
               and child.weight.dtype == torch.bfloat16 and child.weight.device.type == "cpu"]
    try:
        quantized = [Int8Linear(child) for _, _, child in linears]
        if quantized:  # a private kernel: check once that it exists here and computes x @ W^T
            x = torch.randn(3, linears[0][2].in_features, dtype=torch.bfloat16)
            _check_close(quantized[0](x), F.linear(x, linears[0][2].weight), tolerance=0.05)
    except (RuntimeError, AttributeError, NotImplementedError, AssertionError):
        return 0
    for (parent, name, _), new in zip(linears, quantized):
        setattr(parent, name, new)
    return len(quantized)


def _matmul(module):
    """The cheapest call for module's x (B, in) -> x @ W^T (B, out), plus an optional residual (B, out)."""
    if type(module) is nn.Linear:  # one BLAS call that also adds the residual
        w_t = module.weight.t()  # (in, out), a view
        return lambda x, residual=None: torch.mm(x, w_t) if residual is None else torch.addmm(residual, x, w_t)
    forward = module.forward  # skips nn.Module.__call__'s hooks, which cost more than this work here
    return lambda x, residual=None: forward(x) if residual is None else residual + forward(x)


# ----------------------------------------------------------------------------------------------
# One position in few calls


class Decoder:
    """TinyGPT's forward pass for one new character per sequence, in as few calls as it takes.

    Sampling runs one position at a time, and then a CPU spends more time starting each of
    PyTorch's operations than doing its arithmetic: for one position, TinyGPT.forward costs about
    160 ATen operations a layer (nn.Module calls, views and copies between heads and channels,
    QK-norm's five). This computes the same thing in about 110, on the ring buffers of a KVCache:
    - the residual stream stays (B, C): one position needs no reshapes between heads and channels;
    - q and k of all heads get RoPE together, in three calls (apply_rotary);
    - each residual add happens inside its projection's matmul (torch.addmm), for nn.Linear;
    - RoPE, QK-norm and the logit cap are models.py's own functions, on the model's parameters.
    It works with whatever linear layers the model holds: nn.Linear in its dtype, PackedLinear or
    Int8Linear. The prompt goes through TinyGPT.forward, which fills the same cache. Tests check
    that the two give the same logits and, in float32, the same greedy text far past the window.
    """

    def __init__(self, model):
        self.model = model
        self.window, self.cap = model.block_size, model.logit_cap
        self.n_head, self.hs = model.blocks[0].attn.n_head, model.head_size
        self.C, self.rope = model.lm_head.in_features, None
        self.layers = [dict(ln_1=(block.ln_1.weight, block.ln_1.bias), ln_2=(block.ln_2.weight, block.ln_2.bias),
                            qkv=_matmul(block.attn.qkv), proj=_matmul(block.attn.proj),
                            fc=_matmul(block.mlp.fc), fc_proj=_matmul(block.mlp.proj),
                            act=block.mlp.act, qk_norm=block.attn.qk_norm) for block in model.blocks]
        self.head = _matmul(model.lm_head)

    def rotary(self, pos, device, dtype):
        """cos and sin (hs,) for position pos."""
        first, cos, sin = self.rope or (0, None, None)
        if cos is None or not first <= pos < first + len(cos):  # 4096 positions' rows at a time
            if pos < self.window:
                first, cos, sin = 0, self.model.rope_cos, self.model.rope_sin
            else:
                first = pos
                cos, sin = self.model.far_rotary_tables(pos, 4096, device)
            self.rope = (first, cos.to(dtype), sin.to(dtype))  # (N, hs) each
        return cos[pos - first], sin[pos - first]

    def step(self, idx, cache):
        """idx (B, 1): the next character of each sequence -> logits (B, V). Updates the cache."""
        pos = cache.pos
        cos, sin = self.rotary(pos, idx.device, self.model.token_embedding.weight.dtype)
        ring = [cache.buffers(i, idx.size(0), self.n_head, self.hs, idx.device) for i in range(len(self.layers))]
        slot = torch.tensor([pos % self.window], device=idx.device)
        logits = self.forward(idx, cos, sin, ring, slot, min(pos + 1, self.window), None)
        cache.pos += 1
        return logits

    def forward(self, idx, cos, sin, ring, slot, n, mask):
        """One step on explicit inputs: ring holds each layer's (keys, values) buffers, slot (1,)
        is where this position goes, and the query sees the first n slots, or all of them through
        mask (B, 1, 1, W) where n is None. The compiled step (CompiledDecoder) takes the second
        form: its shapes never change, so it is one graph for every position."""
        model, C, nh, hs = self.model, self.C, self.n_head, self.hs
        B = idx.size(0)
        x = model.token_embedding.weight[idx[:, 0]]  # (B, C)
        for layer, (k_buf, v_buf) in zip(self.layers, ring):  # buffers (B, nh, W, hs), float32
            qkv = layer["qkv"](F.layer_norm(x, (C,), *layer["ln_1"]))  # (B, 3C)
            qk = apply_rotary(qkv[:, :2 * C].view(B, 2, nh, hs), cos, sin)  # (B, 2, nh, hs): q and k
            if layer["qk_norm"]:
                qk = qk_norm(qk.float())
            k_buf.index_copy_(2, slot, qk[:, 1, :, None].float())  # overwrites the position that left the window
            v_buf.index_copy_(2, slot, qkv[:, 2 * C:3 * C].view(B, nh, 1, hs).float())
            q = qk[:, 0, :, None, :].float()  # (B, nh, 1, hs)
            if n is not None and n < self.window:
                k_buf, v_buf = k_buf[:, :, :n], v_buf[:, :, :n]  # the filled slots
            y = F.scaled_dot_product_attention(q, k_buf, v_buf, attn_mask=mask)  # (B, nh, 1, hs)
            x = layer["proj"](y.view(B, C).to(x.dtype), x)  # (B, C): x + attention
            x = layer["fc_proj"](layer["act"](layer["fc"](F.layer_norm(x, (C,), *layer["ln_2"]))), x)
        logits = self.head(F.layer_norm(x, (C,), model.ln_f.weight, model.ln_f.bias))  # (B, V)
        if self.cap:
            logits = soft_cap(logits, self.cap)
        return logits


class CompiledDecoder:
    """A Decoder step compiled by torch.compile, on a KV cache of fixed shape.

    Every step runs the same graph: the slot to write, the rotary angles and the mask of filled
    slots are tensors, and the query always attends over all `window` slots of the ring (the
    empty ones masked while it fills; from then on, no mask). So torch.compile builds two graphs
    and reuses them for every position, with the pointwise work between the matmuls fused into
    a few kernels. On CUDA, mode="reduce-overhead" also records each graph as a CUDA graph and
    replays it with one launch, which is what makes one-character steps fast on a GPU; the ring
    buffers are marked as static addresses so that the recording can write into them. Compiling
    takes seconds to minutes, so play.py only picks this where it has measured that it pays.
    """

    def __init__(self, decoder, mode=None):
        self.decoder = decoder
        self.forward = torch.compile(decoder.forward, mode=mode, dynamic=False)
        self.cache = None  # the KVCache whose buffers are marked static

    def step(self, idx, cache):
        d, pos = self.decoder, cache.pos
        W = d.window
        ring = [cache.buffers(i, idx.size(0), d.n_head, d.hs, idx.device) for i in range(len(d.layers))]
        if cache is not self.cache:  # a new cache (a new prompt): its buffers get fixed addresses
            for k_buf, v_buf in ring:
                torch._dynamo.mark_static_address(k_buf)
                torch._dynamo.mark_static_address(v_buf)
            self.cache = cache
        # While the ring fills, slots past pos hold nothing yet: mask them (1, 1, 1, W).
        mask = (torch.arange(W, device=idx.device) <= pos)[None, None, None] if pos < W - 1 else None
        cos, sin = d.rotary(pos, idx.device, d.model.token_embedding.weight.dtype)
        slot = torch.tensor([pos % W], device=idx.device)
        logits = self.forward(idx, cos, sin, ring, slot, None, mask)
        cache.pos += 1
        return logits.clone()  # a CUDA graph's output is overwritten by its next replay


# ----------------------------------------------------------------------------------------------
# How to sample on this machine: timed, not guessed
#
# Which precision samples fastest depends on the processor, not on its feature flags: on one CPU
# with bfloat16 instructions a bfloat16 matrix-vector product is 2x float32's, on another it is
# 3x slower. So play.py times a few decoding steps of each candidate path here and keeps the
# fastest. The decision is stored per CPU (or GPU), PyTorch version, model shape and batch
# size, so the next run on the same machine starts at once.

COMPILE_GUESS_S = 20.0  # what compiling a step is assumed to cost before it has been measured here
TIMED_STEPS = 24  # decoding steps timed per candidate, after a few untimed ones


@dataclass(frozen=True)
class SamplingPath:
    dtype: str  # "float32", "bfloat16", "float16", or "int8" (int8 weights, bfloat16 activations)
    compiled: bool = False  # the decoding step through torch.compile (CUDA graphs on CUDA)

    def __str__(self):
        return self.dtype + (" compiled" if self.compiled else "")


def eager_candidates(device, dtype_flag):
    """The eager paths worth timing on this device, or just the one --dtype asks for."""
    if dtype_flag != "auto":
        return [SamplingPath(dtype_flag)]
    if device.type == "cpu":  # bfloat16 where the CPU runs it natively, int8 where PyTorch has the kernel
        return [SamplingPath("float32"), SamplingPath("bfloat16"), SamplingPath("int8")]
    if device.type == "cuda":
        return [SamplingPath("float32"), SamplingPath(str(resolve_dtype("auto", device))[6:])]
    return [SamplingPath("float32")]  # MPS: float32 is what it runs best


def have_compiler(device):
    """torch.compile needs a C++ compiler for CPU code (and Triton for CUDA code, which CUDA builds ship)."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and any(shutil.which(cc) for cc in ("g++", "c++", "clang++"))


def choose_path(step_seconds, n_steps, compile_seconds=None):
    """The path that writes n_steps characters soonest: each path costs n_steps times its
    seconds per step, plus its compile time if it has one still to pay (compile_seconds)."""
    compile_seconds = compile_seconds or {}
    return min(step_seconds, key=lambda p: compile_seconds.get(p, 0.0) + n_steps * step_seconds[p])


def worth_compiling(eager_step_seconds, n_steps, compile_seconds=COMPILE_GUESS_S):
    """Try compiling only if it could pay: even at twice the eager speed, it must save its cost."""
    return n_steps * eager_step_seconds / 2 > compile_seconds


def prepare_path(model, path, device):
    """A copy of model set up for path, and its decoder (None for a model without one).
    Returns None where this PyTorch cannot run the path (int8 without its kernel)."""
    model = copy.deepcopy(model)
    model.to(torch.bfloat16 if path.dtype == "int8" else DTYPES[path.dtype])
    if path.dtype == "int8":
        if device.type != "cpu" or not quantize_for_cpu_sampling(model):
            return None
    else:
        pack_for_cpu_sampling(model)  # bfloat16 on a CPU only: the same numbers, read faster
    if not isinstance(model, TinyGPT):
        return model, None
    decoder = Decoder(model)
    if path.compiled:  # PyTorch caches compiled code in /tmp unless told; beside the timings it outlives a reboot
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", timings_path("inductor"))
        decoder = CompiledDecoder(decoder, mode=compile_mode(device))
    return model, decoder


def prepared_or_explained(model, path, device):
    """prepare_path for a path the user asked for by name: where it cannot run, one sentence."""
    prepared = prepare_path(model, path, device)
    if prepared is None:
        raise SmollError(f"--dtype {path.dtype} needs PyTorch's int8 kernel for a TinyGPT's linear layers on "
                         f"a CPU, which this model or device has not: use --dtype bfloat16, float32 or auto.")
    return prepared


def compile_mode(device):
    """torch.compile's mode for the decoding step: on CUDA, "reduce-overhead" records CUDA graphs,
    so that a step is one launch instead of a hundred; elsewhere the default."""
    return "reduce-overhead" if device.type == "cuda" else None


def time_steps(model, decoder, batch_size, device, steps=TIMED_STEPS):
    """Seconds per decoding step past the window (the cache full), the median of `steps` steps.
    The untimed steps before them fill the ring's last slots, so a compiled step compiles both
    its graphs (filling, and full) here, where compiling is counted."""
    layers = getattr(decoder, "decoder", decoder)  # a CompiledDecoder wraps a Decoder
    cache = KVCache(model.block_size)
    idx = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
    with torch.no_grad():
        for i in range(len(layers.layers)):
            cache.buffers(i, batch_size, layers.n_head, layers.hs, device)
        cache.pos = model.block_size - 3  # the ring full from the 4th step on, as in steady state
        times = []
        for _ in range(steps + 3):
            t0 = time.perf_counter()
            decoder.step(idx, cache)
            synchronize(device)
            times.append(time.perf_counter() - t0)
    return statistics.median(times[3:])


def decision_key(model, config, device, batch_size):
    """What a timing depends on: the processor, PyTorch, the model's shape and the batch."""
    shape = {k: getattr(config, k) for k in ("model", "n_layer", "n_head", "n_embd", "block_size",
                                             "activation", "qk_norm", "logit_cap")}
    vocab = model.lm_head.out_features
    return (f"{describe_device(device)} | torch {torch.__version__} | {json.dumps(shape, sort_keys=True)} "
            f"| vocab {vocab} | batch {batch_size}")


def pick_sampling_path(model, config, device, dtype_flag="auto", eager=False, n_chars=500, batch_size=1,
                       log=None):
    """Time the candidate paths (or read their timings from the cache), and return the fastest
    for n_chars characters as (path, model, decoder, report): report says what was measured."""
    if not isinstance(model, TinyGPT):  # the Bigram is one table lookup: nothing to choose
        path = SamplingPath(dtype_flag if dtype_flag != "auto" else "float32")
        return (path, *prepared_or_explained(model, path, device), f"{path} (a Bigram has one path)")
    key, store = decision_key(model, config, device, batch_size), timings_path("sampling_paths.json")
    timings_kept = read_timings(store)
    known = timings_kept.get(key, {})
    timings = {}  # path -> seconds per step
    ready = {}  # path -> (model, decoder) set up in this run
    source = "from the cache"
    for path in eager_candidates(device, dtype_flag):
        if str(path) in known.get("steps", {}):
            timings[path] = known["steps"][str(path)]
            continue
        prepared = prepare_path(model, path, device) if dtype_flag == "auto" else prepared_or_explained(
            model, path, device)
        if prepared is None:  # int8 without its kernel here: one candidate fewer
            continue
        ready[path] = prepared
        timings[path] = time_steps(*prepared, batch_size, device)
        source = "timed now"
    best = choose_path(timings, n_chars)
    if not eager and have_compiler(device):
        compiled = SamplingPath(best.dtype, compiled=True)
        compile_s = known.get("compile_s", {}).get(str(compiled))
        if str(compiled) in known.get("steps", {}):
            timings[compiled] = known["steps"][str(compiled)]
        elif worth_compiling(timings[best], n_chars, compile_s or COMPILE_GUESS_S):
            if log:
                log(f"compiling the decoding step ({compiled}): it can pay back over {n_chars:,} characters")
            t0 = time.perf_counter()
            ready[compiled] = prepare_path(model, compiled, device)
            timings[compiled] = time_steps(*ready[compiled], batch_size, device)
            compile_s = time.perf_counter() - t0
            known.setdefault("compile_s", {})[str(compiled)] = compile_s
            source = "timed now"
        if compiled in timings:
            # compiled code is cached on disk by PyTorch, but loading it again still takes time
            cost = {} if compiled in ready else {compiled: compile_s or COMPILE_GUESS_S}
            best = choose_path(timings, n_chars, cost)
    known["steps"] = {**known.get("steps", {}), **{str(p): s for p, s in timings.items()}}
    timings_kept[key] = known
    if source == "timed now":
        write_timings(store, timings_kept)
    if best not in ready:
        ready[best] = prepare_path(model, best, device)
    figures = ", ".join(f"{p} {1e3 * s:.2f} ms" for p, s in sorted(timings.items(), key=lambda kv: kv[1]))
    report = f"{best} ({source}, ms per step: {figures})"
    return (best, *ready[best], report)

"""The decoding step: TinyGPT's forward pass for one new character, in as few calls as it takes.

    Variant(dtype, compiled)           one way to run the step: its precision, and whether it is compiled
    prepare(model, variant, device)    -> (a copy of the model set up for it, its Decoder)
    Decoder(model).step(idx, cache)    -> the next character's logits, the KV cache updated

Sampling writes one character at a time, and then a CPU spends more time starting each of
PyTorch's operations than doing its arithmetic. So this file holds:
- Decoder: the one-position step, built from the model's own parameters and functions (RoPE,
  QK-norm, the logit cap, the rotary table), on the ring buffers of models.KVCache;
- CompiledDecoder: the same step through torch.compile, with CUDA graphs on a GPU;
- PackedLinear and Int8Linear: weights laid out to be read fast, in bfloat16 or int8;
- time_steps: how long a step takes, which choose.py compares.
The step compiled ahead of time for a CPU is in packages.py. models.py's stream() without a decoder
is the reference: the tests check every variant here against it.
"""

import copy
import os
import shutil
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from models import KVCache, TinyGPT, apply_rotary, qk_norm, soft_cap
from smoll.devices import DTYPES, resolve_dtype, synchronize
from smoll.files import SmollError, cache_path

TIMED_STEPS = 24  # decoding steps timed per variant, after a few untimed ones


@dataclass(frozen=True)
class Variant:
    """One way to run the decoding step: its precision, and whether it is compiled."""
    dtype: str  # "float32", "bfloat16", "float16", or "int8" (int8 weights, bfloat16 activations)
    compiled: bool = False  # on a CPU a package built once (packages.py), on CUDA torch.compile in the run

    def __str__(self):
        return self.dtype + (" compiled" if self.compiled else "")


def candidates(device, dtype_flag):
    """The eager variants worth timing on this device, or just the one --dtype asks for."""
    if dtype_flag != "auto":
        return [Variant(dtype_flag)]
    if device.type == "cpu":  # bfloat16 where the CPU runs it natively, int8 where PyTorch has the kernel
        return [Variant("float32"), Variant("bfloat16"), Variant("int8")]
    if device.type == "cuda":
        return [Variant("float32"), Variant(str(resolve_dtype("auto", device))[6:])]
    return [Variant("float32")]  # MPS: float32 is what it runs best


def have_compiler(device):
    """torch.compile needs a C++ compiler for CPU code (and Triton for CUDA code, which CUDA builds ship)."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and any(shutil.which(cc) for cc in ("g++", "c++", "clang++"))


def prepare(model, variant, device, pack=True):
    """A copy of model set up for an eager variant (or a compiled one on CUDA), and its decoder
    (None for a Bigram). Raises SmollError where this PyTorch cannot run the variant here (int8
    without its kernel). pack=False keeps bfloat16 weights in nn.Linear (for torch.export)."""
    model = copy.deepcopy(model)
    model.to(torch.bfloat16 if variant.dtype == "int8" else DTYPES[variant.dtype])
    if variant.dtype == "int8":
        if device.type != "cpu" or not quantize_for_cpu_sampling(model):
            raise SmollError("--dtype int8 needs PyTorch's int8 kernel for a TinyGPT's linear layers on a CPU, "
                             "which this model or device has not: use --dtype bfloat16, float32 or auto.")
    elif pack:
        pack_for_cpu_sampling(model)  # bfloat16 on a CPU only: the same numbers, read faster
    if not isinstance(model, TinyGPT):
        return model, None
    decoder = Decoder(model)
    if variant.compiled and device.type == "cuda":
        # PyTorch keeps compiled code in /tmp unless told; in smoll's cache it outlives a reboot
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", cache_path("inductor"))
        decoder = CompiledDecoder(decoder, mode=compile_mode(device))
    return model, decoder


def time_steps(model, decoder, batch_size, device, steps=TIMED_STEPS):
    """Seconds per decoding step past the context window (the cache full), the median of `steps`
    steps. The untimed steps before them fill the ring's last slots, so a compiled step compiles
    both its graphs (filling, and full) here, where compiling is counted."""
    cache = KVCache(model.block_size)
    cache.pos = model.block_size - 3  # the ring full from the 4th step on, as in steady state
    idx = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
    times = []
    with torch.no_grad():
        for _ in range(steps + 3):
            t0 = time.perf_counter()
            decoder.step(idx, cache)
            synchronize(device)
            times.append(time.perf_counter() - t0)
    return statistics.median(times[3:])


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
    - RoPE, QK-norm and the logit cap are models.py's own functions, on the model's parameters,
      and the rotary rows come from the model's own table (TinyGPT.rotary).
    It works with whatever linear layers the model holds: nn.Linear in its dtype, PackedLinear or
    Int8Linear. Tests check that it gives TinyGPT.forward's logits and, in float32, the same greedy
    text far past the context window. CompiledDecoder and packages.PackagedDecoder run this step's
    forward compiled, on the same ring buffers (ring) and rotary rows (rotary).
    """

    def __init__(self, model):
        self.model = model
        self.window, self.cap = model.block_size, model.logit_cap
        self.n_head, self.hs = model.blocks[0].attn.n_head, model.head_size
        self.C = model.lm_head.in_features
        self.layers = [dict(ln_1=(block.ln_1.weight, block.ln_1.bias), ln_2=(block.ln_2.weight, block.ln_2.bias),
                            qkv=_matmul(block.attn.qkv), proj=_matmul(block.attn.proj),
                            fc=_matmul(block.mlp.fc), fc_proj=_matmul(block.mlp.proj),
                            act=block.mlp.act, qk_norm=block.attn.qk_norm) for block in model.blocks]
        self.head = _matmul(model.lm_head)

    def ring(self, cache, batch_size, device):
        """Each layer's (keys, values) ring buffers in cache, each (B, nh, window, hs), float32."""
        return [cache.buffers(i, batch_size, self.n_head, self.hs, device) for i in range(len(self.layers))]

    def rotary(self, pos):
        """RoPE's cos and sin (hs,) for position pos, in the model's dtype."""
        cos, sin = self.model.rotary(pos, 1)  # (1, hs) each
        return cos[0], sin[0]

    def step(self, idx, cache):
        """idx (B, 1): the next character of each sequence -> logits (B, V). Updates the cache."""
        pos = cache.pos
        slot = torch.tensor([pos % self.window], device=idx.device)
        logits = self.forward(idx, *self.rotary(pos), self.ring(cache, idx.size(0), idx.device), slot,
                              min(pos + 1, self.window), None)
        cache.pos += 1
        return logits

    def forward(self, idx, cos, sin, ring, slot, n, mask):
        """One step on explicit inputs: ring holds each layer's (keys, values) buffers, slot (1,)
        is where this position goes, and the query sees the first n slots, or all of them through
        mask (B, 1, 1, W) where n is None. The compiled steps take the second form: their shapes
        never change, so one graph serves every position."""
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


def _matmul(module):
    """The cheapest call for module's x (B, in) -> x @ W^T (B, out), plus an optional residual (B, out)."""
    if type(module) is nn.Linear:  # one BLAS call that also adds the residual
        w_t = module.weight.t()  # (in, out), a view
        return lambda x, residual=None: torch.mm(x, w_t) if residual is None else torch.addmm(residual, x, w_t)
    forward = module.forward  # skips nn.Module.__call__'s hooks, which cost more than this work here
    return lambda x, residual=None: forward(x) if residual is None else residual + forward(x)


def fixed_shape_inputs(decoder, pos, device):
    """What the compiled steps take besides the ids and the ring: RoPE's rows, the slot, and the
    mask (1, 1, 1, W) of the filled slots (None once the ring is full). Their shapes never change."""
    W = decoder.window
    mask = (torch.arange(W, device=device) <= pos)[None, None, None] if pos < W - 1 else None
    return (*decoder.rotary(pos), torch.tensor([pos % W], device=device), mask)


def compile_mode(device):
    """torch.compile's mode for the decoding step: on CUDA, "reduce-overhead" records CUDA graphs,
    so that a step is one launch instead of a hundred; elsewhere the default."""
    return "reduce-overhead" if device.type == "cuda" else None


class CompiledDecoder:
    """A Decoder step compiled by torch.compile, on a KV cache of fixed shape (used on CUDA).

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
        ring = self.decoder.ring(cache, idx.size(0), idx.device)
        if cache is not self.cache:  # a new cache (a new prompt): its buffers get fixed addresses
            for k_buf, v_buf in ring:
                torch._dynamo.mark_static_address(k_buf)
                torch._dynamo.mark_static_address(v_buf)
            self.cache = cache
        cos, sin, slot, mask = fixed_shape_inputs(self.decoder, cache.pos, idx.device)
        logits = self.forward(idx, cos, sin, ring, slot, None, mask)
        cache.pos += 1
        return logits.clone()  # a CUDA graph's output is overwritten by its next replay


# ----------------------------------------------------------------------------------------------
# Weights that read fast


def check_close(y, reference, tolerance):
    """Raise AssertionError unless y is within tolerance of reference, relative to its largest value.
    (Not torch.testing.assert_close: importing it takes half a second, longer than sampling 500 characters.)"""
    error = (y.float() - reference.float()).abs().max()
    if not error <= tolerance * reference.float().abs().max().clamp_min(1.0):
        raise AssertionError(f"off by {error.item():.3g}")


def swap_linears(model, kind, tolerance):
    """Swap every bias-free nn.Linear of a bfloat16 model on the CPU for kind(layer), in place, after
    checking once that kind computes x @ W^T here (these are private kernels). Returns how many were
    swapped: 0 where a kernel is missing or wrong in this PyTorch."""
    linears = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if type(child) is nn.Linear and child.bias is None
               and child.weight.dtype == torch.bfloat16 and child.weight.device.type == "cpu"]
    try:
        swapped = [kind(layer) for _, _, layer in linears]
        if swapped:
            x = torch.randn(3, linears[0][2].in_features, dtype=torch.bfloat16)
            check_close(swapped[0](x), F.linear(x, linears[0][2].weight), tolerance)
    except (RuntimeError, AttributeError, NotImplementedError, AssertionError):
        return 0  # a PyTorch without these ops, or a oneDNN that cannot run them here: keep nn.Linear
    for (parent, name, _), new in zip(linears, swapped):
        setattr(parent, name, new)
    return len(swapped)


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


def pack_for_cpu_sampling(model):
    """Swap every bfloat16 nn.Linear of a model on the CPU for a PackedLinear, in place. Call it
    after moving the model to its device and dtype. Returns how many layers were swapped: 0 where
    it does not apply (float32 weights, a GPU, or a PyTorch built without oneDNN)."""
    if not (torch.backends.mkldnn.enabled and torch.backends.mkldnn.is_available()):
        return 0
    return swap_linears(model, PackedLinear, tolerance=0.02)


class Int8Linear(nn.Module):
    """A bias-free nn.Linear with int8 weights, for sampling: a quarter of float32's bytes to read.

    Weight-only quantisation: each output row keeps its own scale, max|row| / 127, and the
    activations stay in floating point. PyTorch's CPU kernel for this (the one gpt-fast uses)
    takes bfloat16 activations and returns bfloat16, so this layer belongs in a bfloat16 model.
    Rounding each weight to one of 255 levels of its row costs little: `python -m smoll.bench
    --window_quality` measures it (docs/sampling.md: Precision while sampling). For inference only.
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
    return swap_linears(model, Int8Linear, tolerance=0.05)

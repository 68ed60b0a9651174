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

import atexit
import contextlib
import copy
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from devices import (DTYPES, machine_fingerprint, read_timings, resolve_dtype, synchronize,
                     timings_path, write_timings)
from models import KVCache, TinyGPT, apply_rotary, qk_norm, soft_cap
from utils import ROOT, SmollError, file_sha256

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
# The step compiled ahead of time, kept on disk (CPU)
#
# torch.compile's code lives as long as its process: every run traces and compiles the step again,
# tens of seconds on a 2-core CPU, so it only paid for very long texts. AOTInductor (torch.export,
# then torch._inductor.aoti_compile_and_package) compiles the Decoder step once into a .pt2
# package: a shared library with the weights inside. Loading one takes milliseconds and needs no
# compiler. The packages are kept beside the timings, one per CPU (its flags included), PyTorch
# version, engine code, model weights, path and batch size. Each has a note (.json) with that key,
# the package's SHA-256 and its measured step time; a package whose note, file or first step does
# not match is removed and built again, never trusted. play.py builds them in a background
# process after a run, or in the run when the text is long enough to pay for it
# (`python play.py --prepare` builds them on request).

PACKAGE_FORMAT = 1
# max_autotune times several kernels for each matmul while building and keeps the fastest: on the
# Zen 1 EPYC it made the shipped model's step 1.3x to 1.8x faster and the build 2.5x longer (about
# 70 s). freezing made no difference there; AOTInductor's code is C++ throughout (cpp_wrapper).
PACKAGE_OPTIONS = {"max_autotune": True, "autotune_num_choices_displayed": 0,  # no tables on stderr
                   "max_autotune_report_choices_stats": False}
PACKAGES_KEPT = 16  # the most recently used ones; older packages are deleted
STEP_SOURCES = ("engine.py", "models.py")  # the step's code: editing either builds new packages


class PackageError(Exception):
    """A compiled package that cannot be used: missing, changed on disk, broken, or wrong."""


class PackagedDecoder:
    """A Decoder step compiled ahead of time, run from its .pt2 package (see above).

    The package was exported from Decoder.forward with fixed shapes: the ring of every layer in
    full, a slot and a mask of filled slots as tensors, like CompiledDecoder's graph. Its ring
    buffers are the KVCache's own, written in place by the compiled code. The eager decoder stays
    beside it: its rotary tables feed the package, and it checks the package's first step."""

    def __init__(self, decoder, runner):
        self.decoder, self.run = decoder, runner
        W, dtype = decoder.window, decoder.model.token_embedding.weight.dtype
        self.slot = torch.zeros(1, dtype=torch.long)  # reused: one tensor fewer to make per step
        self.all_slots = torch.ones(1, 1, 1, W, dtype=torch.bool)  # the mask once the ring is full
        self.slots = torch.arange(W)
        self.cache, self.ring = None, None
        # This position's RoPE rows are copied into tensors of their own: a row handed over as a
        # view at the start of a larger table came out as NaN (AOTInductor, PyTorch 2.13).
        self.cos, self.sin = torch.empty(decoder.hs, dtype=dtype), torch.empty(decoder.hs, dtype=dtype)

    def step(self, idx, cache):
        d, pos = self.decoder, cache.pos
        W = d.window
        if cache is not self.cache:  # a new prompt's cache: its buffers never move, so list them once
            self.cache = cache
            self.ring = [b for i in range(len(d.layers)) for b in cache.buffers(i, idx.size(0), d.n_head, d.hs,
                                                                                 idx.device)]
        ring = self.ring
        mask = self.all_slots if pos >= W - 1 else (self.slots <= pos)[None, None, None]  # (1, 1, 1, W)
        cos, sin = d.rotary(pos, idx.device, self.cos.dtype)
        self.cos.copy_(cos)
        self.sin.copy_(sin)
        self.slot.fill_(pos % W)
        (logits,) = self.run([idx, self.cos, self.sin, self.slot, mask, *ring])
        cache.pos += 1
        return logits


class _FlatStep(nn.Module):
    """Decoder.forward with tensors only for inputs (ring buffers flattened): what torch.export takes.
    The model is a submodule, so its weights go into the package as parameters."""

    def __init__(self, decoder):
        super().__init__()
        self.model, self.decoder = decoder.model, decoder

    def forward(self, idx, cos, sin, slot, mask, *ring):
        return self.decoder.forward(idx, cos, sin, list(zip(ring[0::2], ring[1::2])), slot, None, mask)


def example_inputs(decoder, batch_size, device):
    """One step's inputs, shaped as every step's: the ids, RoPE's cos and sin, the slot, the mask, the ring."""
    cache = KVCache(decoder.window)
    ring = [b for i in range(len(decoder.layers)) for b in cache.buffers(i, batch_size, decoder.n_head, decoder.hs,
                                                                          device)]
    cos, sin = decoder.rotary(0, device, decoder.model.token_embedding.weight.dtype)
    return [torch.zeros(batch_size, 1, dtype=torch.long, device=device), cos, sin,
            torch.zeros(1, dtype=torch.long, device=device), torch.ones(1, 1, 1, decoder.window, dtype=torch.bool,
                                                                        device=device), *ring]


def weights_digest(model):
    """SHA-256 of a model's parameters and buffers: which model a package holds. Kept on the model
    with its tensors' addresses and versions, so that a run hashes its model once."""
    memo = tuple((t.data_ptr(), t._version) for t in model.state_dict().values())
    kept = getattr(model, "_weights_digest", None)
    if kept is None or kept[0] != memo:
        model._weights_digest = kept = (memo, _hash_tensors(model))
    return kept[1]


def _hash_tensors(model):
    digest = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        digest.update(f"{name} {t.dtype} {tuple(t.shape)}".encode())
        digest.update(t.view(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def code_digest():
    digest = hashlib.sha256()
    for name in STEP_SOURCES:
        with open(os.path.join(ROOT, name), "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()[:16]


def package_key(model, path, device, batch_size):
    """What a package depends on, as a dict stored in its note. model: the float32 model as loaded."""
    return {"format": PACKAGE_FORMAT, "machine": machine_fingerprint(device), "torch": torch.__version__,
            "code": code_digest(), "model": weights_digest(model), "path": str(path), "batch": batch_size,
            "shape": model_shape(model)}


def model_shape(model):
    """A TinyGPT's shape and options, as far as its weights do not say them (heads, activation)."""
    block = model.blocks[0]
    return {"n_layer": len(model.blocks), "n_head": block.attn.n_head, "n_embd": model.lm_head.in_features,
            "vocab": model.lm_head.out_features, "block_size": model.block_size, "qk_norm": bool(block.attn.qk_norm),
            "activation": getattr(block.mlp.act, "__name__", type(block.mlp.act).__name__),
            "logit_cap": model.logit_cap}


def package_files(key, folder=None):
    """The package's .pt2 and its note's .json, named by a digest of the key."""
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    folder = folder or timings_path("packages")
    return os.path.join(folder, name + ".pt2"), os.path.join(folder, name + ".json")


def read_note(key, folder=None):
    """The note of key's package, or None where there is none or it is another package's."""
    note = read_timings(package_files(key, folder)[1])
    return note if note.get("key") == key else None


def remove_package(key, folder=None):
    for file in package_files(key, folder):
        with contextlib.suppress(OSError):
            os.remove(file)


def load_package(decoder, key, folder=None):
    """A PackagedDecoder for key's package, checked: its file is the one its note describes, it
    loads, and two steps give the eager decoder's logits (the first position, and one far past
    the window on a full ring of random keys and values). Raises PackageError otherwise.
    Returns (decoder, seconds it took)."""
    t0 = time.perf_counter()
    pt2, note_file = package_files(key, folder)
    note = read_note(key, folder)
    if note is None or "sha256" not in note:
        raise PackageError("no package built for this model, path and machine")
    try:
        if file_sha256(pt2) != note["sha256"]:
            raise PackageError(f"{pt2} has changed since it was built")
        # what torch._inductor.aoti_load_package does, without importing torch._inductor (2 s here)
        loader = torch._C._aoti.AOTIModelPackageLoader(pt2, "model", False, 1, -1)
        packaged = PackagedDecoder(decoder, loader.run)
        with torch.no_grad():
            for pos in (0, 3 * decoder.window + 5):
                caches = [KVCache(decoder.window), KVCache(decoder.window)]
                for cache in caches:
                    cache.pos = pos
                if pos:  # the same random past in both caches (a generator of its own: sampling's stays as it is)
                    numbers = torch.Generator().manual_seed(0)
                    for i in range(len(decoder.layers)):
                        for c in caches:
                            c.buffers(i, key["batch"], decoder.n_head, decoder.hs, torch.device("cpu"))
                        for a, b in ((caches[0].k[i], caches[1].k[i]), (caches[0].v[i], caches[1].v[i])):
                            a.copy_(torch.randn(a.shape, generator=numbers))
                            b.copy_(a)
                idx = torch.zeros(key["batch"], 1, dtype=torch.long)
                _check_close(packaged.step(idx, caches[0]), decoder.step(idx, caches[1]),
                             tolerance=1e-3 if key["path"].startswith("float32") else 0.05)
    except PackageError:
        raise
    except AssertionError as e:
        raise PackageError(f"{pt2} does not compute the model's logits ({e})")
    except Exception as e:  # not a package, one for other shapes, or a PyTorch whose loader differs
        raise PackageError(f"{pt2} does not load ({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__})")
    with contextlib.suppress(OSError):
        os.utime(note_file)  # recently used: kept when old packages are pruned
    return packaged, time.perf_counter() - t0


def build_package(model, path, device, batch_size, folder=None):
    """Compile path's decoding step for model (the float32 model as loaded) into a package, time it,
    and write its note. Returns the note; None where another process is building it already, or
    where the cache folder cannot be written. Where the path cannot run or the build fails, the
    note says why (and no package is kept), so that runs do not try again until PyTorch, the code
    or the model change; `play.py --prepare` tries again."""
    key = package_key(model, path, device, batch_size)
    pt2, note_file = package_files(key, folder)
    lock = pt2 + ".lock"
    if not _take_lock(lock):
        return None
    tmp = f"{pt2[:-4]}.{os.getpid()}.tmp.pt2"
    try:
        prepared = prepare_path(model, SamplingPath(path.dtype), device, pack=False)  # oneDNN's packed weights cannot be exported
        if prepared is None:
            return _write_note(note_file, {"key": key, "failed": f"{path.dtype} cannot run here"})
        fast_model, _ = prepared
        fast_model.requires_grad_(False)
        decoder = Decoder(fast_model)
        t0 = time.perf_counter()
        try:
            import torch._inductor  # noqa: F401 (2 s to import: only when building)
            _compiler_folder(os.path.dirname(pt2))
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # export's notes on lifted constants, not for users
                exported = torch.export.export(_FlatStep(decoder), tuple(example_inputs(decoder, batch_size, device)))
                torch._inductor.aoti_compile_and_package(exported, package_path=tmp, inductor_configs=PACKAGE_OPTIONS)
            build_s = time.perf_counter() - t0
            os.replace(tmp, pt2)
            note = _write_note(note_file, {"key": key, "sha256": file_sha256(pt2), "build_s": build_s})
            packaged, load_s = load_package(prepare_path(model, SamplingPath(path.dtype), device)[1], key, folder)
            note.update(load_s=load_s, step_s=time_steps(fast_model, packaged, batch_size, device))
        except Exception as e:  # a compiler error, an op that export or AOTInductor cannot take, a bad package
            remove_package(key, folder)
            reason = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            return _write_note(note_file, {"key": key, "failed": f"building failed: {reason}"})
        _write_note(note_file, note)
        _prune(os.path.dirname(pt2))
        return note
    finally:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        _release_lock(lock)


def _take_lock(lock, stale_s=3600):
    """Create the lock file, holding this process's id; False where another process holds it (one
    younger than stale_s: older ones are from builds that died) or the folder cannot be written."""
    try:
        os.makedirs(os.path.dirname(lock), exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            if time.time() - os.path.getmtime(lock) > stale_s:
                os.remove(lock)
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except OSError:  # FileExistsError: held; PermissionError and the like: an unwritable cache
        return False
    with os.fdopen(fd, "w") as f:
        f.write(str(os.getpid()))
    return True


def _release_lock(lock):
    """Remove the lock, if it is still this process's (a stale one may have been taken over)."""
    with contextlib.suppress(OSError):
        with open(lock) as f:
            mine = f.read() == str(os.getpid())
        if mine:
            os.remove(lock)


def _compiler_folder(folder):
    """Point PyTorch's compiler at a folder of this process's own, deleted when it exits: the
    files a build leaves are of no use once its package is written. PyTorch reads the setting once
    a process, so every build of the process shares it. A TORCHINDUCTOR_CACHE_DIR of the user's own
    is kept."""
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = path = tempfile.mkdtemp(prefix="inductor-", dir=folder)
        atexit.register(shutil.rmtree, path, True)


def _write_note(note_file, note):
    write_timings(note_file, note)
    return note


def _prune(folder, keep=PACKAGES_KEPT):
    """Delete all but the `keep` most recently used packages, and what builds that died left
    behind more than a day ago (temp packages, locks, their build folders)."""
    with contextlib.suppress(OSError):
        entries = list(os.scandir(folder))
        notes = sorted((e for e in entries if e.name.endswith(".json")), key=lambda e: e.stat().st_mtime, reverse=True)
        for entry in notes[keep:]:
            for file in (entry.path, entry.path[:-5] + ".pt2"):
                with contextlib.suppress(OSError):
                    os.remove(file)
        for entry in entries:
            if entry.name.endswith((".tmp.pt2", ".lock")) or entry.name.startswith("inductor-"):
                with contextlib.suppress(OSError):
                    if time.time() - entry.stat().st_mtime > 86400:
                        shutil.rmtree(entry.path) if entry.is_dir() else os.remove(entry.path)


def packages_to_build(model, device, dtype_flag="auto", batch_size=1):
    """The compiled paths worth building for this model here that have no package (nor a note
    saying why they cannot be built): what a background build would make."""
    if device.type != "cpu" or not isinstance(model, TinyGPT) or not have_compiler(device):
        return []
    paths = [SamplingPath(p.dtype, compiled=True) for p in eager_candidates(device, dtype_flag)]
    return [p for p in paths if read_note(package_key(model, p, device, batch_size)) is None]


def build_in_background(weights, dtype_flag="auto", batch_size=1):
    """Start `python play.py --prepare` for these weights in a process of its own, at the lowest
    priority, and return it (None where SMOLL_BACKGROUND_BUILD=0 says not to). It outlives this
    run; its output goes to packages/build.log in the cache folder."""
    if os.environ.get("SMOLL_BACKGROUND_BUILD", "1") == "0":
        return None
    lock = os.path.join(timings_path("packages"), "background.lock")  # one background build at a time
    if not _take_lock(lock):
        return None
    log_file = os.path.join(timings_path("packages"), "build.log")
    command = [sys.executable, os.path.join(ROOT, "play.py"), "--prepare", "--weights", os.path.abspath(weights),
               "--device", "cpu", "--dtype", dtype_flag, "--num_samples", str(batch_size)]
    options = {}
    if os.name == "posix":
        options["start_new_session"] = True  # Ctrl-C in this terminal does not stop it
        if shutil.which("nice"):
            command = [shutil.which("nice"), "-n", "19", *command]
    else:
        options["creationflags"] = subprocess.IDLE_PRIORITY_CLASS | subprocess.CREATE_NEW_PROCESS_GROUP
    try:
        with open(log_file, "a", encoding="utf-8") as log:
            return subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    cwd=ROOT, env={**os.environ, "SMOLL_BACKGROUND_LOCK": lock}, **options)
    except OSError:
        with contextlib.suppress(OSError):
            os.remove(lock)
        return None  # an unwritable cache: this run and the next sample eagerly


# ----------------------------------------------------------------------------------------------
# How to sample on this machine: timed, not guessed
#
# Which precision samples fastest depends on the processor, not on its feature flags: on one CPU
# with bfloat16 instructions a bfloat16 matrix-vector product is 2x float32's, on another it is
# 3x slower. So play.py times a few decoding steps of each candidate path here and keeps the
# fastest. The decision is stored per CPU (or GPU), PyTorch version, model shape and batch
# size, so the next run on the same machine starts at once.

COMPILE_GUESS_S = 20.0  # what compiling a step is assumed to cost before it has been measured here
PACKAGE_BUILD_GUESS_S = 90.0  # the same for a CPU's package (max_autotune): 70 s on a 2-core Zen 1 EPYC
TIMED_STEPS = 24  # decoding steps timed per candidate, after a few untimed ones


@dataclass(frozen=True)
class SamplingPath:
    dtype: str  # "float32", "bfloat16", "float16", or "int8" (int8 weights, bfloat16 activations)
    compiled: bool = False  # the step compiled: on a CPU a package built once, on CUDA torch.compile in the run

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


def prepare_path(model, path, device, batch_size=1, pack=True, folder=None):
    """A copy of model set up for path, and its decoder (None for a model without one); None
    where this PyTorch cannot run the path (int8 without its kernel). A compiled path on a CPU
    loads its package, and raises PackageError where there is no good one (build_package makes
    one); on CUDA it is compiled here, by torch.compile."""
    original, model = model, copy.deepcopy(model)
    model.to(torch.bfloat16 if path.dtype == "int8" else DTYPES[path.dtype])
    if path.dtype == "int8":
        if device.type != "cpu" or not quantize_for_cpu_sampling(model):
            return None
    elif pack:
        pack_for_cpu_sampling(model)  # bfloat16 on a CPU only: the same numbers, read faster
    if not isinstance(model, TinyGPT):
        return model, None
    decoder = Decoder(model)
    if path.compiled and device.type == "cpu":
        decoder, _ = load_package(decoder, package_key(original, path, device, batch_size), folder)
    elif path.compiled:  # PyTorch caches compiled code in /tmp unless told; beside the timings it outlives a reboot
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
    return (f"{machine_fingerprint(device)} | torch {torch.__version__} | {json.dumps(shape, sort_keys=True)} "
            f"| vocab {vocab} | batch {batch_size}")


def pick_sampling_path(model, config, device, dtype_flag="auto", eager=False, n_chars=500, batch_size=1,
                       log=None):
    """Time the candidate paths (or read their timings from the cache), and return the fastest
    for n_chars characters as (path, model, decoder, report): report says what was measured.
    A compiled path counts what it still costs in this run: on a CPU, loading its package where
    one is built (or building it, where the text is long enough to pay for that); on CUDA, compiling."""
    if not isinstance(model, TinyGPT):  # the Bigram is one table lookup: nothing to choose
        path = SamplingPath(dtype_flag if dtype_flag != "auto" else "float32")
        return (path, *prepared_or_explained(model, path, device), f"{path} (a Bigram has one path)")
    log = log or (lambda line: None)
    key, store = decision_key(model, config, device, batch_size), timings_path("sampling_paths.json")
    timings_kept = read_timings(store)
    known = timings_kept.get(key, {})
    kept_before = json.dumps(known, sort_keys=True)
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
    known["steps"] = {**known.get("steps", {}), **{str(p): s for p, s in timings.items()}}
    best, load_report = choose_path(timings, n_chars), ""
    if not eager and device.type == "cpu":
        best, load_report = choose_with_packages(model, device, timings, ready, known, n_chars, batch_size, log)
    elif not eager and have_compiler(device):  # CUDA: torch.compile, in this run
        compiled = SamplingPath(best.dtype, compiled=True)
        compile_s = known.get("compile_s", {}).get(str(compiled))
        if str(compiled) in known["steps"]:
            timings[compiled] = known["steps"][str(compiled)]
        elif worth_compiling(timings[best], n_chars, compile_s or COMPILE_GUESS_S):
            log(f"compiling the decoding step ({compiled}): it can pay back over {n_chars:,} characters")
            t0 = time.perf_counter()
            ready[compiled] = prepare_path(model, compiled, device)
            timings[compiled] = known["steps"][str(compiled)] = time_steps(*ready[compiled], batch_size, device)
            known.setdefault("compile_s", {})[str(compiled)] = compile_s = time.perf_counter() - t0
        if compiled in timings:
            # compiled code is cached on disk by PyTorch, but loading it again still takes time
            cost = {} if compiled in ready else {compiled: compile_s or COMPILE_GUESS_S}
            best = choose_path(timings, n_chars, cost)
    timings_kept[key] = known
    if json.dumps(known, sort_keys=True) != kept_before:
        write_timings(store, timings_kept)
    if best not in ready:
        ready[best] = prepare_path(model, best, device, batch_size)
    figures = ", ".join(f"{p} {1e3 * s:.2f} ms" for p, s in sorted(timings.items(), key=lambda kv: kv[1]))
    report = f"{best} ({source}{load_report}, ms per step: {figures})"
    return (best, *ready[best], report)


def choose_with_packages(model, device, timings, ready, known, n_chars, batch_size, log):
    """pick_sampling_path's choice on a CPU, where compiled steps come as packages (see above): a
    package already built costs its load time; a missing one is built in this run only where
    the text pays for the build, else after the run (play.py). Returns (path, a note for the report)."""
    costs = {}
    for path in [p for p in timings if not p.compiled]:
        compiled = SamplingPath(path.dtype, compiled=True)
        note = read_note(package_key(model, compiled, device, batch_size))
        if note and "step_s" in note:
            timings[compiled], costs[compiled] = note["step_s"], note["load_s"]
    best = choose_path(timings, n_chars, costs)
    compiled = SamplingPath(best.dtype, compiled=True)
    build_s = known.get("build_s", {}).get(str(compiled), PACKAGE_BUILD_GUESS_S)
    tried = read_note(package_key(model, compiled, device, batch_size))  # a note saying it failed here
    if (not best.compiled and tried is None and have_compiler(device)
            and worth_compiling(timings[best], n_chars, build_s)):
        log(f"compiling the decoding step ({compiled}) for this machine: it pays back over {n_chars:,} "
            f"characters, and later runs load it")
        note = build_package(model, compiled, device, batch_size)
        if note and "step_s" in note:  # built (not failed, nor locked by another build)
            known.setdefault("build_s", {})[str(compiled)] = note["build_s"]
            timings[compiled], costs[compiled] = note["step_s"], 0.0
            best = choose_path(timings, n_chars, costs)
    if not best.compiled:
        return best, ""
    t0 = time.perf_counter()
    try:
        ready[best] = prepare_path(model, best, device, batch_size)
    except PackageError as e:  # changed, broken or foreign: removed, and built again after this run
        remove_package(package_key(model, best, device, batch_size))
        log(f"{e}: sampling eagerly, and building it again")
        return choose_path({p: s for p, s in timings.items() if not p.compiled}, n_chars), ""
    return best, f"; its package loaded and checked in {1e3 * (time.perf_counter() - t0):.0f} ms"


def prepare_packages(model, config, device, dtype_flag="auto", batch_size=1, log=print):
    """play.py --prepare: build (or find) the package of every compiled path worth having here,
    saying what each one measures against the eager paths. Raises SmollError where none can be built."""
    if not isinstance(model, TinyGPT):
        raise SmollError("a Bigram samples with one table lookup: there is nothing to compile.")
    if device.type != "cpu":
        raise SmollError(f"--prepare builds compiled steps for a CPU; on {device.type}, play.py compiles in the "
                         f"run where it pays: drop --prepare, or add --device cpu.")
    if not have_compiler(device):
        raise SmollError("--prepare needs a C++ compiler (g++ or clang++) to build: install one (e.g. apt install "
                         "g++). play.py works without it, eagerly.")
    try:
        _prepare_each(model, config, device, dtype_flag, batch_size, log)
    finally:  # a background build (build_in_background) lets the next one start
        if os.environ.get("SMOLL_BACKGROUND_LOCK"):
            with contextlib.suppress(OSError):
                os.remove(os.environ["SMOLL_BACKGROUND_LOCK"])


def _prepare_each(model, config, device, dtype_flag, batch_size, log):
    _, _, _, report = pick_sampling_path(model, config, device, dtype_flag, eager=True, batch_size=batch_size)
    log(f"eager: {report}")
    for path in [SamplingPath(p.dtype, compiled=True) for p in eager_candidates(device, dtype_flag)]:
        key = package_key(model, path, device, batch_size)
        note = read_note(key)
        if note and "step_s" in note and os.path.exists(package_files(key)[0]):
            log(f"{path}: ready, {1e3 * note['step_s']:.2f} ms per step ({package_files(key)[0]})")
            continue
        log(f"{path}: compiling (a minute or so on 2 cores)...")
        note = build_package(model, path, device, batch_size)
        if note is None:
            log(f"{path}: another process is building it now")
        elif "failed" in note:
            log(f"{path}: not built: {note['failed']}")
        else:
            log(f"{path}: built in {note['build_s']:.0f} s, {1e3 * note['step_s']:.2f} ms per step, "
                f"loads in {1e3 * note['load_s']:.0f} ms")
    path, _, _, report = pick_sampling_path(model, config, device, dtype_flag, batch_size=batch_size)
    log(f"play.py now samples with: {report}")

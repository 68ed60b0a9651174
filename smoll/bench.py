"""Measure how fast smoll trains and samples on this machine.

    python -m smoll.bench                        # the default TinyGPT (6 x 384, context 256)
    python -m smoll.bench --preset cpu           # the model that --preset cpu trains
    python -m smoll.bench --batch_size 8 --sample_chars 2000 --device cpu

It first names the machine: the CPU (or GPU), its vector and matrix extensions, PyTorch.
Training: tokens/s and ms per optimizer step of train.py's own train_step, on Tiny Shakespeare
batches, set up as train.py sets it up (compiled where train.py would compile); the achieved
FLOP/s, and that figure as a fraction of this device's matmul peak, measured in the same run; then
the same model size built and trained the way nanoGPT does it on a CPU (float32), side by side.
--breakdown adds where the step's time goes: the passes, dropout's random masks, each optimizer.
Sampling: characters/s on each path play.py can choose here (float32, bfloat16, int8 weights;
--compile_sampling adds the compiled step), and with nanoGPT's generate (no cache: the whole
window rerun for every character), all in steady state past the end of the context window. The
weights are random: speed does not depend on them.
"""

import argparse
import contextlib
import io
import os
import tempfile
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from config import MODELS, PRESETS, add_config_args, config_from_args
from models import build_model
from smoll.devices import cpu_extensions, describe_device, get_device, resolve_dtype, synchronize
from smoll.distributed import setup_machine
from smoll.eval_table import to_model_ids
from smoll.files import SmollError
from smoll.sampling.choose import choose, prepare_variant
from smoll.sampling.decoder import Variant, candidates, have_compiler, prepare
from smoll.sampling.packages import build_package
from smoll.speed import warm_up
from train import setup_run, train_step
from utils import DEFAULT_DATA, autocast, batch_shape, get_batch, load_model, load_text_ids, split_data

VOCAB = 65  # Tiny Shakespeare's


def timed(fn, device, repeats):
    """Seconds per call of fn, after one warm-up call."""
    fn()
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    synchronize(device)
    return (time.perf_counter() - t0) / repeats


def matmul_peak(device, dtype, n=2048, repeats=10):
    """FLOP/s of a large square matmul: a practical ceiling for this device and dtype."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n ** 3 / timed(lambda: a @ b, device, repeats)


def flops_per_token(model, config):
    """Training FLOPs per token: 6 per parameter (forward + backward) plus attention's QK^T and AV
    (the PaLM paper's estimate). The embedding lookup is not a matmul, so it is not counted."""
    n_params = sum(p.numel() for p in model.parameters()) - model.token_embedding.weight.numel()
    return 6 * n_params + 12 * config.n_layer * config.n_embd * config.block_size


class NanoGPTStyleBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        C, self.n_head, self.dropout = config.n_embd, config.n_head, config.dropout
        self.ln_1, self.ln_2 = nn.LayerNorm(C), nn.LayerNorm(C)
        self.c_attn, self.c_proj = nn.Linear(C, 3 * C), nn.Linear(C, C)
        self.mlp = nn.Sequential(nn.Linear(C, 4 * C), nn.GELU(), nn.Linear(4 * C, C),
                                 nn.Dropout(config.dropout))

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        dropout_p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        x = x + self.c_proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.mlp(self.ln_2(x))


class NanoGPTStyle(nn.Module):
    """The reference for bench.py: a GPT built the way nanoGPT's model.py builds it (learned
    position embeddings, biases, a head tied to the token embedding, one qkv matmul, SDPA), and
    trained the way nanoGPT trains on a CPU: float32, plain AdamW. generate() is nanoGPT's."""

    def __init__(self, config, vocab_size):
        super().__init__()
        self.block_size = config.block_size
        self.wte = nn.Embedding(vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.blocks = nn.Sequential(*[NanoGPTStyleBlock(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, idx, targets=None):
        x = self.ln_f(self.blocks(self.wte(idx) + self.wpe(torch.arange(idx.size(1), device=idx.device))))
        if targets is None:  # sampling: only the last position's logits are needed
            return self.lm_head(x[:, [-1], :]), None
        logits = self.lm_head(x)
        return logits, F.cross_entropy(logits.flatten(0, 1), targets.flatten())

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0):
        for _ in range(max_new_tokens):
            logits, _ = self(idx[:, -self.block_size:])  # the whole window, for every character
            probs = F.softmax(logits[:, -1, :] / temperature, dim=-1)
            idx = torch.cat((idx, torch.multinomial(probs, num_samples=1)), dim=1)
        return idx


def bench_training(config, device, steps):
    """ms per step and tokens/s of train.py's own train_step, set up by its own setup_run (the
    data, model, optimizers and compiling, as `python train.py` with this config), at full length."""
    with contextlib.redirect_stdout(io.StringIO()):  # train.py's log lines, which would say where it saves
        run = setup_run(config, setup_machine(config), DEFAULT_DATA, os.path.join(tempfile.gettempdir(), "bench.pth"))
        run.step = config.seq_warmup  # past any sequence-length warmup: full-length batches
        step_model = warm_up(run)  # as train.py does: times the attention, compiles where it pays
    seconds = timed(lambda: train_step(run, step_model, 1.0), device, steps)
    B, T = batch_shape(run.step, config)
    return {"ms_per_step": 1000 * seconds, "tokens_per_s": B * T / seconds, "model": run.model,
            "dtype": run.machine.dtype, "compiled": "compile_s" in run.record,
            "attention": run.record.get("attention", "sdpa"), "run": run, "step_model": step_model}


def step_breakdown(run, step_model, device, repeats):
    """Seconds of the parts of train.py's step: the forward and backward passes on one micro-batch,
    the same passes with dropout off (the difference is the cost of its random masks; changing
    dropout recompiles a compiled step first), and each optimizer's step."""
    config = run.config
    B, T = batch_shape(run.step, config)
    x, y = get_batch(run.train_data, B // config.grad_accum, T, torch.Generator().manual_seed(0), device)

    def passes():
        with autocast(device, run.machine.dtype):
            _, loss = step_model(x, y)
        loss.backward()

    parts = {"forward and backward": timed(passes, device, repeats) * config.grad_accum}
    dropouts = {m: m.p for m in run.model.modules() if isinstance(m, nn.Dropout) and m.p > 0}
    if dropouts:
        for m in dropouts:
            m.p = 0.0
        parts["the same without dropout"] = timed(passes, device, repeats) * config.grad_accum
        for m, p in dropouts.items():
            m.p = p
    for optimizer in run.optimizers:
        parts[f"{type(optimizer).__name__}'s step"] = timed(optimizer.step, device, repeats)
        optimizer.zero_grad(set_to_none=True)
    return parts


def bench_reference_training(model, optimizer, config, device, steps):
    """The same for the nanoGPT-style reference, in float32, with plain AdamW."""
    x = torch.randint(VOCAB, (config.batch_size, config.block_size), device=device)
    y = torch.randint(VOCAB, (config.batch_size, config.block_size), device=device)

    def step():
        _, loss = model(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = timed(step, device, steps)
    tokens = config.batch_size * config.block_size
    return {"ms_per_step": 1000 * seconds, "tokens_per_s": tokens / seconds}


def bench_sampling(config, device, variant, chars, folder=None):
    """Characters/s of smoll's KV cache on one variant of the decoding step, generating `chars`
    characters after a prompt that fills the whole context window, with the model prepared as
    play.py prepares it. A compiled variant on a CPU is first built into a package in `folder` (as
    play.py --prepare does). Returns (chars/s, parameters, seconds spent building), or None where
    this PyTorch cannot run the variant."""
    torch.manual_seed(0)
    model = build_model(config, VOCAB).to(device).eval()
    n_params, build_s = sum(p.numel() for p in model.parameters()), 0.0
    if variant.compiled and device.type == "cpu":
        t0 = time.perf_counter()
        note = build_package(model, variant, device, 1, folder=folder)
        build_s = time.perf_counter() - t0
        if note is None or "failed" in note:
            print(f"sampling past the window: smoll, {variant}: not built ({note['failed'] if note else 'locked'})")
            return None
    try:
        model, decoder = prepare_variant(model, variant, device, folder=folder)
    except SmollError:
        return None
    prompt = torch.randint(VOCAB, (1, config.block_size), device=device)
    steps = model.stream(prompt, chars + 4, decoder=decoder)
    for _ in range(4):  # the prompt, then 3 steps that warm up (and compile): not timed
        next(steps)  # from here on, every step is past the window
    synchronize(device)
    t0 = time.perf_counter()
    for _ in steps:
        pass
    synchronize(device)
    return chars / (time.perf_counter() - t0), n_params, build_s


def bench_reference_sampling(config, device, chars):
    """Characters/s of nanoGPT's generate (float32, no cache) after a prompt that fills the window."""
    torch.manual_seed(0)
    model = NanoGPTStyle(config, VOCAB).to(device).eval()
    prompt = torch.randint(VOCAB, (1, config.block_size), device=device)
    model.generate(prompt, 1)  # warm-up
    synchronize(device)
    t0 = time.perf_counter()
    model.generate(prompt, chars)
    synchronize(device)
    return chars / (time.perf_counter() - t0)


@torch.no_grad()
def window_quality(weights, data_path, n_texts=16, device="cpu", dtype="float32"):
    """Past the window, compare the loss of what the KV cache computes (sliding-window attention,
    the model's forward pass over a long text) with rerunning the model on the last block_size
    characters for every position. Scored on n_texts random 4-window texts from the val split,
    with the model set up the way play.py samples with it on the path of `dtype`
    ("float32", "bfloat16", "float16" or "int8")."""
    model, tokenizer, config = load_model(weights, device, flag="--window_quality")
    try:
        model, _ = prepare(model, Variant(dtype), torch.device(device))
    except SmollError:
        raise SmollError(f"this PyTorch cannot sample in {dtype} on {device}: pick another --sample_dtype.") from None
    W = config.block_size
    ids, text_tokenizer = load_text_ids(data_path)
    _, val = split_data(to_model_ids(ids, text_tokenizer, tokenizer, data_path), W)
    starts = torch.randint(len(val) - 4 * W - 1, (n_texts,), generator=torch.Generator().manual_seed(0))
    sliding, rerun = [], []
    for s in starts.tolist():
        text = torch.from_numpy(val[s:s + 4 * W + 1].astype(np.int64)).to(device)  # (4W+1,)
        x, y = text[:-1], text[1:]
        logits, _ = model(x[None])  # (1, 4W, V): every position sees the W ending at itself
        sliding.append(F.cross_entropy(logits[0, W:].float(), y[W:], reduction="none"))
        windows = torch.stack([x[t - W + 1:t + 1] for t in range(W, 4 * W)])  # (3W, W)
        logits, _ = model(windows)  # each position rerun on its own last W characters
        rerun.append(F.cross_entropy(logits[:, -1].float(), y[W:], reduction="none"))
    return torch.cat(sliding).mean().item(), torch.cat(rerun).mean().item(), 3 * W * n_texts


def describe_machine(device):
    """One line: the device, the CPU's extensions that matter for speed, and PyTorch."""
    extensions = cpu_extensions()
    cpu = f" ({', '.join(extensions)})" if device.type == "cpu" and extensions else ""
    return f"device: {describe_device(device)}{cpu} | torch {torch.__version__}"


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m smoll.bench",
                                     description="Measure smoll's training and sampling speed.")
    parser.add_argument("--model", choices=MODELS, default="tinygpt", help=argparse.SUPPRESS)
    parser.add_argument("--preset", choices=list(PRESETS), help="benchmark a preset's model and batch")
    parser.add_argument("--train_steps", type=int, default=10, help="timed training steps (default: 10)")
    parser.add_argument("--sample_chars", type=int, default=1000,
                        help="characters timed with the KV cache (default: 1000)")
    parser.add_argument("--reference_chars", type=int, default=50,
                        help="characters timed with nanoGPT's generate, without a cache (default: 50)")
    parser.add_argument("--no_reference", action="store_true",
                        help="skip the nanoGPT-style training reference")
    parser.add_argument("--window_quality", metavar="WEIGHTS",
                        help="instead of timing, score a checkpoint past its context window: "
                             "the KV cache's sliding window against rerunning the window")
    parser.add_argument("--sample_dtype", choices=("float32", "bfloat16", "float16", "int8"),
                        help="with --window_quality: the sampling path to score (default: --dtype, "
                             "or float32 for auto)")
    parser.add_argument("--compile_sampling", action="store_true",
                        help="also time the compiled decoding step of each variant: on a CPU the package "
                             "that play.py builds and loads (20 s to a minute and a half to build each "
                             "on 2 cores), "
                             "on CUDA torch.compile with CUDA graphs")
    parser.add_argument("--sampling_only", action="store_true", help="skip the training benchmarks")
    parser.add_argument("--breakdown", action="store_true",
                        help="also time the parts of the training step: the forward and backward passes, "
                             "with and without dropout, and each optimizer's step")
    add_config_args(parser)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.breakdown and args.sampling_only:
        parser.error("--breakdown times the parts of the training step, which --sampling_only skips: drop one.")
    for flag in ("train_steps", "sample_chars", "reference_chars"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be at least 1, got {getattr(args, flag)}: every speed is a "
                         f"count divided by a time.")
    try:
        config = config_from_args(args)
    except ValueError as e:
        parser.error(str(e))
    try:
        device = get_device(config.device)
    except SmollError as e:
        parser.exit(1, f"error: {e}\n")
    dtype = resolve_dtype(config.dtype, device)
    if args.window_quality:
        sample_dtype = args.sample_dtype or ("float32" if config.dtype == "auto" else config.dtype)
        try:
            sliding, rerun, n = window_quality(args.window_quality, DEFAULT_DATA, device=device, dtype=sample_dtype)
        except SmollError as e:
            parser.exit(1, f"error: {e}\n")
        print(f"validation loss past the window in {sample_dtype}, {n:,} positions: {sliding:.4f} "
              f"nats/char with the KV cache (sliding window) | {rerun:.4f} rerunning the last "
              f"block_size characters")
        return

    print(describe_machine(device))
    print(f"model: {config.n_layer} layers x {config.n_head} heads x {config.n_embd}, context "
          f"{config.block_size}, batch {config.batch_size}")
    peak = matmul_peak(device, dtype)
    print(f"matmul peak ({str(dtype)[6:]}, 2048 x 2048): {peak / 1e9:,.0f} GFLOP/s")
    if not args.sampling_only:
        bench_all_training(args, config, device, peak, parser)
    bench_all_sampling(args, config, device)


def bench_all_training(args, config, device, peak, parser):
    try:
        t = bench_training(config, device, args.train_steps)
    except SmollError as e:
        parser.exit(1, f"error: {e}\n")
    flops = flops_per_token(t["model"], config) * t["tokens_per_s"]
    print(f"training ({str(t['dtype'])[6:]}, {'compiled' if t['compiled'] else 'eager'}, {t['attention']} "
          f"attention, train.py's "
          f"train_step): {t['tokens_per_s']:,.0f} tokens/s | {t['ms_per_step']:,.1f} ms/step | "
          f"{flops / 1e9:,.1f} GFLOP/s achieved = {100 * flops / peak:.0f}% of the matmul peak")
    if args.breakdown:
        parts = step_breakdown(t["run"], t["step_model"], device, args.train_steps)
        print("where the step goes: " + " | ".join(f"{name} {1e3 * s:,.1f} ms ({100 * s / t['ms_per_step'] * 1e3:.0f}%)"
                                                    for name, s in parts.items()))
    if not args.no_reference:
        torch.manual_seed(0)
        reference = NanoGPTStyle(config, VOCAB).to(device)
        r = bench_reference_training(reference, torch.optim.AdamW(reference.parameters(), lr=config.learning_rate),
                                     config, device, args.train_steps)
        print(f"nanoGPT-style reference (float32, eager, same size): {r['tokens_per_s']:,.0f} tokens/s | "
              f"{r['ms_per_step']:,.1f} ms/step | smoll trains {t['tokens_per_s'] / r['tokens_per_s']:.2f}x "
              f"as fast")


def bench_all_sampling(args, config, device):
    reference = bench_reference_sampling(config, device, args.reference_chars)
    print(f"sampling past the window: nanoGPT-style generate (float32, no cache): {reference:,.1f} chars/s")
    variants = candidates(device, "auto")
    if args.compile_sampling and have_compiler(device):
        variants += [Variant(v.dtype, compiled=True) for v in variants]
    speeds = {}
    with tempfile.TemporaryDirectory(prefix="smoll-bench-") as folder:  # packages of random weights: not kept
        for variant in variants:
            measured = bench_sampling(config, device, variant, args.sample_chars, folder)
            if measured is None:
                print(f"sampling past the window: smoll, {variant}: not available in this PyTorch")
                continue
            speed, n_params, build_s = speeds[variant] = measured
            built = f" | built in {build_s:.0f} s, once per machine" if build_s else ""
            print(f"sampling past the window: smoll with the KV cache, {variant}: {speed:,.0f} chars/s | "
                  f"{speed * n_params / 1e9:,.2f} G parameter-tokens/s ({n_params / 1e6:.2f}M parameters) | "
                  f"{speed / reference:.1f}x the nanoGPT-style generate{built}")
    if speeds:
        best = choose({v: 1 / s[0] for v, s in speeds.items()}, args.sample_chars)
        print(f"fastest sampling path here: {best} (play.py times its own choice at start)")


if __name__ == "__main__":
    main()

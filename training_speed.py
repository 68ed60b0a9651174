"""The warm-up of a training run: what train.py does before its first step to run fast here.

    warm_up(r) -> (compile seconds, seconds a step takes, seconds an evaluation takes)

- The attention is timed both ways (the fused kernel and the written-out one: which wins depends
  on the device, the precision and the sizes, and no CPU flag tells), and the faster is kept.
- torch.compile compiles the step where it pays (should_compile), and a compiled step that turns
  out no faster than the eager one is dropped.
- The timings give the run's estimate (announce_estimate).
Every random state is put back afterwards, so the run goes on exactly as without the warm-up.
r is train.py's Run.
"""

import time

import torch

from devices import describe_device, read_timings, synchronize, timings_path, write_timings
from ensemble import teacher_log_probs
from models import TinyGPT
from utils import autocast, batch_shape, get_batch, rng_states, set_rng_states


def should_compile(config, device):
    """--compile auto compiles on CUDA, and on a CPU for a time budget of 2 minutes or more: on a
    2-core CPU, compiling takes 10 to 30 s the first time (about 3 s once PyTorch has cached the
    kernels), and then a step of --preset cpu runs about 1.45x faster."""
    if config.compile != "auto":
        return config.compile == "on"
    return device.type == "cuda" or (device.type == "cpu" and config.time_budget >= 120)


def warm_up(r):
    """One forward and backward pass on a throwaway batch before the training loop (two, really:
    the first sets up or compiles, the second is timed), then one evaluation batch. The gradients
    are dropped and every RNG state is put back, so the run goes on exactly as without them.

    First the attention is chosen by timing (choose_attention). Then torch.compile compiles the
    step, for each shape of batch the run will take (two with --seq_warmup). That time counts
    against --time_budget, but not against the tokens/s. With --compile auto, a compiled step that
    turns out no faster than the eager one is dropped. The timings, and the teachers' passes of a
    distilled run, give the run's estimate.
    Returns (seconds spent compiling, or 0; seconds an optimizer step takes; seconds an evaluation takes).
    """
    c = r.config
    saved = rng_states(r.device, r.batch_rng)
    eager_seconds = choose_attention(r)
    shapes = [batch_shape(r.step, c)] if r.compiled and r.step < c.seq_warmup else []
    shapes.append(batch_shape(c.seq_warmup, c))  # the full shape last: it times the step
    compile_seconds = 0.0
    for batch_size, block_size in shapes:
        times = time_passes(r, r.train_model, batch_size, block_size)
        compile_seconds += times[0] - times[1]
    if r.compiled and c.compile == "auto" and eager_seconds is not None and times[1] >= eager_seconds:
        r.log(f"the compiled step ({1e3 * times[1]:.0f} ms) is no faster than the eager one "
              f"({1e3 * eager_seconds:.0f} ms) here: training uncompiled")
        r.train_model, r.compiled, times[1] = r.eager_model, False, eager_seconds
    for optimizer in r.optimizers:
        optimizer.zero_grad(set_to_none=True)
    set_rng_states(saved, r.device, r.batch_rng)
    r.model.eval()
    t = time.perf_counter()
    with torch.no_grad(), autocast(r.device, r.dtype):
        r.model(*r.eval_batches["val"][0])
    synchronize(r.device)
    eval_seconds = 2 * c.eval_iters * (time.perf_counter() - t)
    r.model.train()
    step_seconds = (times[1] + (time_teachers(r) if r.teachers is not None else 0.0)) * c.grad_accum
    return (compile_seconds if r.compiled else 0.0), step_seconds, eval_seconds


def time_teachers(r):
    """Seconds the teachers of a distilled run take on a full-length micro-batch (the second of two passes)."""
    x, _ = get_batch(r.train_data, r.config.batch_size // r.config.grad_accum, r.config.block_size,
                     torch.Generator().manual_seed(0), r.device)
    for _ in range(2):
        t = time.perf_counter()
        teacher_log_probs(r.teachers, x, r.config, r.device, r.dtype)
        synchronize(r.device)
    return time.perf_counter() - t


def time_passes(r, model, batch_size, block_size, passes=2):
    """Seconds of each of `passes` forward and backward passes of model on one fixed micro-batch
    of this shape. The first also sets up (or compiles); the gradients are left for the caller."""
    x, y = get_batch(r.train_data, batch_size // r.config.grad_accum, block_size,
                     torch.Generator().manual_seed(0), r.device)
    times = []
    for _ in range(passes):
        t = time.perf_counter()
        with autocast(r.device, r.dtype):
            _, loss = model(x, y)
        loss.backward()
        synchronize(r.device)
        times.append(time.perf_counter() - t)
    return times


def choose_attention(r):
    """Time a full-length micro-batch with the written-out attention and with the fused kernel
    (F.scaled_dot_product_attention), eagerly, and keep the faster for the run. Which wins depends
    on the device, the precision and the sizes (docs/speed.md), and no CPU flag tells. The
    choice is cached per machine, model shape and batch, like play.py's sampling path, so that
    runs of the same config make the same one; a resumed run keeps its own. Under torchrun the
    ranks keep the default (the fused kernel) rather than time apart and disagree.
    Returns the eager pass's seconds with the chosen attention, or None where nothing was timed."""
    if not isinstance(r.model, TinyGPT) or r.world_size > 1:
        return None
    c = r.config
    key = (f"{describe_device(r.device)} | torch {torch.__version__} | {r.dtype} | layers {c.n_layer} "
           f"x {c.n_embd}, {c.n_head} heads, qk_norm {c.qk_norm}, dropout {c.dropout} | vocab "
           f"{r.tokenizer.vocab_size} | micro-batch {c.batch_size // c.grad_accum} x {c.block_size}")
    store = timings_path("training_choices.json")
    kept = read_timings(store)
    seconds = kept.get(key, {}).get("pass_s")
    if "attention" not in r.record and not seconds:
        seconds = {}
        for name in ("written-out", "sdpa"):
            set_attention(r.model, name)
            seconds[name] = time_passes(r, r.eager_model, *batch_shape(c.seq_warmup, c))[1]
        kept[key] = {"pass_s": seconds}
        write_timings(store, kept)
    choice = r.record.get("attention") or min(seconds, key=seconds.get)
    set_attention(r.model, choice)
    r.record["attention"] = choice
    if seconds:
        r.log(f"attention: {choice} ({', '.join(f'{k} {1e3 * v:.0f} ms' for k, v in seconds.items())} "
              f"a micro-batch, as timed on this machine)")
    return seconds.get(choice) if seconds else None


def set_attention(model, name):
    """Run every attention layer of a TinyGPT through the fused kernel ("sdpa") or written out."""
    for block in model.blocks:
        block.attn.use_sdpa = name == "sdpa"


def announce_estimate(r, step_seconds, eval_seconds):
    """Say how long the run will take here, and point a CPU user to --preset cpu."""
    c = r.config
    if c.time_budget:
        return  # it takes its budget
    steps_left = c.max_iters - r.step
    evals_left = steps_left // c.eval_interval + 1
    total = steps_left * step_seconds + evals_left * eval_seconds
    r.log(f"estimated time here: {format_seconds(total)} ({steps_left:,} steps of {step_seconds:.2g} s "
          f"and {evals_left} evaluation{'s' if evals_left > 1 else ''} of {format_seconds(eval_seconds)})")
    if r.device.type == "cpu" and total > 600:
        r.log("no GPU here: `python train.py --preset cpu` trains the best TinyGPT this CPU makes in 5 "
              "minutes (`--time_budget SECONDS` sets another budget)")


def format_seconds(s):
    if s < 90:
        return f"{s:.2g} s"
    return f"{s / 60:.0f} min" if s < 5400 else f"{s / 3600:.1f} h"

"""The warm-up of a training run: what train.py does before its first step to run fast here.

    warm_up(run) -> the model that the training step runs

- The attention is timed both ways (the fused kernel and the written-out one: which wins depends
  on the device, the precision and the sizes, and no CPU flag tells), and the faster is kept.
- Under torchrun the model is wrapped in DDP, which averages the gradients of the processes.
- torch.compile compiles the step where it pays (should_compile), and a compiled step that turns
  out no faster than the eager one is dropped.
- The timings give the run's estimate (announce_estimate).
Every random state is put back afterwards, so the run goes on exactly as without the warm-up.
run is train.py's Run.
"""

import math
import time

import torch

from smoll.devices import synchronize
from smoll.distributed import rng_states, set_rng_states, wrap_ddp
from smoll.ensemble import teacher_log_probs
from smoll.files import cache_path, read_json, write_json
from utils import autocast, batch_shape, eval_chunks, get_batch


def warm_up(run):
    """Forward and backward passes on a throwaway batch before the training loop (two of each
    shape, really: the first sets up or compiles, the second is timed), then one evaluation batch.
    The gradients are dropped and every RNG state is put back, so the run goes on exactly as
    without them.

    First the attention is chosen by timing (choose_attention). Then torch.compile compiles the
    step, for each shape of batch the run will take (two with --seq_warmup). That time counts
    against --time_budget, but not against the tokens/s. With --compile auto, a compiled step that
    turns out no faster than the eager one, timed side by side (race), is dropped. The timings, and
    the teachers' passes of a distilled run, give the run's estimate. Returns the model the step runs: run.model itself, or
    run.model under DDP and torch.compile, which share its parameters.
    """
    config, machine = run.config, run.machine
    saved = rng_states(machine, run.batch_rng, every_rank=False)
    eager = wrap_ddp(run.model) if machine.world_size > 1 else run.model
    choose_attention(run, eager)
    step_model, compiled = eager, should_compile(config, machine.device)
    if compiled:
        # Fuses the step's small kernels. Checkpoints save run.model, the uncompiled module, so their
        # keys never get the "_orig_mod." prefix. Where compiling fails (no compiler, an old GPU),
        # the step runs uncompiled instead of stopping the run.
        torch._dynamo.config.suppress_errors = True
        # dynamic=False: a batch of another shape (--seq_warmup) gets its own specialised graph.
        step_model = torch.compile(eager, dynamic=False)
    shapes = [batch_shape(run.step, config)] if compiled and run.step < config.seq_warmup else []
    shapes.append(batch_shape(config.seq_warmup, config))  # the full shape last: it times the step
    compile_seconds = 0.0
    for batch_size, block_size in shapes:
        times = time_passes(run, step_model, batch_size, block_size)
        compile_seconds += times[0] - times[1]
    pass_seconds = times[1]
    if compiled and config.compile == "auto" and machine.world_size == 1:  # ranks must not choose apart
        eager_seconds, pass_seconds = race(run, eager, step_model, *batch_shape(config.seq_warmup, config))
        if pass_seconds >= eager_seconds:
            run.log(f"the compiled step ({1e3 * pass_seconds:.0f} ms) is no faster than the eager one "
                    f"({1e3 * eager_seconds:.0f} ms) here: training uncompiled")
            step_model, compiled, pass_seconds = eager, False, eager_seconds
    if compiled:
        run.record["compile_s"] = round(compile_seconds, 1)
        run.log(f"compiled the training step in {compile_seconds:.1f} s")
    for optimizer in run.optimizers:
        optimizer.zero_grad(set_to_none=True)
    set_rng_states(saved, machine, run.batch_rng)
    step_seconds = (pass_seconds + (time_teachers(run) if run.teachers is not None else 0.0)) * config.grad_accum
    announce_estimate(run, step_seconds, time_evaluation(run))
    return step_model


def should_compile(config, device):
    """--compile auto compiles on CUDA, and on a CPU for a time budget of 2 minutes or more: on a
    2-core CPU, compiling takes 10 to 30 s the first time (about 3 s once PyTorch has cached the
    kernels), and then a step of --preset cpu runs about 1.45x faster."""
    if config.compile != "auto":
        return config.compile == "on"
    return device.type == "cuda" or (device.type == "cpu" and config.time_budget >= 120)


def time_passes(run, model, batch_size, block_size, passes=2):
    """Seconds of each of `passes` forward and backward passes of model on one fixed micro-batch
    of this shape. The first also sets up (or compiles); the gradients are left for the caller."""
    x, y = get_batch(run.train_data, batch_size // run.config.grad_accum, block_size,
                     torch.Generator().manual_seed(0), run.machine.device)
    times = []
    for _ in range(passes):
        t = time.perf_counter()
        with autocast(run.machine.device, run.machine.dtype):
            _, loss = model(x, y)
        loss.backward()
        synchronize(run.machine.device)
        times.append(time.perf_counter() - t)
    return times


def race(run, eager, compiled, batch_size, block_size, rounds=3):
    """Seconds of the eager and the compiled pass, timed in turn, round by round, the fastest of each
    kept: side by side, so that a busy moment on a shared machine slows both alike. (The attention's
    timing may come from the cache, from another hour, and cannot judge the compiled step.)"""
    eager_s, compiled_s = [], []
    for _ in range(rounds):
        eager_s += time_passes(run, eager, batch_size, block_size, passes=1)
        compiled_s += time_passes(run, compiled, batch_size, block_size, passes=1)
    return min(eager_s), min(compiled_s)


def time_teachers(run):
    """Seconds the teachers of a distilled run take on a full-length micro-batch (the second of two passes)."""
    x, _ = get_batch(run.train_data, run.config.batch_size // run.config.grad_accum, run.config.block_size,
                     torch.Generator().manual_seed(0), run.machine.device)
    for _ in range(2):
        t = time.perf_counter()
        teacher_log_probs(run.teachers, x, run.config, run.machine.device, run.machine.dtype)
        synchronize(run.machine.device)
    return time.perf_counter() - t


def time_evaluation(run):
    """Seconds one evaluation of train.py takes: the batches it scores of each split (eval_iters, or
    fewer where a split is smaller: utils.eval_chunks), timed on one."""
    config = run.config
    batches = 0
    for data in (run.train_data, run.val_data):
        max_chars = config.eval_iters * config.batch_size * config.block_size  # as train.py's estimate
        starts, tail = eval_chunks(len(data), config.block_size, max_chars)
        batches += math.ceil(len(starts) / config.batch_size) + (1 if tail else 0)
    x, y = get_batch(run.val_data, config.batch_size, config.block_size, torch.Generator().manual_seed(0),
                     run.machine.device)
    run.model.eval()
    t = time.perf_counter()
    with torch.no_grad(), autocast(run.machine.device, run.machine.dtype):
        run.model(x, y)
    synchronize(run.machine.device)
    run.model.train()
    return batches * (time.perf_counter() - t)


def choose_attention(run, model):
    """Time a full-length micro-batch with the written-out attention and with the fused kernel
    (F.scaled_dot_product_attention), eagerly, and keep the faster for the run. Which wins depends
    on the device, the precision and the sizes (docs/speed.md), and no CPU flag tells. The
    choice is cached per machine, model shape and batch, like play.py's sampling path, so that
    runs of the same config make the same one; a resumed run keeps its own. Under torchrun the
    ranks keep the default (the fused kernel) rather than time apart and disagree."""
    if not hasattr(run.model, "blocks") or run.machine.world_size > 1:  # a Bigram has no attention
        return
    config = run.config
    key = (f"{run.machine.name} | torch {torch.__version__} | {run.machine.dtype} | layers {config.n_layer} "
           f"x {config.n_embd}, {config.n_head} heads, qk_norm {config.qk_norm}, dropout {config.dropout} | vocab "
           f"{run.tokenizer.vocab_size} | micro-batch {config.batch_size // config.grad_accum} x {config.block_size}")
    store = cache_path("training_choices.json")
    kept = read_json(store)
    seconds = kept.get(key, {}).get("pass_s")
    if "attention" not in run.record and not seconds:
        seconds = {}
        for name in ("written-out", "sdpa"):
            set_attention(run.model, name)
            seconds[name] = time_passes(run, model, *batch_shape(config.seq_warmup, config))[1]
        kept[key] = {"pass_s": seconds}
        write_json(store, kept)
    choice = run.record.get("attention") or min(seconds, key=seconds.get)
    set_attention(run.model, choice)
    run.record["attention"] = choice
    if seconds:
        run.log(f"attention: {choice} ({', '.join(f'{k} {1e3 * v:.0f} ms' for k, v in seconds.items())} "
                f"a micro-batch, as timed on this machine)")


def set_attention(model, name):
    """Run every attention layer of a TinyGPT through the fused kernel ("sdpa") or written out:
    the one place that sets CausalSelfAttention.use_sdpa."""
    for block in model.blocks:
        block.attn.use_sdpa = name == "sdpa"


def announce_estimate(run, step_seconds, eval_seconds):
    """Say how long the run will take here, and point a CPU user to --preset cpu."""
    config = run.config
    if config.time_budget:
        return  # it takes its budget
    steps_left = config.max_iters - run.step
    evals_left = steps_left // config.eval_interval + 1
    total = steps_left * step_seconds + evals_left * eval_seconds
    run.log(f"estimated time here: {format_seconds(total)} ({steps_left:,} steps of {step_seconds:.2g} s "
            f"and {evals_left} evaluation{'s' if evals_left > 1 else ''} of {format_seconds(eval_seconds)})")
    if run.machine.device.type == "cpu" and total > 600:
        run.log("no GPU here: `python train.py --preset cpu` trains the best TinyGPT this CPU makes in 5 "
                "minutes (`--time_budget SECONDS` sets another budget)")


def format_seconds(s):
    if s < 90:
        return f"{s:.2g} s"
    return f"{s / 60:.0f} min" if s < 5400 else f"{s / 3600:.1f} h"

"""Train a smoll model on a text file.

    python train.py                          # TinyGPT, config.py's defaults (wants a GPU)
    python train.py --preset cpu             # the best TinyGPT a 2-core CPU makes in 5 minutes
    python train.py --model bigram           # the Bigram baseline, in seconds
    python train.py --n_layer 4 --learning_rate 1e-3 --data my_text.txt --out out/mine.pth
    python train.py --preset cpu --time_budget 30                  # the best model in 30 seconds
    python train.py --preset cpu_10min                             # ... or in 10 minutes
    python train.py --resume --out out/mine.pth                    # continue an interrupted run
    python train.py --eval_only --weights models/tinygpt.pth       # score and compare checkpoints
    python train.py --eval_only --weights a.pth b.pth --ensemble   # ... and all of them as one
    python train.py --teacher a.pth b.pth --out out/student.pth    # learn from their predictions
    torchrun --nproc_per_node 4 train.py     # data-parallel on 4 GPUs (or CPU processes)

A run writes, beside --out NAME.pth (default: out/tinygpt.pth, or out/bigram.pth for the Bigram;
the shipped models/ are only written when --out names them):
    NAME.pth       the best checkpoint (lowest validation loss), for play.py
    NAME.last.pth  the latest full training state, for --resume
    NAME.csv       the loss history, one row per evaluation
    NAME.png       the loss curve (if matplotlib is installed)

Read from the top: train() is the whole run (set up, warm up, the loop, finish), and the
functions after it come in the order it calls them. What a learner need not read lives beside
it: training_speed.py (the warm-up's timings and torch.compile), distributed.py (the device, the
data and torchrun: alone it only calls devices.get_device and token_cache.load_tokens),
ensemble.py (--teacher), eval_table.py (--eval_only).
"""

import argparse
import contextlib
import csv
import math
import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field, fields, replace
from datetime import datetime, timezone
from types import SimpleNamespace

import numpy as np
import torch
from tqdm import tqdm

from config import MODELS, PRESETS, Config, add_config_args, config_from_args, config_from_dict
from devices import describe_device, resolve_dtype
from distributed import barrier, gather, leave, load_data, setup_distributed, stop_requested, wrap_ddp
from ensemble import distillation_loss, load_teachers, teacher_log_probs
from models import build_model
from pictures import plot_history
from training_speed import announce_estimate, format_seconds, should_compile, warm_up
from utils import (DEFAULT_DATA, DEFAULT_OUT, FULL_EVAL_CHARS, SHIPPED_WEIGHTS, CharTokenizer, SmollError, atomic_save, autocast,
                   batch_shape, check_writable, eval_loss, get_batch, git_commit, load_checkpoint, load_model,
                   replaced_atomically, rng_states, save_checkpoint, set_rng_states, split_data, to_cpu)

# The fields a resumed run takes from its checkpoint; device, dtype, compile and grad_accum may
# change between machines.
HYPERPARAMETERS = {f.name for f in fields(Config)} - {"model", "device", "dtype", "compile", "grad_accum"}


# ----------------------------------------------------------------------------------------------
# The run


def train(config, data_path=DEFAULT_DATA, out_path=None, sample_chars=300, resume=False,
          full_eval=False, teachers=None):
    """Train config.model on the text at data_path, saving as the module docstring says.

    With resume, continue the run whose state is in NAME.last.pth; config then only supplies the
    device and dtype, the rest comes from the saved run (its teachers too). The final score covers
    the whole validation split up to FULL_EVAL_CHARS characters, an even sample past that, or all
    of it with full_eval. teachers, a list of checkpoint paths, distils their averaged predictions
    into the model (ensemble.distillation_loss). Returns a dict of the run's figures.
    """
    out_path = out_path or DEFAULT_OUT[config.model]
    check_writable(out_path)  # a run that cannot save should stop now, not at its first checkpoint
    state = None
    if resume:
        config, state = load_saved_run(config, out_path)
        teachers = [t["path"] for t in state["run"].get("teachers", [])]
    if config.time_budget and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise SmollError("--time_budget times a single process: under torchrun, use --max_iters.")
    rank, n_ranks, device = setup_distributed(config)
    try:
        # The clock covers everything up to the last checkpoint: reading the data, building the model,
        # the warm-up (and compiling), training and evaluating. --time_budget counts all of it.
        t_start = time.perf_counter()
        r = setup_run(config, data_path, out_path, state, rank, n_ranks, device, teachers)
        r.time_before, r.t_start = r.record["train_time_s"], t_start
        compile_seconds, step_seconds, eval_seconds = warm_up(r)
        if compile_seconds:
            r.record["compile_s"] = round(compile_seconds, 1)
            r.log(f"compiled the training step in {compile_seconds:.1f} s")
        announce_estimate(r, step_seconds, eval_seconds)
        r.t_loop, r.step_start = time.perf_counter(), r.step

        # The loop: evaluate and save every eval_interval steps and at the last one (the end of
        # max_iters, or of the time budget, keeping time for that last evaluation), step otherwise.
        # With a time budget the bar counts seconds, otherwise steps. In a terminal it redraws
        # often; into a log file, every few seconds is plenty.
        budget = config.time_budget
        bar = tqdm(total=round(budget) if budget else config.max_iters, initial=0 if budget else r.step,
                   unit="s" if budget else "step", dynamic_ncols=True, file=sys.stdout,
                   mininterval=0.1 if sys.stdout.isatty() else 5.0, disable=rank != 0)
        interrupted = False
        with ctrl_c_stops() as stop:
            while True:
                r.record["train_time_s"] = r.elapsed()
                if budget:
                    last_step = r.record["train_time_s"] + r.eval_seconds >= budget
                else:
                    last_step = r.step == config.max_iters
                due = r.step % config.eval_interval == 0 or last_step
                if due and not (r.history and r.history[-1]["step"] == r.step):  # a resumed step is done
                    if rank == 0 and not evaluate_and_keep_best(r, bar, stop if n_ranks == 1 else None):
                        save_state(r, finished=False)  # Ctrl-C during the evaluation
                        interrupted = True
                        break
                    save_state(r, finished=last_step)
                if last_step:
                    break
                if stop_requested(stop, r.step, n_ranks, device):
                    save_state(r, finished=False)
                    interrupted = True
                    break
                scale = lr_scale(r.step, config, r.record["train_time_s"])
                loss = train_step(r, scale)
                r.step += 1
                bar.update(int(min(r.elapsed(), budget)) - bar.n if budget else 1)  # whole seconds
                if r.step % 10 == 0 or r.step == config.max_iters:  # .item() waits for the GPU: not every step
                    loss_value = loss.item()
                    check_loss(loss_value, r)
                    bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{config.learning_rate * scale:.2e}",
                                    tok_s=f"{r.tokens_per_s():,.0f}")
        bar.close()
        result = finish_run(r, interrupted, sample_chars, full_eval)
        if n_ranks > 1:
            barrier()  # the ranks leave together, after rank 0 has scored and saved
        return result
    finally:
        if n_ranks > 1:
            leave()


def load_saved_run(config, out_path):
    """The state of the run saved at NAME.last.pth, for --resume, and its config: the saved
    run's hyperparameters, with this machine's device, dtype, compile and grad_accum."""
    try:
        state = load_checkpoint(last_path(out_path))
    except SmollError as e:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # every rank reads the file rank 0 wrote
            raise SmollError(f"{e} Under torchrun on several machines, --out must be on storage "
                             f"that every machine sees (a shared filesystem).") from None
        raise
    if "optimizer" not in state:
        raise SmollError(f"'{last_path(out_path)}' holds weights but no training state to "
                         f"resume from: start a new run without --resume.")
    if state["finished"]:
        raise SmollError(f"the run saved at '{last_path(out_path)}' already finished, at step "
                         f"{state['step']}: there is nothing to resume. Start a new run (with a "
                         f"larger --max_iters or --time_budget to train longer).")
    config = replace(config_from_dict(state["config"]), device=config.device, dtype=config.dtype,
                     compile=config.compile, grad_accum=config.grad_accum)
    try:
        config.validate()  # --grad_accum must still divide the saved run's batch size
    except ValueError as e:
        raise SmollError(str(e)) from None
    return config, state


def last_path(out_path):
    """The full training state, for --resume, lives beside the best weights: NAME.last.pth."""
    return os.path.splitext(out_path)[0] + ".last.pth"


# ----------------------------------------------------------------------------------------------
# Setting up


@dataclass
class Run:
    """What a training run holds while it trains; the functions below share it."""
    config: Config
    device: torch.device
    dtype: torch.dtype
    rank: int
    world_size: int
    out_path: str
    tokenizer: CharTokenizer
    train_data: np.ndarray  # the first 90% of the text's ids, memory-mapped
    val_data: np.ndarray  # the last 10%
    eval_batches: dict  # split -> fixed [(x, y), ...], the same at every evaluation
    model: torch.nn.Module  # what checkpoints save
    train_model: torch.nn.Module  # what the step runs: model, wrapped by DDP and torch.compile
    optimizers: list  # AdamW, and Muon with --optimizer muon
    scaler: torch.amp.GradScaler  # only enabled for float16
    batch_rng: torch.Generator
    record: dict  # where and how it was trained, saved in checkpoints as "run"
    resumed: bool
    step: int = 0
    history: list = field(default_factory=list)
    best: dict = field(default_factory=lambda: {"val": float("inf"), "step": -1})
    backup: str = None  # where an earlier checkpoint at out_path was kept
    eval_seconds: float = 0.0  # how long an evaluation takes: a timed run keeps this much for its last
    compiled: bool = False  # whether train_model runs through torch.compile
    eager_model: torch.nn.Module = None  # train_model before torch.compile, to fall back to
    teachers: torch.nn.Module = None  # with --teacher: the Ensemble whose averaged predictions it learns
    time_before: float = 0.0  # training seconds of earlier sessions of a resumed run
    t_start: float = 0.0  # when this session's clock started: before the data, the model and the warm-up
    t_loop: float = 0.0  # when its training loop started, after the warm-up (for tokens/s)
    step_start: int = 0  # the step this session started at

    def log(self, *args, **kwargs):
        if self.rank == 0:
            print(*args, **kwargs)

    def elapsed(self):
        """Training seconds so far, across resumes."""
        return self.time_before + time.perf_counter() - self.t_start

    def tokens_per_s(self):
        tokens = (self.step - self.step_start) * self.config.batch_size * self.config.block_size
        return tokens * self.world_size / (time.perf_counter() - self.t_loop)


def setup_run(config, data_path, out_path, state, rank, world_size, device, teachers=None):
    """Data, model, optimizer, teachers and, with state, everything a resumed run picks up again."""
    dtype = resolve_dtype(config.dtype, device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls for anything left in fp32
        torch.backends.cudnn.allow_tf32 = True
    ids, tokenizer = load_data(data_path, config, rank, world_size)  # memory-mapped: batches are read from disk
    if state is not None and tokenizer.chars != state["vocab"]:
        raise SmollError(f"'{data_path}' is not the text this run was trained on (its characters "
                         f"differ): resume with the same --data.")
    train_data, val_data = split_data(ids, config.block_size)
    # Before the seeds are set: building the teachers draws random initial weights of its own.
    ensemble, teacher_record = load_teachers(teachers, tokenizer, device, state) if teachers else (None, None)

    torch.manual_seed(config.seed)  # the same initial weights on every rank
    model = build_model(config, tokenizer.vocab_size).to(device)
    optimizers = make_optimizers(model, config, device)
    # float16 needs loss scaling: small gradients would round to zero. The scaler multiplies the loss
    # before backward and divides the gradients before the update; a step whose gradients overflow
    # is skipped and the scale lowered. Disabled, it passes everything through unchanged.
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    torch.manual_seed(config.seed + rank)  # dropout differs between ranks
    batch_rng = torch.Generator().manual_seed(config.seed + rank)  # so do the batches
    eval_rng = torch.Generator().manual_seed(0)  # the same eval batches in every run
    eval_batches = {split: [get_batch(d, config.batch_size, config.block_size, eval_rng, device)
                            for _ in range(config.eval_iters)]
                    for split, d in (("train", train_data), ("val", val_data))}
    record = {"git_commit": git_commit(), "device": describe_device(device), "dtype": str(dtype)[6:],
              "torch": str(torch.__version__), "world_size": world_size,
              "started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "train_time_s": 0.0}
    r = Run(config, device, dtype, rank, world_size, out_path, tokenizer, train_data, val_data,
            eval_batches, model, model, optimizers, scaler, batch_rng, record, resumed=state is not None)
    if state is not None:
        restore_state(r, state)
    if ensemble is not None:
        r.teachers, r.record["teachers"] = ensemble, teacher_record
    if world_size > 1:
        r.train_model = wrap_ddp(model)
    r.eager_model = r.train_model
    r.compiled = should_compile(config, device)
    if r.compiled:
        # Fuses the step's small kernels. Checkpoints save `model`, the uncompiled module, so their
        # keys never get the "_orig_mod." prefix. Where compiling fails (no compiler, an old GPU),
        # the step runs uncompiled instead of stopping the run.
        torch._dynamo.config.suppress_errors = True
        # dynamic=False: a batch of another shape (--seq_warmup) gets its own specialised graph.
        r.train_model = torch.compile(r.train_model, dynamic=False)

    n_params = sum(p.numel() for p in model.parameters())
    r.log(f"{config.model}: {n_params / 1e6:.2f}M parameters | vocab {tokenizer.vocab_size} | "
          f"{len(train_data):,} train / {len(val_data):,} val characters | {record['device']} "
          f"{record['dtype']}" + (f" | {world_size} processes" if world_size > 1 else ""))
    if r.teachers is not None:
        r.log(f"distilling from {len(r.teachers.members)} teacher(s) (weight {config.distill_weight:g}, "
              f"temperature {config.distill_temperature:g}), trained for "
              f"{format_seconds(sum(t['train_time_s'] for t in r.record['teachers']))} in all")
    r.log(f"{'resuming at step ' + str(r.step) if state else 'saving the best checkpoint'} "
          f"to {os.path.relpath(out_path)}")
    return r


def optimizer_flags(device):
    """One fused kernel for the whole AdamW update on CUDA; a few batched (foreach) ops elsewhere."""
    fused = device.type == "cuda"
    return {"fused": fused, "foreach": not fused}


def make_optimizers(model, config, device):
    """AdamW, with weight decay on weight matrices only: decaying gains and biases only hurts.

    With --optimizer muon, Muon updates the transformer blocks' weight matrices instead: it turns
    each one's momentum into the nearest orthogonal matrix (a few Newton-Schulz steps), so every
    direction of the matrix learns at the same rate. Embeddings, the head and the gains keep AdamW.
    Each group keeps its peak learning rate in "peak_lr"; train_step scales it by lr_scale.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    hidden = set()
    if config.optimizer == "muon" and hasattr(model, "blocks"):
        hidden = {p for p in model.blocks.parameters() if p.dim() == 2}
    adamw_groups = [
        {"params": [p for p in params if p.dim() >= 2 and p not in hidden], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    for group in adamw_groups:
        group["peak_lr"] = config.learning_rate
    optimizers = [torch.optim.AdamW(adamw_groups, lr=config.learning_rate, betas=(0.9, 0.99),
                                    **optimizer_flags(device))]
    if hidden:
        muon_params = [p for p in params if p in hidden]  # in the model's order, so resume matches
        optimizers.append(torch.optim.Muon([{"params": muon_params, "peak_lr": config.muon_lr}],
                                           lr=config.muon_lr, weight_decay=config.weight_decay))
    return optimizers


def restore_state(r, state):
    """Pick up exactly where the saved run stopped."""
    r.model.load_state_dict(state["model_state"])
    saved = state["optimizer"]
    for optimizer, optimizer_state in zip(r.optimizers, saved if isinstance(saved, list) else [saved]):
        optimizer.load_state_dict(optimizer_state)  # moves its tensors to the parameters' device
    for group in r.optimizers[0].param_groups:  # AdamW's flags are those of the machine that saved
        group.update(optimizer_flags(r.device))
    if r.scaler.is_enabled() and state.get("scaler"):
        r.scaler.load_state_dict(state["scaler"])
    r.step, r.history, r.record = state["step"], state["history"], state["run"]
    r.best = {"val": state["val_loss"], "step": state["best_step"]}
    if len(state["rng"]) != r.world_size:
        raise SmollError(f"this run was saved from {len(state['rng'])} process(es): resume it "
                         f"with the same number, not {r.world_size}.")
    set_rng_states(state["rng"][r.rank], r.device, r.batch_rng)


# ----------------------------------------------------------------------------------------------
# One step


def lr_scale(step, config, elapsed=0.0):
    """The learning rate as a fraction of its peak: a linear warmup, then the decay to min_lr_ratio.

    --schedule cosine decays along half a cosine. --schedule linear holds the peak, then cools down
    in a straight line over the last `cooldown` fraction of the run.
    The decay follows the steps, or with --time_budget the fraction of the budget spent (elapsed
    seconds), so that a timed run always ends at the bottom of the schedule.
    """
    warmup = (step + 1) / (config.warmup_iters + 1)
    if config.time_budget > 0:
        progress = elapsed / config.time_budget
    else:
        if step < config.warmup_iters:
            return warmup
        progress = (step - config.warmup_iters) / max(1, config.max_iters - config.warmup_iters)
    progress = min(progress, 1.0)
    if config.schedule == "cosine":
        left = 0.5 * (1.0 + math.cos(math.pi * progress))  # goes from 1 down to 0
    else:
        left = min(1.0, (1.0 - progress) / config.cooldown) if config.cooldown else 1.0
    decayed = config.min_lr_ratio + left * (1.0 - config.min_lr_ratio)
    return min(warmup, decayed) if step < config.warmup_iters else decayed


def train_step(r, scale):
    """One optimizer step on one batch, run as config.grad_accum micro-batches whose gradients add up
    to the whole batch's. Returns the batch's mean loss, as a tensor (reading it waits for the GPU)."""
    c = r.config
    for optimizer in r.optimizers:
        for group in optimizer.param_groups:
            group["lr"] = group["peak_lr"] * scale
    x, y = get_batch(r.train_data, *batch_shape(r.step, c), r.batch_rng, r.device)  # (B, T) each
    total = 0.0
    for i, (x_micro, y_micro) in enumerate(zip(x.chunk(c.grad_accum), y.chunk(c.grad_accum))):
        # Under DDP, averaging the gradients across ranks once, after the last micro-batch, is enough.
        last = i == c.grad_accum - 1
        with contextlib.nullcontext() if last or r.world_size == 1 else r.train_model.no_sync():
            teachers = teacher_log_probs(r.teachers, x_micro, c, r.device, r.dtype) if r.teachers else None
            with autocast(r.device, r.dtype):
                logits, loss = r.train_model(x_micro, y_micro)
                if teachers is not None:
                    loss = distillation_loss(logits, y_micro, teachers, c.distill_weight, c.distill_temperature)
            r.scaler.scale(loss / c.grad_accum).backward()  # each micro-batch is 1/grad_accum of the mean
        total += loss.detach() / c.grad_accum
    if c.grad_clip > 0:
        for optimizer in r.optimizers:
            r.scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
        torch.nn.utils.clip_grad_norm_(r.model.parameters(), c.grad_clip)
    for optimizer in r.optimizers:
        r.scaler.step(optimizer)  # skips the update if float16 gradients overflowed
        optimizer.zero_grad(set_to_none=True)
    r.scaler.update()
    return total


# ----------------------------------------------------------------------------------------------
# Evaluating and saving


def evaluate_and_keep_best(r, bar, stop):
    """Estimate the losses, save the best checkpoint and the history. Rank 0 only. Returns False
    when a Ctrl-C stopped the evaluation."""
    t_eval = time.perf_counter()
    losses = estimate_loss(r.model, r.eval_batches, r.device, r.dtype, stop)
    if losses is None:
        return False
    r.eval_seconds = time.perf_counter() - t_eval
    check_finite(losses["train"], r.step, r.out_path, r.config)
    check_finite(losses["val"], r.step, r.out_path, r.config)
    r.history.append({"step": r.step, "train_loss": round(losses["train"], 5),
                      "val_loss": round(losses["val"], 5),
                      "lr": r.config.learning_rate * lr_scale(min(r.step, r.config.max_iters - 1), r.config,
                                                              r.record["train_time_s"]),
                      "tokens_per_s": round(r.tokens_per_s()), "time_s": round(r.record["train_time_s"], 2)})
    mark = ""
    if losses["val"] < r.best["val"]:
        if r.best["step"] < 0 and not r.resumed:
            r.backup = keep_previous(r.out_path)
        r.best = {"val": losses["val"], "step": r.step}
        save_checkpoint(r.out_path, r.model, r.config, r.tokenizer, r.step, r.best["val"],
                        history=r.history, run=r.record)
        mark = " (saved)"
    write_history_csv(r.history, os.path.splitext(r.out_path)[0] + ".csv")
    bar.write(f"step {r.step:5d} | train {losses['train']:.4f} | val {losses['val']:.4f}{mark}")
    return True


@torch.no_grad()
def estimate_loss(model, eval_batches, device, dtype, stop=None):
    """Mean loss over fixed batches per split, so curves are comparable between evaluations.

    A progress bar shows up when it takes more than a second. Returns None, at once, when a Ctrl-C
    asks the run to stop (stop.requested).
    """
    model.eval()
    out = {}
    bar = tqdm(total=sum(len(b) for b in eval_batches.values()), desc="evaluating", unit="batch",
               leave=False, delay=1.0, dynamic_ncols=True, file=sys.stdout, position=0,
               mininterval=0.1 if sys.stdout.isatty() else 5.0)
    try:
        for split, batches in eval_batches.items():
            losses = torch.zeros(len(batches))
            for i, (x, y) in enumerate(batches):
                if stop is not None and stop.requested:
                    return None
                with autocast(device, dtype):
                    _, loss = model(x, y)
                losses[i] = loss.item()
                bar.update()
            out[split] = losses.mean().item()
    finally:
        bar.close()
        model.train()
    return out


def check_finite(value, step, out_path, config):
    if not math.isfinite(value):
        raise SmollError(f"the loss became {value} at step {step}: training diverged. The last good "
                         f"checkpoint {os.path.relpath(out_path)} is untouched; try a lower "
                         f"--learning_rate than {config.learning_rate} or a longer --warmup_iters.")


def check_loss(value, r):
    """check_finite for the training loss. In float16 a step can overflow while the GradScaler
    looks for its scale: the scaler skips that step and halves the scale, and training goes on.
    Only overflow at every scale (the scale driven below 1) is divergence."""
    if not math.isfinite(value) and r.scaler.is_enabled() and r.scaler.get_scale() >= 1.0:
        return
    check_finite(value, r.step, r.out_path, r.config)


def keep_previous(path):
    """Copy an existing checkpoint to NAME.prev.pth before a new run first overwrites it."""
    if not os.path.exists(path):
        return None
    backup = os.path.splitext(path)[0] + ".prev.pth"
    with open(path, "rb") as source, replaced_atomically(backup, ".pth") as f:
        shutil.copyfileobj(source, f)
    return backup


def write_history_csv(history, path):
    with replaced_atomically(path, ".csv", "w") as f:
        writer = csv.DictWriter(f, fieldnames=list(history[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(history)


def save_state(r, finished):
    """The full state, for --resume: every rank's RNG states are gathered into rank 0's file, and
    every tensor goes to the CPU, so the file loads on any machine. A finished run is marked, so
    that --resume leaves it alone."""
    rngs = [rng_states(r.device, r.batch_rng)]
    if r.world_size > 1:
        rngs = gather(rngs[0], r.world_size)
    if r.rank == 0:
        save_checkpoint(last_path(r.out_path), r.model, r.config, r.tokenizer, r.step, r.best["val"],
                        half=False, optimizer=[to_cpu(o.state_dict()) for o in r.optimizers],
                        scaler=r.scaler.state_dict(),
                        rng=rngs, best_step=r.best["step"], history=r.history, run=r.record,
                        finished=finished)


def finish_run(r, interrupted, sample_chars, full_eval):
    """Report, score the best checkpoint on the validation split, draw the curve, print a sample."""
    if r.rank != 0:
        return {}
    out = os.path.relpath(r.out_path)
    result = {"best_val": r.best["val"], "best_step": r.best["step"], "history": r.history}
    if interrupted:
        saved = f"The best checkpoint is {out}" if r.best["step"] >= 0 else "No evaluation has finished yet"
        r.log(f"interrupted at step {r.step}. {saved}; continue with: python train.py --resume --out {out}")
        return {**result, "interrupted": r.step}
    tokens_per_s = r.tokens_per_s()
    r.log(f"trained to step {r.step} in {r.record['train_time_s']:.1f} s ({tokens_per_s:,.0f} tokens/s)")
    if r.backup:
        r.log(f"the checkpoint that was at {out} before is kept as {os.path.relpath(r.backup)}")

    # Score the best checkpoint on the validation split, and store the run's figures in it.
    best_model, _, _ = load_model(r.out_path, r.device)
    for block, trained in zip(getattr(best_model, "blocks", []), getattr(r.model, "blocks", [])):
        block.attn.use_sdpa = trained.attn.use_sdpa  # the attention the warm-up timed faster
    full_val, n_scored = eval_loss(best_model, r.val_data, r.config.block_size, device=r.device,
                                   dtype=r.dtype, max_chars=None if full_eval else FULL_EVAL_CHARS)
    r.record.update(full_val_loss=round(full_val, 5), val_chars_scored=n_scored, best_step=r.best["step"],
                    tokens_per_s=round(tokens_per_s))
    checkpoint = load_checkpoint(r.out_path)
    checkpoint.update(history=r.history, run=r.record)
    atomic_save(checkpoint, r.out_path)
    kind = "full" if n_scored == len(r.val_data) - 1 else "sampled"
    r.log(f"best val estimate {r.best['val']:.4f} at step {r.best['step']}; {kind} validation loss "
          f"{full_val:.4f} nats/char ({full_val / math.log(2):.4f} bits/char) over {n_scored:,} characters"
          + (f" (an even sample of {len(r.val_data) - 1:,}; --full_eval scores all)" if kind == "sampled" else ""))
    picture = os.path.splitext(r.out_path)[0] + ".png"
    try:
        plot_history(r.history, picture, title=f"{r.config.model}: {os.path.basename(r.out_path)}")
        r.log(f"loss curve: {os.path.relpath(picture)}")
    except SmollError as e:
        r.log(f"no loss curve: {e}")
    if sample_chars:
        prompt = torch.tensor([[int(r.train_data[0])]], device=r.device)  # the text's first character
        ids = best_model.generate(prompt, sample_chars)[0].tolist()
        r.log("sample:\n" + r.tokenizer.decode(ids))
    if os.path.abspath(r.out_path) == DEFAULT_OUT[r.config.model]:
        r.log(f"play it: python play.py --weights {out}")
    return {**result, "full_val": full_val}


# ----------------------------------------------------------------------------------------------
# Ctrl-C and the command line


@contextlib.contextmanager
def ctrl_c_stops():
    """Turns the first Ctrl-C into a request to stop at the next step boundary (or in the middle
    of an evaluation): the flag it yields gets .requested = True, so the saved state is never half
    an optimizer step. A second Ctrl-C stops at once."""
    stop = SimpleNamespace(requested=False)

    def handle(signum, frame):
        if stop.requested:
            raise KeyboardInterrupt
        stop.requested = True
        print("\nCtrl-C: stopping and saving (press again to quit at once)", file=sys.stderr, flush=True)

    # Signals can only be caught on the main thread. A process started with SIGINT ignored
    # (a background job, nohup) keeps ignoring it.
    catch = (threading.current_thread() is threading.main_thread()
             and signal.getsignal(signal.SIGINT) is not signal.SIG_IGN)
    previous = signal.signal(signal.SIGINT, handle) if catch else None
    try:
        yield stop
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def build_parser():
    parser = argparse.ArgumentParser(
        description="Train a smoll model (TinyGPT or Bigram) on a UTF-8 text file.",
        epilog="Every hyperparameter above can be set from the command line, e.g. "
               "`python train.py --n_layer 4 --learning_rate 1e-3`.")
    parser.add_argument("--model", choices=MODELS, default="tinygpt",
                        help="which model to train (default: tinygpt)")
    parser.add_argument("--preset", choices=list(PRESETS),
                        help="a named set of overrides from config.py: `cpu` trains the best "
                             "TinyGPT a laptop CPU makes in 5 minutes (or --time_budget seconds), "
                             "`cpu_10min` in 10, `cpu_30min` in 30, `cpu_60min` the shipped model in an hour")
    parser.add_argument("--data", default=DEFAULT_DATA,
                        help="UTF-8 text to train on; the first 90%% trains, the last 10%% validates "
                             "(default: dataset/tinyshakespeare.txt)")
    parser.add_argument("--out", help="where to save the best checkpoint (default: out/tinygpt.pth, or "
                                      "out/bigram.pth for the bigram; the shipped models/ are never "
                                      "written unless named here)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run saved at --out (from its NAME.last.pth), with its "
                             "own hyperparameters")
    parser.add_argument("--eval_only", action="store_true",
                        help="do not train: print the full validation loss of each --weights on --data")
    parser.add_argument("--full_eval", action="store_true",
                        help=f"score the whole validation split at the end, however large (default: "
                             f"all of it up to {FULL_EVAL_CHARS:,} characters, an even sample of that "
                             f"many past it)")
    parser.add_argument("--weights", nargs="+", help="checkpoint(s) to score with --eval_only "
                                                     "(default: the shipped weights of --model)")
    parser.add_argument("--ensemble", action="store_true",
                        help="with --eval_only and several --weights: also score them as one model "
                             "that averages their next-character probabilities")
    parser.add_argument("--teacher", nargs="+", metavar="WEIGHTS",
                        help="checkpoint(s) to distil: the model also learns the mean of their "
                             "predictions (see --distill_weight and --distill_temperature)")
    add_config_args(parser)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.ensemble and not (args.eval_only and args.weights and len(args.weights) > 1):
            parser.error("--ensemble scores several checkpoints together: use it with --eval_only "
                         "--weights A.pth B.pth ...")
        if args.eval_only:
            from eval_table import eval_only  # imported when asked for: a training run never uses it
            eval_only(args.weights or [SHIPPED_WEIGHTS[args.model]], args.data, args.device or "auto",
                      args.full_eval, args.ensemble)
            return
        if args.teacher and args.resume:
            parser.error("--resume learns from the saved run's own teachers: drop --teacher.")
        if args.resume:
            fixed = [f"--{k}" for k, v in vars(args).items() if k in HYPERPARAMETERS and v is not None]
            if args.preset or fixed:
                parser.error(f"--resume continues the saved run with its own hyperparameters: "
                             f"drop {' '.join(fixed or ['--preset'])}.")
        try:
            config = config_from_args(args)
        except ValueError as e:
            parser.error(str(e))
        result = train(config, args.data, args.out, resume=args.resume, full_eval=args.full_eval,
                       teachers=args.teacher)
        if result.get("interrupted") is not None:
            sys.exit(130)  # the shell's code for "stopped by Ctrl-C"
    except SmollError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:  # a second Ctrl-C, or one outside the training loop
        print("\nstopped by Ctrl-C. Files on disk are whole (every write is atomic); "
              "a run that saved its state goes on with --resume.", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()

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

Read from train() below (main(), at the bottom, only parses the command line). train() is the
whole run. setup_run builds the data (text -> vocabulary -> ids -> train/val), the model and its
optimizers (make_optimizers), and holds them in a Run. Then one loop takes optimizer steps
(lr_scale, train_step), and every eval_interval steps estimates the loss, writes a short sample and
saves the best checkpoint (evaluate_and_keep_best, write_sample, check_loss). finish_run scores the
best checkpoint on the whole validation split, draws the loss curve and prints a longer sample. The
functions follow in that order; after them come the training state that --resume picks up, and the
command line.

What serves speed or safety is a call into smoll/, a package you need not open: setup_machine (the
device, its precision, torchrun), warm_up (the faster attention, torch.compile, the time
estimate), ctrl_c_stops and stop_requested (Ctrl-C, and torchrun's processes stopping together),
rng_states (every random state, for --resume), check_writable and replaced_atomically (files
written whole; utils.save_checkpoint uses the same), plot_history (the loss curve), and for
--teacher the three functions of smoll/ensemble.py.
"""

import argparse
import contextlib
import csv
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field, fields, replace
from datetime import datetime, timezone

import torch
from tqdm import tqdm

from config import MODELS, PRESETS, Config, add_config_args, config_from_args, config_from_dict
from models import build_model
from smoll.distributed import (Machine, barrier, ctrl_c_stops, leave, rng_states, set_rng_states, setup_machine,
                               stop_requested)
from smoll.ensemble import distillation_loss, load_teachers, teacher_log_probs
from smoll.files import SmollError, check_writable, replaced_atomically
from smoll.muon import Muon
from smoll.pictures import plot_history
from smoll.speed import warm_up
from utils import (DEFAULT_DATA, DEFAULT_OUT, FULL_EVAL_CHARS, SHIPPED_WEIGHTS, CharTokenizer, autocast, batch_shape,
                   eval_loss, get_batch, git_commit, load_checkpoint, load_text_ids, save_checkpoint, split_data)

# The fields a resumed run takes from its checkpoint; device, dtype, compile and grad_accum may
# change between machines.
HYPERPARAMETERS = {f.name for f in fields(Config)} - {"model", "device", "dtype", "compile", "grad_accum"}


# ----------------------------------------------------------------------------------------------
# The run


def train(config, data_path=DEFAULT_DATA, out_path=None, sample_chars=300, resume=False,
          full_eval=False, teachers=None, eval_sample=80):
    """Train config.model on the text at data_path, saving as the module docstring says.

    With resume, continue the run whose state is in NAME.last.pth; config then only supplies the
    device and dtype, the rest comes from the saved run (its teachers too). The final score covers
    the whole validation split up to FULL_EVAL_CHARS characters, an even sample past that, or all
    of it with full_eval. teachers, a list of checkpoint paths, distils their averaged predictions
    into the model (smoll/ensemble.py). Every evaluation also writes eval_sample characters (0:
    none), and the run ends with sample_chars more. Returns a dict of the run's figures.
    """
    out_path = out_path or DEFAULT_OUT[config.model]
    check_writable(out_path)  # a run that cannot save should stop now, not at its first checkpoint
    saved = None
    if resume:
        config, saved = load_saved_run(config, out_path)
        teachers = [t["path"] for t in saved["run"].get("teachers", [])]
    machine = setup_machine(config)  # the device, its precision, and which of torchrun's processes this is
    try:
        run = setup_run(config, machine, data_path, out_path, saved, teachers)
        # Before the first step: which attention is faster here, torch.compile where it pays, DDP
        # under torchrun, and how long the run will take. step_model is what the step runs:
        # run.model itself, or run.model compiled or under DDP (the same parameters).
        step_model = warm_up(run)
        run.loop_start = (time.perf_counter(), run.step)  # for tokens/s: the warm-up does not count

        # The loop: evaluate and save every eval_interval steps and at the last step (the end of
        # max_iters, or of the time budget less the time its last evaluation takes); in between,
        # one optimizer step at a time.
        budget = config.time_budget
        bar = tqdm(total=round(budget) if budget else config.max_iters, initial=0 if budget else run.step,
                   unit="s" if budget else "step", dynamic_ncols=True, file=sys.stdout,
                   mininterval=0.1 if sys.stdout.isatty() else 5.0, disable=machine.rank != 0)
        interrupted = False
        with ctrl_c_stops() as stop:  # the first Ctrl-C sets stop.requested: the run saves, then stops
            while True:
                run.record["train_time_s"] = run.elapsed()
                if budget:
                    last_step = run.record["train_time_s"] + run.eval_seconds >= budget
                else:
                    last_step = run.step == config.max_iters
                due = run.step % config.eval_interval == 0 or last_step
                if due and not (run.history and run.history[-1]["step"] == run.step):  # a resumed step is done
                    # Alone, a Ctrl-C stops an evaluation; under torchrun, the ranks stop together below.
                    stops_evaluation = stop if machine.world_size == 1 else None
                    evaluated = machine.rank != 0 or evaluate_and_keep_best(run, bar, stops_evaluation, eval_sample)
                    interrupted = not evaluated
                    save_state(run, finished=last_step and not interrupted)
                if last_step or interrupted:
                    break
                if stop_requested(stop, run.step, machine):  # under torchrun, the ranks agree on it
                    save_state(run, finished=False)
                    interrupted = True
                    break
                scale = lr_scale(run.step, config, run.record["train_time_s"])
                loss = train_step(run, step_model, scale)
                run.step += 1
                bar.update(int(min(run.elapsed(), budget)) - bar.n if budget else 1)  # whole seconds
                if run.step % 10 == 0 or run.step == config.max_iters:  # .item() waits for the GPU: not every step
                    loss_value = loss.item()
                    check_loss(loss_value, run)
                    bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{config.learning_rate * scale:.2e}",
                                    tok_s=f"{run.tokens_per_s():,.0f}")
        bar.close()
        result = finish_run(run, interrupted, sample_chars, full_eval)
        if machine.world_size > 1:
            barrier()  # the ranks leave together, after rank 0 has scored and saved
        return result
    finally:
        if machine.world_size > 1:
            leave()


@dataclass
class Run:
    """A training run while it trains: its data, its model and optimizers, and where it stands.
    The functions below share it; NAME.last.pth saves it and --resume restores it (save_state)."""
    config: Config
    machine: Machine  # the device, the precision, and torchrun's rank and world size (smoll/distributed.py)
    out_path: str  # where the best checkpoint goes: NAME.pth
    tokenizer: CharTokenizer
    train_data: object  # the first 90% of the text's ids (a numpy array)
    val_data: object  # the last 10%
    model: torch.nn.Module  # what checkpoints save; the step may run it compiled, or under DDP
    optimizers: list  # AdamW, and Muon with --optimizer muon
    scaler: torch.amp.GradScaler  # float16's loss scaling; it passes everything through otherwise
    batch_rng: torch.Generator  # draws the training batches
    teachers: torch.nn.Module = None  # --teacher: the ensemble whose predictions the model also learns
    step: int = 0
    history: list = field(default_factory=list)  # one dict per evaluation
    best: dict = field(default_factory=lambda: {"val": float("inf"), "step": -1})  # the best estimate so far
    record: dict = field(default_factory=dict)  # where and how it was trained: checkpoints save it as "run"
    eval_seconds: float = 0.0  # how long an evaluation takes: a timed run keeps this much for its last
    clock_start: float = 0.0  # time.perf_counter() when the run started, less its earlier sessions' seconds
    loop_start: tuple = (0.0, 0)  # (time, step) when this session's loop started

    def elapsed(self):
        """Training seconds so far, across resumes: all of them count against --time_budget."""
        return time.perf_counter() - self.clock_start

    def tokens_per_s(self):
        seconds, step = time.perf_counter() - self.loop_start[0], self.loop_start[1]
        tokens = (self.step - step) * self.config.batch_size * self.config.block_size * self.machine.world_size
        return tokens / seconds

    def log(self, *args):
        if self.machine.rank == 0:  # under torchrun, one process speaks for all
            print(*args)


def setup_run(config, machine, data_path, out_path, saved=None, teachers=None):
    """The data, the model and its optimizers; with saved (--resume), where the saved run stopped."""
    clock_start = time.perf_counter() - (saved["run"]["train_time_s"] if saved else 0.0)

    # The data: text -> vocabulary -> ids. The vocabulary is the text's distinct characters, sorted,
    # and a character's id is its place in it (utils.CharTokenizer). The first 90% trains, the last
    # 10% validates: the model is scored on text it never trained on.
    ids, tokenizer = load_text_ids(data_path, config.min_char_count)
    if saved and tokenizer.chars != saved["vocab"]:
        raise SmollError(f"'{data_path}' is not the text this run was trained on (its characters "
                         f"differ): resume with the same --data.")
    train_data, val_data = split_data(ids, config.block_size)
    if teachers:  # first: building the teachers draws random initial weights of its own
        teachers, teacher_record = load_teachers(teachers, tokenizer, machine.device, saved)

    # The model, and the optimizers that update it. float16 needs loss scaling, or small gradients
    # would round to zero: the scaler multiplies the loss before backward and divides the gradients
    # before the update, skipping a step whose gradients overflow. Disabled, it changes nothing.
    torch.manual_seed(config.seed)  # the same initial weights on every rank
    model = build_model(config, tokenizer.vocab_size).to(machine.device)
    optimizers = make_optimizers(model, config, machine.device)
    scaler = torch.amp.GradScaler(machine.device.type, enabled=machine.dtype == torch.float16)
    torch.manual_seed(config.seed + machine.rank)  # dropout differs between ranks
    batch_rng = torch.Generator().manual_seed(config.seed + machine.rank)  # and so do the batches
    run = Run(config, machine, out_path, tokenizer, train_data, val_data, model, optimizers, scaler, batch_rng,
              teachers or None, clock_start=clock_start)
    run.record = {"git_commit": git_commit(), "device": machine.name, "dtype": str(machine.dtype)[6:],
                  "torch": str(torch.__version__), "world_size": machine.world_size,
                  "started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "train_time_s": 0.0}
    if saved:
        restore_state(run, saved)
    if teachers:
        run.record["teachers"] = teacher_record
        run.log(f"distilling from {len(teachers.members)} teacher(s) (weight {config.distill_weight:g}, "
                f"temperature {config.distill_temperature:g}), trained for "
                f"{sum(t['train_time_s'] for t in teacher_record):.0f} s in all")
    run.log(f"{config.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters | vocab "
            f"{tokenizer.vocab_size} | {len(train_data):,} train / {len(val_data):,} val characters | "
            f"{machine.name} {run.record['dtype']}"
            + (f" | {machine.world_size} processes" if machine.world_size > 1 else ""))
    run.log(f"{'resuming at step ' + str(run.step) if saved else 'saving the best checkpoint'} "
            f"to {os.path.relpath(out_path)}")
    return run


def make_optimizers(model, config, device):
    """AdamW, with weight decay on weight matrices only: decaying gains and biases only hurts.

    With --optimizer muon, Muon updates the transformer blocks' weight matrices instead: it turns
    each one's momentum into the nearest orthogonal matrix (a few Newton-Schulz steps), so every
    direction of the matrix learns at the same rate (smoll/muon.py: torch.optim.Muon, with the
    matrices of one shape orthogonalised together). Embeddings, the head and the gains keep AdamW.
    Each group keeps its peak learning rate in "peak_lr"; train_step scales it by lr_scale. On CUDA
    one fused kernel does AdamW's whole update; elsewhere a few batched (foreach) operations.
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
    fused = device.type == "cuda"
    optimizers = [torch.optim.AdamW(adamw_groups, lr=config.learning_rate, betas=(0.9, 0.99), fused=fused,
                                    foreach=not fused)]
    if hidden:
        muon_params = [p for p in params if p in hidden]  # in the model's order, so resume matches
        optimizers.append(Muon([{"params": muon_params, "peak_lr": config.muon_lr}],  # torch.optim.Muon's math
                               lr=config.muon_lr, weight_decay=config.weight_decay))
    return optimizers


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


def train_step(run, step_model, scale):
    """One optimizer step on one batch, run as config.grad_accum micro-batches whose gradients add up
    to the whole batch's. Returns the batch's mean loss, as a tensor (reading it waits for the GPU)."""
    config, machine = run.config, run.machine
    for optimizer in run.optimizers:
        for group in optimizer.param_groups:
            group["lr"] = group["peak_lr"] * scale
    x, y = get_batch(run.train_data, *batch_shape(run.step, config), run.batch_rng, machine.device)  # (B, T) each
    total = 0.0
    for i, (x_micro, y_micro) in enumerate(zip(x.chunk(config.grad_accum), y.chunk(config.grad_accum))):
        # Under DDP, averaging the gradients across ranks once, after the last micro-batch, is enough.
        last = i == config.grad_accum - 1
        with contextlib.nullcontext() if last or machine.world_size == 1 else step_model.no_sync():
            if run.teachers is not None:  # --teacher: the loss also compares with the teachers' predictions
                taught = teacher_log_probs(run.teachers, x_micro, config, machine.device, machine.dtype)
            with autocast(machine.device, machine.dtype):
                logits, loss = step_model(x_micro, y_micro)
                if run.teachers is not None:
                    loss = distillation_loss(logits, y_micro, taught, config.distill_weight,
                                             config.distill_temperature)
            run.scaler.scale(loss / config.grad_accum).backward()  # each micro-batch is 1/grad_accum of the mean
        total += loss.detach() / config.grad_accum
    if config.grad_clip > 0:
        for optimizer in run.optimizers:
            run.scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), config.grad_clip)
    for optimizer in run.optimizers:
        run.scaler.step(optimizer)  # skips the update if float16 gradients overflowed
        optimizer.zero_grad(set_to_none=True)
    run.scaler.update()
    return total


# ----------------------------------------------------------------------------------------------
# Evaluating, saving and finishing


def evaluate_and_keep_best(run, bar, stop, eval_sample=0):
    """Estimate the loss on eval_iters batches of chunks of each split, spread evenly over it and the
    same every time (utils.eval_loss; a split smaller than that is scored whole), and write
    eval_sample characters (write_sample). Save the best checkpoint and the history. Rank 0 only.
    Returns False when a Ctrl-C stopped the evaluation."""
    config, machine = run.config, run.machine
    started, losses = time.perf_counter(), {}
    for split, data in (("train", run.train_data), ("val", run.val_data)):
        scored = eval_loss(run.model, data, config.block_size, config.batch_size, machine.device, machine.dtype,
                           max_chars=config.eval_iters * config.batch_size * config.block_size, stop=stop)
        if scored is None:
            return False
        losses[split] = scored[0]
        check_loss(losses[split], run, training=False)
    sample = write_sample(run, eval_sample) if eval_sample else None
    run.eval_seconds = time.perf_counter() - started  # the sample included: a timed run keeps time for it
    lr = config.learning_rate * lr_scale(min(run.step, config.max_iters - 1), config, run.record["train_time_s"])
    run.history.append({"step": run.step, "train_loss": round(losses["train"], 5),
                        "val_loss": round(losses["val"], 5), "lr": lr, "tokens_per_s": round(run.tokens_per_s()),
                        "time_s": round(run.record["train_time_s"], 2)}
                       | ({"sample": sample} if sample is not None else {}))
    mark = ""
    if losses["val"] < run.best["val"]:
        if len(run.history) == 1 and os.path.exists(run.out_path):  # a new run: keep what it overwrites
            backup = os.path.splitext(run.out_path)[0] + ".prev.pth"
            with open(run.out_path, "rb") as source, replaced_atomically(backup, ".pth") as f:
                shutil.copyfileobj(source, f)
            run.log(f"the checkpoint that was at {os.path.relpath(run.out_path)} is kept as {os.path.relpath(backup)}")
        run.best = {"val": losses["val"], "step": run.step}
        save_checkpoint(run.out_path, run.model, config, run.tokenizer, run.step, run.best["val"],
                        history=run.history, run=run.record)
        mark = " (saved)"
    with replaced_atomically(os.path.splitext(run.out_path)[0] + ".csv", ".csv", "w") as f:
        columns = list(dict.fromkeys(key for row in run.history for key in row))  # a resumed run's may differ
        writer = csv.DictWriter(f, fieldnames=columns, restval="", lineterminator="\n")
        writer.writeheader()
        writer.writerows(run.history)
    bar.write(f"step {run.step:5d} | train {losses['train']:.4f} | val {losses['val']:.4f}{mark}")
    if sample is not None:
        bar.write("  " + sample.replace("\n", "⏎"))
    return True


def write_sample(run, length):
    """length characters after the text's first line (at most its first 32 characters), drawn with a
    fixed seed: the same prompt and the same draws at every evaluation, so that one sample after
    another shows what the model has learned. Neither training's random state nor its mode changes."""
    ids = [int(i) for i in run.train_data[:32]]
    newline = run.tokenizer.stoi.get("\n")
    prompt = ids[:ids.index(newline) + 1] if newline in ids else ids
    device = run.machine.device
    generator = torch.Generator("cpu" if device.type == "mps" else device).manual_seed(run.config.seed)
    new_ids = run.model.stream(torch.tensor([prompt], device=device), length, generator=generator)
    return run.tokenizer.decode(prompt + [int(i) for i in torch.cat(list(new_ids), dim=1)[0]])


def check_loss(value, run, training=True):
    """Stop with a sentence when a loss is not a number. In float16 a training step can overflow
    while the GradScaler looks for its scale: it skips that step and halves the scale, and training
    goes on. Only overflow at every scale (the scale driven below 1) is divergence."""
    if math.isfinite(value) or (training and run.scaler.is_enabled() and run.scaler.get_scale() >= 1.0):
        return
    raise SmollError(f"the loss became {value} at step {run.step}: training diverged. The last good "
                     f"checkpoint {os.path.relpath(run.out_path)} is untouched; try a lower "
                     f"--learning_rate than {run.config.learning_rate} or a longer --warmup_iters.")


def finish_run(run, interrupted, sample_chars, full_eval):
    """Score the best checkpoint on the validation split, draw the loss curve, print a sample."""
    if run.machine.rank != 0:
        return {}
    out = os.path.relpath(run.out_path)
    result = {"best_val": run.best["val"], "best_step": run.best["step"], "history": run.history}
    if interrupted:
        saved = f"The best checkpoint is {out}" if run.best["step"] >= 0 else "No evaluation has finished yet"
        run.log(f"interrupted at step {run.step}. {saved}; continue with: python train.py --resume --out {out}")
        return {**result, "interrupted": run.step}
    tokens_per_s = run.tokens_per_s()
    run.log(f"trained to step {run.step} in {run.record['train_time_s']:.1f} s ({tokens_per_s:,.0f} tokens/s)")

    # The best checkpoint's weights (rounded to float16, as play.py will load them), scored on the
    # whole validation split with the evaluation of the estimates; its figures go into the file.
    checkpoint = load_checkpoint(run.out_path)
    run.model.load_state_dict(checkpoint["model_state"])
    val_loss, n_scored = eval_loss(run.model, run.val_data, run.config.block_size, device=run.machine.device,
                                   dtype=run.machine.dtype, max_chars=None if full_eval else FULL_EVAL_CHARS)
    run.record.update(full_val_loss=round(val_loss, 5), val_chars_scored=n_scored, best_step=run.best["step"],
                      tokens_per_s=round(tokens_per_s))
    save_checkpoint(run.out_path, run.model, run.config, run.tokenizer, checkpoint["step"], checkpoint["val_loss"],
                    history=run.history, run=run.record)
    kind = "full" if n_scored == len(run.val_data) - 1 else "sampled"
    run.log(f"best val estimate {run.best['val']:.4f} at step {run.best['step']}; {kind} validation loss "
            f"{val_loss:.4f} nats/char ({val_loss / math.log(2):.4f} bits/char) over {n_scored:,} characters"
            + (f" (an even sample of {len(run.val_data) - 1:,}; --full_eval scores all)" if kind == "sampled" else ""))
    picture = os.path.splitext(run.out_path)[0] + ".png"
    try:
        plot_history(run.history, picture, title=f"{run.config.model}: {os.path.basename(run.out_path)}")
        run.log(f"loss curve: {os.path.relpath(picture)}")
    except SmollError as e:
        run.log(f"no loss curve: {e}")
    if sample_chars:  # written as it is sampled, from the text's first character
        prompt = torch.tensor([[int(run.train_data[0])]], device=run.machine.device)  # (1, 1)
        print("sample:\n" + run.tokenizer.decode(prompt[0].tolist()), end="", flush=True)
        for next_id in run.model.stream(prompt, sample_chars):
            print(run.tokenizer.decode(next_id[0].tolist()), end="", flush=True)
        print()
    if os.path.abspath(run.out_path) == DEFAULT_OUT[run.config.model]:
        run.log(f"play it: python play.py --weights {out}")
    return {**result, "full_val": val_loss}


# ----------------------------------------------------------------------------------------------
# The training state, for --resume


def last_path(out_path):
    """The full training state, for --resume, lives beside the best weights: NAME.last.pth."""
    return os.path.splitext(out_path)[0] + ".last.pth"


def save_state(run, finished):
    """Everything --resume needs, in NAME.last.pth: the weights in float32, the optimizers' and the
    scaler's states, and every rank's random states (rank 0 writes them all). A finished run is
    marked, so that --resume leaves it alone."""
    rngs = rng_states(run.machine, run.batch_rng)  # under torchrun, every rank must take part
    if run.machine.rank == 0:
        save_checkpoint(last_path(run.out_path), run.model, run.config, run.tokenizer, run.step, run.best["val"],
                        half=False, optimizer=[o.state_dict() for o in run.optimizers],
                        scaler=run.scaler.state_dict(), rng=rngs, best_step=run.best["step"], history=run.history,
                        run=run.record, finished=finished)


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


def restore_state(run, state):
    """Pick up exactly where the saved run stopped."""
    run.model.load_state_dict(state["model_state"])
    saved = state["optimizer"]
    saved = saved if isinstance(saved, list) else [saved]  # files of older versions: AdamW's state alone
    for optimizer, optimizer_state in zip(run.optimizers, saved):
        flags = {k: optimizer.defaults[k] for k in ("fused", "foreach") if k in optimizer.defaults}  # AdamW's
        optimizer.load_state_dict(optimizer_state)  # moves its tensors to the parameters' device
        for group in optimizer.param_groups:  # this machine's flags, not those of the one that saved
            group.update(flags)
    if run.scaler.is_enabled() and state.get("scaler"):
        run.scaler.load_state_dict(state["scaler"])
    run.step, run.history, run.record = state["step"], state["history"], state["run"]
    run.best = {"val": state["val_loss"], "step": state["best_step"]}
    if len(state["rng"]) != run.machine.world_size:
        raise SmollError(f"this run was saved from {len(state['rng'])} process(es): resume it "
                         f"with the same number, not {run.machine.world_size}.")
    set_rng_states(state["rng"][run.machine.rank], run.machine, run.batch_rng)


# ----------------------------------------------------------------------------------------------
# The command line


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
    parser.add_argument("--eval_sample", type=int, default=80, metavar="CHARS",
                        help="characters written at each evaluation, after the text's first line, with a "
                             "fixed seed: the samples show the model learning (default: 80; 0: none)")
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
            from smoll.eval_table import eval_only  # imported when asked for: a training run never uses it
            eval_only(args.weights or [SHIPPED_WEIGHTS[args.model]], args.data, args.device or "auto",
                      args.full_eval, args.ensemble)
            return
        if args.eval_sample < 0:
            parser.error(f"--eval_sample must be 0 (none) or more characters, got {args.eval_sample}.")
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
                       teachers=args.teacher, eval_sample=args.eval_sample)
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

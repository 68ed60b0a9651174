"""Train a smoll model on a text file.

    python train.py                          # TinyGPT, config.py's defaults (wants a GPU)
    python train.py --preset cpu             # the best TinyGPT a 2-core CPU makes in 5 minutes
    python train.py --model bigram           # the Bigram baseline, in seconds
    python train.py --n_layer 4 --learning_rate 1e-3 --data my_text.txt --out models/mine.pth
    python train.py --preset cpu --time_budget 90                  # the best model in 90 seconds
    python train.py --resume --out models/mine.pth                 # continue an interrupted run
    python train.py --eval_only --weights models/tinygpt.pth       # score and compare checkpoints
    torchrun --nproc_per_node 4 train.py     # data-parallel on 4 GPUs (or CPU processes)

A run writes, beside --out NAME.pth:
    NAME.pth       the best checkpoint (lowest validation loss), for play.py
    NAME.last.pth  the latest full training state, for --resume
    NAME.csv       the loss history, one row per evaluation
    NAME.png       the loss curve (if matplotlib is installed)
"""

import argparse
import csv
import math
import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import fields, replace
from datetime import datetime, timezone

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from config import MODELS, PRESETS, Config, add_config_args, config_from_args, config_from_dict
from models import build_model
from utils import (DEFAULT_DATA, DEFAULT_WEIGHTS, FULL_EVAL_CHARS, SmollError, atomic_save, autocast,
                   describe_device, eval_loss, get_batch, get_device, git_commit, load_checkpoint,
                   load_model, load_tokens, plot_history, resolve_dtype, save_checkpoint, split_data)

# The fields a resumed run takes from its checkpoint; device, dtype and compile may change
# between machines.
HYPERPARAMETERS = {f.name for f in fields(Config)} - {"model", "device", "dtype", "compile"}


def get_lr(step, config, elapsed=0.0):
    """Linear warmup to learning_rate, then cosine decay to learning_rate * min_lr_ratio.

    The decay follows the steps, or with --time_budget the fraction of the budget spent (elapsed
    seconds), so that a timed run always ends at the bottom of the schedule.
    """
    warmup = config.learning_rate * (step + 1) / (config.warmup_iters + 1)
    if config.time_budget > 0:
        progress = elapsed / config.time_budget
    else:
        if step < config.warmup_iters:
            return warmup
        progress = (step - config.warmup_iters) / max(1, config.max_iters - config.warmup_iters)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))  # goes from 1 down to 0
    min_lr = config.learning_rate * config.min_lr_ratio
    decayed = min_lr + cosine * (config.learning_rate - min_lr)
    return min(warmup, decayed) if step < config.warmup_iters else decayed


def make_optimizer(model, config, device):
    """AdamW with weight decay on weight matrices only: decaying gains and biases only hurts."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    fused = device.type == "cuda"  # one kernel for the whole update; foreach elsewhere
    return torch.optim.AdamW(groups, lr=config.learning_rate, betas=(0.9, 0.99),
                             fused=fused, foreach=not fused)


@torch.no_grad()
def estimate_loss(model, eval_batches, device, dtype):
    """Mean loss over fixed batches per split, so curves are comparable between evaluations."""
    model.eval()
    out = {}
    for split, batches in eval_batches.items():
        losses = torch.zeros(len(batches))
        for i, (x, y) in enumerate(batches):
            with autocast(device, dtype):
                _, loss = model(x, y)
            losses[i] = loss.item()
        out[split] = losses.mean().item()
    model.train()
    return out


def last_path(out_path):
    """The full training state, for --resume, lives beside the best weights: NAME.last.pth."""
    return os.path.splitext(out_path)[0] + ".last.pth"


def keep_previous(path):
    """Copy an existing checkpoint to NAME.prev.pth before a new run first overwrites it."""
    if not os.path.exists(path):
        return None
    backup = os.path.splitext(path)[0] + ".prev.pth"
    shutil.copy2(path, backup + ".tmp")
    os.replace(backup + ".tmp", backup)
    return backup


def write_history_csv(history, path):
    tmp = path + ".tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)
    os.replace(tmp, path)


class StopFlag:
    """Turns the first Ctrl-C into a request to stop at the next step boundary, so the saved state
    is never half an optimizer step. A second Ctrl-C stops at once."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        # Signals can only be caught on the main thread. A process started with SIGINT ignored
        # (a background job, nohup) keeps ignoring it.
        if (threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGINT) is not signal.SIG_IGN):
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nCtrl-C: saving after this step (press again to quit at once)", file=sys.stderr,
              flush=True)

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def setup_distributed(config):
    """Under torchrun, join the process group (NCCL on GPUs, gloo on CPUs).

    Returns (rank, world_size, device). Without torchrun: (0, 1, the configured device).
    """
    device = get_device(config.device)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise SmollError(f"torchrun needs CUDA GPUs or CPUs, not {device.type}: add --device cpu.")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world_size, device


def train(config, data_path=DEFAULT_DATA, out_path=None, sample_chars=300, resume=False,
          full_eval=False):
    """Train config.model on the text at data_path, saving as the module docstring says.

    With resume, continue the run whose state is in NAME.last.pth; config then only supplies the
    device and dtype, the rest comes from the saved run. The final score covers the whole
    validation split up to FULL_EVAL_CHARS characters, an even sample past that, or all of it with
    full_eval. Returns a dict of the run's figures.
    """
    out_path = out_path or DEFAULT_WEIGHTS[config.model]
    state = None
    if resume:
        state = load_checkpoint(last_path(out_path))
        if "optimizer" not in state:
            raise SmollError(f"'{last_path(out_path)}' holds weights but no training state to "
                             f"resume from: start a new run without --resume.")
        if state["finished"]:
            raise SmollError(f"the run saved at '{last_path(out_path)}' already finished, at step "
                             f"{state['step']}: there is nothing to resume. Start a new run (with a "
                             f"larger --max_iters or --time_budget to train longer).")
        config = replace(config_from_dict(state["config"]), device=config.device, dtype=config.dtype,
                         compile=config.compile)
    if config.time_budget and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise SmollError("--time_budget times a single process: under torchrun, use --max_iters.")
    rank, world_size, device = setup_distributed(config)
    try:
        result = _train(config, data_path, out_path, sample_chars, state, rank, world_size, device,
                        full_eval)
        if world_size > 1:
            dist.barrier()  # the ranks leave together, after rank 0 has scored and saved
        return result
    finally:
        if world_size > 1:
            dist.destroy_process_group()


def load_data(data_path, rank, world_size):
    """load_tokens for every rank: under torchrun, each machine's first process encodes the text
    while the others wait, then they all read its token file."""
    if world_size == 1:
        return load_tokens(data_path)
    first = int(os.environ.get("LOCAL_RANK", "0")) == 0
    if not first:
        dist.barrier()
    try:
        return load_tokens(data_path, progress=rank == 0)
    finally:
        if first:
            dist.barrier()


def _train(config, data_path, out_path, sample_chars, state, rank, world_size, device, full_eval):
    dtype = resolve_dtype(config.dtype, device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls for anything left in fp32
        torch.backends.cudnn.allow_tf32 = True
    log = print if rank == 0 else (lambda *args, **kwargs: None)

    ids, tokenizer = load_data(data_path, rank, world_size)  # memory-mapped: batches are read from disk
    if state is not None and tokenizer.chars != state["vocab"]:
        raise SmollError(f"'{data_path}' is not the text this run was trained on (its characters "
                         f"differ): resume with the same --data.")
    train_data, val_data = split_data(ids, config.block_size)

    torch.manual_seed(config.seed)  # the same initial weights on every rank
    model = build_model(config, tokenizer.vocab_size).to(device)
    optimizer = make_optimizer(model, config, device)
    torch.manual_seed(config.seed + rank)  # dropout differs between ranks
    batch_rng = torch.Generator().manual_seed(config.seed + rank)  # so do the batches
    eval_rng = torch.Generator().manual_seed(0)  # the same eval batches in every run
    eval_batches = {split: [get_batch(d, config.batch_size, config.block_size, eval_rng, device)
                            for _ in range(config.eval_iters)]
                    for split, d in (("train", train_data), ("val", val_data))}

    step, history, best = 0, [], {"val": float("inf"), "step": -1}
    run = {"git_commit": git_commit(), "device": describe_device(device), "dtype": str(dtype)[6:],
           "torch": str(torch.__version__), "world_size": world_size,
           "started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "train_time_s": 0.0}
    if state is not None:  # pick up exactly where the saved run stopped
        model.load_state_dict(state["model_state"])
        optimizer.load_state_dict(state["optimizer"])
        step, history, run = state["step"], state["history"], state["run"]
        best = {"val": state["val_loss"], "step": state["best_step"]}
        if len(state["rng"]) != world_size:
            raise SmollError(f"this run was saved from {len(state['rng'])} process(es): resume it "
                             f"with the same number, not {world_size}.")
        rng = state["rng"][rank]
        torch.set_rng_state(rng["torch"])
        batch_rng.set_state(rng["batch"])
        if "cuda" in rng and device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], device)
    # Under torchrun, DDP averages the gradients of all ranks during backward().
    # Its buffers are the constant rotary tables: equal on every rank, so no syncing at each step.
    train_model = DistributedDataParallel(model, forward_sync_buffers=False) if world_size > 1 else model
    if config.compile == "on" or (config.compile == "auto" and device.type == "cuda"):
        # Fuses the step's small kernels. Checkpoints save `model`, the uncompiled module, so their
        # keys never get the "_orig_mod." prefix. Where compiling fails (no compiler, an old GPU),
        # the step runs uncompiled instead of stopping the run.
        torch._dynamo.config.suppress_errors = True
        train_model = torch.compile(train_model)

    n_params = sum(p.numel() for p in model.parameters())
    log(f"{config.model}: {n_params / 1e6:.2f}M parameters | vocab {tokenizer.vocab_size} | "
        f"{len(train_data):,} train / {len(val_data):,} val characters | {run['device']} "
        f"{run['dtype']}" + (f" | {world_size} processes" if world_size > 1 else ""))
    log(f"{'resuming at step ' + str(step) if state else 'saving the best checkpoint'} "
        f"to {os.path.relpath(out_path)}")

    tokens_per_step = config.batch_size * config.block_size * world_size
    backup = None
    t_start, time_before, step_start = time.perf_counter(), run["train_time_s"], step

    def save_state(finished):
        """The full state, for --resume: every rank's RNG states are gathered into rank 0's file.
        A finished run is marked, so that --resume leaves it alone."""
        rng = {"torch": torch.get_rng_state(), "batch": batch_rng.get_state()}
        if device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(device)
        rngs = [rng]
        if world_size > 1:
            rngs = [None] * world_size
            dist.all_gather_object(rngs, rng)
        if rank == 0:
            save_checkpoint(last_path(out_path), model, config, tokenizer, step, best["val"], half=False,
                            optimizer=optimizer.state_dict(), rng=rngs, best_step=best["step"],
                            history=history, run=run, finished=finished)

    # With a time budget the bar counts seconds, otherwise steps. In a terminal it redraws often;
    # into a log file, every few seconds is plenty.
    budget = config.time_budget
    bar = tqdm(total=round(budget) if budget else config.max_iters, initial=0 if budget else step,
               unit="s" if budget else "step", dynamic_ncols=True, file=sys.stdout,
               mininterval=0.1 if sys.stdout.isatty() else 5.0, disable=rank != 0)
    eval_seconds = 0.0  # how long an evaluation takes: a timed run keeps this much for its last
    interrupted = False
    with StopFlag() as stop:
        while True:
            run["train_time_s"] = time_before + time.perf_counter() - t_start
            if budget:
                last_step = run["train_time_s"] + eval_seconds >= budget
            else:
                last_step = step == config.max_iters
            # Evaluate (rank 0 only), keep the best checkpoint, and save the state for --resume.
            due = step % config.eval_interval == 0 or last_step
            if due and not (history and history[-1]["step"] == step):  # a resumed step is done
                if rank == 0:
                    t_eval = time.perf_counter()
                    losses = estimate_loss(model, eval_batches, device, dtype)
                    eval_seconds = time.perf_counter() - t_eval
                    check_finite(losses["train"], step, out_path, config)
                    check_finite(losses["val"], step, out_path, config)
                    elapsed = time.perf_counter() - t_start
                    history.append({"step": step, "train_loss": round(losses["train"], 5),
                                    "val_loss": round(losses["val"], 5),
                                    "lr": get_lr(min(step, config.max_iters - 1), config,
                                                 run["train_time_s"]),
                                    "tokens_per_s": round((step - step_start) * tokens_per_step / elapsed),
                                    "time_s": round(run["train_time_s"], 2)})
                    mark = ""
                    if losses["val"] < best["val"]:
                        if best["step"] < 0 and state is None:
                            backup = keep_previous(out_path)
                        best = {"val": losses["val"], "step": step}
                        save_checkpoint(out_path, model, config, tokenizer, step, best["val"],
                                        history=history, run=run)
                        mark = " (saved)"
                    write_history_csv(history, os.path.splitext(out_path)[0] + ".csv")
                    bar.write(f"step {step:5d} | train {losses['train']:.4f} | "
                              f"val {losses['val']:.4f}{mark}")
                save_state(finished=last_step)
            if last_step:
                break
            if stop_requested(stop, step, world_size, device):
                save_state(finished=False)
                interrupted = True
                break

            # One optimizer step.
            lr = get_lr(step, config, run["train_time_s"])
            for group in optimizer.param_groups:
                group["lr"] = lr
            x, y = get_batch(train_data, config.batch_size, config.block_size, batch_rng, device)
            with autocast(device, dtype):
                _, loss = train_model(x, y)
            loss.backward()
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1

            bar.update(min(time_before + time.perf_counter() - t_start, budget) - bar.n if budget else 1)
            if step % 10 == 0 or step == config.max_iters:  # .item() waits for the GPU: not every step
                loss_value = loss.item()
                check_finite(loss_value, step, out_path, config)
                elapsed = time.perf_counter() - t_start
                bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}",
                                tok_s=f"{(step - step_start) * tokens_per_step / elapsed:,.0f}")
    bar.close()
    if rank != 0:
        return {}
    result = {"best_val": best["val"], "best_step": best["step"], "history": history}
    if interrupted:
        log(f"interrupted at step {step}. The best checkpoint is {os.path.relpath(out_path)}; "
            f"continue with: python train.py --resume --out {os.path.relpath(out_path)}")
        return {**result, "interrupted": step}

    elapsed = time.perf_counter() - t_start
    log(f"trained to step {step} in {run['train_time_s']:.1f} s "
        f"({(step - step_start) * tokens_per_step / elapsed:,.0f} tokens/s)")
    if backup:
        log(f"the checkpoint that was at {os.path.relpath(out_path)} before is kept as "
            f"{os.path.relpath(backup)}")

    # Score the best checkpoint on the whole validation split, and store the run's figures in it.
    best_model, _, _ = load_model(out_path, device)
    full_val, n_scored = eval_loss(best_model, val_data, config.block_size, device=device, dtype=dtype,
                                   max_chars=None if full_eval else FULL_EVAL_CHARS)
    run.update(full_val_loss=round(full_val, 5), val_chars_scored=n_scored, best_step=best["step"],
               tokens_per_s=round((step - step_start) * tokens_per_step / elapsed))
    checkpoint = load_checkpoint(out_path)
    checkpoint.update(history=history, run=run)
    atomic_save(checkpoint, out_path)
    kind = scored_kind(n_scored, val_data)
    log(f"best val estimate {best['val']:.4f} at step {best['step']}; {kind} validation loss "
        f"{full_val:.4f} nats/char ({full_val / math.log(2):.4f} bits/char) over {n_scored:,} characters"
        + (f" (an even sample of {len(val_data) - 1:,}; --full_eval scores all)" if kind == "sampled" else ""))
    picture = os.path.splitext(out_path)[0] + ".png"
    try:
        plot_history(history, picture, title=f"{config.model}: {os.path.basename(out_path)}")
        log(f"loss curve: {os.path.relpath(picture)}")
    except SmollError as e:
        log(f"no loss curve: {e}")
    if sample_chars:
        prompt = torch.tensor([[int(ids[0])]], device=device)  # the text's first character
        ids = best_model.generate(prompt, sample_chars)[0].tolist()
        log("sample:\n" + tokenizer.decode(ids))
    return {**result, "full_val": full_val}


def check_finite(value, step, out_path, config):
    if not math.isfinite(value):
        raise SmollError(f"the loss became {value} at step {step}: training diverged. The last good "
                         f"checkpoint {os.path.relpath(out_path)} is untouched; try a lower "
                         f"--learning_rate than {config.learning_rate} or a longer --warmup_iters.")


def stop_requested(stop, step, world_size, device):
    """Whether to stop now. Under torchrun every rank must stop at the same step, so the ranks
    agree every 10 steps (one tiny all-reduce); alone, a Ctrl-C takes effect at once."""
    if world_size == 1:
        return stop.requested
    if step % 10 != 0:
        return False
    flag = torch.tensor([float(stop.requested)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def eval_only(weights, data_path, device_name, full_eval=False):
    """Print each checkpoint's run and its validation loss, side by side."""
    device = get_device(device_name)
    ids, text_tokenizer = load_tokens(data_path)
    rows = []
    for path in weights:
        model, tokenizer, config = load_model(path, device)
        checkpoint = load_checkpoint(path)
        _, val_data = split_data(ids, config.block_size)
        val_data = to_model_ids(val_data, text_tokenizer, tokenizer, data_path)
        loss, n_scored = eval_loss(model, val_data, config.block_size, device=device,
                                   max_chars=None if full_eval else FULL_EVAL_CHARS)
        run = checkpoint.get("run", {})
        rows.append({
            "checkpoint": os.path.relpath(path),
            "model": describe_config(config),
            "parameters": format_count(sum(p.numel() for p in model.parameters())),
            "step": f"{checkpoint['step']} of "
                    + (f"a {config.time_budget:g} s budget" if config.time_budget else str(config.max_iters)),
            "trained on": f"{run.get('device', '?')} ({run.get('dtype', '?')}"
                          + (f", {run['world_size']} processes" if run.get("world_size", 1) > 1 else "")
                          + ")",
            "training time": f"{run['train_time_s']:.0f} s" if "train_time_s" in run else "?",
            "git commit": run.get("git_commit", "?"),
            "val loss estimate": f"{checkpoint['val_loss']:.4f}",
            f"{scored_kind(n_scored, val_data)} val loss": f"{loss:.4f} nats/char",
            "bits/char": f"{loss / math.log(2):.4f}",
            "characters scored": f"{n_scored:,} of {len(val_data) - 1:,}",
        })
    note = ("every character counted once" if all("full val loss" in r for r in rows) else
            f"past {FULL_EVAL_CHARS:,} characters an even sample is scored; --full_eval scores all")
    print(f"validation loss over the last 10% of {os.path.relpath(data_path)} ({note}):")
    width = max(len(k) for k in rows[0])
    columns = [max(len(r[k]) for k in r) for r in rows]
    for key in rows[0]:
        print((f"  {key:<{width}}  " + "  ".join(f"{r[key]:<{w}}" for r, w in zip(rows, columns))).rstrip())
    return rows


def to_model_ids(ids, text_tokenizer, model_tokenizer, data_path):
    """ids of a text, renumbered into a model's vocabulary (which may hold more characters)."""
    if text_tokenizer.chars == model_tokenizer.chars:
        return ids
    unknown = [ch for ch in text_tokenizer.chars if ch not in model_tokenizer.stoi]
    if unknown:
        shown = " ".join(repr(ch) for ch in unknown[:10])
        raise SmollError(f"'{data_path}' has {len(unknown)} character(s) this model never saw in "
                         f"training ({shown}): score it on the text it was trained on.")
    renumber = np.array([model_tokenizer.stoi[ch] for ch in text_tokenizer.chars], dtype=np.int64)
    return renumber[ids]


def scored_kind(n_scored, val_data):
    """"full" when every validation character was scored, "sampled" for an even sample."""
    return "full" if n_scored == len(val_data) - 1 else "sampled"


def format_count(n):
    return f"{n / 1e6:.2f}M" if n >= 100_000 else f"{n:,}"


def describe_config(config):
    if config.model == "bigram":
        return "bigram"
    return f"tinygpt {config.n_layer}L x {config.n_head}H x {config.n_embd}, ctx {config.block_size}"


def build_parser():
    parser = argparse.ArgumentParser(
        description="Train a smoll model (TinyGPT or Bigram) on a UTF-8 text file.",
        epilog="Every hyperparameter above can be set from the command line, e.g. "
               "`python train.py --n_layer 4 --learning_rate 1e-3`.")
    parser.add_argument("--model", choices=MODELS, default="tinygpt",
                        help="which model to train (default: tinygpt)")
    parser.add_argument("--preset", choices=list(PRESETS),
                        help="a named set of overrides from config.py: `cpu` trains the best "
                             "TinyGPT a laptop CPU makes in 5 minutes (or --time_budget seconds)")
    parser.add_argument("--data", default=DEFAULT_DATA,
                        help="UTF-8 text to train on; the first 90%% trains, the last 10%% validates "
                             "(default: dataset/tinyshakespeare.txt)")
    parser.add_argument("--out", help="where to save the best checkpoint (default: models/tinygpt.pth, "
                                      "or models/model_weights.pth for the bigram)")
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
    add_config_args(parser)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.eval_only:
            eval_only(args.weights or [DEFAULT_WEIGHTS[args.model]], args.data, args.device or "auto",
                      args.full_eval)
            return
        if args.resume:
            fixed = [f"--{k}" for k, v in vars(args).items() if k in HYPERPARAMETERS and v is not None]
            if args.preset or fixed:
                parser.error(f"--resume continues the saved run with its own hyperparameters: "
                             f"drop {' '.join(fixed or ['--preset'])}.")
        try:
            config = config_from_args(args)
        except ValueError as e:
            parser.error(str(e))
        result = train(config, args.data, args.out, resume=args.resume, full_eval=args.full_eval)
        if result.get("interrupted") is not None:
            sys.exit(130)  # the shell's code for "stopped by Ctrl-C"
    except SmollError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()

"""Train a smoll model on a text file.

    python train.py                          # TinyGPT, config.py's defaults (wants a GPU)
    python train.py --preset cpu             # the best TinyGPT a 2-core CPU makes in 5 minutes
    python train.py --model bigram           # the Bigram baseline, in seconds
    python train.py --n_layer 4 --learning_rate 1e-3 --data my_text.txt --out models/mine.pth
    python train.py --preset cpu --time_budget 30                  # the best model in 30 seconds
    python train.py --preset cpu_10min                             # ... or in 10 minutes
    python train.py --resume --out models/mine.pth                 # continue an interrupted run
    python train.py --eval_only --weights models/tinygpt.pth       # score and compare checkpoints
    python train.py --eval_only --weights a.pth b.pth --ensemble   # ... and all of them as one
    python train.py --teacher a.pth b.pth --out models/student.pth # learn from their predictions
    torchrun --nproc_per_node 4 train.py     # data-parallel on 4 GPUs (or CPU processes)

A run writes, beside --out NAME.pth:
    NAME.pth       the best checkpoint (lowest validation loss), for play.py
    NAME.last.pth  the latest full training state, for --resume
    NAME.csv       the loss history, one row per evaluation
    NAME.png       the loss curve (if matplotlib is installed)
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

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from config import MODELS, PRESETS, Config, add_config_args, config_from_args, config_from_dict
from models import Ensemble, TinyGPT, build_model, distillation_loss
from utils import (DEFAULT_DATA, DEFAULT_WEIGHTS, FULL_EVAL_CHARS, CharTokenizer, SmollError, atomic_save,
                   check_writable, decisions_path, read_decisions, write_decisions, writing,
                   autocast, describe_device, eval_loss, file_sha256, get_batch, get_device, git_commit,
                   load_checkpoint, load_model, load_tokens, plot_history, resolve_dtype, save_checkpoint,
                   split_data, synchronize, to_cpu)

# The fields a resumed run takes from its checkpoint; device, dtype, compile and grad_accum may
# change between machines.
HYPERPARAMETERS = {f.name for f in fields(Config)} - {"model", "device", "dtype", "compile", "grad_accum"}


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


def batch_shape(step, config):
    """(sequences, context length) of a step's batch. With --seq_warmup N, the first N steps take
    contexts half as long, twice as many of them: as many characters per step, but attention
    costs half as much, and early on the model mostly learns short-range statistics anyway."""
    if step < config.seq_warmup:
        return 2 * config.batch_size, max(1, config.block_size // 2)
    return config.batch_size, config.block_size


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


def last_path(out_path):
    """The full training state, for --resume, lives beside the best weights: NAME.last.pth."""
    return os.path.splitext(out_path)[0] + ".last.pth"


def keep_previous(path):
    """Copy an existing checkpoint to NAME.prev.pth before a new run first overwrites it."""
    if not os.path.exists(path):
        return None
    backup = os.path.splitext(path)[0] + ".prev.pth"
    with writing(backup), removed_on_failure(backup + ".tmp"):
        shutil.copy2(path, backup + ".tmp")
        os.replace(backup + ".tmp", backup)
    return backup


def write_history_csv(history, path):
    with writing(path), removed_on_failure(path + ".tmp"):
        with open(path + ".tmp", "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(history[0]))
            writer.writeheader()
            writer.writerows(history)
        os.replace(path + ".tmp", path)


@contextlib.contextmanager
def removed_on_failure(tmp):
    """Delete the temp file tmp if the block fails, so a failed write leaves nothing behind."""
    try:
        yield
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


class StopFlag:
    """Turns the first Ctrl-C into a request to stop at the next step boundary (or in the middle
    of an evaluation), so the saved state is never half an optimizer step. A second Ctrl-C stops
    at once."""

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
        print("\nCtrl-C: stopping and saving (press again to quit at once)", file=sys.stderr, flush=True)

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
          full_eval=False, teachers=None):
    """Train config.model on the text at data_path, saving as the module docstring says.

    With resume, continue the run whose state is in NAME.last.pth; config then only supplies the
    device and dtype, the rest comes from the saved run (its teachers too). The final score covers
    the whole validation split up to FULL_EVAL_CHARS characters, an even sample past that, or all
    of it with full_eval. teachers, a list of checkpoint paths, distils their averaged predictions
    into the model (distillation_loss, with config.distill_weight and distill_temperature).
    Returns a dict of the run's figures.
    """
    out_path = out_path or DEFAULT_WEIGHTS[config.model]
    check_writable(out_path)  # a run that cannot save should stop now, not at its first checkpoint
    state = None
    if resume:
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
    if config.time_budget and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise SmollError("--time_budget times a single process: under torchrun, use --max_iters.")
    if state is not None:
        teachers = [t["path"] for t in state["run"].get("teachers", [])]
    rank, world_size, device = setup_distributed(config)
    try:
        result = _train(config, data_path, out_path, sample_chars, state, rank, world_size, device,
                        full_eval, teachers)
        if world_size > 1:
            dist.barrier()  # the ranks leave together, after rank 0 has scored and saved
        return result
    finally:
        if world_size > 1:
            dist.destroy_process_group()


def load_data(data_path, config, rank, world_size):
    """load_tokens for every rank: under torchrun, each machine's first process encodes the text
    while the others wait, then they all read its token file."""
    if world_size == 1:
        return load_tokens(data_path, min_count=config.min_char_count)
    first = int(os.environ.get("LOCAL_RANK", "0")) == 0
    if not first:
        dist.barrier()
    try:
        return load_tokens(data_path, progress=rank == 0, min_count=config.min_char_count)
    finally:
        if first:
            dist.barrier()


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
    text_ids: np.ndarray  # the whole text, memory-mapped: train_data and val_data are its two parts
    train_data: np.ndarray
    val_data: np.ndarray
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
    teachers: Ensemble = None  # with --teacher: the models whose averaged predictions it learns from
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


def _train(config, data_path, out_path, sample_chars, state, rank, world_size, device, full_eval, teachers):
    """The training loop: set up, warm up, then step, evaluating and saving every eval_interval
    steps, until the last step, the end of the time budget or a Ctrl-C."""
    # The clock covers everything up to the last checkpoint: reading the data, building the model,
    # the warm-up (and compiling), training and evaluating. --time_budget counts all of it.
    t_start = time.perf_counter()
    r = setup_run(config, data_path, out_path, state, rank, world_size, device, teachers)
    r.time_before, r.t_start = r.record["train_time_s"], t_start
    compile_seconds, step_seconds, eval_seconds = warm_up(r)
    if compile_seconds:
        r.record["compile_s"] = round(compile_seconds, 1)
        r.log(f"compiled the training step in {compile_seconds:.1f} s")
    announce_estimate(r, step_seconds, eval_seconds)
    r.t_loop, r.step_start = time.perf_counter(), r.step
    budget = config.time_budget
    # With a time budget the bar counts seconds, otherwise steps. In a terminal it redraws often;
    # into a log file, every few seconds is plenty.
    bar = tqdm(total=round(budget) if budget else config.max_iters, initial=0 if budget else r.step,
               unit="s" if budget else "step", dynamic_ncols=True, file=sys.stdout,
               mininterval=0.1 if sys.stdout.isatty() else 5.0, disable=rank != 0)
    interrupted = False
    with StopFlag() as stop:
        while True:
            r.record["train_time_s"] = r.elapsed()
            if budget:
                last_step = r.record["train_time_s"] + r.eval_seconds >= budget
            else:
                last_step = r.step == config.max_iters
            due = r.step % config.eval_interval == 0 or last_step
            if due and not (r.history and r.history[-1]["step"] == r.step):  # a resumed step is done
                if rank == 0 and not evaluate_and_keep_best(r, bar, stop if world_size == 1 else None):
                    save_state(r, finished=False)  # Ctrl-C during the evaluation
                    interrupted = True
                    break
                save_state(r, finished=last_step)
            if last_step:
                break
            if stop_requested(stop, r.step, world_size, device):
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
    return finish_run(r, interrupted, sample_chars, full_eval)


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
    r = Run(config, device, dtype, rank, world_size, out_path, tokenizer, ids, train_data, val_data,
            eval_batches, model, model, optimizers, scaler, batch_rng, record, resumed=state is not None)
    if state is not None:
        restore_state(r, state)
    if ensemble is not None:
        r.teachers, r.record["teachers"] = ensemble, teacher_record
    # Under torchrun, DDP averages the gradients of all ranks during backward().
    # Its buffers are the constant rotary tables: equal on every rank, so no syncing at each step.
    if world_size > 1:
        try:
            r.train_model = DistributedDataParallel(model, forward_sync_buffers=False)
        except TypeError:  # PyTorch before 2.13 names the same setting broadcast_buffers
            r.train_model = DistributedDataParallel(model, broadcast_buffers=False)
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


def load_teachers(paths, tokenizer, device, state=None):
    """The teachers as one Ensemble, frozen, and what the run records of each: its path, a hash of
    the file (a resumed run must learn from the very same teachers) and how long it trained,
    counting its own teachers, so that a distilled model's cost includes theirs."""
    members, record = [], []
    saved = {t["path"]: t for t in state["run"].get("teachers", [])} if state is not None else {}
    for path in paths:
        path = os.path.abspath(path)
        digest = file_sha256(path) if os.path.isfile(path) else None
        if path in saved and digest != saved[path]["sha256"]:
            raise SmollError(f"the teacher '{os.path.relpath(path)}' this run learns from is "
                             f"{'gone' if digest is None else 'not the file it was'}: put the same "
                             f"checkpoint back there to resume.")
        model, teacher_tokenizer, config = load_model(path, device, flag="--teacher")
        if teacher_tokenizer.chars != tokenizer.chars:
            raise SmollError(f"the teacher '{os.path.relpath(path)}' knows other characters than this "
                             f"run's text: distil from models trained on the same --data.")
        model.requires_grad_(False)
        run = load_checkpoint(path, flag="--teacher").get("run", {})
        seconds = training_seconds(run) or 0.0
        members.append(model)
        record.append({"path": path, "sha256": digest, "train_time_s": round(seconds, 1),
                       "model": describe_config(config)})
    return Ensemble(members).eval(), record


def training_seconds(run):
    """A run's training time with its teachers' added in, from its record (None if it has none)."""
    if "train_time_s" not in run:
        return None
    return run["train_time_s"] + sum(t["train_time_s"] for t in run.get("teachers", []))


def teacher_log_probs(r, x):
    """The teachers' averaged predictions for x, softened by the distillation temperature."""
    with torch.no_grad(), autocast(r.device, r.dtype):
        return r.teachers.log_probs(x, r.config.distill_temperature)


def should_compile(config, device):
    """--compile auto compiles on CUDA, and on a CPU for a time budget of 2 minutes or more: on a
    2-core CPU, compiling takes 10 to 30 s the first time (about 3 s once PyTorch has cached the
    kernels), and then a step of --preset cpu runs about 1.45x faster."""
    if config.compile != "auto":
        return config.compile == "on"
    return device.type == "cuda" or (device.type == "cpu" and config.time_budget >= 120)


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


def rng_states(device, batch_rng):
    """Every random number generator a run draws from: dropout's (CPU and GPU) and the batches'."""
    rng = {"torch": torch.get_rng_state(), "batch": batch_rng.get_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    elif device.type == "mps":
        rng["mps"] = torch.mps.get_rng_state()
    return rng


def set_rng_states(rng, device, batch_rng):
    torch.set_rng_state(rng["torch"])
    batch_rng.set_state(rng["batch"])
    if device.type == "cuda" and "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"], device)
    elif device.type == "mps" and "mps" in rng:
        torch.mps.set_rng_state(rng["mps"])


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
    step_seconds = (times[1] + time_teachers(r)) * c.grad_accum
    return (compile_seconds if r.compiled else 0.0), step_seconds, eval_seconds


def time_teachers(r):
    """Seconds the teachers take on a full-length micro-batch (the second of two passes), or 0."""
    if r.teachers is None:
        return 0.0
    x, _ = get_batch(r.train_data, r.config.batch_size // r.config.grad_accum, r.config.block_size,
                     torch.Generator().manual_seed(0), r.device)
    for _ in range(2):
        t = time.perf_counter()
        teacher_log_probs(r, x)
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
    on the device, the precision and the sizes (README: Speed), and no CPU flag tells. The
    choice is cached per machine, model shape and batch, like play.py's sampling path, so that
    runs of the same config make the same one; a resumed run keeps its own. Under torchrun the
    ranks keep the default (models.py's use_sdpa = None) rather than time apart and disagree.
    Returns the eager pass's seconds with the chosen attention, or None where nothing was timed."""
    if not isinstance(r.model, TinyGPT) or r.world_size > 1:
        return None
    c = r.config
    key = (f"{describe_device(r.device)} | torch {torch.__version__} | {r.dtype} | layers {c.n_layer} "
           f"x {c.n_embd}, {c.n_head} heads, qk_norm {c.qk_norm}, dropout {c.dropout} | vocab "
           f"{r.tokenizer.vocab_size} | micro-batch {c.batch_size // c.grad_accum} x {c.block_size}")
    store = decisions_path("training_choices.json")
    decisions = read_decisions(store)
    seconds = decisions.get(key, {}).get("pass_s")
    if "attention" not in r.record and not seconds:
        seconds = {}
        for name in ("written-out", "sdpa"):
            set_attention(r.model, name)
            seconds[name] = time_passes(r, r.eager_model, *batch_shape(c.seq_warmup, c))[1]
        decisions[key] = {"pass_s": seconds}
        write_decisions(store, decisions)
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
            teachers = teacher_log_probs(r, x_micro) if r.teachers is not None else None
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


def save_state(r, finished):
    """The full state, for --resume: every rank's RNG states are gathered into rank 0's file, and
    every tensor goes to the CPU, so the file loads on any machine. A finished run is marked, so
    that --resume leaves it alone."""
    rngs = [rng_states(r.device, r.batch_rng)]
    if r.world_size > 1:
        rngs = [None] * r.world_size
        dist.all_gather_object(rngs, rng_states(r.device, r.batch_rng))
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
    full_val, n_scored = eval_loss(best_model, r.val_data, r.config.block_size, device=r.device,
                                   dtype=r.dtype, max_chars=None if full_eval else FULL_EVAL_CHARS)
    r.record.update(full_val_loss=round(full_val, 5), val_chars_scored=n_scored, best_step=r.best["step"],
                    tokens_per_s=round(tokens_per_s))
    checkpoint = load_checkpoint(r.out_path)
    checkpoint.update(history=r.history, run=r.record)
    atomic_save(checkpoint, r.out_path)
    kind = scored_kind(n_scored, r.val_data)
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
        prompt = torch.tensor([[int(r.text_ids[0])]], device=r.device)  # the text's first character
        ids = best_model.generate(prompt, sample_chars)[0].tolist()
        r.log("sample:\n" + r.tokenizer.decode(ids))
    return {**result, "full_val": full_val}


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


def eval_only(weights, data_path, device_name, full_eval=False, ensemble=False):
    """Print each checkpoint's run and its validation loss, side by side; with ensemble, also the
    loss of all of them predicting together (models.Ensemble: the mean of their probabilities)."""
    device = get_device(device_name)
    ids, text_tokenizer = load_tokens(data_path)
    max_chars = None if full_eval else FULL_EVAL_CHARS
    rows, members = [], []
    for path in weights:
        model, tokenizer, config = load_model(path, device)
        checkpoint = load_checkpoint(path)
        _, val_data = split_data(ids, config.block_size)
        val_data = to_model_ids(val_data, text_tokenizer, tokenizer, data_path)
        loss, n_scored = eval_loss(model, val_data, config.block_size, device=device, max_chars=max_chars)
        run = checkpoint.get("run", {})
        teachers = run.get("teachers", [])
        seconds = training_seconds(run)
        rows.append({
            "checkpoint": os.path.relpath(path),
            "model": describe_config(config),
            "parameters": format_count(sum(p.numel() for p in model.parameters())),
            "step": f"{checkpoint['step']} of "
                    + (f"a {config.time_budget:g} s budget" if config.time_budget else str(config.max_iters)),
            "trained on": f"{run.get('device', '?')} ({run.get('dtype', '?')}"
                          + (f", {run['world_size']} processes" if run.get("world_size", 1) > 1 else "")
                          + ")",
            "training time": "?" if seconds is None else f"{seconds:.0f} s" + (
                f" ({run['train_time_s']:.0f} s + {len(teachers)} teacher(s))" if teachers else ""),
            "git commit": run.get("git_commit", "?"),
            "val loss estimate": f"{checkpoint['val_loss']:.4f}",
            **score_columns(loss, n_scored, val_data),
        })
        members.append((model, tokenizer, file_sha256(path), run))
    if ensemble:
        rows.append(ensemble_row(members, ids, text_tokenizer, data_path, device, max_chars))
    note = ("every character counted once" if all("full val loss" in r for r in rows) else
            f"past {FULL_EVAL_CHARS:,} characters an even sample is scored; --full_eval scores all")
    print(f"validation loss over the last 10% of {os.path.relpath(data_path)} ({note}):")
    width = max(len(k) for k in rows[0])
    columns = [max(len(r[k]) for k in r) for r in rows]
    for key in rows[0]:
        print((f"  {key:<{width}}  " + "  ".join(f"{r[key]:<{w}}" for r, w in zip(rows, columns))).rstrip())
    return rows


def score_columns(loss, n_scored, val_data):
    """The columns of eval_only's table that give a loss."""
    return {f"{scored_kind(n_scored, val_data)} val loss": f"{loss:.4f} nats/char",
            "bits/char": f"{loss / math.log(2):.4f}",
            "characters scored": f"{n_scored:,} of {len(val_data) - 1:,}"}


def ensemble_row(members, ids, text_tokenizer, data_path, device, max_chars):
    """eval_only's column for the members predicting together. They must share a vocabulary; each
    sees the context of the shortest, so the windows are that member's."""
    models = [model for model, _, _, _ in members]
    tokenizer = members[0][1]
    if any(t.chars != tokenizer.chars for _, t, _, _ in members):
        raise SmollError("--ensemble averages the members' predictions character by character, so they "
                         "must know the same characters: pick checkpoints trained on the same text.")
    together = Ensemble(models)
    _, val_data = split_data(ids, together.block_size)
    val_data = to_model_ids(val_data, text_tokenizer, tokenizer, data_path)
    loss, n_scored = eval_loss(together, val_data, together.block_size, device=device, max_chars=max_chars)
    # Training time in all: each member's own, and each teacher's that is not a member too, once.
    seconds = {digest: run.get("train_time_s") for _, _, digest, run in members}
    for _, _, _, run in members:
        seconds.update({t["sha256"]: t["train_time_s"] for t in run.get("teachers", []) if t["sha256"] not in seconds})
    blocks = sorted({m.block_size for m in models})
    return {
        "checkpoint": f"ensemble of {len(models)}",
        "model": "mean of their probabilities" + (f", ctx {blocks[0]}" if len(blocks) > 1 else ""),
        "parameters": format_count(sum(p.numel() for p in together.parameters())),
        "step": "-", "trained on": "-",
        "training time": "?" if None in seconds.values() else f"{sum(seconds.values()):.0f} s in all",
        "git commit": "-", "val loss estimate": "-",
        **score_columns(loss, n_scored, val_data),
    }


def to_model_ids(ids, text_tokenizer, model_tokenizer, data_path):
    """ids of a text, renumbered into a model's vocabulary (which may hold more characters, or
    an unknown symbol that stands for the characters it lacks)."""
    if text_tokenizer.chars == model_tokenizer.chars:
        return ids
    unknown = [ch for ch in text_tokenizer.chars if ch not in model_tokenizer.stoi]
    if unknown and model_tokenizer.unknown is None:
        shown = " ".join(repr(ch) for ch in unknown[:10])
        raise SmollError(f"'{data_path}' has {len(unknown)} character(s) this model never saw in "
                         f"training ({shown}): score it on the text it was trained on.")
    renumber = np.array(model_tokenizer.encode(text_tokenizer.chars), dtype=np.int64)
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
                             "TinyGPT a laptop CPU makes in 5 minutes (or --time_budget seconds), "
                             "`cpu_10min` in 10, `cpu_30min` in 30, `cpu_60min` the shipped model in an hour")
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
            eval_only(args.weights or [DEFAULT_WEIGHTS[args.model]], args.data, args.device or "auto",
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

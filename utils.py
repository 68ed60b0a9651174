"""What a learner needs beside the model: the tokenizer, batches, evaluation, checkpoints.

    load_model(path, device="cpu") -> (model, tokenizer, config)   a checkpoint, ready to sample
    get_batch(data, batch_size, block_size)  -> (x, y)             random windows for training
    eval_loss(model, data, block_size)       -> (loss, n_scored)   the loss over a whole split

Every file smoll writes is written whole or not at all (replaced_atomically), and every way a
file can fail to read or write becomes one sentence that names the fix (SmollError). The
machinery around these lives in files of its own: token_cache.py encodes big texts,
devices.py picks the device, pictures.py draws.
"""

import contextlib
import errno
import hashlib
import math
import mmap
import os
import subprocess
import tempfile
from dataclasses import asdict

import numpy as np
import torch

from config import config_from_dict
from models import build_model


ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DATA = os.path.join(ROOT, "dataset", "tinyshakespeare.txt")
SHIPPED_WEIGHTS = {"tinygpt": os.path.join(ROOT, "models", "tinygpt.pth"),
                   "bigram": os.path.join(ROOT, "models", "model_weights.pth")}  # the Bigram's historic name
DEFAULT_OUT = {"tinygpt": os.path.join(ROOT, "out", "tinygpt.pth"),  # where train.py writes: git-ignored
               "bigram": os.path.join(ROOT, "out", "bigram.pth")}
FULL_EVAL_CHARS = 1 << 18  # a validation split up to this size is scored whole; a larger one is sampled


class SmollError(Exception):
    """A problem the user can fix. Scripts print its message as one line and exit non-zero."""


def user_cache_dir():
    """smoll's folder for what it keeps between runs (timings, compiled code, token files of
    read-only folders): $SMOLL_CACHE, or $XDG_CACHE_HOME/smoll, or ~/.cache/smoll."""
    home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.environ.get("SMOLL_CACHE") or os.path.join(home, "smoll")


# ----------------------------------------------------------------------------------------------
# Text and tokenizer


def read_text(path, flag="--data"):
    """Read a UTF-8 text file, with a clear error for each way it can be unusable."""
    if not os.path.isfile(path):
        raise SmollError(f"text file '{path}' does not exist: pass an existing file with {flag}.")
    try:
        with reading(path, flag), open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError:
        raise SmollError(f"'{path}' is not UTF-8 text: convert it first, for example with "
                         f"`iconv -t UTF-8 {path} > text.txt`.") from None
    if not text:
        raise SmollError(f"'{path}' is empty: give {flag} a file with some text in it.")
    return text


UNKNOWN = "\ufffd"  # the symbol rare characters become with --min_char_count: "�"


class CharTokenizer:
    """Maps each character of the vocabulary to its index in the sorted list of characters.

    With unknown set (a character of the vocabulary), characters outside the vocabulary encode
    as that one instead of being refused.
    """

    def __init__(self, chars, unknown=None):
        self.chars = list(chars)
        self.stoi = {ch: i for i, ch in enumerate(self.chars)}
        self.unknown = unknown

    @classmethod
    def from_text(cls, text):
        return cls(sorted(set(text)))

    @property
    def vocab_size(self):
        return len(self.chars)

    def encode(self, s, what="the text"):
        if self.unknown is not None:
            return [self.stoi.get(ch, self.stoi[self.unknown]) for ch in s]
        unknown = sorted(set(s) - self.stoi.keys())
        if unknown:
            shown = " ".join(repr(ch) for ch in unknown[:10])
            raise SmollError(f"{what} has {len(unknown)} character(s) this model never saw in "
                             f"training ({shown}): remove or replace them.")
        return [self.stoi[ch] for ch in s]

    def decode(self, ids):
        return "".join(self.chars[i] for i in ids)


def file_sha256(path):
    """The SHA-256 of a file, read 16 MiB at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------
# Batches and evaluation


def split_data(data, block_size):
    """First 90% of the ids for training, last 10% for validation; both must hold one block."""
    n = int(0.9 * len(data))
    train, val = data[:n], data[n:]
    if len(val) < block_size + 1:
        need = math.ceil((block_size + 1) / 0.1)
        raise SmollError(f"the text is too short for block_size {block_size}: its 10% validation "
                         f"split has {len(val)} characters but needs {block_size + 1}. Use a text "
                         f"of at least {need} characters, or a smaller --block_size.")
    return train, val


def windows(data, starts, length, device="cpu"):
    """Rows data[s : s + length] for each start s, as an int64 tensor (len(starts), length) on device.

    data is a numpy array (a memory-mapped token file) or a CPU tensor; only the rows are copied.
    For a GPU they go through pinned memory and a non-blocking copy, so the host does not wait for
    the GPU to finish its queued work.
    """
    rows = np.asarray(data)[np.asarray(starts)[:, None] + np.arange(length)]  # (B, length)
    rows = torch.from_numpy(rows.astype(np.int64))
    # The gather mapped the pages around each row into this process. They stay in the OS's file
    # cache, shared by all processes, but unless they are unmapped they count towards this
    # process's resident memory, which would then grow with the text.
    mapping = getattr(data, "_mmap", None)  # np.memmap's mmap object
    if mapping is not None and hasattr(mapping, "madvise"):  # not on Windows
        mapping.madvise(mmap.MADV_DONTNEED)
    device = torch.device(device)
    if device.type == "cuda":
        return rows.pin_memory().to(device, non_blocking=True)
    return rows.to(device)


def get_batch(data, batch_size, block_size, generator=None, device="cpu"):
    """Random windows of data: inputs x and targets y (x shifted left by one), each (B, T)."""
    starts = torch.randint(len(data) - block_size, (batch_size,), generator=generator)  # (B,)
    rows = windows(data, starts.numpy(), block_size + 1, device)  # (B, T+1)
    return rows[:, :-1], rows[:, 1:]


def batch_shape(step, config):
    """(sequences, context length) of a step's batch. With --seq_warmup N, the first N steps take
    contexts half as long, twice as many of them: as many characters per step, but attention
    costs half as much, and early on the model mostly learns short-range statistics anyway."""
    if step < config.seq_warmup:
        return 2 * config.batch_size, max(1, config.block_size // 2)
    return config.batch_size, config.block_size


def eval_windows(n_ids, block_size, max_chars=FULL_EVAL_CHARS):
    """Where to score a split of n_ids ids: (starts, tail). Each start begins a window of block_size
    targets; tail > 0 adds one shorter window of the last tail targets.

    Up to max_chars targets (or with max_chars=None), every target is scored once, in
    non-overlapping windows. Past that, max_chars // block_size windows spread evenly over the
    split: the same in every run, so scores stay comparable.
    """
    n_targets = n_ids - 1
    if max_chars is None or n_targets <= max_chars:
        return np.arange(n_targets // block_size) * block_size, n_targets % block_size
    count = max(1, max_chars // block_size)
    return np.linspace(0, n_targets - block_size, count).round().astype(np.int64), 0


def autocast(device, dtype):
    """Mixed precision for the forward pass: matmuls in bf16 or fp16, weights and optimizer in fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def eval_loss(model, data, block_size, batch_size=32, device="cpu", dtype=torch.float32,
              max_chars=FULL_EVAL_CHARS):
    """Mean cross-entropy over the windows of eval_windows. Returns (loss, characters scored).

    Each position is predicted from the characters before it inside its window. Scored whole,
    two models on the same split are exactly comparable.
    """
    was_training = model.training
    model.eval()
    device = torch.device(device)
    starts, tail = eval_windows(len(data), block_size, max_chars)
    total, n_scored = 0.0, 0
    pieces = [(starts[i:i + batch_size], block_size) for i in range(0, len(starts), batch_size)]
    if tail:
        pieces.append((np.array([len(data) - 1 - tail]), tail))
    for batch_starts, length in pieces:
        rows = windows(data, batch_starts, length + 1, device)  # (B, T+1)
        with autocast(device, dtype):
            _, loss = model(rows[:, :-1], rows[:, 1:])
        total += loss.item() * batch_starts.size * length
        n_scored += batch_starts.size * length
    model.train(was_training)
    return total / n_scored, n_scored


# ----------------------------------------------------------------------------------------------
# Files that cannot be written: one sentence that names the file, the cause and the fix

WRITE_FAILURES = {  # errno -> (what happened, what to do)
    errno.ENOSPC: ("the disk is full", "free some space, or write to another disk"),
    errno.EDQUOT: ("the disk quota is used up", "free some space, or write to another disk"),
    errno.EFBIG: ("the file would grow past the largest size this system allows",
                  "raise the limit (`ulimit -f`), or write to another disk"),
    errno.EACCES: ("permission denied", "write to a folder you may write to"),
    errno.EPERM: ("the system does not allow writing there", "write to another folder"),
    errno.EROFS: ("the file system is read-only", "write to another disk"),
    errno.EISDIR: ("a folder has that name", "pick a file name that is free"),
    errno.ENOTDIR: ("a file stands where one of its folders should be", "pick another path"),
    errno.EEXIST: ("a file stands where one of its folders should be", "pick another path"),
    errno.ENOENT: ("its folder does not exist and cannot be made (a missing drive?)", "pick another path"),
    errno.EIO: ("the disk reported an error", "check the disk, or write to another one"),
}


def write_failure(path, error, flag=None):
    """A SmollError for an OSError met while writing path: the file, the cause and a fix."""
    cause, fix = WRITE_FAILURES.get(error.errno, (error.strerror or str(error), "write somewhere else"))
    source = f" (the path comes from {flag})" if flag else ""
    return SmollError(f"could not write '{path}': {cause}; {fix}{source}. Files written before are unchanged.")


@contextlib.contextmanager
def writing(path, flag=None):
    """Turn an OSError raised while writing path into write_failure's sentence."""
    try:
        yield
    except OSError as e:
        if isinstance(e, (BrokenPipeError, ConnectionError)):
            raise
        raise write_failure(path, e, flag) from None


@contextlib.contextmanager
def reading(path, flag=None):
    """Turn an OSError raised while reading path (a disk error, a file that vanished) into one sentence."""
    try:
        yield
    except OSError as e:
        source = f" (the path comes from {flag})" if flag else ""
        raise SmollError(f"could not read '{path}': {e.strerror or e}{source}. Check the disk, or "
                         f"copy the file somewhere else.") from None


def check_writable(path, flag="--out"):
    """Make sure a file can be written at path before any work is done: its folder exists or can
    be made, path is not a folder, and a file can be created there. Raises write_failure's error."""
    folder = os.path.dirname(os.path.abspath(path))
    with writing(path, flag):
        if os.path.isdir(path):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
        os.makedirs(folder, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".tmp-probe-")
        os.close(fd)
        os.remove(probe)


# ----------------------------------------------------------------------------------------------
# Checkpoints
# A checkpoint is one dict of plain types and tensors, so it loads with weights_only=True:
#   model_state  the state_dict; float16 in the best checkpoint to halve the file (loading casts
#                it back), float32 in the NAME.last.pth training state
#   config       the Config as a dict; config["model"] names the model type
#   vocab        the characters, in id order
#   step         the optimizer step it was taken at
#   val_loss     the validation loss estimate of the best step so far
#   history      one dict per evaluation: step, train_loss, val_loss, lr, tokens_per_s, time_s
#   run          where and how it was trained: git commit, device, dtype, torch, time, figures
# The NAME.last.pth training state adds optimizer, scaler, rng, best_step and finished, for --resume.


def temp_file(folder, suffix):
    """A new temp file in folder, to be renamed into place once written. Returns (fd, path)."""
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=suffix)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private; give it the usual mode
    return fd, tmp


@contextlib.contextmanager
def replaced_atomically(path, suffix, mode="wb", make_folder=True):
    """A file to write in place of path: a temp file beside it, renamed over path once the block
    ends. A crash, a full disk or Ctrl-C mid-write leaves the old file untouched, never a
    half-written one, and no temp file behind; an OSError becomes write_failure's SmollError."""
    folder = os.path.dirname(os.path.abspath(path))
    with writing(path):
        if make_folder:
            os.makedirs(folder, exist_ok=True)
        fd, tmp = temp_file(folder, suffix)
        try:
            with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)  # atomic on POSIX and Windows
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise


def atomic_save(obj, path):
    """torch.save into a temp file beside path, then rename over it (see replaced_atomically)."""
    with replaced_atomically(path, ".pth") as f:
        torch.save(obj, f)


def to_cpu(obj):
    """A copy of a nested dict/list structure with every tensor moved to the CPU, so that a
    checkpoint from a GPU loads with weights_only=True on a machine without one."""
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def save_checkpoint(path, model, config, tokenizer, step, val_loss, half=True, **extra):
    """Save a self-describing checkpoint atomically; extra keys (history, run, ...) are added as is."""
    dtype = torch.float16 if half else torch.float32
    state = {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype)
             for k, v in model.state_dict().items()}
    checkpoint = {"model_state": state, "config": asdict(config), "vocab": tokenizer.chars,
                  "step": step, "val_loss": val_loss, **extra}
    atomic_save(checkpoint, path)


def load_checkpoint(path, flag="--weights"):
    """Read a checkpoint dict, turning every way a file can be wrong into one clear SmollError.
    flag names the command-line option that gave the path, for the message."""
    if not os.path.isfile(path):
        raise SmollError(f"weights file '{path}' does not exist: {way_forward(path)}, or pass an "
                         f"existing file with {flag}.")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        raise SmollError(f"'{path}' is not a readable smoll checkpoint (truncated, corrupt or not "
                         f"a PyTorch file): {way_forward(path)}.") from None
    keys = ("model_state", "config", "vocab", "step", "val_loss")
    if not isinstance(checkpoint, dict) or not all(k in checkpoint for k in keys):
        raise SmollError(f"'{path}' is a PyTorch file but not a smoll checkpoint: pass weights "
                         f"written by smoll's train.py.")
    return checkpoint


def load_model(path, device="cpu", flag="--weights"):
    """Load a checkpoint into a ready-to-sample model. Returns (model, tokenizer, config).

    The model is in eval mode, in float32, on device. Its type comes from the checkpoint.
    """
    checkpoint = load_checkpoint(path, flag)
    config = config_from_dict(checkpoint["config"])
    tokenizer = CharTokenizer(checkpoint["vocab"], UNKNOWN if config.min_char_count > 1 else None)
    try:
        model = build_model(config, tokenizer.vocab_size)
        model.load_state_dict(checkpoint["model_state"])  # copies cast float16 back to float32
    except (KeyError, RuntimeError, ValueError, TypeError):
        raise SmollError(f"'{path}' does not match the model it describes (its weights and config "
                         f"disagree): {way_forward(path)}.") from None
    model.to(device).eval()
    return model, tokenizer, config


def way_forward(path):
    """The shortest fix for a checkpoint that is missing or damaged: a shipped one comes back from
    git; any other is made again in minutes, without touching the shipped ones."""
    if os.path.abspath(path) in SHIPPED_WEIGHTS.values():
        return f"restore the shipped file with `git checkout -- {os.path.relpath(path, ROOT)}`"
    return (f"train one in 5 minutes with `python train.py --preset cpu --out {path}` (a Bigram "
            f"in seconds: `python train.py --model bigram --out {path}`)")


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


def git_commit():
    """The commit the code was run from, with "-dirty" for uncommitted changes, or "unknown"."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, text=True,
                             capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"

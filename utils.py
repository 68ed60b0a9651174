"""What a learner needs beside the model: text to ids, batches, the loss over a split, checkpoints.

    load_text_ids(path)                      -> (ids, tokenizer)   where characters become numbers
    get_batch(data, batch_size, block_size)  -> (x, y)             random chunks of text, for training
    eval_loss(model, data, block_size)       -> (loss, n_scored)   the mean loss over a split, in nats
    save_checkpoint(path, model, ...)                              one self-describing file, written whole
    load_model(path, device)                 -> (model, tokenizer, config)   a checkpoint, ready to sample

What these lean on lives in smoll/, a package a learner need not open: smoll/data.py encodes texts
too big to read at once, smoll/files.py writes every file whole and turns disk errors into sentences.
"""

import collections
import contextlib
import math
import mmap
import os
import subprocess
import sys
from dataclasses import asdict

import numpy as np
import torch
from tqdm import tqdm

from config import config_from_dict
from models import build_model
from smoll.files import SmollError, atomic_save, reading

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DATA = os.path.join(ROOT, "dataset", "tinyshakespeare.txt")
SHIPPED_WEIGHTS = {"tinygpt": os.path.join(ROOT, "models", "tinygpt.pth"),
                   "bigram": os.path.join(ROOT, "models", "model_weights.pth")}  # the Bigram's historic name
DEFAULT_OUT = {"tinygpt": os.path.join(ROOT, "out", "tinygpt.pth"),  # where train.py writes: git-ignored
               "bigram": os.path.join(ROOT, "out", "bigram.pth")}
FULL_EVAL_CHARS = 1 << 18  # a validation split up to this size is scored whole; a larger one is sampled
BIG_TEXT_BYTES = 1 << 24  # a text over 16 MiB is encoded in pieces into a token file (smoll/data.py)
UNKNOWN = "\ufffd"  # the symbol rare characters become with --min_char_count: "�"


# ----------------------------------------------------------------------------------------------
# Text to ids


class CharTokenizer:
    """The vocabulary is the text's distinct characters, sorted; a character's id is its place in it.

        "hello"  ->  vocabulary ['e', 'h', 'l', 'o']  ->  ids [1, 0, 2, 2, 3]

    With unknown set (a character of the vocabulary), characters outside the vocabulary encode as
    that one instead of being refused.
    """

    def __init__(self, chars, unknown=None):
        self.chars = list(chars)
        self.vocab_size = len(self.chars)
        self.stoi = {ch: i for i, ch in enumerate(self.chars)}
        self.unknown = unknown

    @classmethod
    def from_text(cls, text, min_count=1):
        """The vocabulary of text. With min_count > 1, the characters seen fewer times all become
        one symbol, UNKNOWN, which the vocabulary then holds."""
        if min_count <= 1:
            return cls(sorted(set(text)))
        kept = {ch for ch, n in collections.Counter(text).items() if n >= min_count}
        return cls(sorted(kept | {UNKNOWN}), unknown=UNKNOWN)

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


def load_text_ids(path, min_count=1, flag="--data"):
    """The text at path as ids, and its tokenizer: (ids, tokenizer), ids a 1-D numpy array with one
    id per character. Line endings become "\\n", as Python reads text files.

    A text of up to BIG_TEXT_BYTES is read whole and encoded here. A bigger one is encoded once, in
    pieces, into a token file that every later run memory-maps (smoll/data.py): the same vocabulary
    and the same ids, in memory that does not grow with the text.
    """
    if os.path.isfile(path) and os.path.getsize(path) > BIG_TEXT_BYTES:
        from smoll.data import load_token_file  # imported when needed: most texts are read whole
        ids, chars = load_token_file(path, flag, min_count, UNKNOWN)
        return ids, CharTokenizer(chars, UNKNOWN if min_count > 1 else None)
    text = read_text(path, flag)
    tokenizer = CharTokenizer.from_text(text, min_count)
    return np.array(tokenizer.encode(text), dtype=np.int64), tokenizer


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


def chunks(data, starts, length, device="cpu"):
    """Rows data[s : s + length] for each start s, as an int64 tensor (len(starts), length) on device.

    data is a numpy array (memory-mapped for a big text) or a CPU tensor; only the rows are copied.
    For a GPU they go through pinned memory and a non-blocking copy, so the host does not wait for
    the GPU to finish its queued work.
    """
    rows = torch.from_numpy(np.asarray(data)[np.asarray(starts)[:, None] + np.arange(length)].astype(np.int64))
    # A memory-mapped text: the gather mapped the pages around each row into this process. They
    # stay in the OS's file cache, but would count towards this process's memory until unmapped.
    mapping = getattr(data, "_mmap", None)
    if mapping is not None and hasattr(mapping, "madvise"):  # not on Windows
        mapping.madvise(mmap.MADV_DONTNEED)
    device = torch.device(device)
    if device.type == "cuda":
        return rows.pin_memory().to(device, non_blocking=True)
    return rows.to(device)


def get_batch(data, batch_size, block_size, generator=None, device="cpu"):
    """Random chunks of data: inputs x and targets y (x shifted left by one), each (B, T)."""
    starts = torch.randint(len(data) - block_size, (batch_size,), generator=generator)  # (B,)
    rows = chunks(data, starts.numpy(), block_size + 1, device)  # (B, T+1)
    return rows[:, :-1], rows[:, 1:]


def batch_shape(step, config):
    """(sequences, context length) of a step's batch. With --seq_warmup N, the first N steps take
    contexts half as long, twice as many of them: as many characters per step, but attention
    costs half as much, and early on the model mostly learns short-range statistics anyway."""
    if step < config.seq_warmup:
        return 2 * config.batch_size, max(1, config.block_size // 2)
    return config.batch_size, config.block_size


def eval_chunks(n_ids, block_size, max_chars=FULL_EVAL_CHARS):
    """Where to score a split of n_ids ids: (starts, tail). Each start begins a chunk of block_size
    targets; tail > 0 adds one shorter chunk of the last tail targets.

    Up to max_chars targets (or with max_chars=None), every target is scored once, in
    non-overlapping chunks. Past that, max_chars // block_size chunks spread evenly over the
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
              max_chars=FULL_EVAL_CHARS, stop=None):
    """Mean cross-entropy over the chunks of eval_chunks. Returns (loss, characters scored).

    Each position is predicted from the characters before it inside its chunk. Scored whole,
    two models on the same split are exactly comparable. train.py scores its run with this: every
    eval_interval steps on eval_iters batches of each split (its estimate), and at the end on the
    whole validation split. A progress bar shows up when it takes more than a second; it returns None at
    once when stop.requested turns True (a Ctrl-C).
    """
    was_training = model.training
    model.eval()
    device = torch.device(device)
    starts, tail = eval_chunks(len(data), block_size, max_chars)
    pieces = [(starts[i:i + batch_size], block_size) for i in range(0, len(starts), batch_size)]
    if tail:
        pieces.append((np.array([len(data) - 1 - tail]), tail))
    total, n_scored = 0.0, 0
    for batch_starts, length in tqdm(pieces, desc="evaluating", unit="batch", leave=False, delay=1.0,
                                     dynamic_ncols=True, file=sys.stdout):
        if stop is not None and stop.requested:
            model.train(was_training)
            return None
        rows = chunks(data, batch_starts, length + 1, device)  # (B, T+1)
        with autocast(device, dtype):
            _, loss = model(rows[:, :-1], rows[:, 1:])
        total += loss.item() * batch_starts.size * length
        n_scored += batch_starts.size * length
    model.train(was_training)
    return total / n_scored, n_scored


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


def save_checkpoint(path, model, config, tokenizer, step, val_loss, half=True, **extra):
    """Save a self-describing checkpoint, written whole or not at all (smoll/files.py), with every
    tensor on the CPU; extra keys (history, run, the optimizers' states ...) are added as they are."""
    dtype = torch.float16 if half else torch.float32
    state = {k: v.detach().to(dtype if v.is_floating_point() else v.dtype) for k, v in model.state_dict().items()}
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

    The model is in eval mode, in float32, on device. Its type comes from the checkpoint. (play.py
    then samples from a copy set up for the fastest variant here, perhaps in bfloat16 or int8.)
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


def git_commit():
    """The commit the code was run from, with "-dirty" for uncommitted changes, or "unknown"."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, text=True,
                             capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"

"""What train.py and play.py share: devices, text, the tokenizer, batches, checkpoints, evaluation.

Public API: load_model(path, device="cpu") -> (model, tokenizer, config).
"""

import contextlib
import math
import os
import platform
import subprocess
import tempfile
from dataclasses import asdict

import torch

from config import config_from_dict
from models import build_model


ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DATA = os.path.join(ROOT, "dataset", "tinyshakespeare.txt")
DEFAULT_WEIGHTS = {"tinygpt": os.path.join(ROOT, "models", "tinygpt.pth"),
                   "bigram": os.path.join(ROOT, "models", "model_weights.pth")}  # the Bigram's historic name


class SmollError(Exception):
    """A problem the user can fix. Scripts print its message as one line and exit non-zero."""


# ----------------------------------------------------------------------------------------------
# Devices and precision


def get_device(name="auto"):
    """Resolve "auto" to cuda, then mps, then cpu; refuse a device this machine does not have."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SmollError(f"--device {name} was asked for, but this machine has no CUDA GPU "
                         f"(or this PyTorch was built without CUDA): use --device cpu or --device auto.")
    if name == "mps" and not torch.backends.mps.is_available():
        raise SmollError("--device mps was asked for, but MPS is not available here: "
                         "use --device cpu or --device auto.")
    return torch.device(name)


def describe_device(device):
    """A human name for the device, for logs and checkpoints: "NVIDIA H100 80GB HBM3", "AMD EPYC ..."."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        name = platform.processor() or platform.machine()
        with contextlib.suppress(OSError):
            with open("/proc/cpuinfo", encoding="utf-8") as f:
                names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
            name = names[0] if names else name
        return f"{name} CPU, {torch.get_num_threads()} threads"
    return device.type


def cpu_has_fast_bf16():
    """True when the CPU has bf16 matrix instructions (AVX512-BF16 or AMX), where bf16 is ~2x fp32."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(name, device):
    """Pick the autocast dtype: "auto" is bfloat16 on bf16-capable GPUs and CPUs, else float32."""
    if name == "auto":
        if device.type == "cuda":
            fast = torch.cuda.is_bf16_supported()
        else:
            fast = device.type == "cpu" and cpu_has_fast_bf16()
        return torch.bfloat16 if fast else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def autocast(device, dtype):
    """Mixed precision for the forward pass: matmuls in bf16, weights and optimizer in fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# ----------------------------------------------------------------------------------------------
# Text and tokenizer


def read_text(path, flag="--data"):
    """Read a UTF-8 text file, with a clear error for each way it can be unusable."""
    if not os.path.isfile(path):
        raise SmollError(f"text file '{path}' does not exist: pass an existing file with {flag}.")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError:
        raise SmollError(f"'{path}' is not UTF-8 text: convert it first, for example with "
                         f"`iconv -t UTF-8 {path} > text.txt`.") from None
    if not text:
        raise SmollError(f"'{path}' is empty: give {flag} a file with some text in it.")
    return text


class CharTokenizer:
    """Maps each character of the vocabulary to its index in the sorted list of characters."""

    def __init__(self, chars):
        self.chars = list(chars)
        self.stoi = {ch: i for i, ch in enumerate(self.chars)}

    @classmethod
    def from_text(cls, text):
        return cls(sorted(set(text)))

    @property
    def vocab_size(self):
        return len(self.chars)

    def encode(self, s, what="the text"):
        unknown = sorted(set(s) - self.stoi.keys())
        if unknown:
            shown = " ".join(repr(ch) for ch in unknown[:10])
            raise SmollError(f"{what} has {len(unknown)} character(s) this model never saw in "
                             f"training ({shown}): remove or replace them.")
        return [self.stoi[ch] for ch in s]

    def decode(self, ids):
        return "".join(self.chars[i] for i in ids)


# ----------------------------------------------------------------------------------------------
# Data


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


def get_batch(data, batch_size, block_size, generator=None):
    """Random windows of data: inputs x and targets y (x shifted left by one), each (B, T).

    One gather on the whole tensor; no Python loop over rows.
    """
    starts = torch.randint(len(data) - block_size, (batch_size,), generator=generator)  # (B,)
    offsets = torch.arange(block_size + 1)  # (T+1,)
    windows = data[(starts[:, None] + offsets).to(data.device)]  # (B, T+1)
    return windows[:, :-1], windows[:, 1:]


@torch.no_grad()
def full_eval_loss(model, data, block_size, batch_size=32, device="cpu", dtype=torch.float32):
    """Mean cross-entropy over every position of data, in non-overlapping windows of block_size.

    Each position is predicted from the characters before it inside its window, and every one of
    the len(data) - 1 targets counts once, so two models scored on the same split are comparable.
    """
    was_training = model.training
    model.eval()
    n_targets = len(data) - 1
    n_full = n_targets // block_size
    total = 0.0
    full = data[: n_full * block_size + 1]
    x_all = full[:-1].view(n_full, block_size)  # (N, T)
    y_all = full[1:].view(n_full, block_size)  # (N, T)
    for i in range(0, n_full, batch_size):
        x, y = x_all[i:i + batch_size].to(device), y_all[i:i + batch_size].to(device)
        with autocast(torch.device(device), dtype):
            _, loss = model(x, y)
        total += loss.item() * y.numel()
    tail = n_targets - n_full * block_size  # the last, shorter window
    if tail > 0:
        x = data[-tail - 1:-1].view(1, tail).to(device)
        y = data[-tail:].view(1, tail).to(device)
        with autocast(torch.device(device), dtype):
            _, loss = model(x, y)
        total += loss.item() * tail
    model.train(was_training)
    return total / n_targets


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
# The NAME.last.pth training state adds optimizer, rng, best_step and finished, for --resume.


def atomic_save(obj, path):
    """torch.save into a temp file beside path, then rename over it.

    A crash or Ctrl-C mid-write leaves the old file untouched, never a half-written one.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".pth")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private; give it the usual mode
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX and Windows
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


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
        raise SmollError(f"weights file '{path}' does not exist: train one with `python train.py` "
                         f"or pass an existing file with {flag}.")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        shipped = os.path.abspath(path) in DEFAULT_WEIGHTS.values()
        fix = f"restore it with `git checkout -- {path}`" if shipped else "retrain it with `python train.py`"
        raise SmollError(f"'{path}' is not a readable smoll checkpoint (truncated, corrupt or not "
                         f"a PyTorch file): {fix}.") from None
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
    tokenizer = CharTokenizer(checkpoint["vocab"])
    try:
        model = build_model(config, tokenizer.vocab_size)
        model.load_state_dict(checkpoint["model_state"])  # copies cast float16 back to float32
    except (KeyError, RuntimeError, ValueError, TypeError):
        raise SmollError(f"'{path}' does not match the model it describes (its weights and config "
                         f"disagree): retrain it with `python train.py`.") from None
    model.to(device).eval()
    return model, tokenizer, config


def git_commit():
    """The commit the code was run from, with "-dirty" for uncommitted changes, or "unknown"."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, text=True,
                             capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


# ----------------------------------------------------------------------------------------------
# Pictures. matplotlib is optional: it is imported only when a picture is drawn.


def import_pyplot():
    try:
        import matplotlib
    except ImportError:
        raise SmollError("drawing pictures needs matplotlib: `pip install matplotlib`.") from None
    matplotlib.use("Agg")  # draw to files; no window needed
    import matplotlib.pyplot as plt
    return plt


def plot_history(history, path, title=""):
    """Draw train and val loss against the step, and save it as a PNG."""
    plt = import_pyplot()
    steps = [h["step"] for h in history]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120, layout="constrained")
    ax.plot(steps, [h["train_loss"] for h in history], marker=".", label="train")
    ax.plot(steps, [h["val_loss"] for h in history], marker=".", label="val")
    best = min(history, key=lambda h: h["val_loss"])
    ax.scatter([best["step"]], [best["val_loss"]], marker="*", s=150, color="C1", zorder=3,
               label=f"best val {best['val_loss']:.3f} (step {best['step']})")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per character)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path)
    plt.close(fig)


def plot_attention(maps, chars, path, title=""):
    """Draw attention maps (n_layer, n_head, T, T) as a grid of heatmaps, one per layer and head.

    Row t of a panel shows how much the character at t attends to each earlier character.
    """
    plt = import_pyplot()
    n_layer, n_head, T, _ = maps.shape
    size = 1.2 + 0.12 * T  # inches per panel, so the tick labels stay readable
    fig, axes = plt.subplots(n_layer, n_head, figsize=(size * n_head, size * n_layer), dpi=100,
                             squeeze=False, layout="constrained")
    labels = ["␣" if c == " " else repr(c)[1:-1] if c.isspace() else c for c in chars]  # "\n" shows
    for layer in range(n_layer):
        for head in range(n_head):
            ax = axes[layer][head]
            ax.imshow(maps[layer, head].float().cpu().numpy(), cmap="viridis", vmin=0, vmax=1)
            ax.set_xticks(range(T), labels, fontsize=7)
            ax.set_yticks(range(T), labels, fontsize=7)
            ax.set_title(f"layer {layer + 1}, head {head + 1}", fontsize=9)
    fig.suptitle(title)
    fig.savefig(path)
    plt.close(fig)

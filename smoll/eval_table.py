"""`python train.py --eval_only`: the table that scores checkpoints side by side, on the full
validation split, with how and where each was trained; with --ensemble, one more column for all
of them predicting together (smoll/ensemble.py).

The loss itself is utils.eval_loss, the same function train.py scores its runs with.
"""

import math
import os

import numpy as np

from smoll.devices import get_device
from smoll.ensemble import Ensemble, describe_config, training_seconds
from smoll.files import SmollError, file_sha256
from utils import FULL_EVAL_CHARS, eval_loss, load_checkpoint, load_model, load_text_ids, split_data


def eval_only(weights, data_path, device_name, full_eval=False, ensemble=False):
    """Print each checkpoint's run and its validation loss, side by side; with ensemble, also the
    loss of all of them predicting together (ensemble.Ensemble: the mean of their probabilities)."""
    device = get_device(device_name)
    ids, text_tokenizer = load_text_ids(data_path)
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
    sees the context of the shortest, so the chunks scored are that member's."""
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

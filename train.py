"""Train a smoll model on a text file.

    python train.py                          # TinyGPT, config.py's defaults (wants a GPU)
    python train.py --preset cpu             # a TinyGPT sized for a laptop CPU
    python train.py --model bigram           # the Bigram baseline, in seconds
    python train.py --n_layer 4 --learning_rate 1e-3 --data my_text.txt --out models/mine.pth
    python train.py --eval_only --weights models/tinygpt.pth    # score a checkpoint

The best checkpoint (lowest validation loss) is saved to --out as training goes.
"""

import argparse
import math
import os
import shutil
import sys
import time

import torch
from tqdm import tqdm

from config import MODELS, PRESETS, add_config_args, config_from_args
from models import build_model
from utils import (DEFAULT_DATA, DEFAULT_WEIGHTS, CharTokenizer, SmollError, autocast,
                   full_eval_loss, get_batch, get_device, load_model, read_text, resolve_dtype,
                   save_checkpoint, split_data)


def get_lr(step, config):
    """Linear warmup to learning_rate, then cosine decay to learning_rate * min_lr_ratio."""
    if step < config.warmup_iters:
        return config.learning_rate * (step + 1) / (config.warmup_iters + 1)
    progress = (step - config.warmup_iters) / max(1, config.max_iters - config.warmup_iters)
    progress = min(progress, 1.0)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))  # goes from 1 down to 0
    min_lr = config.learning_rate * config.min_lr_ratio
    return min_lr + cosine * (config.learning_rate - min_lr)


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


def keep_previous(path):
    """Copy an existing checkpoint to NAME.prev.pth before this run first overwrites it."""
    if not os.path.exists(path):
        return None
    backup = os.path.splitext(path)[0] + ".prev.pth"
    tmp = backup + ".tmp"
    shutil.copy2(path, tmp)
    os.replace(tmp, backup)
    return backup


def train(config, data_path=DEFAULT_DATA, out_path=None, sample_chars=300):
    """Train config.model on the text at data_path; save the best checkpoint to out_path.

    Returns a dict with the best val-loss estimate, its step and the full validation loss.
    """
    out_path = out_path or DEFAULT_WEIGHTS[config.model]
    device = get_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls for anything left in fp32
        torch.backends.cudnn.allow_tf32 = True

    text = read_text(data_path)
    tokenizer = CharTokenizer.from_text(text)
    data = torch.tensor(tokenizer.encode(text), dtype=torch.long)
    train_data, val_data = split_data(data, config.block_size)
    train_data, val_data = train_data.to(device), val_data.to(device)  # the whole text lives on device

    torch.manual_seed(config.seed)  # weights and dropout
    model = build_model(config, tokenizer.vocab_size).to(device)
    optimizer = make_optimizer(model, config, device)
    batch_rng = torch.Generator().manual_seed(config.seed)  # training batches
    eval_rng = torch.Generator().manual_seed(0)  # the same eval batches in every run
    eval_batches = {split: [get_batch(d, config.batch_size, config.block_size, eval_rng)
                            for _ in range(config.eval_iters)]
                    for split, d in (("train", train_data), ("val", val_data))}

    n_params = sum(p.numel() for p in model.parameters())
    print(f"{config.model}: {n_params / 1e6:.2f}M parameters | vocab {tokenizer.vocab_size} | "
          f"{len(train_data):,} train / {len(val_data):,} val characters | {device} {str(dtype)[6:]}")
    print(f"saving the best checkpoint to {os.path.relpath(out_path)}")

    tokens_per_step = config.batch_size * config.block_size
    best = {"val": float("inf"), "step": -1}
    backup = None
    # In a terminal the bar redraws often; into a log file, every few seconds is plenty.
    bar = tqdm(total=config.max_iters, unit="step", dynamic_ncols=True, file=sys.stdout,
               mininterval=0.1 if sys.stdout.isatty() else 5.0)
    t_start = time.perf_counter()
    try:
        for step in range(config.max_iters + 1):
            last_step = step == config.max_iters
            # Evaluate, and keep the checkpoint if validation improved.
            if step % config.eval_interval == 0 or last_step:
                losses = estimate_loss(model, eval_batches, device, dtype)
                mark = ""
                if losses["val"] < best["val"]:
                    if best["step"] < 0:
                        backup = keep_previous(out_path)
                    best = {"val": losses["val"], "step": step}
                    save_checkpoint(out_path, model, config, tokenizer, step, losses["val"])
                    mark = " (saved)"
                bar.write(f"step {step:5d} | train {losses['train']:.4f} | val {losses['val']:.4f}{mark}")
            if last_step:
                break

            # One optimizer step.
            lr = get_lr(step, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x, y = get_batch(train_data, config.batch_size, config.block_size, batch_rng)
            with autocast(device, dtype):
                _, loss = model(x, y)
            loss.backward()
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

            bar.update(1)
            if step % 10 == 0 or step == config.max_iters - 1:  # .item() waits for the GPU: not every step
                elapsed = time.perf_counter() - t_start
                bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.2e}",
                                tok_s=f"{(step + 1) * tokens_per_step / elapsed:,.0f}")
    except KeyboardInterrupt:
        bar.close()
        where = f"best checkpoint (step {best['step']}) is in {out_path}" if best["step"] >= 0 \
            else "nothing was saved"
        raise SmollError(f"interrupted at step {step}; the {where}.") from None
    bar.close()
    elapsed = time.perf_counter() - t_start
    print(f"trained {config.max_iters} steps in {elapsed:.1f} s "
          f"({config.max_iters * tokens_per_step / elapsed:,.0f} tokens/s)")
    if backup:
        print(f"the checkpoint that was at {os.path.relpath(out_path)} before is kept as "
              f"{os.path.relpath(backup)}")

    # Score the saved best checkpoint on the whole validation split, then show what it writes.
    best_model, _, _ = load_model(out_path, device)
    full_val = full_eval_loss(best_model, val_data, config.block_size, device=device, dtype=dtype)
    print(f"best val estimate {best['val']:.4f} at step {best['step']}; "
          f"full validation loss {full_val:.4f} nats/char ({full_val / math.log(2):.4f} bits/char)")
    if sample_chars:
        prompt = torch.tensor([tokenizer.encode(text[0])], device=device)
        ids = best_model.generate(prompt, sample_chars)[0].tolist()
        print("sample:\n" + tokenizer.decode(ids))
    return {"best_val": best["val"], "best_step": best["step"], "full_val": full_val}


def eval_only(weights, data_path, device_name):
    """Print a checkpoint's full validation loss on the text at data_path."""
    device = get_device(device_name)
    model, tokenizer, config = load_model(weights, device)
    data = torch.tensor(tokenizer.encode(read_text(data_path)), dtype=torch.long)
    _, val_data = split_data(data, config.block_size)
    loss = full_eval_loss(model, val_data, config.block_size, device=device)
    print(f"{os.path.relpath(weights)}: {config.model} trained {checkpoint_summary(config)}")
    print(f"full validation loss {loss:.4f} nats/char ({loss / math.log(2):.4f} bits/char) "
          f"over {len(val_data) - 1:,} characters of {os.path.relpath(data_path)}")
    return loss


def checkpoint_summary(config):
    if config.model == "bigram":
        return f"with block_size {config.block_size}, {config.max_iters} steps"
    return (f"with {config.n_layer} layers x {config.n_head} heads x {config.n_embd} dims, "
            f"context {config.block_size}, {config.max_iters} steps")


def build_parser():
    parser = argparse.ArgumentParser(
        description="Train a smoll model (TinyGPT or Bigram) on a UTF-8 text file.",
        epilog="Every hyperparameter above can be set from the command line, e.g. "
               "`python train.py --n_layer 4 --learning_rate 1e-3`.")
    parser.add_argument("--model", choices=MODELS, default="tinygpt",
                        help="which model to train (default: tinygpt)")
    parser.add_argument("--preset", choices=list(PRESETS),
                        help="a named set of overrides from config.py; `cpu` suits a laptop CPU")
    parser.add_argument("--data", default=DEFAULT_DATA,
                        help="UTF-8 text to train on; the first 90%% trains, the last 10%% validates "
                             "(default: dataset/tinyshakespeare.txt)")
    parser.add_argument("--out", help="where to save the best checkpoint (default: models/tinygpt.pth, "
                                      "or models/model_weights.pth for the bigram)")
    parser.add_argument("--eval_only", action="store_true",
                        help="do not train: print the full validation loss of --weights on --data")
    parser.add_argument("--weights", help="checkpoint to score with --eval_only "
                                          "(default: the shipped weights of --model)")
    add_config_args(parser)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.eval_only:
            eval_only(args.weights or DEFAULT_WEIGHTS[args.model], args.data, args.device or "auto")
            return
        try:
            config = config_from_args(args)
        except ValueError as e:
            parser.error(str(e))
        train(config, args.data, args.out)
    except SmollError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()

"""All of smoll's hyperparameters, in one dataclass.

The value a run uses is settled in this order, later winning:
    1. the defaults in `Config` below,
    2. `MODEL_DEFAULTS[model]` (the Bigram wants a different recipe from TinyGPT),
    3. `PRESETS[name]` when `--preset name` is given,
    4. `--<field> VALUE` flags on the command line.
"""

import argparse
import inspect
import math
import re
from dataclasses import dataclass, fields

MODELS = ("tinygpt", "bigram")


@dataclass
class Config:
    # --- what to train ---
    model: str = "tinygpt"  # "tinygpt" (the transformer) or "bigram" (the baseline)
    min_char_count: int = 1  # characters seen fewer times in the text become one symbol, "�" (1: none)
    # --- model size ---
    block_size: int = 256  # context length: how many characters the model sees at once
    n_embd: int = 384  # width of the residual stream (embedding dimension)
    n_head: int = 6  # attention heads per layer; n_embd must divide evenly among them
    n_layer: int = 6  # number of transformer blocks
    dropout: float = 0.2  # dropout on the embeddings and each block's output while training (0: off)
    activation: str = "gelu"  # the MLP's nonlinearity: "gelu", or "relu2" (ReLU squared)
    qk_norm: bool = False  # RMS-normalise each head's queries and keys before attention
    zero_init: bool = False  # start each block's output projections at zero
    logit_cap: float = 0.0  # squash the logits smoothly into (-cap, cap) with tanh (0: off)
    # --- optimisation ---
    batch_size: int = 64  # sequences per optimizer step
    grad_accum: int = 1  # run each batch as this many micro-batches: same update, less memory
    optimizer: str = "adamw"  # "adamw", or "muon": Muon for the blocks' weight matrices, AdamW for the rest
    learning_rate: float = 3e-4  # peak learning rate of AdamW
    muon_lr: float = 0.02  # peak learning rate of Muon, with --optimizer muon
    max_iters: int = 5000  # optimizer steps: one batch each
    time_budget: float = 0.0  # seconds: train for this long instead of max_iters (0 = off)
    warmup_iters: int = 100  # steps of linear warmup from 0 to the peak learning rate
    seq_warmup: int = 0  # this many first steps train on half-length contexts, twice as many per batch (0: off)
    schedule: str = "cosine"  # after warmup: "cosine" decay, or "linear": constant, then a linear cooldown
    cooldown: float = 0.5  # with --schedule linear, the fraction of the run spent cooling down
    min_lr_ratio: float = 0.1  # the decay ends at learning_rate * min_lr_ratio
    weight_decay: float = 0.1  # weight decay of the weight matrices (AdamW and Muon); gains get none
    grad_clip: float = 1.0  # clip the global gradient norm to this (0 turns clipping off)
    # --- distillation: only with --teacher ---
    distill_weight: float = 0.5  # the loss is (1 - this) x cross-entropy + this x KL divergence to the teachers
    distill_temperature: float = 1.0  # student and teacher logits are divided by this before they are compared
    # --- evaluation and bookkeeping ---
    eval_interval: int = 500  # estimate train/val loss every this many steps (and at the last)
    eval_iters: int = 200  # batches of each split per loss estimate (a smaller split is scored whole)
    seed: int = 1337  # seeds the weights, the batches and dropout: same seed, same run
    device: str = "auto"  # "auto" picks cuda, then mps, then cpu; or name one of them
    dtype: str = "auto"  # autocast "float32", "bfloat16" or "float16"; "auto" = the device's fastest
    compile: str = "auto"  # torch.compile the training step: "on", "off"; "auto" = on CUDA, or a CPU budget >= 2 min

    def validate(self):
        """Raise ValueError with a sentence that names the fix for the first bad value."""
        if self.model not in MODELS:
            raise ValueError(f"unknown model '{self.model}': choose one of {', '.join(MODELS)}.")
        for f in fields(self):  # Python's float() reads "nan" and "inf": refused here, not in a traceback later
            if f.type is float and not math.isfinite(getattr(self, f.name)):
                raise ValueError(f"--{f.name} must be a finite number, got {getattr(self, f.name)}.")
        for name in ("block_size", "n_embd", "n_head", "n_layer", "min_char_count", "batch_size", "grad_accum",
                     "max_iters", "eval_interval", "eval_iters"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name} must be a positive integer, got {getattr(self, name)}.")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"--n_embd {self.n_embd} is not divisible by --n_head {self.n_head}: "
                             f"pick sizes where n_embd is a multiple of n_head, e.g. "
                             f"--n_embd {self.n_head * max(1, round(self.n_embd / self.n_head))}.")
        if self.n_embd // self.n_head % 2 != 0:
            raise ValueError(f"the head size n_embd/n_head = {self.n_embd // self.n_head} must be even "
                             f"for rotary position embeddings: change --n_embd or --n_head.")
        if self.batch_size % self.grad_accum != 0:
            raise ValueError(f"--batch_size {self.batch_size} does not split into --grad_accum "
                             f"{self.grad_accum} equal micro-batches: pick a grad_accum that divides it.")
        if not self.learning_rate > 0:
            raise ValueError(f"--learning_rate must be positive, got {self.learning_rate}.")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"--dropout must be in [0, 1), got {self.dropout}.")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"--min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}.")
        for name in ("warmup_iters", "seq_warmup", "weight_decay", "grad_clip", "time_budget"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} must not be negative, got {getattr(self, name)}.")
        if self.device not in ("auto", "cpu", "cuda", "mps") and not self.device.startswith("cuda:"):
            raise ValueError(f"unknown device '{self.device}': use auto, cpu, cuda, cuda:N or mps.")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"unknown dtype '{self.dtype}': use auto, float32, bfloat16 or float16.")
        if self.compile not in ("auto", "on", "off"):
            raise ValueError(f"unknown --compile '{self.compile}': use auto, on or off.")
        choices = {"activation": ("gelu", "relu2"), "optimizer": ("adamw", "muon"),
                   "schedule": ("cosine", "linear")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"unknown --{name} '{getattr(self, name)}': use {' or '.join(allowed)}.")
        for name in ("muon_lr", "logit_cap"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} must not be negative, got {getattr(self, name)}.")
        if not 0 <= self.distill_weight <= 1:
            raise ValueError(f"--distill_weight must be in [0, 1], got {self.distill_weight}.")
        if not self.distill_temperature > 0:
            raise ValueError(f"--distill_temperature must be positive, got {self.distill_temperature}.")
        if not 0 <= self.cooldown <= 1:
            raise ValueError(f"--cooldown must be in [0, 1], got {self.cooldown}.")


# The Bigram is one vocab x vocab table: it needs neither long contexts nor dropout, and with a
# large learning rate it reaches the count-based optimum in seconds.
MODEL_DEFAULTS = {
    "tinygpt": {},
    "bigram": dict(block_size=32, dropout=0.0, learning_rate=0.1, max_iters=1500,
                   warmup_iters=0, weight_decay=0.0, eval_interval=250, eval_iters=50),
}

# The speedruns' recipe, as the CPU presets use it: Muon, ReLU², zero-initialised output
# projections, and a constant learning rate followed by a linear cooldown (docs/training.md: The CPU recipe).
CPU_RECIPE = dict(block_size=128, n_embd=128, n_head=4, batch_size=16, activation="relu2", zero_init=True,
                  optimizer="muon", learning_rate=8e-3, muon_lr=0.01, warmup_iters=30, schedule="linear",
                  cooldown=0.5, min_lr_ratio=0.0, eval_interval=200, eval_iters=5)

# Named sets of overrides, chosen with --preset NAME.
PRESETS = {
    # A TinyGPT for a 2-core CPU and a time budget, tuned for the lowest full-validation loss after
    # 30 s and 5 minutes of training (docs/results.md). Alone it trains for 5 minutes;
    # --time_budget SECONDS sets another budget. The sequence-length warmup is half of a 30 s run.
    "cpu": dict(CPU_RECIPE, n_layer=3, dropout=0.0, seq_warmup=200, time_budget=300.0),
    # The same for a 10-minute budget: a layer deeper, with dropout, as more passes over the
    # text start to overfit. It and cpu_30min were measured with QK-norm and a logit cap, which
    # --preset cpu showed not to pay at 30 s or 5 minutes once it had the sequence-length warmup.
    "cpu_10min": dict(CPU_RECIPE, n_layer=4, dropout=0.1, qk_norm=True, logit_cap=30.0, time_budget=600.0),
    # Half an hour on a 2-core CPU, for a model of 6 layers x 192, with more dropout for its many
    # passes over the text: the recipe of the shipped model before cpu_60min (docs/results.md).
    "cpu_30min": dict(CPU_RECIPE, n_layer=6, n_embd=192, n_head=6, dropout=0.2, qk_norm=True, logit_cap=30.0,
                      time_budget=1800.0, eval_interval=250, eval_iters=20),
    # The recipe of the shipped models/tinygpt.pth: the same model for an hour, which makes about
    # 40 passes over Tiny Shakespeare, so with a little more dropout still.
    "cpu_60min": dict(CPU_RECIPE, n_layer=6, n_embd=192, n_head=6, dropout=0.25, qk_norm=True, logit_cap=30.0,
                      time_budget=3600.0, eval_interval=500, eval_iters=20),
}


def make_config(model="tinygpt", preset=None, **overrides):
    """Build a validated Config: defaults, then the model's defaults, then a preset, then overrides."""
    if model not in MODELS:
        raise ValueError(f"unknown model '{model}': choose one of {', '.join(MODELS)}.")
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"unknown preset '{preset}': choose one of {', '.join(PRESETS)}.")
    values = {"model": model, **MODEL_DEFAULTS[model], **(PRESETS[preset] if preset else {})}
    values.update({k: v for k, v in overrides.items() if v is not None})
    config = Config(**values)
    config.validate()
    return config


def add_config_args(parser):
    """Add one --<field> flag per Config field; each defaults to None, meaning "not given". Its help
    is the field's comment above, read from this file, so that --help shows the same words."""
    help_lines = dict(re.findall(r"^\s+(\w+): .*?#\s*(.*)$", inspect.getsource(Config), flags=re.MULTILINE))
    group = parser.add_argument_group("hyperparameters (defaults from config.py)")
    for f in fields(Config):
        if f.name == "model":
            continue  # scripts add --model themselves, with its choices
        if f.type is bool:
            kind, metavar, default = parse_bool, "ON|OFF", "on" if f.default else "off"
        else:
            kind, metavar, default = f.type, f.type.__name__.upper(), f.default
        group.add_argument(f"--{f.name}", type=kind, default=None, metavar=metavar,
                           help=f"{help_lines.get(f.name, '')} (default: {default})")
    return parser


def parse_bool(text):
    """'on', 'true', 'yes' or '1' -> True; 'off', 'false', 'no' or '0' -> False."""
    value = {"on": True, "true": True, "yes": True, "1": True,
             "off": False, "false": False, "no": False, "0": False}.get(text.lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"expected on or off, got '{text}'")
    return value


def config_from_args(args):
    """Turn parsed argparse flags into a validated Config."""
    overrides = {f.name: getattr(args, f.name, None) for f in fields(Config) if f.name != "model"}
    return make_config(model=args.model, preset=getattr(args, "preset", None), **overrides)


def config_from_dict(d):
    """Rebuild a Config from a checkpoint's dict, ignoring keys this version does not know."""
    known = {f.name for f in fields(Config)}
    return Config(**{k: v for k, v in d.items() if k in known})


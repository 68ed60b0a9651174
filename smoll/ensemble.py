"""Several models as one, and one model that learns from several.

    Ensemble(models)          -> predicts the mean of its members' next-character probabilities
    distillation_loss(...)    -> the loss of a student that learns from teachers and from the text
    load_teachers(paths, ...) -> the --teacher checkpoints of train.py, frozen, as one Ensemble

train.py --teacher trains a student with these; train.py --eval_only --ensemble scores an
Ensemble (smoll/eval_table.py). Both models of models.py can be members.
"""

import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from models import cross_entropy
from smoll.files import SmollError, file_sha256
from utils import autocast, load_checkpoint, load_model


class Ensemble(nn.Module):
    """K trained models that predict together: their next-character distribution is the mean of the
    members' distributions. Averaging probabilities, not logits, keeps what any one member is sure
    of: a character that one member gives 0.6 and the others 0 still gets 0.6 / K.

    forward returns log-probabilities where a model returns logits: log_softmax leaves them as they
    are, so cross-entropy over them is the ensemble's loss, and eval_loss scores it like one model.
    """

    def __init__(self, members):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.block_size = min(m.block_size for m in members)

    def log_probs(self, idx, temperature=1.0):
        """idx (B, T) -> log of the members' mean probabilities (B, T, V), each member's logits
        divided by temperature first."""
        logps = torch.stack([F.log_softmax(m(idx)[0].float() / temperature, dim=-1)
                             for m in self.members])  # (K, B, T, V)
        return torch.logsumexp(logps, dim=0) - math.log(len(self.members))  # log(mean p), without underflow

    def forward(self, idx, targets=None):
        log_probs = self.log_probs(idx)
        loss = None if targets is None else cross_entropy(log_probs, targets)
        return log_probs, loss


def distillation_loss(logits, targets, teacher_log_probs, weight, temperature=1.0):
    """The loss of a student that learns from teachers as well as from the text (Hinton et al. 2015,
    "Distilling the knowledge in a neural network"):

        (1 - weight) * cross-entropy(student, true next characters)
        + weight * temperature² * KL(teachers' distribution || student's distribution)

    with both distributions softened by the temperature. The KL term tells the student how likely
    every other character was, not only which one came. Its gradients shrink as 1/temperature²,
    hence the factor. logits (B, T, V) are the student's; teacher_log_probs (B, T, V) come from
    Ensemble.log_probs at the same temperature. With weight 0 this is exactly cross_entropy.
    """
    ce = cross_entropy(logits, targets)
    student = F.log_softmax(logits.flatten(0, 1).float() / temperature, dim=-1)  # (B*T, V)
    kl = F.kl_div(student, teacher_log_probs.flatten(0, 1).float(), log_target=True,
                  reduction="batchmean")  # the mean over positions of sum_v p_teacher (log p_teacher - log p_student)
    return (1 - weight) * ce + weight * temperature ** 2 * kl


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


def teacher_log_probs(teachers, x, config, device, dtype):
    """The teachers' averaged predictions for x, softened by the distillation temperature."""
    with torch.no_grad(), autocast(device, dtype):
        return teachers.log_probs(x, config.distill_temperature)


def describe_config(config):
    """A model's shape in a few words, for tables and records."""
    if config.model == "bigram":
        return "bigram"
    return f"tinygpt {config.n_layer}L x {config.n_head}H x {config.n_embd}, ctx {config.block_size}"

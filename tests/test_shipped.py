"""The weights that ship in models/: run with `python -m pytest tests/test_shipped.py`."""

import os

import pytest
import torch

import play
from conftest import ROOT
from models import Bigram, TinyGPT
from utils import SHIPPED_WEIGHTS, eval_loss, load_model, split_data


@pytest.mark.parametrize("name, cls, target", [("tinygpt", TinyGPT, 1.435), ("bigram", Bigram, 2.50)])
def test_shipped_weights_load_safely_and_meet_their_target(name, cls, target, shakespeare):
    path = SHIPPED_WEIGHTS[name]
    assert os.path.dirname(path) == os.path.join(ROOT, "models")
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert raw["config"]["model"] == name
    model, tokenizer, config = load_model(path)
    assert isinstance(model, cls)
    data = torch.tensor(tokenizer.encode(shakespeare))
    _, val_data = split_data(data, config.block_size)
    loss, n_scored = eval_loss(model, val_data, config.block_size, batch_size=64)
    assert n_scored == len(val_data) - 1  # Tiny Shakespeare's validation split is scored whole
    assert loss <= target


def test_play_works_from_a_fresh_clone(capsys):
    play.main(["--length", "60", "--seed", "0", "--device", "cpu"])
    out = capsys.readouterr().out
    assert len(out) == 61 and out.endswith("\n")

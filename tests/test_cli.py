"""train.py and play.py from the command line: run with `python -m pytest tests/test_cli.py`."""

import os
import subprocess
import sys

import pytest
import torch

import play
import train
from conftest import ROOT
from smoll.files import SmollError

TINY = ["--n_layer", "1", "--n_embd", "32", "--n_head", "2", "--block_size", "16", "--batch_size", "8",
        "--max_iters", "30", "--eval_interval", "15", "--eval_iters", "2", "--device", "cpu"]


def run(script, *args):
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], capture_output=True,
                          text=True, encoding="utf-8", timeout=300)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Train a tiny TinyGPT through the real CLI once, for the tests below."""
    folder = tmp_path_factory.mktemp("cli")
    text = folder / "tiny.txt"
    with open(os.path.join(ROOT, "dataset", "tinyshakespeare.txt"), encoding="utf-8") as f:
        text.write_text(f.read(20_000), encoding="utf-8")
    out = folder / "tiny.pth"
    result = run("train.py", "--data", str(text), "--out", str(out), *TINY)
    assert result.returncode == 0, result.stderr
    assert "full validation loss" in result.stdout
    return {"weights": str(out), "text": str(text), "train_stdout": result.stdout}


def test_train_then_play_end_to_end(trained):
    result = run("play.py", "--weights", trained["weights"], "--prompt", "ROMEO:", "--length", "40",
                 "--seed", "1", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ROMEO:")
    assert len(result.stdout) == len("ROMEO:") + 40 + 1  # prompt, 40 new characters, final newline
    assert torch.load(trained["weights"], weights_only=True)["config"]["n_layer"] == 1


def test_eval_only_prints_full_validation_loss(trained):
    result = run("train.py", "--eval_only", "--weights", trained["weights"], "--data", trained["text"])
    assert result.returncode == 0, result.stderr
    assert "every character counted once" in result.stdout and "full val loss" in result.stdout
    assert "bits/char" in result.stdout


def test_same_seed_same_text_and_another_seed_other_text(trained, capsys):
    def sample(seed):
        play.main(["--weights", trained["weights"], "--length", "80", "--seed", str(seed),
                   "--device", "cpu"])
        return capsys.readouterr().out

    first = sample(3)
    assert sample(3) == first
    assert sample(4) != first


def test_greedy_text_is_the_same_every_time(trained, capsys):
    play.main(["--weights", trained["weights"], "--length", "50", "--temperature", "0", "--device", "cpu"])
    a = capsys.readouterr().out
    play.main(["--weights", trained["weights"], "--length", "50", "--temperature", "0", "--device", "cpu"])
    assert capsys.readouterr().out == a


def test_errors_print_one_line_and_no_traceback(tmp_path):
    result = run("play.py", "--weights", str(tmp_path / "nope.pth"))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    missing = tmp_path / "nope.pth"
    assert result.stderr.strip().splitlines() == [
        f"error: weights file '{missing}' does not exist: train one in 5 minutes with `python train.py "
        f"--preset cpu --out {missing}` (a Bigram in seconds: `python train.py --model bigram --out {missing}`), "
        f"or pass an existing file with --weights."]


def test_a_damaged_shipped_file_is_restored_from_git_not_retrained(tmp_path, monkeypatch):
    import utils
    shipped = tmp_path / "models" / "tinygpt.pth"
    shipped.parent.mkdir()
    shipped.write_bytes(b"not a checkpoint")
    monkeypatch.setattr(utils, "ROOT", str(tmp_path))
    monkeypatch.setattr(utils, "SHIPPED_WEIGHTS", {"tinygpt": str(shipped)})
    with pytest.raises(SmollError, match=r"restore the shipped file with `git checkout -- models/tinygpt.pth`\.$"):
        utils.load_model(str(shipped))


def error_of(main, argv, capsys):
    """Run a script's main() in-process and return (exit code, its last line on stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    return exit_info.value.code, lines[-1]


def _files(tmp_path, trained):
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café crème".encode("latin-1") * 100)
    short = tmp_path / "short.txt"
    short.write_text("To be, or not to be." * 5, encoding="utf-8")
    truncated = tmp_path / "truncated.pth"
    data = open(trained["weights"], "rb").read()
    truncated.write_bytes(data[: len(data) // 3])
    foreign = tmp_path / "foreign.pth"
    torch.save({"weights": torch.zeros(3)}, foreign)
    return dict(empty=str(empty), latin1=str(latin1), short=str(short), truncated=str(truncated),
                foreign=str(foreign), missing=str(tmp_path / "missing.txt"), weights=trained["weights"])


TRAIN_ERRORS = [
    (["--data", "{missing}"], "does not exist"),
    (["--data", "{empty}"], "is empty"),
    (["--data", "{latin1}"], "is not UTF-8"),
    (["--data", "{short}"], "too short for block_size"),
    (["--n_embd", "100", "--n_head", "6"], "not divisible by --n_head"),
    (["--n_layer", "0"], "--n_layer must be a positive integer"),
    (["--batch_size", "-4"], "--batch_size must be a positive integer"),
    (["--learning_rate", "0"], "--learning_rate must be positive"),
    (["--learning_rate", "fast"], "invalid float value: 'fast'"),
    (["--model", "gpt5"], "invalid choice: 'gpt5'"),
    (["--optimizer", "sgd"], "unknown --optimizer 'sgd': use adamw or muon"),
    (["--qk_norm", "maybe"], "expected on or off, got 'maybe'"),
    (["--epochs", "10"], "unrecognized arguments: --epochs"),
    (["--eval_only", "--weights", "{missing}"], "does not exist"),
    (["--eval_only", "--weights", "{truncated}"], "not a readable smoll checkpoint"),
    (["--eval_only", "--weights", "{foreign}"], "not a smoll checkpoint"),
]


@pytest.mark.parametrize("argv, message", TRAIN_ERRORS)
def test_train_bad_input_gets_a_clear_error(argv, message, tmp_path, trained, capsys):
    files = _files(tmp_path, trained)
    out = ["--out", str(tmp_path / "m.pth")]  # not the repository's out/, which a run would make first
    code, line = error_of(train.main, [a.format(**files) for a in argv] + ["--max_iters", "1"] + out, capsys)
    assert code != 0
    assert message in line


PLAY_ERRORS = [
    (["--weights", "{missing}"], "does not exist"),
    (["--weights", "{truncated}"], "not a readable smoll checkpoint"),
    (["--weights", "{foreign}"], "not a smoll checkpoint"),
    (["--weights", "{weights}", "--prompt", "ROMEO: ☃"], "--prompt has 1 character(s) this model never saw"),
    (["--weights", "{weights}", "--length", "-5"], "--length must be 0 or more"),
    (["--weights", "{weights}", "--top_p", "1.5"], "--top_p must be in (0, 1]"),
    (["--weights", "{weights}", "--temperature", "-1"], "--temperature must be 0 (greedy) or positive"),
    (["--weights", "{weights}", "--model", "bigram"], "holds a tinygpt model, not a bigram"),
    (["--model", "bigram", "--dtype", "int8"], "--dtype int8 needs PyTorch's int8 kernel"),
    (["--model", "bigram", "--dtype", "int8", "--no_cache"], "--dtype int8 needs PyTorch's int8 kernel"),
    (["--model", "trigram"], "invalid choice: 'trigram'"),
    (["--lenght", "5"], "unrecognized arguments: --lenght"),
]


@pytest.mark.parametrize("argv, message", PLAY_ERRORS)
def test_play_bad_input_gets_a_clear_error(argv, message, tmp_path, trained, capsys):
    files = _files(tmp_path, trained)
    code, line = error_of(play.main, [a.format(**files) for a in argv], capsys)
    assert code != 0
    assert message in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("main, extra", [(train.main, ["--max_iters", "1"]), (play.main, [])])
def test_device_cuda_without_cuda_is_a_clear_error(main, extra, trained, tmp_path, capsys):
    out = ["--out", str(tmp_path / "m.pth")]
    argv = ["--device", "cuda"] + (["--weights", trained["weights"]] if main is play.main else extra + out)
    code, line = error_of(main, argv, capsys)
    assert code != 0
    assert "has no CUDA GPU" in line and "--device cpu" in line

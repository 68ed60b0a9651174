"""A new user's first loop, in a copy of the repository: the README's first training command must
leave the shipped models byte for byte as they were (so tests/test_shipped.py, which tests those
files, still passes after it), and say how to play the model it made.
Run with `python -m pytest tests/test_first_run.py`."""

import hashlib
import os
import re
import shutil
import subprocess
import sys

from conftest import ROOT


def first_training_command():
    """The first `python train.py ...` line of the README's code blocks, as a list of arguments."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        for line in f:
            match = re.match(r"\s*python train\.py([^#`]*)", line)
            if match:
                return match.group(1).split()
    raise AssertionError("the README gives no `python train.py` command")


def copy_of_the_repository(folder):
    """The tracked files (or, without git, every file but caches and outputs), as a clone has them."""
    try:
        names = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True,
                               timeout=60).stdout.decode().split("\0")
    except (OSError, subprocess.SubprocessError):
        names = [os.path.relpath(os.path.join(d, n), ROOT) for d, dirs, files in os.walk(ROOT) for n in files
                 if not {".git", "out", ".smoll_cache", "__pycache__"} & set(d.split(os.sep))]
    for name in filter(None, names):
        target = folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(os.path.join(ROOT, name), target)
    return folder


def digests(folder):
    return {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in os.listdir(folder)}


def run(folder, *args):
    return subprocess.run([sys.executable, *args], cwd=folder, capture_output=True, text=True,
                          encoding="utf-8", timeout=600)


def test_the_readmes_first_training_run_keeps_the_shipped_models_as_they_were(tmp_path):
    args = first_training_command()
    assert "--out" not in args  # the README's command relies on the default output
    repo = copy_of_the_repository(tmp_path / "smoll")
    shipped = digests(repo / "models")
    # The README's command, shortened to seconds: the same code path and the same default --out.
    result = run(repo, "train.py", *args, "--time_budget", "6")
    assert result.returncode == 0, result.stderr[-2000:]
    assert digests(repo / "models") == shipped  # nothing in models/ changed, and nothing was added
    assert (repo / "out" / "tinygpt.pth").is_file()
    assert "python play.py --weights out/tinygpt.pth" in result.stdout  # the run says how to play it
    played = run(repo, "play.py", "--weights", "out/tinygpt.pth", "--length", "20", "--seed", "1")
    assert played.returncode == 0 and len(played.stdout) == 21, played.stderr[-2000:]
    shipped_play = run(repo, "play.py", "--length", "5", "--dtype", "float32")  # plays the shipped one, and says so
    assert shipped_play.returncode == 0, shipped_play.stderr[-2000:]
    assert ("[the shipped models/tinygpt.pth; the one you trained plays with --weights out/tinygpt.pth]"
            in shipped_play.stderr)

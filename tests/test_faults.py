"""Faults of the disk and the filesystem: damaged caches, full disks, outputs that cannot be
written. Each test checks the sentence, the exit status, and that the files that were there
before are byte-identical afterwards. Run with `python -m pytest tests/test_faults.py`."""

import errno
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile

import numpy as np
import pytest

import train as train_script
import utils
from config import make_config
from conftest import ROOT, load_tokens
from smoll import data as token_cache
from smoll import files
from smoll.files import SmollError
from train import train

TINY_RUN = ["--n_layer", "1", "--n_embd", "32", "--n_head", "2", "--block_size", "16", "--batch_size", "8",
            "--max_iters", "20", "--eval_interval", "10", "--eval_iters", "2", "--device", "cpu",
            "--dtype", "float32"]


@pytest.fixture
def text(tmp_path, shakespeare, monkeypatch):
    """A small text with its own token cache folder."""
    monkeypatch.setenv("SMOLL_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "tiny.txt"
    path.write_text(shakespeare[:20_000], encoding="utf-8")
    return str(path)


def cached_files(tmp_path):
    folder = tmp_path / "cache"
    (meta,) = folder.glob("*.json")
    return meta, meta.with_suffix(".bin")


def snapshot(folder):
    """Every file under folder and its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def run_script(script, *args, file_size_limit=None):
    """Run a smoll script in a subprocess; with file_size_limit, no file it writes may grow past that
    many bytes (the kernel's RLIMIT_FSIZE: writes past it fail with EFBIG, as on a full disk)."""
    def limit():
        if file_size_limit is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write instead of killing the process
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], capture_output=True, text=True,
                          encoding="utf-8", timeout=300, preexec_fn=limit, env={**os.environ})


def one_sentence(result):
    """The last line of stderr, checked to be the only error and no traceback."""
    assert "Traceback" not in result.stderr, result.stderr
    return result.stderr.strip().splitlines()[-1]


# ----------------------------------------------------------------------------------------------
# The token cache


def damage(meta, binary, how):
    """Damage the cached files of a text in one way; returns the words the rebuild line must say."""
    info = json.loads(meta.read_text())
    data = bytearray(binary.read_bytes())
    if how == "truncated":
        binary.write_bytes(data[:len(data) // 2])
        return "bytes long where its description says"
    if how == "padded":
        binary.write_bytes(data + b"\0" * 100)
        return "bytes long where its description says"
    if how == "bytes changed":
        data[len(data) // 3] = (data[len(data) // 3] + 1) % len(info["vocab"])  # still a valid id
        binary.write_bytes(data)
        return "its bytes have changed"
    if how == "id out of range":  # a change the sampled hash does not see: only the range check can
        data[123] = 250
        binary.write_bytes(data)
        meta.write_text(json.dumps({**info, "sample_sha256": token_cache.sample_digest(binary)}))
        return "holds the id 250, outside its vocabulary of"
    if how == "bin missing":
        binary.unlink()
        return "cannot be read"
    if how == "json not json":
        meta.write_text("{\"n_ids\": 3, \"vocab")
        return "cannot be read"
    if how == "json missing a key":
        del info["dtype"]
        meta.write_text(json.dumps(info))
        return "cannot be read (KeyError"
    if how == "json nonsense":
        meta.write_text(json.dumps({**info, "n_ids": -5}))
        return "has a description that does not make sense"
    if how == "another text":
        meta.write_text(json.dumps({**info, "sha256": "0" * 64}))
        return "was made from another version of the text"
    raise ValueError(how)


@pytest.mark.parametrize("how", ["truncated", "padded", "bytes changed", "id out of range", "bin missing",
                                 "json not json", "json missing a key", "json nonsense", "another text"])
def test_a_damaged_token_cache_is_rebuilt_with_one_line(how, text, tmp_path, capsys):
    expected_ids, tokenizer = load_tokens(text)
    expected_ids = np.array(expected_ids)
    meta, binary = cached_files(tmp_path)
    said = damage(meta, binary, how)
    ids, again = load_tokens(text)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and said in err[0] and f"encoding '{text}' again" in err[0]
    assert np.array_equal(ids, expected_ids) and again.chars == tokenizer.chars
    load_tokens(text)  # the rebuilt cache is whole: no second rebuild
    assert capsys.readouterr().err == ""


def test_a_run_on_a_damaged_cache_trains_and_says_so(text, tmp_path, shakespeare):
    big = tmp_path / "big.txt"  # past utils.BIG_TEXT_BYTES: train.py reads it through its token file
    big.write_text(shakespeare * (utils.BIG_TEXT_BYTES // len(shakespeare) + 1), encoding="utf-8")
    ids, _ = load_tokens(str(big))
    meta, binary = cached_files(tmp_path)
    binary.write_bytes(binary.read_bytes()[:100])  # a copy cut short
    result = run_script("train.py", "--data", str(big), "--out", str(tmp_path / "m.pth"), *TINY_RUN)
    assert result.returncode == 0, result.stderr
    assert f"is 100 bytes long where its description says {len(ids):,}" in result.stderr
    assert (tmp_path / "m.pth").exists()


def test_a_cache_of_a_vocabulary_with_rare_characters_merged_is_checked_too(text, tmp_path, capsys):
    load_tokens(text, min_count=50)
    merged = next(p for p in (tmp_path / "cache").glob("*.min50.bin"))
    merged.write_bytes(merged.read_bytes()[:10])
    ids, tokenizer = load_tokens(text, min_count=50)
    assert "min50.bin' is 10 bytes long" in capsys.readouterr().err
    assert len(ids) == 20_000 and utils.UNKNOWN in tokenizer.chars


# ----------------------------------------------------------------------------------------------
# Writes that fail


def test_a_full_disk_while_saving_stops_with_one_sentence_and_keeps_every_earlier_file(text, tmp_path):
    out = tmp_path / "runs" / "m.pth"
    first = run_script("train.py", "--data", text, "--out", str(out), *TINY_RUN)
    assert first.returncode == 0, first.stderr
    before = snapshot(tmp_path / "runs")
    assert {"m.pth", "m.last.pth", "m.csv"} <= set(before)
    # The second run's checkpoints need more room than is left: every file may reach 20 kB.
    result = run_script("train.py", "--data", text, "--out", str(out), *TINY_RUN, file_size_limit=20_000)
    assert result.returncode == 1
    line = one_sentence(result)
    assert line.startswith("error: could not write '") and str(tmp_path / "runs") in line
    assert "the file would grow past the largest size this system allows" in line
    after = snapshot(tmp_path / "runs")
    for name, data in before.items():  # NAME.pth, NAME.last.pth, NAME.csv, NAME.png: as they were
        assert after.get(name) == data, name
    assert not [name for name in after if name.startswith(".tmp-") or name.endswith(".tmp")]


@pytest.mark.parametrize("where, said", [
    ("a file", "a file stands where one of its folders should be"),
    ("a folder", "a folder has that name"),
    ("a missing drive", "its folder does not exist and cannot be made (a missing drive?)"),
])
def test_an_out_that_cannot_be_written_stops_before_any_work(where, said, text, tmp_path):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("keep me")
    out = {"a file": blocker / "m.pth", "a folder": tmp_path, "a missing drive": "/proc/no-such-drive/m.pth"}[where]
    result = run_script("train.py", "--data", text, "--out", str(out), *TINY_RUN)
    assert result.returncode == 1
    line = one_sentence(result)
    assert line == (f"error: could not write '{out}': {said}; "
                    f"{'pick a file name that is free' if where == 'a folder' else 'pick another path'} "
                    f"(the path comes from --out). Files written before are unchanged.")
    assert blocker.read_text() == "keep me"
    assert "parameters" not in result.stdout  # stopped before the data and the model were set up


def test_a_read_only_out_folder_is_found_before_the_data_is_read(text, tmp_path, monkeypatch):
    def read_only(*args, **kwargs):  # root may write anywhere: simulate what a user's account meets
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    monkeypatch.setattr(train_script, "load_text_ids", lambda *a: pytest.fail("the data was read first"))
    with pytest.raises(SmollError, match=r"could not write '.*m.pth': permission denied; write to a folder "
                                         r"you may write to \(the path comes from --out\)"):
        train(make_config(n_layer=1, n_embd=32, n_head=2, block_size=16, device="cpu"), text,
              str(tmp_path / "ro" / "m.pth"))


def test_a_history_that_cannot_be_written_stops_the_run_and_keeps_the_old_one(text, tmp_path, monkeypatch, capsys):
    config = make_config(n_layer=1, n_embd=32, n_head=2, block_size=16, batch_size=8, max_iters=20,
                         eval_interval=10, eval_iters=2, device="cpu", dtype="float32")
    out = tmp_path / "m.pth"
    train(config, text, str(out), sample_chars=0)
    old_csv = (tmp_path / "m.csv").read_bytes()
    real_temp_file = files.temp_file

    def disk_full_for_csv(folder, suffix):
        fd, tmp = real_temp_file(folder, suffix)
        if suffix == ".csv":  # every write to the history's temp file fails with ENOSPC
            os.close(fd)
            fd = os.open("/dev/full", os.O_WRONLY)
        return fd, tmp

    monkeypatch.setattr(files, "temp_file", disk_full_for_csv)
    with pytest.raises(SmollError, match=r"could not write '.*m.csv': the disk is full; free some space"):
        train(config, text, str(out), sample_chars=0)
    monkeypatch.undo()
    assert (tmp_path / "m.csv").read_bytes() == old_csv
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".tmp-")]  # no temp file left


def test_a_loss_curve_that_cannot_be_drawn_is_reported_and_the_run_still_ends_well(text, tmp_path, monkeypatch,
                                                                                   capsys):
    pytest.importorskip("matplotlib")
    config = make_config(n_layer=1, n_embd=32, n_head=2, block_size=16, batch_size=8, max_iters=10,
                         eval_interval=10, eval_iters=2, device="cpu", dtype="float32")
    real_temp_file = files.temp_file

    def no_room_for_pictures(folder, suffix):
        if suffix == ".png":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_temp_file(folder, suffix)

    monkeypatch.setattr(files, "temp_file", no_room_for_pictures)
    result = train(config, text, str(tmp_path / "m.pth"), sample_chars=0)
    assert result["full_val"] > 0 and (tmp_path / "m.pth").exists()
    out = capsys.readouterr().out
    assert "no loss curve: could not write" in out and "m.png': the disk is full" in out


def test_play_says_when_its_attention_picture_cannot_be_written(tmp_path):
    (tmp_path / "file").write_text("a file, where the picture's folder should be")
    result = run_script("play.py", "--prompt", "ROMEO:", "--attention", str(tmp_path / "file" / "sub" / "a.png"))
    assert result.returncode == 1
    assert "could not write" in one_sentence(result) and "a.png" in one_sentence(result)
    new_folder = tmp_path / "out" / "a.png"  # a folder that does not exist yet is made, as for --out
    assert run_script("play.py", "--prompt", "ROMEO:", "--attention", str(new_folder)).returncode == 0
    assert new_folder.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = run_script("play.py", "--prompt", "ROMEO:", "--attention", str(tmp_path))
    assert result.returncode == 1 and "could not write" in one_sentence(result)


def test_a_text_that_cannot_be_read_is_one_sentence(tmp_path, monkeypatch):
    path = tmp_path / "t.txt"
    path.write_text("hello there\n" * 50)
    monkeypatch.setenv("SMOLL_CACHE", str(tmp_path / "cache"))
    real_open = open

    def disk_error(p, *args, **kwargs):
        if str(p) == str(path):
            raise OSError(errno.EIO, "Input/output error")
        return real_open(p, *args, **kwargs)

    monkeypatch.setattr("builtins.open", disk_error)
    with pytest.raises(SmollError, match=r"could not read '.*t.txt': Input/output error \(the path comes from "
                                         r"--data\)\. Check the disk"):
        load_tokens(str(path))


def test_a_killed_run_loses_only_the_steps_since_its_last_checkpoint_and_resumes(text, tmp_path):
    import time
    out = tmp_path / "m.pth"
    run = [sys.executable, os.path.join(ROOT, "train.py"), "--data", text, "--out", str(out), *TINY_RUN[:8],
           "--max_iters", "400", "--eval_interval", "20", "--eval_iters", "2", "--device", "cpu", "--dtype", "float32"]
    process = subprocess.Popen(run, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = tmp_path / "m.last.pth"
    deadline = time.time() + 120
    while not (last.exists() and last.stat().st_size) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    process.kill()  # SIGKILL: no handler runs, whatever it was doing
    process.wait()
    import torch
    step = torch.load(last, weights_only=True)["step"]
    assert 0 <= step < 400
    result = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--resume", "--out", str(out),
                             "--data", text, "--device", "cpu", "--dtype", "float32"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"resuming at step {step}" in result.stdout
    assert torch.load(last, weights_only=True)["step"] == 400


def test_a_full_disk_at_a_new_runs_first_checkpoint_leaves_no_half_file(text, tmp_path):
    out = tmp_path / "fresh" / "m.pth"
    result = run_script("train.py", "--data", text, "--out", str(out), *TINY_RUN, file_size_limit=20_000)
    assert result.returncode == 1
    assert one_sentence(result).startswith(f"error: could not write '{out}': the file would grow past")
    assert list((tmp_path / "fresh").iterdir()) == []  # the temp file of the torch.save is gone too

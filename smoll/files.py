"""Files: every one smoll writes is written whole or not at all, and every way a file can fail to read
or write becomes one sentence that names the fix.

    SmollError                      a problem the user can fix: scripts print it as one line, no traceback
    replaced_atomically(path, ...)  a temp file beside path, renamed over it once written
    atomic_save(obj, path)          torch.save through replaced_atomically, every tensor on the CPU
    check_writable(path)            fail before any work is done, not at the first checkpoint
    cache_path(name)                smoll's folder in the user's cache: timings, compiled steps
    read_json / write_json          what is kept there between runs

This module imports nothing else of smoll's: utils.py and the rest of the package build on it.
"""

import contextlib
import errno
import hashlib
import json
import os
import tempfile

import torch


class SmollError(Exception):
    """A problem the user can fix. Scripts print its message as one line and exit non-zero."""


# ----------------------------------------------------------------------------------------------
# Writing whole files, and one sentence for each way writing or reading fails

WRITE_FAILURES = {  # errno -> (what happened, what to do)
    errno.ENOSPC: ("the disk is full", "free some space, or write to another disk"),
    errno.EDQUOT: ("the disk quota is used up", "free some space, or write to another disk"),
    errno.EFBIG: ("the file would grow past the largest size this system allows",
                  "raise the limit (`ulimit -f`), or write to another disk"),
    errno.EACCES: ("permission denied", "write to a folder you may write to"),
    errno.EPERM: ("the system does not allow writing there", "write to another folder"),
    errno.EROFS: ("the file system is read-only", "write to another disk"),
    errno.EISDIR: ("a folder has that name", "pick a file name that is free"),
    errno.ENOTDIR: ("a file stands where one of its folders should be", "pick another path"),
    errno.EEXIST: ("a file stands where one of its folders should be", "pick another path"),
    errno.ENOENT: ("its folder does not exist and cannot be made (a missing drive?)", "pick another path"),
    errno.EIO: ("the disk reported an error", "check the disk, or write to another one"),
}


def write_failure(path, error, flag=None):
    """A SmollError for an OSError met while writing path: the file, the cause and a fix."""
    cause, fix = WRITE_FAILURES.get(error.errno, (error.strerror or str(error), "write somewhere else"))
    source = f" (the path comes from {flag})" if flag else ""
    return SmollError(f"could not write '{path}': {cause}; {fix}{source}. Files written before are unchanged.")


@contextlib.contextmanager
def writing(path, flag=None):
    """Turn an OSError raised while writing path into write_failure's sentence."""
    try:
        yield
    except OSError as e:
        if isinstance(e, (BrokenPipeError, ConnectionError)):
            raise
        raise write_failure(path, e, flag) from None


@contextlib.contextmanager
def reading(path, flag=None):
    """Turn an OSError raised while reading path (a disk error, a file that vanished) into one sentence."""
    try:
        yield
    except OSError as e:
        source = f" (the path comes from {flag})" if flag else ""
        raise SmollError(f"could not read '{path}': {e.strerror or e}{source}. Check the disk, or "
                         f"copy the file somewhere else.") from None


def check_writable(path, flag="--out"):
    """Make sure a file can be written at path before any work is done: its folder exists or can
    be made, path is not a folder, and a file can be created there. Raises write_failure's error."""
    folder = os.path.dirname(os.path.abspath(path))
    with writing(path, flag):
        if os.path.isdir(path):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
        os.makedirs(folder, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".tmp-probe-")
        os.close(fd)
        os.remove(probe)


def temp_file(folder, suffix):
    """A new temp file in folder, to be renamed into place once written. Returns (fd, path)."""
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=suffix)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private; give it the usual mode
    return fd, tmp


@contextlib.contextmanager
def replaced_atomically(path, suffix, mode="wb"):
    """A file to write in place of path (its folders made if need be): a temp file beside it, renamed
    over path once the block ends. A crash, a full disk or Ctrl-C mid-write leaves the old file
    untouched, never a half-written one, and no temp file behind; an OSError becomes write_failure's
    SmollError."""
    folder = os.path.dirname(os.path.abspath(path))
    with writing(path):
        os.makedirs(folder, exist_ok=True)
        fd, tmp = temp_file(folder, suffix)
        try:
            with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)  # atomic on POSIX and Windows
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise


def atomic_save(obj, path):
    """torch.save into a temp file beside path, then rename over it (see replaced_atomically).
    Every tensor goes to the CPU first, so that a file saved on a GPU loads on any machine."""
    with replaced_atomically(path, ".pth") as f:
        try:
            torch.save(to_cpu(obj), f)
        except RuntimeError as e:  # a write that failed (a full disk) can surface as the zip writer's error
            if isinstance(e.__context__, OSError):
                raise e.__context__ from None
            raise


def to_cpu(obj):
    """A copy of a nested dict/list structure with every tensor moved to the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def file_sha256(path):
    """The SHA-256 of a file, read 16 MiB at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------
# What smoll keeps between runs: timings, choices and compiled code, in the user's cache folder


def user_cache_dir():
    """smoll's folder for what it keeps between runs (timings, compiled code, token files of
    read-only folders): $SMOLL_CACHE, or $XDG_CACHE_HOME/smoll, or ~/.cache/smoll."""
    home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.environ.get("SMOLL_CACHE") or os.path.join(home, "smoll")


def cache_path(name):
    """A file or folder of smoll's cache folder (user_cache_dir)."""
    return os.path.join(user_cache_dir(), name)


def read_json(path):
    """A dict kept in the cache, or {} when there is none or it cannot be read (then it is remade)."""
    try:
        with open(path, encoding="utf-8") as f:
            kept = json.load(f)
        return kept if isinstance(kept, dict) else {}
    except (OSError, ValueError):
        return {}


def write_json(path, obj):
    """Keep a dict in the cache, atomically; a cache that cannot be written only costs the next run time."""
    with contextlib.suppress(SmollError), replaced_atomically(path, ".json", "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)

"""The decoding step compiled ahead of time for a CPU, kept on disk: built once, loaded in milliseconds.

    load_package(decoder, key)         -> PackagedDecoder, checked against the eager step
    build_package(model, variant, ...) -> its note: build, load and step times, or why it failed
    start_background_build(...)        play.py, after its text: `python play.py --prepare` at the lowest priority

torch.compile's code lives as long as its process: every run would trace and compile the step again,
tens of seconds on a 2-core CPU. AOTInductor (torch.export, then
torch._inductor.aoti_compile_and_package) compiles the Decoder step once into a .pt2 package: a
shared library with the weights inside. Loading one takes milliseconds and needs no compiler. The
packages are kept in smoll's cache folder, one per CPU (its flags included), PyTorch version, step
code, model weights, variant and batch size. Each has a note (.json) with that key, the package's
SHA-256 and its measured step time; a package whose note, file or first steps do not match is
removed and built again, never trusted. play.py builds them in a background process after a run,
or in the run when the text is long enough to pay for it (`python play.py --prepare` builds them
on request); choose.py decides.

A background build runs at the lowest priority, so while another process works (a training run
started after play.py), its steps stall on every thread the other one takes: a 0.3 ms step timed
at 340 ms. Its timings would then be the other process's, and play.py would keep a slow choice
for good. So it compiles and times only once its eager step runs as fast as play.py timed it in
the foreground (wait_for_cpu), and times again where the machine got busy meanwhile.
"""

import atexit
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings

import torch
import torch.nn as nn

from models import KVCache, TinyGPT
from smoll.devices import machine_fingerprint
from smoll.files import SmollError, cache_path, file_sha256, read_json, write_json
from smoll.sampling.decoder import Variant, candidates, check_close, have_compiler, prepare, time_steps

PACKAGE_FORMAT = 1
# max_autotune times several kernels for each matmul while building and keeps the fastest: on a
# 2-core AVX2-only CPU it made the shipped model's step 1.3x to 1.8x faster and the build 2.5x longer
# (about 70 s). freezing made no difference there; AOTInductor's code is C++ throughout (cpp_wrapper).
PACKAGE_OPTIONS = {"max_autotune": True, "autotune_num_choices_displayed": 0,  # no tables on stderr
                   "max_autotune_report_choices_stats": False}
PACKAGES_KEPT = 16  # the most recently used ones; older packages are deleted
BUSY_FACTOR = 1.5  # an eager step this much slower than the foreground timed it: another process has the CPU
BUSY_WAIT_S = 15.0  # how long a background build sleeps before it looks again
AUTOGROUP = "/proc/self/autogroup"  # Linux: the priority of this process's session as a whole
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
STEP_SOURCES = ("models.py", "smoll/sampling/decoder.py", "smoll/sampling/packages.py")  # editing one builds anew


class PackageError(Exception):
    """A compiled package that cannot be used: missing, changed on disk, broken, or wrong."""


class PackagedDecoder:
    """A Decoder step compiled ahead of time, run from its .pt2 package.

    The package was exported from Decoder.forward with fixed shapes: the ring of every layer in
    full, a slot and a mask of filled slots as tensors, like CompiledDecoder's graph. Its ring
    buffers are the KVCache's own, written in place by the compiled code. The eager decoder stays
    beside it: its rotary rows feed the package, and it checks the package's first steps."""

    def __init__(self, decoder, runner):
        self.decoder, self.run = decoder, runner
        W, dtype = decoder.window, decoder.model.token_embedding.weight.dtype
        self.slot = torch.zeros(1, dtype=torch.long)  # reused: one tensor fewer to make per step
        self.all_slots = torch.ones(1, 1, 1, W, dtype=torch.bool)  # the mask once the ring is full
        self.slots = torch.arange(W)
        self.cache, self.ring = None, None
        # This position's RoPE rows are copied into tensors of their own: a row handed over as a
        # view at the start of a larger table came out as NaN (AOTInductor, PyTorch 2.13).
        self.cos, self.sin = torch.empty(decoder.hs, dtype=dtype), torch.empty(decoder.hs, dtype=dtype)

    def step(self, idx, cache):
        d, pos = self.decoder, cache.pos
        if cache is not self.cache:  # a new prompt's cache: its buffers never move, so list them once
            self.cache = cache
            self.ring = [b for pair in d.ring(cache, idx.size(0), idx.device) for b in pair]
        mask = self.all_slots if pos >= d.window - 1 else (self.slots <= pos)[None, None, None]  # (1, 1, 1, W)
        cos, sin = d.rotary(pos)
        self.cos.copy_(cos)
        self.sin.copy_(sin)
        self.slot.fill_(pos % d.window)
        (logits,) = self.run([idx, self.cos, self.sin, self.slot, mask, *self.ring])
        cache.pos += 1
        return logits


# ----------------------------------------------------------------------------------------------
# What a package depends on, and where it is kept


def package_key(model, variant, device, batch_size):
    """What a package depends on, as a dict stored in its note. model: the float32 model as loaded."""
    block = model.blocks[0]
    shape = {"n_layer": len(model.blocks), "n_head": block.attn.n_head, "n_embd": model.lm_head.in_features,
             "vocab": model.lm_head.out_features, "block_size": model.block_size, "qk_norm": bool(block.attn.qk_norm),
             "activation": getattr(block.mlp.act, "__name__", type(block.mlp.act).__name__),
             "logit_cap": model.logit_cap}  # what the weights do not say
    return {"format": PACKAGE_FORMAT, "machine": machine_fingerprint(device), "torch": torch.__version__,
            "code": code_digest(), "model": weights_digest(model), "path": str(variant), "batch": batch_size,
            "shape": shape}


def weights_digest(model):
    """SHA-256 of a model's parameters and buffers: which model a package holds. Kept on the model
    with its tensors' addresses and versions, so that a run hashes its model once."""
    memo = tuple((t.data_ptr(), t._version) for t in model.state_dict().values())
    kept = getattr(model, "_weights_digest", None)
    if kept is None or kept[0] != memo:
        digest = hashlib.sha256()
        for name, t in model.state_dict().items():
            t = t.detach().cpu().contiguous()
            digest.update(f"{name} {t.dtype} {tuple(t.shape)}".encode())
            digest.update(t.view(-1).view(torch.uint8).numpy())
        model._weights_digest = kept = (memo, digest.hexdigest())
    return kept[1]


def code_digest():
    digest = hashlib.sha256()
    for name in STEP_SOURCES:
        with open(os.path.join(ROOT, name), "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()[:16]


def package_files(key, folder=None):
    """The package's .pt2 and its note's .json, named by a digest of the key."""
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    folder = folder or cache_path("packages")
    return os.path.join(folder, name + ".pt2"), os.path.join(folder, name + ".json")


def read_note(key, folder=None):
    """The note of key's package, or None where there is none or it is another package's."""
    note = read_json(package_files(key, folder)[1])
    return note if note.get("key") == key else None


def remove_package(key, folder=None):
    for file in package_files(key, folder):
        with contextlib.suppress(OSError):
            os.remove(file)


# ----------------------------------------------------------------------------------------------
# Loading and building


def load_package(decoder, key, folder=None):
    """A PackagedDecoder for key's package, checked: its file is the one its note describes, it
    loads, and two steps give the eager decoder's logits (the first position, and one far past
    the context window on a full ring of random keys and values). Raises PackageError otherwise.
    Returns (decoder, seconds it took)."""
    t0 = time.perf_counter()
    pt2, note_file = package_files(key, folder)
    note = read_note(key, folder)
    if note is None or "sha256" not in note:
        raise PackageError("no package built for this model, variant and machine")
    try:
        if file_sha256(pt2) != note["sha256"]:
            raise PackageError(f"{pt2} has changed since it was built")
        # what torch._inductor.aoti_load_package does, without importing torch._inductor (2 s here)
        loader = torch._C._aoti.AOTIModelPackageLoader(pt2, "model", False, 1, -1)
        packaged = PackagedDecoder(decoder, loader.run)
        with torch.no_grad():
            for pos in (0, 3 * decoder.window + 5):
                caches = [KVCache(decoder.window), KVCache(decoder.window)]
                rings = [decoder.ring(cache, key["batch"], torch.device("cpu")) for cache in caches]
                numbers = torch.Generator().manual_seed(0)  # a generator of its own: sampling's stays as it is
                for (k_a, v_a), (k_b, v_b) in zip(*rings):
                    for a, b in ((k_a, k_b), (v_a, v_b)):
                        if pos:  # the same random past in both caches
                            a.copy_(torch.randn(a.shape, generator=numbers))
                            b.copy_(a)
                for cache in caches:
                    cache.pos = pos
                idx = torch.zeros(key["batch"], 1, dtype=torch.long)
                check_close(packaged.step(idx, caches[0]), decoder.step(idx, caches[1]),
                            tolerance=1e-3 if key["path"].startswith("float32") else 0.05)
    except PackageError:
        raise
    except AssertionError as e:
        raise PackageError(f"{pt2} does not compute the model's logits ({e})")
    except Exception as e:  # not a package, one for other shapes, or a PyTorch whose loader differs
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PackageError(f"{pt2} does not load ({reason})")
    with contextlib.suppress(OSError):
        os.utime(note_file)  # recently used: kept when old packages are pruned
    return packaged, time.perf_counter() - t0


class _FlatStep(nn.Module):
    """Decoder.forward with tensors only for inputs (ring buffers flattened): what torch.export takes.
    The model is a submodule, so its weights go into the package as parameters."""

    def __init__(self, decoder):
        super().__init__()
        self.model, self.decoder = decoder.model, decoder

    def forward(self, idx, cos, sin, slot, mask, *ring):
        return self.decoder.forward(idx, cos, sin, list(zip(ring[0::2], ring[1::2])), slot, None, mask)


def build_package(model, variant, device, batch_size, folder=None, eager_s=None, patience_s=0.0, log=None):
    """Compile variant's decoding step for model (the float32 model as loaded) into a package, time
    it, and write its note. Returns the note; None where another process is building it already, or
    where the cache folder cannot be written. Where the variant cannot run or the build fails, the
    note says why (and no package is kept), so that runs do not try again until PyTorch, the code
    or the model change; `play.py --prepare` tries again.

    eager_s: the eager variant's step as the foreground timed it. Given, the build waits up to
    patience_s for a CPU on which its own eager step is as fast (wait_for_cpu) before it compiles
    (max_autotune times kernels) and before it times the package."""
    key = package_key(model, variant, device, batch_size)
    pt2, note_file = package_files(key, folder)
    lock = pt2 + ".lock"
    if not _take_lock(lock):
        return None
    tmp = f"{pt2[:-4]}.{os.getpid()}.tmp.pt2"
    try:
        eager = Variant(variant.dtype)
        try:
            # pack=False: oneDNN's packed weights cannot be exported
            fast_model, decoder = prepare(model, eager, device, pack=False)
        except SmollError:  # int8 without its kernel here
            return _write_note(note_file, {"key": key, "failed": f"{variant.dtype} cannot run here"})
        fast_model.requires_grad_(False)
        eager_model, eager_decoder = prepare(model, eager, device)  # as play.py samples eagerly
        deadline = time.monotonic() + patience_s
        wait_for_cpu(eager_model, eager_decoder, batch_size, device, eager_s, deadline, log)
        t0 = time.perf_counter()
        try:
            import torch._inductor  # noqa: F401 (2 s to import: only when building)
            _compiler_folder(os.path.dirname(pt2))
            cache = KVCache(decoder.window)
            ring = [b for pair in decoder.ring(cache, batch_size, device) for b in pair]
            cos, sin = decoder.rotary(0)
            inputs = (torch.zeros(batch_size, 1, dtype=torch.long), cos, sin, torch.zeros(1, dtype=torch.long),
                      torch.ones(1, 1, 1, decoder.window, dtype=torch.bool), *ring)  # shaped as every step's
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # export's notes on lifted constants, not for users
                exported = torch.export.export(_FlatStep(decoder), inputs)
                torch._inductor.aoti_compile_and_package(exported, package_path=tmp, inductor_configs=PACKAGE_OPTIONS)
            build_s = time.perf_counter() - t0
            os.replace(tmp, pt2)
            note = _write_note(note_file, {"key": key, "sha256": file_sha256(pt2), "build_s": build_s})
            while True:  # timed again where another process took the CPU meanwhile
                packaged, load_s = load_package(eager_decoder, key, folder)
                note.update(load_s=load_s, step_s=time_steps(fast_model, packaged, batch_size, device))
                if wait_for_cpu(eager_model, eager_decoder, batch_size, device, eager_s, deadline, log):
                    break
        except Exception as e:  # a compiler error, an op that export or AOTInductor cannot take, a bad package
            remove_package(key, folder)
            reason = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            return _write_note(note_file, {"key": key, "failed": f"building failed: {reason}"})
        _write_note(note_file, note)
        _prune(os.path.dirname(pt2))
        return note
    finally:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        _release_lock(lock)


def wait_for_cpu(model, decoder, batch_size, device, eager_s, deadline, log=None):
    """Wait, until time.monotonic() reaches deadline, for this process's eager step to run within
    BUSY_FACTOR of eager_s (the foreground's timing): until no other process holds the CPU it needs.
    Returns True where it ran (or nothing was given to compare with) without waiting; False where
    it waited, or gave up at the deadline."""
    if eager_s is None:
        return True
    waited = False
    while time_steps(model, decoder, batch_size, device) > BUSY_FACTOR * eager_s and time.monotonic() < deadline:
        if not waited and log:
            log(f"another process is using the CPU: waiting for it to finish (up to "
                f"{(deadline - time.monotonic()) / 60:.0f} minutes), so that the timings are this step's own")
        waited = True
        time.sleep(BUSY_WAIT_S)
    return not waited


def _take_lock(lock, stale_s=3600):
    """Create the lock file, holding this process's id; False where another process holds it (one
    younger than stale_s: older ones are from builds that died) or the folder cannot be written."""
    try:
        os.makedirs(os.path.dirname(lock), exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            if time.time() - os.path.getmtime(lock) > stale_s:
                os.remove(lock)
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except OSError:  # FileExistsError: held; PermissionError and the like: an unwritable cache
        return False
    with os.fdopen(fd, "w") as f:
        f.write(str(os.getpid()))
    return True


def _release_lock(lock):
    """Remove the lock, if it is still this process's (a stale one may have been taken over)."""
    with contextlib.suppress(OSError):
        with open(lock) as f:
            mine = f.read() == str(os.getpid())
        if mine:
            os.remove(lock)


def _compiler_folder(folder):
    """Point PyTorch's compiler at a folder of this process's own, deleted when it exits: the
    files a build leaves are of no use once its package is written. PyTorch reads the setting once
    a process, so every build of the process shares it. A TORCHINDUCTOR_CACHE_DIR of the user's own
    is kept."""
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = path = tempfile.mkdtemp(prefix="inductor-", dir=folder)
        atexit.register(shutil.rmtree, path, True)


def _write_note(note_file, note):
    write_json(note_file, note)
    return note


def _prune(folder, keep=PACKAGES_KEPT):
    """Delete all but the `keep` most recently used packages, and what builds that died left
    behind more than a day ago (temp packages, locks, their build folders)."""
    with contextlib.suppress(OSError):
        entries = list(os.scandir(folder))
        notes = sorted((e for e in entries if e.name.endswith(".json")), key=lambda e: e.stat().st_mtime, reverse=True)
        for entry in notes[keep:]:
            for file in (entry.path, entry.path[:-5] + ".pt2"):
                with contextlib.suppress(OSError):
                    os.remove(file)
        for entry in entries:
            if entry.name.endswith((".tmp.pt2", ".lock")) or entry.name.startswith("inductor-"):
                with contextlib.suppress(OSError):
                    if time.time() - entry.stat().st_mtime > 86400:
                        shutil.rmtree(entry.path) if entry.is_dir() else os.remove(entry.path)


# ----------------------------------------------------------------------------------------------
# Building after a run, in the background


def start_background_build(model, device, weights, dtype_flag="auto", batch_size=1):
    """Where this CPU has no package yet for a compiled variant of the model (nor a note saying why
    it cannot be built), start `python play.py --prepare` for these weights in a process of its own,
    at the lowest priority, and say so on stderr: the next run loads what it builds, and this one is
    not slowed. It outlives this run; its output goes to packages/build.log in the cache folder.
    Returns the process, or None where nothing is started (SMOLL_BACKGROUND_BUILD=0 turns it off)."""
    if os.environ.get("SMOLL_BACKGROUND_BUILD", "1") == "0" or not missing_packages(model, device, dtype_flag,
                                                                                   batch_size):
        return None
    lock = os.path.join(cache_path("packages"), "background.lock")  # one background build at a time
    if not _take_lock(lock):
        return None
    command = [sys.executable, os.path.join(ROOT, "play.py"), "--prepare", "--weights", os.path.abspath(weights),
               "--device", "cpu", "--dtype", dtype_flag, "--num_samples", str(batch_size)]
    options = {}
    if os.name == "posix":
        options["start_new_session"] = True  # Ctrl-C in this terminal does not stop it
        if shutil.which("nice"):
            command = [shutil.which("nice"), "-n", "19", *command]
    else:
        options["creationflags"] = subprocess.IDLE_PRIORITY_CLASS | subprocess.CREATE_NEW_PROCESS_GROUP
    try:
        with open(os.path.join(cache_path("packages"), "build.log"), "a", encoding="utf-8") as log:
            process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                       cwd=ROOT, env={**os.environ, "SMOLL_BACKGROUND_LOCK": lock}, **options)
    except OSError:
        with contextlib.suppress(OSError):
            os.remove(lock)
        return None  # an unwritable cache: this run and the next sample eagerly
    print("[compiling the decoding step for this CPU in a background process, a few minutes at the "
          "lowest priority: later runs load it. --eager: never]", file=sys.stderr)
    return process


def lowest_priority():
    """For the background build itself: its session at the lowest priority too. Where Linux groups
    processes by session (autogroup, the default on desktops), `nice -n 19` counts only against the
    build's own session, and a build in a session of its own would take two thirds of the CPU from a
    training run beside it; with its session at nice 19 as well, it takes what the run leaves."""
    with contextlib.suppress(OSError):  # not Linux, or a kernel without autogroup
        with open(AUTOGROUP, "w") as f:
            f.write("19")


def missing_packages(model, device, dtype_flag="auto", batch_size=1):
    """The compiled variants worth building for this model here that have no package (nor a note
    saying why they cannot be built): what a background build would make."""
    if device.type != "cpu" or not isinstance(model, TinyGPT) or not have_compiler(device):
        return []
    variants = [Variant(v.dtype, compiled=True) for v in candidates(device, dtype_flag)]
    return [v for v in variants if read_note(package_key(model, v, device, batch_size)) is None]

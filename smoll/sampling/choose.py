"""Which variant of the decoding step samples fastest on this machine: timed, not guessed.

    fastest_decoder(model, config, device, ...) -> (model, decoder, variant, report)   play.py's one call
    prepare_packages(model, config, device, ...)                                      play.py --prepare

Which precision samples fastest depends on the processor, not on its feature flags: on one CPU
with bfloat16 instructions a bfloat16 matrix-vector product is 2x float32's, on another it is 3x
slower. So a few decoding steps of each variant are timed here and the fastest is kept. The
timings are stored per CPU (or GPU), PyTorch version, model shape and batch size, so the next run
on the same machine starts at once. A compiled variant counts what it still costs in this run: on
a CPU, loading its package where one is built (or building it, where the text is long enough to
pay for that); on CUDA, compiling.
"""

import contextlib
import json
import os
import time

import torch

from models import TinyGPT
from smoll.devices import machine_fingerprint
from smoll.files import SmollError, cache_path, read_json, write_json
from smoll.sampling.decoder import Variant, candidates, have_compiler, prepare, time_steps
from smoll.sampling.packages import (PackageError, build_package, load_package, lowest_priority, package_files,
                                     package_key, read_note, remove_package)

PREPARE_PATIENCE_S = {"background": 1800.0, "foreground": 300.0}  # the longest --prepare waits for a busy CPU
COMPILE_GUESS_S = 20.0  # what compiling a step is assumed to cost before it has been measured here
PACKAGE_BUILD_GUESS_S = 90.0  # the same for a CPU's package (max_autotune): 70 s on a 2-core AVX2-only CPU


def fastest_decoder(model, config, device, dtype_flag="auto", eager=False, n_chars=500, batch_size=1,
                    log=None, timed=True):
    """The model set up for the variant that writes n_chars characters soonest here, and its
    decoder: (model, decoder, the variant's name, a report of what was measured). --dtype names
    one variant instead of "auto"; eager=True never compiles; timed=False takes float32 (or the
    named one) without timing anything, for the reference decoder and the attention maps."""
    if not timed or not isinstance(model, TinyGPT):  # the Bigram is one table lookup: nothing to choose
        variant = Variant(dtype_flag if dtype_flag != "auto" else "float32")
        why = "a Bigram has one path" if timed else ("--dtype auto means float32 here" if dtype_flag == "auto"
                                                     else "as --dtype asks")
        return (*prepare(model, variant, device), str(variant), f"{variant} ({why})")
    log = log or (lambda line: None)
    key, store = timings_key(model, config, device, batch_size), cache_path("sampling_paths.json")
    timings_kept = read_json(store)
    known = timings_kept.get(key, {})
    kept_before = json.dumps(known, sort_keys=True)
    timings = {}  # variant -> seconds per step
    ready = {}  # variant -> (model, decoder) set up in this run
    source = "from the cache"
    for variant in candidates(device, dtype_flag):
        if str(variant) in known.get("steps", {}):
            timings[variant] = known["steps"][str(variant)]
            continue
        try:
            ready[variant] = prepare(model, variant, device)
        except SmollError:  # int8 without its kernel here: one candidate fewer, unless it was asked for
            if dtype_flag != "auto":
                raise
            continue
        timings[variant] = time_steps(*ready[variant], batch_size, device)
        source = "timed now"
    known["steps"] = {**known.get("steps", {}), **{str(v): s for v, s in timings.items()}}
    best, load_report = choose(timings, n_chars), ""
    if not eager and device.type == "cpu":
        best, load_report = choose_with_packages(model, device, timings, ready, known, n_chars, batch_size, log)
    elif not eager and have_compiler(device):  # CUDA: torch.compile, in this run
        best = choose_compiled_in_run(model, device, timings, ready, known, n_chars, batch_size, best, log)
    timings_kept[key] = known
    if json.dumps(known, sort_keys=True) != kept_before:
        write_json(store, timings_kept)
    if best not in ready:
        ready[best] = prepare_variant(model, best, device, batch_size)
    figures = ", ".join(f"{v} {1e3 * s:.2f} ms" for v, s in sorted(timings.items(), key=lambda kv: kv[1]))
    return (*ready[best], str(best), f"{best} ({source}{load_report}, ms per step: {figures})")


def timings_key(model, config, device, batch_size):
    """What a step's timing depends on: the processor, PyTorch, the model's shape and the batch."""
    shape = {k: getattr(config, k) for k in ("model", "n_layer", "n_head", "n_embd", "block_size", "activation",
                                             "qk_norm", "logit_cap")}
    return (f"{machine_fingerprint(device)} | torch {torch.__version__} | {json.dumps(shape, sort_keys=True)} "
            f"| vocab {model.lm_head.out_features} | batch {batch_size}")


def choose(step_seconds, n_steps, compile_seconds=None):
    """The variant that writes n_steps characters soonest: each costs n_steps times its seconds per
    step, plus its compile time if it has one still to pay (compile_seconds)."""
    compile_seconds = compile_seconds or {}
    return min(step_seconds, key=lambda v: compile_seconds.get(v, 0.0) + n_steps * step_seconds[v])


def worth_compiling(eager_step_seconds, n_steps, compile_seconds=COMPILE_GUESS_S):
    """Try compiling only if it could pay: even at twice the eager speed, it must save its cost."""
    return n_steps * eager_step_seconds / 2 > compile_seconds


def prepare_variant(model, variant, device, batch_size=1, folder=None):
    """prepare() for any variant: a compiled one on a CPU loads its package, and raises PackageError
    where there is no good one (build_package makes one)."""
    if not (variant.compiled and device.type == "cpu"):
        return prepare(model, variant, device)
    fast_model, decoder = prepare(model, Variant(variant.dtype), device)
    packaged, _ = load_package(decoder, package_key(model, variant, device, batch_size), folder)
    return fast_model, packaged


def choose_with_packages(model, device, timings, ready, known, n_chars, batch_size, log):
    """fastest_decoder's choice on a CPU, where compiled steps come as packages (packages.py): a
    package already built costs its load time; a missing one is built in this run only where
    the text pays for the build, else after the run (play.py). Returns (variant, a note for the report)."""
    costs = {}
    for variant in [v for v in timings if not v.compiled]:
        compiled = Variant(variant.dtype, compiled=True)
        note = read_note(package_key(model, compiled, device, batch_size))
        if note and "step_s" in note:
            timings[compiled], costs[compiled] = note["step_s"], note["load_s"]
    best = choose(timings, n_chars, costs)
    compiled = Variant(best.dtype, compiled=True)
    build_s = known.get("build_s", {}).get(str(compiled), PACKAGE_BUILD_GUESS_S)
    tried = read_note(package_key(model, compiled, device, batch_size))  # a note saying it failed here
    if (not best.compiled and tried is None and have_compiler(device)
            and worth_compiling(timings[best], n_chars, build_s)):
        log(f"compiling the decoding step ({compiled}) for this machine: it pays back over {n_chars:,} "
            f"characters, and later runs load it")
        note = build_package(model, compiled, device, batch_size)
        if note and "step_s" in note:  # built (not failed, nor locked by another build)
            known.setdefault("build_s", {})[str(compiled)] = note["build_s"]
            timings[compiled], costs[compiled] = note["step_s"], 0.0
            best = choose(timings, n_chars, costs)
    if not best.compiled:
        return best, ""
    t0 = time.perf_counter()
    try:
        ready[best] = prepare_variant(model, best, device, batch_size)
    except PackageError as e:  # changed, broken or foreign: removed, and built again after this run
        remove_package(package_key(model, best, device, batch_size))
        log(f"{e}: sampling eagerly, and building it again")
        return choose({v: s for v, s in timings.items() if not v.compiled}, n_chars), ""
    return best, f"; its package loaded and checked in {1e3 * (time.perf_counter() - t0):.0f} ms"


def choose_compiled_in_run(model, device, timings, ready, known, n_chars, batch_size, best, log):
    """fastest_decoder's choice on CUDA, where the step is compiled in the run by torch.compile
    (with CUDA graphs): tried only where it can pay back over n_chars; PyTorch keeps its compiled
    code on disk, but loading it again still takes time."""
    compiled = Variant(best.dtype, compiled=True)
    compile_s = known.get("compile_s", {}).get(str(compiled))
    if str(compiled) in known["steps"]:
        timings[compiled] = known["steps"][str(compiled)]
    elif worth_compiling(timings[best], n_chars, compile_s or COMPILE_GUESS_S):
        log(f"compiling the decoding step ({compiled}): it can pay back over {n_chars:,} characters")
        t0 = time.perf_counter()
        ready[compiled] = prepare(model, compiled, device)
        timings[compiled] = known["steps"][str(compiled)] = time_steps(*ready[compiled], batch_size, device)
        known.setdefault("compile_s", {})[str(compiled)] = compile_s = time.perf_counter() - t0
    if compiled not in timings:
        return best
    return choose(timings, n_chars, {} if compiled in ready else {compiled: compile_s or COMPILE_GUESS_S})


def prepare_packages(model, config, device, dtype_flag="auto", batch_size=1, log=print):
    """play.py --prepare: build (or find) the package of every compiled variant worth having here,
    saying what each one measures against the eager ones. Raises SmollError where none can be built."""
    if not isinstance(model, TinyGPT):
        raise SmollError("a Bigram samples with one table lookup: there is nothing to compile.")
    if device.type != "cpu":
        raise SmollError(f"--prepare builds compiled steps for a CPU; on {device.type}, play.py compiles in the "
                         f"run where it pays: drop --prepare, or add --device cpu.")
    if not have_compiler(device):
        raise SmollError("--prepare needs a C++ compiler (g++ or clang++) to build: install one (e.g. apt install "
                         "g++). play.py works without it, eagerly.")
    background = bool(os.environ.get("SMOLL_BACKGROUND_LOCK"))  # started by packages.start_background_build
    if background:
        lowest_priority()
    try:
        *_, report = fastest_decoder(model, config, device, dtype_flag, eager=True, batch_size=batch_size)
        log(f"eager: {report}")
        timed = read_json(cache_path("sampling_paths.json")).get(timings_key(model, config, device, batch_size), {})
        eager_steps = timed.get("steps", {})  # what the eager steps take in the foreground, as just read or timed
        patience_s = PREPARE_PATIENCE_S["background" if background else "foreground"]
        for variant in [Variant(v.dtype, compiled=True) for v in candidates(device, dtype_flag)]:
            key = package_key(model, variant, device, batch_size)
            note = read_note(key)
            if note and "step_s" in note and os.path.exists(package_files(key)[0]):
                log(f"{variant}: ready, {1e3 * note['step_s']:.2f} ms per step ({package_files(key)[0]})")
                continue
            log(f"{variant}: compiling (20 s to a minute and a half on 2 cores)...")
            note = build_package(model, variant, device, batch_size, eager_s=eager_steps.get(variant.dtype),
                                 patience_s=patience_s, log=log)
            if note is None:
                log(f"{variant}: another process is building it now")
            elif "failed" in note:
                log(f"{variant}: not built: {note['failed']}")
            else:
                log(f"{variant}: built in {note['build_s']:.0f} s, {1e3 * note['step_s']:.2f} ms per step, "
                    f"loads in {1e3 * note['load_s']:.0f} ms")
        *_, report = fastest_decoder(model, config, device, dtype_flag, batch_size=batch_size)
        log(f"play.py now samples with: {report}")
    finally:  # a background build lets the next one start
        if background:
            with contextlib.suppress(OSError):
                os.remove(os.environ["SMOLL_BACKGROUND_LOCK"])

"""The decoding step compiled ahead of time (smoll/sampling/packages.py: PackagedDecoder, build_package, load_package):
built once per CPU, PyTorch, code and model, reused by later runs, and never trusted when it does
not match. Run with `python -m pytest tests/test_packages.py`.

One small model is really compiled, once for the whole file (20-40 s on 2 cores, skipped without a
C++ compiler); everything else copies that package or simulates the build."""

import json
import os
import shutil
import sys

import pytest
import torch

import play
from config import make_config
from models import TinyGPT
from smoll import devices
from smoll.files import SmollError, file_sha256
from smoll.sampling import choose as choosing
from smoll.sampling import decoder as decoding
from smoll.sampling import packages as packaging
from smoll.sampling.choose import fastest_decoder, prepare_packages, prepare_variant
from smoll.sampling.decoder import Int8Linear, Variant, prepare
from smoll.sampling.packages import (PackagedDecoder, PackageError, build_package, load_package, missing_packages,
                                     package_files, package_key, read_note)

CPU = torch.device("cpu")
F32, BF16, INT8 = Variant("float32"), Variant("bfloat16"), Variant("int8")
F32_COMPILED = Variant("float32", compiled=True)
SLOW_EAGER = {F32: 5e-3, BF16: 6e-3, INT8: 7e-3}  # simulated eager timings that a package beats
HAVE_COMPILER = decoding.have_compiler(CPU)


def patch(monkeypatch, name, value):
    """Replace name in every module of the sampling engine that looks it up."""
    for module in (decoding, packaging, choosing):
        if hasattr(module, name):
            monkeypatch.setattr(module, name, value)


def tiny(seed=0):
    config = make_config(n_layer=2, n_embd=32, n_head=4, block_size=8, dropout=0.0, qk_norm=True,
                         activation="relu2", logit_cap=30.0)
    torch.manual_seed(seed)
    return TinyGPT(config, 20).eval(), config


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SMOLL_CACHE", str(tmp_path))
    return tmp_path


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The float32 package of tiny(), really compiled, in a folder of its own: (folder, note)."""
    if not HAVE_COMPILER:
        pytest.skip("building a package needs a C++ compiler")
    folder = str(tmp_path_factory.mktemp("packages"))
    model, _ = tiny()
    note = build_package(model, F32_COMPILED, CPU, 1, folder=folder)
    assert note is not None and "failed" not in note, note
    return folder, note


def install(built, cache_dir):
    """Copy the built package into this test's cache folder, where play.py looks for it."""
    folder = cache_dir / "packages"
    shutil.copytree(built[0], folder)
    return folder


def eager_timings(monkeypatch, timings=SLOW_EAGER):
    """Simulated eager timings (the choice is tested, not this machine's speed)."""
    def time_steps(model, decoder, batch_size, device):
        if isinstance(decoder, PackagedDecoder):
            return 1e-3
        return timings[Variant(str(model.lm_head.weight.dtype)[6:]
                               if type(model.lm_head) is torch.nn.Linear else
                               "int8" if type(model.lm_head) is Int8Linear else "bfloat16")]
    patch(monkeypatch, "time_steps", time_steps)


def test_a_package_writes_the_reference_text_far_past_the_window(built, cache_dir):
    """Greedy text in float32 through the package equals the cache-free reference decoder
    (stream with use_cache=False), through the filling ring and 5 windows past it."""
    model, _ = tiny()
    install(built, cache_dir)
    fast_model, packaged = prepare_variant(model, F32_COMPILED, CPU)
    assert isinstance(packaged, PackagedDecoder)
    prompt = torch.tensor([[1, 2, 3]])
    reference = model.generate(prompt, 40, temperature=0, use_cache=False)
    assert torch.equal(fast_model.generate(prompt, 40, temperature=0, decoder=packaged), reference)
    # one package serves prompt after prompt, each with a fresh cache
    assert torch.equal(fast_model.generate(prompt[:, :1], 12, temperature=0, decoder=packaged),
                       model.generate(prompt[:, :1], 12, temperature=0, use_cache=False))


def test_the_note_says_what_the_package_is_and_how_fast_it_ran(built):
    folder, note = built
    model, _ = tiny()
    key = package_key(model, F32_COMPILED, CPU, 1)
    assert read_note(key, folder) == note
    assert note["key"] == key and note["step_s"] > 0 and note["load_s"] > 0 and note["build_s"] > 0
    assert note["sha256"] == file_sha256(package_files(key, folder)[0])
    assert not [f for f in os.listdir(folder) if f.endswith((".lock", ".tmp.pt2"))]  # nothing left behind


def test_a_second_run_loads_the_package_instead_of_compiling(built, cache_dir, monkeypatch):
    model, config = tiny()
    install(built, cache_dir)
    eager_timings(monkeypatch)
    patch(monkeypatch, "build_package", lambda *a, **k: pytest.fail("built again"))
    fast_model, decoder, variant, report = fastest_decoder(model, config, CPU, dtype_flag="float32", n_chars=500)
    assert variant == str(F32_COMPILED) and isinstance(decoder, PackagedDecoder)
    assert "package loaded and checked in" in report
    assert missing_packages(model, CPU, "float32") == []  # nothing for the background to do
    # without a compiler a built package still loads: only building needs one
    patch(monkeypatch, "have_compiler", lambda device: False)
    _, _, variant, _ = fastest_decoder(model, config, CPU, dtype_flag="float32", n_chars=500)
    assert variant == str(F32_COMPILED)
    # --eager never loads one
    _, _, variant, _ = fastest_decoder(model, config, CPU, dtype_flag="float32", eager=True)
    assert variant == str(F32)


def test_the_load_cost_counts_in_the_choice(built, cache_dir, monkeypatch):
    model, config = tiny()
    folder = install(built, cache_dir)
    key = package_key(model, F32_COMPILED, CPU, 1)
    note_file = package_files(key, str(folder))[1]
    note = json.loads(open(note_file).read())
    note["load_s"] = 10.0  # a package that loads slowly does not pay for 20 characters
    with open(note_file, "w") as f:
        json.dump(note, f)
    eager_timings(monkeypatch)
    _, _, variant, _ = fastest_decoder(model, config, CPU, dtype_flag="float32", n_chars=20)
    assert variant == str(F32)


@pytest.mark.parametrize("damage", ["changed", "broken", "foreign"])
def test_a_damaged_or_foreign_package_is_removed_and_rebuilt_not_trusted(damage, built, cache_dir, monkeypatch):
    model, config = tiny()
    folder = str(install(built, cache_dir))
    key = package_key(model, F32_COMPILED, CPU, 1)
    pt2, note_file = package_files(key, folder)
    if damage == "changed":  # one byte flipped after it was built
        data = bytearray(open(pt2, "rb").read())
        data[len(data) // 2] ^= 0xFF
        open(pt2, "wb").write(bytes(data))
    elif damage == "broken":  # not a package at all, with a note that matches it
        open(pt2, "wb").write(b"not a zip file")
        note = json.loads(open(note_file).read())
        note["sha256"] = file_sha256(pt2)
        open(note_file, "w").write(json.dumps(note))
    else:  # another model's package under this model's key: its first step gives other logits
        model, config = tiny(seed=1)
        other_pt2, other_note = package_files(package_key(model, F32_COMPILED, CPU, 1), folder)
        os.replace(pt2, other_pt2)
        note = json.loads(open(note_file).read())
        note["key"] = package_key(model, F32_COMPILED, CPU, 1)
        open(other_note, "w").write(json.dumps(note))
        os.remove(note_file)
        key, pt2, note_file = note["key"], other_pt2, other_note
    with pytest.raises(PackageError):
        load_package(prepare(model, F32, CPU)[1], key, folder)
    eager_timings(monkeypatch)
    said = []
    fast_model, decoder, variant, _ = fastest_decoder(model, config, CPU, dtype_flag="float32", n_chars=500,
                                                      log=said.append)
    assert variant == str(F32) and not isinstance(decoder, PackagedDecoder)  # eager, this run
    assert not os.path.exists(pt2) and not os.path.exists(note_file) and said
    assert missing_packages(model, CPU, "float32") == [F32_COMPILED]  # built again after the run


@pytest.mark.parametrize("change", ["torch", "cpu", "model", "code", "batch"])
def test_a_package_is_rebuilt_when_torch_the_cpu_the_model_or_the_code_changes(change, monkeypatch):
    model, _ = tiny()
    batch = 1
    before = package_key(model, F32_COMPILED, CPU, batch)
    if change == "torch":
        monkeypatch.setattr(torch, "__version__", "9.9.9")
    elif change == "cpu":  # a CPU of the same name with other instructions
        patch(monkeypatch, "machine_fingerprint", lambda device: "AMD EPYC CPU, 2 threads, flags 0")
    elif change == "model":
        with torch.no_grad():
            model.lm_head.weight[0, 0] += 1e-3  # one weight, changed in place
    elif change == "code":
        patch(monkeypatch, "code_digest", lambda: "edited")
    else:
        batch = 3
    after = package_key(model, F32_COMPILED, CPU, batch)
    assert after != before and package_files(after) != package_files(before)


def test_the_cpu_fingerprint_tells_apart_cpus_of_one_name(monkeypatch):
    monkeypatch.setattr(devices, "cpu_info", lambda: ("AMD EPYC", {"avx2", "fma"}))
    zen1 = devices.machine_fingerprint(CPU)
    monkeypatch.setattr(devices, "cpu_info", lambda: ("AMD EPYC", {"avx2", "fma", "avx512f", "avx512_bf16"}))
    assert devices.machine_fingerprint(CPU) != zen1 and zen1.startswith("AMD EPYC")


def test_without_a_compiler_nothing_is_built_and_play_still_samples(cache_dir, monkeypatch, capsys):
    patch(monkeypatch, "have_compiler", lambda device: False)
    patch(monkeypatch, "build_package", lambda *a, **k: pytest.fail("tried to compile"))
    model, config = tiny()
    assert missing_packages(model, CPU) == []
    _, _, variant, _ = fastest_decoder(model, config, CPU, n_chars=10_000_000)  # even where it would pay
    assert "compiled" not in variant
    with pytest.raises(SmollError, match="C\\+\\+ compiler"):
        prepare_packages(model, config, CPU)
    play.main(["--length", "30", "--seed", "0", "--device", "cpu"])
    assert len(capsys.readouterr().out) == 31


def test_a_long_run_builds_its_package_in_the_run_and_uses_it(cache_dir, monkeypatch):
    model, config = tiny()
    eager_timings(monkeypatch)
    patch(monkeypatch, "have_compiler", lambda device: True)
    built_variants = []

    def fake_build(model, variant, device, batch_size, **options):  # stands in for a minute of compiling
        built_variants.append(variant)
        key = package_key(model, variant, device, batch_size)
        note = {"key": key, "sha256": "x", "build_s": 30.0, "load_s": 0.02, "step_s": 1e-3}
        packaging._write_note(package_files(key)[1], note)
        return note

    patch(monkeypatch, "build_package", fake_build)
    real_prepare = choosing.prepare_variant
    patch(monkeypatch, "prepare_variant", lambda model, variant, device, batch_size=1, **k: (
        (model, "packaged") if variant.compiled else real_prepare(model, variant, device, batch_size, **k)))
    _, decoder, variant, _ = fastest_decoder(model, config, CPU, n_chars=500)  # short: not in the run
    assert built_variants == [] and "compiled" not in variant
    _, decoder, variant, _ = fastest_decoder(model, config, CPU, n_chars=1_000_000)
    assert built_variants == [Variant("float32", compiled=True)] and variant == "float32 compiled"
    assert decoder == "packaged"
    _, _, variant, _ = fastest_decoder(model, config, CPU, n_chars=500)  # the next run loads what was built
    assert "compiled" in variant and len(built_variants) == 1


def test_a_first_run_starts_the_build_in_the_background_after_its_text(cache_dir, monkeypatch, capsys):
    started = []

    class FakePopen:
        def __init__(self, command, **options):
            started.append((command, options))

    monkeypatch.setattr(packaging.subprocess, "Popen", FakePopen)
    patch(monkeypatch, "have_compiler", lambda device: True)
    monkeypatch.setenv("SMOLL_BACKGROUND_BUILD", "1")
    play.main(["--length", "20", "--seed", "0", "--device", "cpu", "--verbose"])
    err = capsys.readouterr().err
    (command, options), = started
    assert command[command.index(sys.executable) + 1:][:2] == [os.path.join(packaging.ROOT, "play.py"), "--prepare"]
    assert "--weights" in command and command[command.index("--dtype") + 1] == "auto"
    if os.name == "posix" and shutil.which("nice"):
        assert command[:3] == [shutil.which("nice"), "-n", "19"] and options["start_new_session"]
    assert "in a background process" in err
    assert options["env"]["SMOLL_BACKGROUND_LOCK"].endswith("background.lock")
    started.clear()
    play.main(["--length", "20", "--seed", "0", "--device", "cpu"])  # one background build at a time
    assert started == []
    os.remove(options["env"]["SMOLL_BACKGROUND_LOCK"])  # what the build does when it ends
    play.main(["--length", "20", "--seed", "0", "--device", "cpu", "--eager"])  # --eager: never
    monkeypatch.setenv("SMOLL_BACKGROUND_BUILD", "0")
    play.main(["--length", "20", "--seed", "0", "--device", "cpu"])  # switched off
    assert started == []


def test_waiting_for_the_cpu(monkeypatch):
    """wait_for_cpu: an eager step more than BUSY_FACTOR slower than the foreground timed it means
    another process holds the CPU; it sleeps and looks again, until the deadline."""
    steps, sleeps, lines = [], [], []

    def run(timings, eager_s=1e-3, patience_s=60.0):
        steps[:] = timings
        sleeps.clear(), lines.clear()
        patch(monkeypatch, "time_steps", lambda *a: steps.pop(0))
        monkeypatch.setattr(packaging.time, "sleep", sleeps.append)
        deadline = packaging.time.monotonic() + patience_s
        return packaging.wait_for_cpu(None, None, 1, CPU, eager_s, deadline, lines.append)

    assert run([1.2e-3]) and sleeps == [] and lines == []  # quiet: no wait
    assert not run([9e-3, 4e-3, 1.4e-3]) and len(sleeps) == 2 and len(lines) == 1  # busy twice, then quiet
    assert "another process is using the CPU" in lines[0] and steps == []
    assert run([9e-3], patience_s=0.0) and sleeps == []  # past the deadline: times as it can
    assert run([], eager_s=None)  # nothing to compare with: nothing timed, no wait


def test_a_build_compiles_and_times_while_no_other_process_holds_the_cpu(built, tmp_path, monkeypatch):
    """build_package waits for a quiet CPU before compiling (max_autotune times kernels), and times
    the package again where the machine got busy while it timed it."""
    model, _ = tiny()
    compiled = package_files(package_key(model, F32_COMPILED, CPU, 1), built[0])[0]
    events = []
    import torch._inductor
    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package",  # the package built once, copied
                        lambda exported, package_path, **k: events.append("compiled") or shutil.copy(compiled,
                                                                                                     package_path))
    eager = [9e-3, 1e-3,  # busy, then quiet: compiles
             5e-3, 1e-3,  # busy while the package was timed: waits
             1e-3]  # timed again, quiet throughout
    package = [0.3, 2e-4]  # its first timing was the other process's

    def time_steps(model, decoder, batch_size, device):
        events.append("package" if isinstance(decoder, PackagedDecoder) else "eager")
        return (package if isinstance(decoder, PackagedDecoder) else eager).pop(0)

    patch(monkeypatch, "time_steps", time_steps)
    monkeypatch.setattr(packaging.time, "sleep", lambda s: events.append("sleep"))
    note = build_package(model, F32_COMPILED, CPU, 1, folder=str(tmp_path), eager_s=1e-3, patience_s=600)
    assert events == ["eager", "sleep", "eager", "compiled", "package", "eager", "sleep", "eager", "package", "eager"]
    assert note["step_s"] == 2e-4 and read_note(package_key(model, F32_COMPILED, CPU, 1), str(tmp_path)) == note


def test_prepare_compares_with_the_eager_steps_the_foreground_timed(cache_dir, monkeypatch):
    model, config = tiny()
    eager_timings(monkeypatch)
    patch(monkeypatch, "have_compiler", lambda device: True)
    asked = []
    patch(monkeypatch, "build_package", lambda *a, **k: asked.append(k) or None)
    autogroup = cache_dir / "autogroup"  # stands in for /proc/self/autogroup
    monkeypatch.setattr(packaging, "AUTOGROUP", str(autogroup))
    fastest_decoder(model, config, CPU, eager=True)  # play.py's run in the foreground: timed and kept
    prepare_packages(model, config, CPU, dtype_flag="float32", log=lambda line: None)
    assert not autogroup.exists()  # in the foreground, the priority stays as it is
    lock = cache_dir / "background.lock"
    lock.write_text("")
    monkeypatch.setenv("SMOLL_BACKGROUND_LOCK", str(lock))
    prepare_packages(model, config, CPU, dtype_flag="float32", log=lambda line: None)
    assert [(k["eager_s"], k["patience_s"]) for k in asked] == [(SLOW_EAGER[F32], 300.0), (SLOW_EAGER[F32], 1800.0)]
    assert autogroup.read_text() == "19"  # the background build's session at the lowest priority
    assert not lock.exists()  # the next background build may start


def test_one_build_at_a_time(tmp_path, monkeypatch):
    model, _ = tiny()
    key = package_key(model, F32_COMPILED, CPU, 1)
    pt2, _ = package_files(key, str(tmp_path))
    open(pt2 + ".lock", "w").close()  # another process is building this package
    patch(monkeypatch, "prepare", lambda *a, **k: pytest.fail("built while locked"))
    assert build_package(model, F32_COMPILED, CPU, 1, folder=str(tmp_path)) is None
    os.utime(pt2 + ".lock", (0, 0))  # a lock from a build that died long ago is taken over

    def cannot_run(*args, **kwargs):  # the variant cannot run here
        raise SmollError("no kernel")

    patch(monkeypatch, "prepare", cannot_run)
    note = build_package(model, F32_COMPILED, CPU, 1, folder=str(tmp_path))
    assert "failed" in note and read_note(key, str(tmp_path)) == note and not os.path.exists(pt2 + ".lock")


def test_old_packages_are_pruned(tmp_path):
    for i in range(5):
        (tmp_path / f"{i}.pt2").write_bytes(b"x")
        (tmp_path / f"{i}.json").write_text("{}")
        os.utime(tmp_path / f"{i}.json", (i, i))
    packaging._prune(str(tmp_path), keep=2)
    assert sorted(os.listdir(tmp_path)) == ["3.json", "3.pt2", "4.json", "4.pt2"]


def test_prepare_says_why_where_there_is_nothing_to_build(capsys):
    with pytest.raises(SystemExit) as stop:
        play.main(["--prepare", "--model", "bigram"])
    assert stop.value.code == 1 and "nothing to compile" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        play.main(["--prepare", "--web"])
    assert stop.value.code == 2 and "--prepare builds the compiled step" in capsys.readouterr().err
    with pytest.raises(SmollError, match="--device cpu"):
        prepare_packages(tiny()[0], tiny()[1], torch.device("cuda"))

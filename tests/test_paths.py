"""How play.py picks its variant of the decoding step by timing it, and caches the decision.
Run with `python -m pytest tests/test_paths.py`. Timings are recorded or simulated here: the
choice is what is tested, not the speed of this machine."""

import json

import pytest
import torch

import play
from config import make_config
from models import TinyGPT
from smoll.sampling import choose as choosing
from smoll.sampling import decoder as decoding
from smoll.sampling.choose import choose, fastest_decoder, worth_compiling
from smoll.sampling.decoder import Int8Linear, PackedLinear, Variant

F32, BF16, INT8 = Variant("float32"), Variant("bfloat16"), Variant("int8")
CPU = torch.device("cpu")

# Seconds per decoding step, as measured with the shipped model on two kinds of 2-core CPU.
AMD_EPYC = {F32: 0.53e-3, BF16: 0.79e-3, INT8: 0.56e-3}
XEON_AMX = {F32: 2.0e-3, BF16: 2.8e-3, INT8: 0.9e-3}  # a bfloat16 matrix-vector product is slower there


def tiny():
    config = make_config(n_layer=1, n_embd=32, n_head=4, block_size=8, dropout=0.0)
    torch.manual_seed(0)
    return TinyGPT(config, 20).eval(), config


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SMOLL_CACHE", str(tmp_path))
    return tmp_path


def fake_timer(monkeypatch, timings):
    """Replace time_steps by recorded timings; returns the list of variants it was asked to time."""
    asked = []

    def time_steps(model, decoder, batch_size, device):
        variant = Variant(DTYPE_OF[type(model.lm_head)](model))
        asked.append(variant)
        return timings[variant]

    monkeypatch.setattr(choosing, "time_steps", time_steps)
    return asked


DTYPE_OF = {torch.nn.Linear: lambda m: str(m.lm_head.weight.dtype)[6:], PackedLinear: lambda m: "bfloat16",
            Int8Linear: lambda m: "int8"}


def test_the_fastest_path_wins_whatever_the_cpu_flags_say():
    assert choose(AMD_EPYC, 500) == F32
    assert choose(XEON_AMX, 500) == INT8
    only_bf16_fast = {F32: 1e-3, BF16: 0.5e-3}
    assert choose(only_bf16_fast, 500) == BF16


def test_compile_cost_counts_against_a_compiled_path():
    compiled = Variant("int8", compiled=True)
    timings = {INT8: 0.5e-3, compiled: 0.3e-3}
    assert choose(timings, 500, {compiled: 12.0}) == INT8  # 0.25 s against 12.15 s
    assert choose(timings, 100_000, {compiled: 12.0}) == compiled  # 50 s against 42 s
    assert choose(timings, 500) == compiled  # compiled already: only the steps count
    assert not worth_compiling(0.5e-3, 500, compile_seconds=30)
    assert worth_compiling(0.5e-3, 200_000, compile_seconds=30)


@pytest.mark.parametrize("timings, expected", [(AMD_EPYC, F32), (XEON_AMX, INT8)])
def test_play_picks_what_it_timed_and_reuses_the_timings_next_time(timings, expected, cache_dir, monkeypatch):
    model, config = tiny()
    asked = fake_timer(monkeypatch, timings)
    fast_model, decoder, variant, report = fastest_decoder(model, config, CPU, eager=True)
    assert variant == str(expected) and "timed now" in report
    assert set(asked) == {F32, BF16, INT8}
    assert model.lm_head.weight.dtype == torch.float32  # the loaded model itself is left as it was
    stored = json.loads((cache_dir / "sampling_paths.json").read_text())
    assert len(stored) == 1 and list(stored.values())[0]["steps"]["int8"] == timings[INT8]
    asked.clear()
    _, _, again, report = fastest_decoder(model, config, CPU, eager=True)
    assert again == str(expected) and asked == [] and "from the cache" in report
    # the chosen path really is set up: its text is the model's own (float32) or close to it
    prompt = torch.zeros(1, 1, dtype=torch.long)
    text = fast_model.generate(prompt, 10, temperature=0, decoder=decoder)
    assert text.shape == (1, 11)


@pytest.mark.parametrize("change", ["torch", "cpu", "model", "batch"])
def test_a_cached_decision_is_ignored_when_the_torch_version_the_cpu_or_the_model_changes(
        change, cache_dir, monkeypatch):
    model, config = tiny()
    asked = fake_timer(monkeypatch, AMD_EPYC)
    fastest_decoder(model, config, CPU, eager=True)
    asked.clear()
    batch = 1
    if change == "torch":
        monkeypatch.setattr(torch, "__version__", "9.9.9")
    elif change == "cpu":
        monkeypatch.setattr(choosing, "machine_fingerprint", lambda device: "Some Other CPU, 2 threads, flags 0")
    elif change == "model":
        config = make_config(n_layer=2, n_embd=32, n_head=4, block_size=8, dropout=0.0)
        model = TinyGPT(config, 20).eval()
    else:
        batch = 3
    fastest_decoder(model, config, CPU, eager=True, batch_size=batch)
    assert set(asked) == {F32, BF16, INT8}  # timed again
    assert len(json.loads((cache_dir / "sampling_paths.json").read_text())) == 2


def test_dtype_overrides_the_timing(cache_dir, monkeypatch):
    model, config = tiny()
    asked = fake_timer(monkeypatch, XEON_AMX)
    fast_model, _, variant, _ = fastest_decoder(model, config, CPU, dtype_flag="bfloat16", eager=True)
    assert variant == str(BF16) and asked in ([BF16], [])
    assert next(fast_model.parameters()).dtype == torch.bfloat16


def test_a_damaged_decision_file_is_remade(cache_dir, monkeypatch):
    (cache_dir / "sampling_paths.json").write_text("{not json", encoding="utf-8")
    model, config = tiny()
    fake_timer(monkeypatch, AMD_EPYC)
    _, _, variant, _ = fastest_decoder(model, config, CPU, eager=True)
    assert variant == str(F32)
    assert json.loads((cache_dir / "sampling_paths.json").read_text())


def test_an_unwritable_cache_folder_costs_only_the_next_runs_time(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setenv("SMOLL_CACHE", str(blocker / "sub"))  # a folder inside a file: cannot exist
    model, config = tiny()
    fake_timer(monkeypatch, AMD_EPYC)
    _, _, variant, _ = fastest_decoder(model, config, CPU, eager=True)
    assert variant == str(F32)


def test_verbose_says_which_path_and_why(tmp_path, cache_dir, capsys):
    play.main(["--length", "20", "--seed", "0", "--device", "cpu", "--verbose", "--eager"])
    err = capsys.readouterr().err
    assert "[sampling path: " in err and "ms per step:" in err and "float32" in err
    play.main(["--length", "20", "--seed", "0", "--device", "cpu", "--verbose", "--eager"])
    assert "from the cache" in capsys.readouterr().err


def test_int8_sampling_from_the_command_line(capsys):
    play.main(["--length", "40", "--seed", "0", "--device", "cpu", "--dtype", "int8", "--verbose"])
    captured = capsys.readouterr()
    if "int8" not in captured.err:
        pytest.skip("this PyTorch has no int8 weight kernel for the CPU")
    assert len(captured.out) == 41 and "sampling path: int8" in captured.err


@pytest.mark.parametrize("capability, half", [((9, 0), "bfloat16"), ((7, 5), "float16")])
def test_on_a_simulated_gpu_the_candidates_are_float32_and_its_native_half_with_cuda_graphs(
        capability, half, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    cuda = torch.device("cuda")
    assert decoding.candidates(cuda, "auto") == [F32, Variant(half)]
    assert decoding.compile_mode(cuda) == "reduce-overhead" and decoding.compile_mode(CPU) is None
    assert decoding.have_compiler(cuda)  # CUDA builds of PyTorch ship Triton
    assert decoding.candidates(torch.device("mps"), "auto") == [F32]

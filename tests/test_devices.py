"""Device and precision choices with simulated GPUs, float16 training, gradient accumulation:
run with `python -m pytest tests/test_devices.py`."""

import contextlib
import functools
import os
import signal
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pytest
import torch

import train as train_script
from conftest import ROOT, listen_to_ctrl_c
from config import make_config
from models import TinyGPT
from smoll import devices, files
from smoll.devices import cuda_problem, get_device, kernel_problem, pick_dtype, resolve_dtype
from smoll.distributed import rng_states, set_rng_states, setup_machine
from smoll.files import SmollError
from smoll.sampling.decoder import pack_for_cpu_sampling
from smoll.speed import should_compile
from train import last_path, setup_run, train, train_step

CU130_ARCHS = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120", "compute_120"]
GPUS = {"T4": (7, 5), "V100": (7, 0), "A100": (8, 0), "H100": (9, 0), "RTX 3090": (8, 6)}


@pytest.fixture
def fake_cuda(monkeypatch):
    """A machine whose CUDA GPUs are the given names: fake_cuda("A100", "T4") is cuda:0 and cuda:1."""
    def install(*names, archs=CU130_ARCHS):
        index = lambda d: torch.device(d).index or 0  # noqa: E731
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: len(names))
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: GPUS[names[index(d or 0)]])
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: f"NVIDIA {names[index(d or 0)]}")
        monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: archs)
        monkeypatch.setattr(torch.version, "hip", None)
    return install


@pytest.mark.parametrize("gpu, dtype", [("T4", torch.float16), ("V100", torch.float16),
                                        ("A100", torch.bfloat16), ("H100", torch.bfloat16)])
def test_auto_dtype_on_simulated_gpus(fake_cuda, gpu, dtype):
    fake_cuda(gpu)
    assert resolve_dtype("auto", torch.device("cuda")) == dtype
    assert pick_dtype("cuda", GPUS[gpu]) == dtype


def test_auto_dtype_asks_about_the_chosen_gpu_not_the_current_one(fake_cuda):
    fake_cuda("A100", "T4")
    assert resolve_dtype("auto", get_device("cuda:0")) == torch.bfloat16
    assert resolve_dtype("auto", get_device("cuda:1")) == torch.float16
    with pytest.raises(SmollError, match="has 2 GPU.*cuda:0 to cuda:1"):
        get_device("cuda:2")


def test_auto_dtype_on_mps_and_on_cpus_with_and_without_bf16(monkeypatch):
    assert resolve_dtype("auto", torch.device("mps")) == torch.float32
    monkeypatch.setattr(devices, "cpu_has_fast_bf16", lambda: True)
    assert resolve_dtype("auto", torch.device("cpu")) == torch.bfloat16
    monkeypatch.setattr(devices, "cpu_has_fast_bf16", lambda: False)
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("float16", torch.device("cpu")) == torch.float16  # asked for, given


def test_a_gpu_this_build_has_no_kernels_for_is_refused_with_the_fix(fake_cuda):
    fake_cuda("V100")
    with pytest.raises(SmollError, match="V100.*7.0.*no kernel image.*whl/cu126"):
        get_device("auto")
    fake_cuda("RTX 3090")  # 8.6 runs the sm_80 and sm_86 code
    assert get_device("auto") == torch.device("cuda")


def test_kernel_compatibility_rules():
    assert kernel_problem((8, 9), ["sm_80"], "L4") is None  # same major, newer minor
    assert kernel_problem((9, 0), ["sm_80"], "H100") is not None  # sm_80 code does not run on 9.x
    assert kernel_problem((9, 0), ["sm_80", "compute_80"], "H100") is None  # PTX is compiled for it
    assert kernel_problem((6, 1), CU130_ARCHS, "GTX 1080") is not None


def test_an_unusable_nvidia_gpu_stops_the_run_instead_of_training_on_the_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(devices, "nvidia_gpu_present", lambda: True)
    monkeypatch.setattr(devices, "nvidia_driver_version", lambda: 535)
    with pytest.raises(SmollError, match="CUDA 13.0, which needs NVIDIA driver 580.*has driver 535.*"
                                         "update the driver.*cu126.*--device cpu"):
        get_device("auto")
    assert get_device("cpu") == torch.device("cpu")  # asked for the CPU: no complaint
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(SmollError, match="CPU-only build.*cuda13_requirements.txt"):
        get_device("cuda")
    monkeypatch.setattr(devices, "nvidia_gpu_present", lambda: False)  # a laptop without a GPU
    assert get_device("auto") == torch.device("cpu")
    assert cuda_problem("12.6", 535, True) is None  # CUDA 12 runs on driver 525 and later


def test_the_nvidia_driver_version_is_read_from_the_kernel_module_line(tmp_path):
    closed = tmp_path / "closed"
    closed.write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug 19 01:15:15 UTC 2023\n"
                      "GCC version:  gcc version 12.2.0 (Debian 12.2.0-14)\n")
    opened = tmp_path / "open"
    opened.write_text("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.65.06  Release Build\n")
    assert devices.nvidia_driver_version(str(closed)) == 535
    assert devices.nvidia_driver_version(str(opened)) == 580
    assert devices.nvidia_driver_version(str(tmp_path / "none")) is None


def test_mps_rng_state_is_saved_and_restored(monkeypatch):
    state = torch.arange(8, dtype=torch.uint8)
    restored = []
    monkeypatch.setattr(torch.mps, "get_rng_state", lambda: state)
    monkeypatch.setattr(torch.mps, "set_rng_state", restored.append)
    mps = SimpleNamespace(device=torch.device("mps"), world_size=1)  # a Machine, as far as these look
    (rng,) = rng_states(mps, torch.Generator())
    assert torch.equal(rng["mps"], state)
    set_rng_states(rng, mps, torch.Generator())
    assert torch.equal(restored[0], state)


def test_state_is_saved_on_the_cpu():
    nested = {"state": {0: {"exp_avg": torch.ones(2), "step": torch.tensor(3.0)}}, "groups": [{"lr": 1e-3}]}
    moved = files.to_cpu(nested)
    assert moved["groups"] == [{"lr": 1e-3}] and torch.equal(moved["state"][0]["exp_avg"], torch.ones(2))
    assert all(t.device.type == "cpu" for t in moved["state"][0].values())


def test_a_resumed_optimizer_gets_the_flags_of_its_own_device(tmp_path, tiny_config, tiny_text):
    out = tmp_path / "run.pth"
    train(tiny_config, tiny_text, str(out), sample_chars=0)
    state = torch.load(last_path(str(out)), weights_only=True)
    for group in state["optimizer"][0]["param_groups"]:  # AdamW's, as a CUDA machine would have saved them
        group.update(fused=True, foreach=False)
    state["finished"] = False
    run = setup_run(tiny_config, setup_machine(tiny_config), tiny_text, str(out), state)
    assert all(g["fused"] is False and g["foreach"] is True for g in run.optimizers[0].param_groups)


def test_packed_linears_fall_back_on_a_pytorch_without_the_private_ops(monkeypatch):
    model = TinyGPT(make_config(n_layer=1, n_embd=32, n_head=2, block_size=8), 10).to(torch.bfloat16)
    monkeypatch.setattr(torch.ops, "mkldnn", SimpleNamespace())  # no _reorder_linear_weight here
    assert pack_for_cpu_sampling(model) == 0
    assert model.generate(torch.zeros(1, 1, dtype=torch.long), 5).shape == (1, 6)


# float16 training with a GradScaler, on the CPU for real


def test_float16_training_runs_with_a_grad_scaler_that_skips_overflowing_steps(tmp_path, tiny_config,
                                                                               tiny_text, monkeypatch):
    # A scale of 2**40 makes the float16 gradients overflow at first. The scaler skips those steps
    # and halves its scale each time, until the gradients fit; the run must go on meanwhile.
    monkeypatch.setattr(torch.amp, "GradScaler", functools.partial(torch.amp.GradScaler, init_scale=2.0 ** 40))
    config = make_config(**{**vars(tiny_config), "dtype": "float16", "max_iters": 60, "learning_rate": 3e-3})
    result = train(config, tiny_text, str(tmp_path / "half.pth"), sample_chars=0)
    state = torch.load(last_path(str(tmp_path / "half.pth")), weights_only=True)
    assert state["run"]["dtype"] == "float16"
    assert 0 < state["scaler"]["scale"] <= 2.0 ** 30  # at least ten steps were skipped
    assert result["full_val"] < result["history"][0]["val_loss"] - 0.3  # and it learned all the same


def test_skipped_float16_steps_are_not_divergence_but_overflow_at_every_scale_is():
    r = SimpleNamespace(scaler=torch.amp.GradScaler("cpu", init_scale=1024.0), step=7, out_path="x.pth",
                        config=make_config())
    train_script.check_loss(float("inf"), r)  # the scaler skips this step and lowers its scale
    r.scaler = torch.amp.GradScaler("cpu", init_scale=0.5)
    with pytest.raises(SmollError, match="diverged"):
        train_script.check_loss(float("nan"), r)
    r.scaler = torch.amp.GradScaler("cpu", enabled=False)  # float32 and bfloat16: no scaler to wait for
    with pytest.raises(SmollError, match="diverged"):
        train_script.check_loss(float("inf"), r)


# Gradient accumulation


def gradients_of_one_step(config, text, out):
    run = setup_run(config, setup_machine(config), text, out)
    seen = {}
    run.optimizers[0].step = lambda *a, **k: seen.update({n: p.grad.clone() for n, p in run.model.named_parameters()})
    loss = train_step(run, run.model, scale=1.0)
    return seen, loss


def test_grad_accum_gives_the_gradients_of_the_whole_batch(tmp_path, tiny_config, tiny_text):
    whole, whole_loss = gradients_of_one_step(tiny_config, tiny_text, str(tmp_path / "a.pth"))
    config = make_config(**{**vars(tiny_config), "grad_accum": 4})
    micro, micro_loss = gradients_of_one_step(config, tiny_text, str(tmp_path / "b.pth"))
    assert whole.keys() == micro.keys()
    for name in whole:
        torch.testing.assert_close(micro[name], whole[name], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(micro_loss, whole_loss)
    with pytest.raises(ValueError, match="does not split into --grad_accum 3"):
        make_config(batch_size=8, grad_accum=3)


def test_under_ddp_only_the_last_micro_batch_syncs_gradients(tmp_path, tiny_config, tiny_text):
    config = make_config(**{**vars(tiny_config), "grad_accum": 4})
    run = setup_run(config, setup_machine(config), tiny_text, str(tmp_path / "run.pth"))
    model, entered = run.model, []

    class FakeDDP(torch.nn.Module):  # counts the micro-batches run without a gradient sync
        def forward(self, x, y):
            return model(x, y)

        @contextlib.contextmanager
        def no_sync(self):
            entered.append(1)
            yield

    run.machine = SimpleNamespace(**{**vars(run.machine), "world_size": 2})
    train_step(run, FakeDDP(), scale=1.0)
    assert len(entered) == 3


# The newcomer on a CPU


def test_ctrl_c_during_the_first_evaluation_stops_within_seconds(tmp_path):
    out = tmp_path / "run.pth"
    # Tiny Shakespeare's whole training split (1000 batches ask for more than it holds), by a model
    # large enough to take about 20 s over it on 2 cores
    flags = ["--n_layer", "4", "--n_embd", "128", "--n_head", "4", "--block_size", "128", "--batch_size", "64",
             "--eval_iters", "1000", "--device", "cpu", "--dtype", "float32"]
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"),
                             "--out", str(out), *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             preexec_fn=listen_to_ctrl_c)
    output = []
    reader = threading.Thread(target=lambda: output.extend(iter(lambda: os.read(proc.stdout.fileno(), 4096), b"")))
    reader.start()
    deadline = time.time() + 120
    while b"evaluating" not in b"".join(output) and time.time() < deadline:  # the progress bar is up
        time.sleep(0.1)
    assert b"estimated time here" in b"".join(output) and b"--preset cpu" in b"".join(output)
    pressed = time.time()
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)
    reader.join()
    assert time.time() - pressed < 10
    stdout = b"".join(output).decode()
    assert proc.returncode == 130, proc.stderr.read().decode()
    assert "No evaluation has finished yet" in stdout
    assert f"python train.py --resume --out {os.path.relpath(out)}" in stdout
    assert torch.load(last_path(str(out)), weights_only=True)["step"] == 0


def test_compile_auto_compiles_on_cuda_and_for_long_cpu_budgets():
    cpu, cuda, mps = torch.device("cpu"), torch.device("cuda"), torch.device("mps")
    assert should_compile(make_config(), cuda)
    assert not should_compile(make_config(), cpu)  # no budget: by steps, uncompiled
    assert should_compile(make_config(preset="cpu"), cpu)  # 5 minutes repay ~15 s of compiling
    assert not should_compile(make_config(preset="cpu", time_budget=30), cpu)
    assert not should_compile(make_config(preset="cpu"), mps)
    assert not should_compile(make_config(compile="off"), cuda)
    assert should_compile(make_config(compile="on"), cpu)

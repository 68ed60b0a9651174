"""Devices and precision: which device to run on, what a GPU that cannot run this PyTorch needs,
the fastest precision each device runs natively, and a name for the CPU or GPU.

    get_device(name)            -> torch.device   "auto": cuda, then mps, then cpu
    resolve_dtype(name, device) -> torch.dtype    "auto": the device's fastest native precision

play.py calls get_device; train.py reaches both through smoll.distributed.setup_machine. The rest
is what they need to give a sentence that names the fix instead of a traceback. Nothing here knows
about models.
"""

import contextlib
import hashlib
import os
import platform
import re
import shutil

import torch

from smoll.files import SmollError

# ----------------------------------------------------------------------------------------------
# Devices and precision


def get_device(name="auto"):
    """Resolve "auto" to cuda, then mps, then cpu; refuse a device this PyTorch cannot run on,
    with a sentence that names the fix (see cuda_problem)."""
    auto = name == "auto"
    if (auto or name.startswith("cuda")) and not torch.cuda.is_available() and nvidia_gpu_present():
        problem = cuda_problem(torch.version.cuda, nvidia_driver_version(), gpu_present=True)
        if problem:
            raise SmollError(problem + (" Or pass --device cpu to run on the CPU." if auto else ""))
    if auto:
        if torch.cuda.is_available():
            name = "cuda"
        elif torch.backends.mps.is_available():
            return torch.device("mps")
        else:
            return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SmollError(f"--device {name} was asked for, but this machine has no CUDA GPU "
                             f"(or this PyTorch was built without CUDA): use --device cpu or --device auto.")
        device = torch.device(name)
        if (device.index or 0) >= torch.cuda.device_count():
            raise SmollError(f"--device {name} was asked for, but this machine has "
                             f"{torch.cuda.device_count()} GPU(s): use cuda:0 to "
                             f"cuda:{torch.cuda.device_count() - 1}.")
        if torch.version.hip is None:  # ROCm names its GPU code differently
            problem = kernel_problem(torch.cuda.get_device_capability(device), torch.cuda.get_arch_list(),
                                     torch.cuda.get_device_name(device))
            if problem:
                raise SmollError(problem + (" Or pass --device cpu to run on the CPU." if auto else ""))
        return device
    if name == "mps" and not torch.backends.mps.is_available():
        raise SmollError("--device mps was asked for, but MPS is not available here: "
                         "use --device cpu or --device auto.")
    return torch.device(name)


# The oldest NVIDIA driver each CUDA major version runs on (CUDA's minor-version compatibility).
MIN_DRIVER = {11: 450, 12: 525, 13: 580}
OLD_GPU_INSTALL = "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126"


def cuda_problem(cuda_build, driver_version, gpu_present):
    """Why CUDA is unavailable although it may be wanted, as one sentence naming the fix; None when
    there is no NVIDIA GPU to use (or nothing smoll can say). Plain inputs, so tests can simulate
    any machine: cuda_build is torch.version.cuda ("13.0", or None for a CPU-only PyTorch),
    driver_version the NVIDIA driver's major version (or None)."""
    if not gpu_present:
        return None
    if cuda_build is None:
        return ("this machine has an NVIDIA GPU, but this PyTorch is a CPU-only build: install the "
                "CUDA build with `pip install -r cuda13_requirements.txt` (see the README's Install).")
    need = MIN_DRIVER.get(int(cuda_build.split(".")[0]))
    if driver_version is not None and need is not None and driver_version < need:
        return (f"this PyTorch is built for CUDA {cuda_build}, which needs NVIDIA driver {need} or "
                f"newer, but this machine has driver {driver_version}: update the driver, or install "
                f"the CUDA 12.6 build that older drivers run (`{OLD_GPU_INSTALL}`).")
    return None


def kernel_problem(capability, arch_list, name):
    """None if this PyTorch has GPU code for a device of this compute capability, else the fix.

    A kernel built for sm_XY runs on the same major version from minor Y up; PTX (compute_XY)
    is compiled at load time for any device from XY up."""
    cc = 10 * capability[0] + capability[1]
    for arch in arch_list:
        kind, _, version = arch.partition("_")
        code = int(version.rstrip("af"))
        if (kind == "sm" and code // 10 == capability[0] and code <= cc) or (kind == "compute" and code <= cc):
            return None
    return (f"the {name} (compute capability {capability[0]}.{capability[1]}) cannot run this PyTorch "
            f"build, which has no GPU code for it (\"no kernel image\"): install the CUDA 12.6 build, "
            f"which supports it: `{OLD_GPU_INSTALL}`.")


def nvidia_driver_version(path="/proc/driver/nvidia/version"):
    """The NVIDIA kernel driver's major version on Linux (580 for 580.65.06), or None."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        with open(path, encoding="utf-8") as f:
            return int(re.search(r"\s(\d{3,})\.\d+", f.readline()).group(1))
    return None


def nvidia_gpu_present():
    return os.path.exists("/proc/driver/nvidia/version") or shutil.which("nvidia-smi") is not None


def describe_device(device):
    """A human name for the device, for logs and checkpoints: "NVIDIA H100 80GB HBM3", "AMD EPYC ..."."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        return f"{cpu_info()[0]} CPU, {torch.get_num_threads()} threads"
    return device.type


def machine_fingerprint(device):
    """describe_device, and on a CPU what code built for it depends on: the architecture and a
    digest of the feature flags. Two CPUs can share a name ("AMD EPYC") and not their instructions,
    and code compiled for one of them can crash on the other."""
    if device.type != "cpu":
        return describe_device(device)
    flags = hashlib.sha256(" ".join(sorted(cpu_info()[1])).encode()).hexdigest()[:12]
    return f"{describe_device(device)}, {platform.machine()}, flags {flags}"


def cpu_info(path="/proc/cpuinfo"):
    """(the CPU's model name, the set of its feature flags), read from /proc/cpuinfo on Linux;
    elsewhere (macOS, Windows) the name the platform module knows, and no flags."""
    fields = {}
    with contextlib.suppress(OSError):
        with open(path, encoding="utf-8") as f:
            for line in f:  # the first processor's lines come first
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name") or platform.processor() or platform.machine()
    return name, set((fields.get("flags") or fields.get("Features") or "").split())


CPU_EXTENSIONS = {"avx2": "AVX2", "avx512f": "AVX512F", "avx512_bf16": "AVX512-BF16", "avx512_vnni": "AVX512-VNNI",
                  "amx_bf16": "AMX-BF16", "amx_int8": "AMX-INT8", "asimd": "NEON", "sve": "SVE", "bf16": "BF16"}


def cpu_extensions():
    """The vector and matrix extensions this CPU reports that matter to smoll's speed, by name
    ("AVX2", "AVX512-BF16", "AMX-BF16", "NEON", ...). Empty where the OS does not say (macOS)."""
    flags = cpu_info()[1]
    return [name for flag, name in CPU_EXTENSIONS.items() if flag in flags]


def cpu_has_fast_bf16():
    """True when the CPU has bf16 matrix instructions (AVX512-BF16 or AMX), where bf16 is ~2x fp32."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_info()[1])


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_dtype(device_type, capability=None, cpu_bf16=False):
    """The fastest precision a device runs natively, which is what --dtype auto means.

    CUDA: bfloat16 from compute capability 8.0 on (A100, RTX 30xx and later, H100). Older cards
    (T4, V100, RTX 20xx) only emulate bfloat16, but their tensor cores run float16 many times
    faster than float32: float16 there, with a gradient scaler in training. CPUs: bfloat16 with
    AVX512-BF16 or AMX instructions, float32 otherwise. Apple's MPS: float32.
    """
    if device_type == "cuda":
        return torch.bfloat16 if tuple(capability) >= (8, 0) else torch.float16
    if device_type == "cpu" and cpu_bf16:
        return torch.bfloat16
    return torch.float32


def resolve_dtype(name, device):
    """--dtype: float32, bfloat16, float16, or auto (pick_dtype for this device)."""
    if name != "auto":
        return DTYPES[name]
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    return pick_dtype(device.type, capability, device.type == "cpu" and cpu_has_fast_bf16())


def synchronize(device):
    """Wait for the device's queued work, so that a timing measures the work and not its queueing."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()

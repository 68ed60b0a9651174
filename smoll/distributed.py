"""The machine a run trains on, and torchrun: several processes training one model.

    setup_machine(config) -> Machine(device, dtype, rank, world_size, name)

    torchrun --nproc_per_node 4 train.py ...

Under torchrun every process (rank) runs the whole of train.py on its own batches, and DDP averages
the gradients during backward(). What that takes is here: joining the process group, the ranks
agreeing on when to stop (and a Ctrl-C becoming a request to stop), and gathering every rank's
random state into one checkpoint. Alone (no torchrun) each of these does nothing. (The first process
of each machine encodes a big text while the others wait: smoll/data.py.)
"""

import contextlib
import os
import signal
import sys
import threading
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from smoll.devices import describe_device, get_device, resolve_dtype
from smoll.files import SmollError


@dataclass(frozen=True)
class Machine:
    """Where a run trains: its device and precision, and which of torchrun's processes this is."""
    device: torch.device
    dtype: torch.dtype  # the forward pass's precision (autocast): what config.dtype ("auto", ...) means here
    rank: int  # this process's number under torchrun (0 alone): rank 0 saves and reports
    world_size: int  # how many processes train together (1 alone)
    name: str  # the device in words, for the log and the checkpoints: "AMD EPYC CPU, 2 threads"


def setup_machine(config):
    """The device (--device auto: cuda, then mps, then cpu) and its fastest precision (--dtype auto).
    Under torchrun, join the process group: NCCL on GPUs, gloo on CPUs."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if config.time_budget and world_size > 1:
        raise SmollError("--time_budget times a single process: under torchrun, use --max_iters.")
    device = get_device(config.device)
    rank = 0
    if world_size > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        elif device.type != "cpu":
            raise SmollError(f"torchrun needs CUDA GPUs or CPUs, not {device.type}: add --device cpu.")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        rank = dist.get_rank()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls for anything left in float32
        torch.backends.cudnn.allow_tf32 = True
    return Machine(device, resolve_dtype(config.dtype, device), rank, world_size, describe_device(device))


def wrap_ddp(model):
    """The model that DDP runs: it averages the gradients of all ranks during backward().
    Its buffers are the constant rotary tables, equal on every rank: no syncing at each step."""
    try:
        return DistributedDataParallel(model, forward_sync_buffers=False)
    except TypeError:  # PyTorch before 2.13 names the same setting broadcast_buffers
        return DistributedDataParallel(model, broadcast_buffers=False)


@contextlib.contextmanager
def ctrl_c_stops():
    """Turns the first Ctrl-C into a request to stop at the next step boundary (or in the middle
    of an evaluation): the flag it yields gets .requested = True, so the saved state is never half
    an optimizer step. A second Ctrl-C stops at once. SIGTERM (`kill`, a job scheduler, the
    explorer's Stop) and, on Windows, Ctrl-Break ask the same."""
    stop = SimpleNamespace(requested=False)

    def handle(signum, frame):
        if stop.requested:
            raise KeyboardInterrupt
        stop.requested = True
        said = "Ctrl-C" if signum == signal.SIGINT else "asked to stop"
        print(f"\n{said}: stopping and saving (Ctrl-C to quit at once)", file=sys.stderr, flush=True)

    # Signals can only be caught on the main thread. A process started with one of them ignored
    # (SIGINT in a background job, under nohup) keeps ignoring it.
    signals = [signal.SIGINT] + [getattr(signal, name) for name in ("SIGTERM", "SIGBREAK") if hasattr(signal, name)]
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {s: signal.signal(s, handle) for s in signals if signal.getsignal(s) is not signal.SIG_IGN}
    try:
        yield stop
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def stop_requested(stop, step, machine):
    """Whether to stop now (stop.requested: a Ctrl-C). Under torchrun every rank must stop at the
    same step, so the ranks agree every 10 steps (one tiny all-reduce); alone, a Ctrl-C takes effect
    at once."""
    if machine.world_size == 1:
        return stop.requested
    if step % 10 != 0:
        return False
    flag = torch.tensor([float(stop.requested)], device=machine.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def rng_states(machine, batch_rng, every_rank=True):
    """Every random number generator a run draws from (dropout's on the CPU and the GPU, and the
    batches'): this process's as a dict, or with every_rank, a list of every rank's in rank order
    (rank 0 saves them all, for --resume; under torchrun every rank must call it)."""
    rng = {"torch": torch.get_rng_state(), "batch": batch_rng.get_state()}
    if machine.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(machine.device)
    elif machine.device.type == "mps":
        rng["mps"] = torch.mps.get_rng_state()
    if not every_rank:
        return rng
    if machine.world_size == 1:
        return [rng]
    every = [None] * machine.world_size
    dist.all_gather_object(every, rng)
    return every


def set_rng_states(rng, machine, batch_rng):
    """Put back one rank's random states, as rng_states took them."""
    torch.set_rng_state(rng["torch"])
    batch_rng.set_state(rng["batch"])
    if machine.device.type == "cuda" and "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"], machine.device)
    elif machine.device.type == "mps" and "mps" in rng:
        torch.mps.set_rng_state(rng["mps"])


def barrier():
    """Wait for every rank."""
    dist.barrier()


def leave():
    """Leave the process group, whatever happened."""
    dist.destroy_process_group()

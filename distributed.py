"""torchrun: several processes training one model, on several GPUs or CPU processes.

    torchrun --nproc_per_node 4 train.py ...

Every process (rank) runs the whole of train.py on its own batches; DDP averages the gradients
during backward(). What that takes is here: joining the process group, one process per machine
encoding the text while the others wait, the ranks agreeing on when to stop, and gathering
every rank's random state into one checkpoint. Alone (no torchrun) each of these does nothing.
"""

import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from devices import get_device
from token_cache import load_tokens
from utils import SmollError


def setup_distributed(config):
    """Under torchrun, join the process group (NCCL on GPUs, gloo on CPUs).

    Returns (rank, world_size, device). Without torchrun: (0, 1, the configured device).
    """
    device = get_device(config.device)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise SmollError(f"torchrun needs CUDA GPUs or CPUs, not {device.type}: add --device cpu.")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world_size, device


def load_data(data_path, config, rank, world_size):
    """token_cache.load_tokens for every rank: under torchrun, each machine's first process
    encodes the text while the others wait, then they all read its token file."""
    if world_size == 1:
        return load_tokens(data_path, min_count=config.min_char_count)
    first = int(os.environ.get("LOCAL_RANK", "0")) == 0
    if not first:
        dist.barrier()
    try:
        return load_tokens(data_path, progress=rank == 0, min_count=config.min_char_count)
    finally:
        if first:
            dist.barrier()


def wrap_ddp(model):
    """The model that DDP runs: it averages the gradients of all ranks during backward().
    Its buffers are the constant rotary tables, equal on every rank: no syncing at each step."""
    try:
        return DistributedDataParallel(model, forward_sync_buffers=False)
    except TypeError:  # PyTorch before 2.13 names the same setting broadcast_buffers
        return DistributedDataParallel(model, broadcast_buffers=False)


def stop_requested(stop, step, world_size, device):
    """Whether to stop now. Under torchrun every rank must stop at the same step, so the ranks
    agree every 10 steps (one tiny all-reduce); alone, a Ctrl-C takes effect at once."""
    if world_size == 1:
        return stop.requested
    if step % 10 != 0:
        return False
    flag = torch.tensor([float(stop.requested)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def gather(obj, world_size):
    """Every rank's obj, as a list in rank order (rank 0 saves them all)."""
    objs = [None] * world_size
    dist.all_gather_object(objs, obj)
    return objs


def barrier():
    """Wait for every rank."""
    dist.barrier()


def leave():
    """Leave the process group, whatever happened."""
    dist.destroy_process_group()

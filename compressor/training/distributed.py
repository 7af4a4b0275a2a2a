"""Data-parallel runs under torchrun: which process this is, its share of the data, and
what rank 0 tells the other ranks.

Under ``torchrun`` every process runs the same script. The training stages run on every
rank, with the model in DistributedDataParallel and each rank on its own share of the
batches; everything else (pruning, export, quantization, measuring, writing) runs on rank 0
alone, which sends the other ranks the model before each training stage (`share`). One
process, without torchrun, runs exactly as before: nothing here is used.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import io
import os
from collections.abc import Iterable, Iterator
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch
from torch import distributed as dist
from torch import nn

from ..errors import UserError, first_line

if TYPE_CHECKING:
    from ..data import DataSpec

# A rank waits for rank 0 while it prunes, quantizes and measures alone: minutes on big
# models. A hang is still caught: torchrun stops every rank when one exits with an error.
TIMEOUT = timedelta(hours=2)


class DistributedError(UserError):
    """Rank 0 failed; the other ranks stop with its message."""


def launched() -> bool:
    """Whether this process is one of several (torchrun's WORLD_SIZE > 1, or a group exists)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup() -> bool:
    """Join torchrun's process group when launched by it; True when the run is data-parallel.

    Uses the group the script made itself when there is one; otherwise starts one from
    torchrun's environment (its rendezvous): gloo for CPU tensors, NCCL for CUDA ones, and
    destroys it when the process exits (a group left to the interpreter's teardown can abort
    the process after the run: "terminate called without an active exception").
    """
    if not launched():
        return False
    if not dist.is_initialized():
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank())
        dist.init_process_group(backend=backend, timeout=TIMEOUT)
        atexit.register(_close)
    return True


def _close() -> None:
    """Destroy the process group `setup` started, unless the script already did."""
    if dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    """Whether a process group of more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's global rank (0 when not data-parallel)."""
    return dist.get_rank() if active() else 0


def world_size() -> int:
    """How many ranks train together (1 when not data-parallel)."""
    return dist.get_world_size() if active() else 1


def local_rank() -> int:
    """This process's rank on its machine (torchrun's LOCAL_RANK; 0 without torchrun)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_follower() -> bool:
    """True on every rank but 0 of a running data-parallel group: it trains, writes nothing."""
    return active() and rank() != 0


def local_device(device: torch.device) -> torch.device:
    """``device`` for this rank: ``cuda`` means this machine's GPU number LOCAL_RANK."""
    if device.type == "cuda" and device.index is None and launched():
        return torch.device("cuda", local_rank())
    return device


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` in DistributedDataParallel (gradients averaged over the ranks).

    ``find_unused_parameters``: a model whose forward skips some parameters (auxiliary
    heads, a branch the data never takes) still trains; the cost is one graph walk a step.
    """
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)


def shard(data: DataSpec, seed: int) -> DataSpec:
    """This rank's share of ``data``'s batches.

    A DataLoader over a sized, map-style dataset is rebuilt with a DistributedSampler (the
    same batch size, workers and collate function; shuffled when the original shuffled), so
    each rank loads only its samples. Any other iterable of batches is dealt out: rank r
    takes batches r, r + N, r + 2N, ...
    """
    from torch.utils.data import DataLoader, IterableDataset, RandomSampler
    from torch.utils.data.distributed import DistributedSampler

    batches = data.batches
    n, r = world_size(), rank()
    if (
        isinstance(batches, DataLoader)
        and not isinstance(batches.dataset, IterableDataset)
        and hasattr(batches.dataset, "__len__")
        and batches.batch_size is not None
    ):
        sampler = DistributedSampler(
            batches.dataset,  # type: ignore[arg-type]
            num_replicas=n,
            rank=r,
            shuffle=isinstance(batches.sampler, RandomSampler),
            seed=seed,
            drop_last=batches.drop_last,
        )
        loader = DataLoader(
            batches.dataset,
            batch_size=batches.batch_size,
            sampler=sampler,
            num_workers=batches.num_workers,
            collate_fn=batches.collate_fn,
            pin_memory=batches.pin_memory,
            drop_last=batches.drop_last,
            timeout=batches.timeout,
            worker_init_fn=batches.worker_init_fn,
            multiprocessing_context=batches.multiprocessing_context,
            prefetch_factor=batches.prefetch_factor if batches.num_workers else None,
            persistent_workers=batches.persistent_workers,
        )
        return dataclasses.replace(data, batches=_Epochs(loader, sampler))
    return dataclasses.replace(data, batches=_DealtOut(batches, r, n))


class _Epochs:
    """A DataLoader with a DistributedSampler that draws a new order every pass."""

    def __init__(self, loader: Any, sampler: Any) -> None:
        self.loader, self.sampler, self.epoch = loader, sampler, 0

    def __iter__(self) -> Iterator[Any]:
        self.sampler.set_epoch(self.epoch)
        self.epoch += 1
        return iter(self.loader)

    def __len__(self) -> int:
        return len(self.loader)


class _DealtOut:
    """Batches ``rank``, ``rank + world``, ... of a re-iterable of batches."""

    def __init__(self, batches: Iterable[Any], rank: int, world: int) -> None:
        self.batches, self.rank, self.world = batches, rank, world

    def __iter__(self) -> Iterator[Any]:
        for i, batch in enumerate(self.batches):
            if i % self.world == self.rank:
                yield batch

    def __len__(self) -> int:
        total = len(self.batches)  # type: ignore[arg-type]  # TypeError: length unknown
        return total // self.world + (1 if self.rank < total % self.world else 0)


def same_buffers(model: nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm statistics of its own last batches)."""
    if active():
        for buffer in model.buffers():
            dist.broadcast(buffer.data, src=0)


def all_sum(values: list[float]) -> list[float]:
    """``values`` summed over the ranks (unchanged when not data-parallel)."""
    if not active():
        return values
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor)
    return tensor.tolist()


def all_min(values: list[float]) -> list[float]:
    """The smallest of ``values`` over the ranks, element by element."""
    if not active():
        return values
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return tensor.tolist()


def share(value: Any = None) -> Any:
    """Rank 0's ``value`` on every rank (tensors and plain data; the others pass nothing).

    It travels as bytes that load with ``weights_only=True``: no pickled code.
    """
    holder: list[Any] = [None]
    if rank() == 0:
        buffer = io.BytesIO()
        torch.save(value, buffer)
        holder[0] = buffer.getvalue()
    dist.broadcast_object_list(holder, src=0)
    if rank() == 0:
        return value
    return torch.load(io.BytesIO(holder[0]), map_location="cpu", weights_only=True)


def send_error(exc: BaseException) -> None:
    """Rank 0: tell the other ranks it failed, so they stop with its message."""
    # when the others are gone already, rank 0's own error is what matters
    with contextlib.suppress(Exception):
        share({"kind": "error", "message": f"rank 0 failed: {first_line(exc)}"})

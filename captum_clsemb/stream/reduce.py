"""Streaming sums with exact reduction across ``torch.distributed`` ranks."""

from __future__ import annotations

from collections.abc import Iterator, Sized
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import Sampler

T = TypeVar("T")


def world() -> tuple[int, int]:
    """(rank, world_size) of the initialised process group, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_objects(obj: T) -> list[T]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` without a process group."""
    rank, size = world()
    if size == 1:
        return [obj]
    out: list = [None] * size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank ``src``'s ``obj`` on every rank; ``obj`` itself without a process group."""
    rank, size = world()
    if size == 1:
        return obj
    box = [obj if rank == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


class ShardSampler(Sampler[int]):
    r"""Deterministic shard of a dataset for one rank: indices ``rank, rank + world, ...``.

    Unlike :class:`torch.utils.data.DistributedSampler` it never pads the dataset with
    repeated samples, so that sums reduced over ranks equal the single-process sums exactly.
    """

    def __init__(self, dataset: Sized, rank: int | None = None, world_size: int | None = None) -> None:
        r, w = world()
        self.rank = r if rank is None else rank
        self.world_size = w if world_size is None else world_size
        self.n = len(dataset)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.n, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world_size))


class StreamingSums:
    r"""Named running sums (float64) whose memory does not grow with the number of images.

    ``add`` accumulates; ``all_reduce`` sums over ``torch.distributed`` ranks (gloo on CPU,
    nccl on GPU) in a fixed name order, so every rank ends with the totals of the whole set.
    """

    def __init__(self) -> None:
        self._sums: dict[str, Tensor] = {}

    def add(self, name: str, value: Tensor | float | int) -> None:
        v = torch.as_tensor(value).detach().to("cpu", torch.float64)
        self._sums[name] = self._sums[name] + v if name in self._sums else v.clone()

    def __getitem__(self, name: str) -> Tensor:
        return self._sums[name]

    def __contains__(self, name: str) -> bool:
        return name in self._sums

    def all_reduce(self) -> StreamingSums:
        rank, size = world()
        if size == 1:
            return self
        backend = dist.get_backend()
        device = (
            torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        )
        # every rank must reduce the same names, in the same order, with the same shapes
        names: list[list[str]] = [None] * size  # type: ignore[list-item]
        dist.all_gather_object(names, sorted(self._sums))
        if any(n != names[0] for n in names):
            raise RuntimeError(f"ranks accumulated different quantities: {names}")
        for name in names[0]:
            t = self._sums[name].to(device)
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            self._sums[name] = t.cpu()
        return self

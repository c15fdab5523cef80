"""Run under torchrun by tests/stream/test_distributed.py: dataset identifiability on a shard per rank."""

import json
import sys

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, TensorDataset

from captum_clsemb.stream import ShardSampler, dataset_identifiability


def dataset() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(23, 3, 32, 32, generator=g)  # 23: not divisible by the world size
    y = torch.randint(0, 7, (23,), generator=g)
    y[::5] = -1  # unlabelled images: their predicted class is scored
    return TensorDataset(x, y)


if __name__ == "__main__":
    sys.path.insert(0, sys.argv[2])  # tests/ for the conftest model builders
    from conftest import small_timm

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    ds = dataset()
    loader = DataLoader(ds, batch_size=4, sampler=ShardSampler(ds))
    result = dataset_identifiability(small_timm(), loader)
    if dist.get_rank() == 0:
        with open(sys.argv[1], "w") as fh:
            json.dump(result, fh)
    dist.destroy_process_group()

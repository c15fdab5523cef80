"""Dataset-level runs: streaming accumulators and exact multi-process reduction."""

from captum_clsemb.stream.identifiability import (
    IdentifiabilityAccumulator,
    dataset_identifiability,
    score_batch,
)
from captum_clsemb.stream.reduce import (
    ShardSampler,
    StreamingSums,
    broadcast_object,
    gather_objects,
    world,
)

__all__ = [
    "IdentifiabilityAccumulator",
    "dataset_identifiability",
    "score_batch",
    "ShardSampler",
    "StreamingSums",
    "world",
    "gather_objects",
    "broadcast_object",
]

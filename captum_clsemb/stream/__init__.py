"""Dataset-level runs: streaming accumulators and exact multi-process reduction."""

from captum_clsemb.stream.identifiability import (
    IdentifiabilityAccumulator,
    dataset_identifiability,
    score_batch,
)
from captum_clsemb.stream.reduce import ShardSampler, StreamingSums, world

__all__ = [
    "IdentifiabilityAccumulator",
    "dataset_identifiability",
    "score_batch",
    "ShardSampler",
    "StreamingSums",
    "world",
]

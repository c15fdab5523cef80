"""A named activation cache: everything one traced forward recorded, by name."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

# What a traced forward can record per block, with shapes (N examples, T tokens, d dims,
# H heads, M MLP hidden units).
RECORDABLE: dict[str, str] = {
    "resid_pre": "residual stream entering the block (N, T, d)",
    "resid_mid": "residual stream after the attention sub-layer (N, T, d)",
    "resid_post": "residual stream after the MLP sub-layer, i.e. the block output (N, T, d)",
    "attn_out": "attention sub-layer output as added to the residual (N, T, d)",
    "mlp_out": "MLP sub-layer output as added to the residual (N, T, d)",
    "attn_probs": "attention probabilities after any edit (N, H, T, T)",
    "attn_keys": "attention key coefficients: per-head attention-weighted values, input of the output projection (N, T, H*head_dim)",
    "mlp_keys": "MLP key coefficients: activation output of the first MLP layer (N, T, M)",
}


class ActivationCache:
    r"""Activations recorded by :func:`captum_clsemb.trace.trace`, keyed ``"blocks.{b}.{kind}"``.

    Index with a full name (``cache["blocks.3.attn_probs"]``) or ``(kind, block)``
    (``cache["resid_post", -1]``); :meth:`stack` returns one kind over all recorded blocks.
    """

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._store: dict[str, Tensor] = {}

    def _name(self, key: str | tuple[str, int]) -> str:
        if isinstance(key, tuple):
            kind, block = key
            if kind not in RECORDABLE:
                raise KeyError(f"unknown activation kind {kind!r}; choose from {sorted(RECORDABLE)}")
            block = block % self.num_blocks
            return f"blocks.{block}.{kind}"
        return key

    def __setitem__(self, key: str | tuple[str, int], value: Tensor) -> None:
        self._store[self._name(key)] = value

    def __getitem__(self, key: str | tuple[str, int]) -> Tensor:
        name = self._name(key)
        if name not in self._store:
            raise KeyError(f"{name!r} was not recorded; pass record=[...] with its kind to trace()")
        return self._store[name]

    def __contains__(self, key: object) -> bool:
        return isinstance(key, (str, tuple)) and self._name(key) in self._store  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[str]:
        return iter(self._store)

    def __len__(self) -> int:
        return len(self._store)

    def keys(self) -> list[str]:
        return list(self._store)

    def stack(self, kind: str) -> Tensor:
        """One kind over all blocks, stacked on dim 1: (N, num_blocks, ...)."""
        return torch.stack([self[kind, b] for b in range(self.num_blocks)], dim=1)

    def __repr__(self) -> str:
        return f"ActivationCache({len(self)} tensors: {', '.join(list(self._store)[:6])}{', ...' if len(self) > 6 else ''})"

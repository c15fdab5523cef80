r"""Attention-probability edits applied during a traced forward.

An edit is any callable ``edit(block: int, probs: Tensor) -> Tensor`` taking the attention
probabilities of one block, (N, heads, T, T) with queries on dim 2, and returning the
probabilities to use instead. The built-ins reproduce the paper's perturbations (Sec. 5).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor

AttentionEdit = Callable[[int, Tensor], Tensor]


class SelfOnly:
    r"""Image tokens attend only to themselves: each image-token query row becomes one-hot at
    its own position (attention to the class and other prefix tokens removed too), so rows
    still sum to 1. Prefix-token rows are unchanged. This is the authors' ``self_only``.

    Args:
        num_prefix_tokens: tokens before the patches (class/distillation/register).
        blocks: blocks to edit (default: all).
    """

    def __init__(self, num_prefix_tokens: int, blocks: Iterable[int] | None = None) -> None:
        self.num_prefix_tokens = num_prefix_tokens
        self.blocks = None if blocks is None else set(blocks)

    def __call__(self, block: int, probs: Tensor) -> Tensor:
        if self.blocks is not None and block not in self.blocks:
            return probs
        p = self.num_prefix_tokens
        t = probs.shape[-1]
        eye = torch.eye(t, dtype=probs.dtype, device=probs.device)[p:]
        out = probs.clone()
        out[:, :, p:, :] = eye
        return out


class NoClassToken:
    r"""Image tokens do not attend to the class token: the class-token column of image-token
    query rows is set to 0. With ``renormalize=False`` (the authors' ``no_cls``, default) the
    rows then sum to less than 1; with ``renormalize=True`` they are rescaled to sum to 1.

    Args:
        class_token_index: position of the class token.
        num_prefix_tokens: tokens before the patches.
        renormalize: rescale edited rows to sum to 1. Default: False.
        blocks: blocks to edit (default: all).
    """

    def __init__(
        self,
        class_token_index: int,
        num_prefix_tokens: int,
        renormalize: bool = False,
        blocks: Iterable[int] | None = None,
    ) -> None:
        self.class_token_index = class_token_index
        self.num_prefix_tokens = num_prefix_tokens
        self.renormalize = renormalize
        self.blocks = None if blocks is None else set(blocks)

    def __call__(self, block: int, probs: Tensor) -> Tensor:
        if self.blocks is not None and block not in self.blocks:
            return probs
        out = probs.clone()
        out[:, :, self.num_prefix_tokens :, self.class_token_index] = 0
        if self.renormalize:
            rows = out[:, :, self.num_prefix_tokens :]
            out[:, :, self.num_prefix_tokens :] = rows / rows.sum(-1, keepdim=True)
        return out


BUILTIN_EDITS = ("self_only", "no_cls")

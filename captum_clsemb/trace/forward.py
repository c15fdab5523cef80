"""One batched decomposed forward that records activations by name, with interventions."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from captum_clsemb.adapters import ModelAdapter, adapt
from captum_clsemb.adapters.base import BlockParts
from captum_clsemb.errors import InputValidationError
from captum_clsemb.trace.cache import RECORDABLE, ActivationCache
from captum_clsemb.trace.interventions import BUILTIN_EDITS, AttentionEdit, NoClassToken, SelfOnly

BlockCallback = Callable[[int, dict[str, Tensor]], None]


@dataclass
class Trace:
    r"""Result of :func:`trace`.

    Attributes:
        logits: model logits (N, num_classes), equal to ``model(x)`` without interventions.
        cache: the recorded activations.
        token_index: (N, T') model-order index (prefix tokens first, then patches in raster
            order) of each position of the traced sequence; differs from ``arange`` only
            when tokens were dropped.
        num_prefix_tokens: number of prefix tokens at the start of the sequence.
    """

    logits: Tensor
    cache: ActivationCache
    token_index: Tensor
    num_prefix_tokens: int


def resolve_attention_edit(
    attention_edit: str | AttentionEdit | None, adapter: ModelAdapter, blocks: Iterable[int] | None = None
) -> AttentionEdit | None:
    """Turn ``"self_only"`` / ``"no_cls"`` into edit objects; pass callables through."""
    if attention_edit is None:
        return None
    if isinstance(attention_edit, str):
        if attention_edit == "self_only":
            return SelfOnly(adapter.num_prefix_tokens, blocks)
        if attention_edit == "no_cls":
            return NoClassToken(adapter.class_token_index, adapter.num_prefix_tokens, blocks=blocks)
        raise InputValidationError(
            f"unknown attention_edit {attention_edit!r}; use one of {BUILTIN_EDITS} or a callable (block, probs) -> probs"
        )
    if not callable(attention_edit):
        raise InputValidationError("attention_edit must be a name or a callable (block, probs) -> probs")
    if blocks is None:
        return attention_edit
    chosen = set(blocks)

    def edit(block: int, probs: Tensor) -> Tensor:
        return attention_edit(block, probs) if block in chosen else probs

    return edit


def keep_token_index(adapter: ModelAdapter, keep_tokens: Tensor, num_examples: int) -> Tensor:
    r"""Sequence positions to keep, (N, prefix + K), from per-example image-token indices.

    ``keep_tokens`` is (N, K) (or (K,) for all examples) of patch indices in 0..P-1, or a
    boolean mask (N, P) with the same number of kept patches per example. Prefix tokens are
    always kept. Positions are returned in model order.
    """
    p, num_patches = adapter.num_prefix_tokens, adapter.num_patches
    if not isinstance(keep_tokens, Tensor):
        keep_tokens = torch.as_tensor(keep_tokens)
    if keep_tokens.dtype == torch.bool:
        if keep_tokens.dim() == 1:
            keep_tokens = keep_tokens.expand(num_examples, -1)
        if keep_tokens.shape != (num_examples, num_patches):
            raise InputValidationError(
                f"a boolean keep_tokens mask must have shape (N, num_patches) = ({num_examples}, {num_patches}), "
                f"got {tuple(keep_tokens.shape)}"
            )
        counts = keep_tokens.sum(1)
        if (counts != counts[0]).any():
            raise InputValidationError(
                "keep_tokens must keep the same number of patches in every example (the sequence is batched); "
                f"got counts {counts.tolist()}"
            )
        idx = torch.arange(num_patches, device=keep_tokens.device).expand(num_examples, -1)
        keep_tokens = idx[keep_tokens].view(num_examples, int(counts[0]))
    if keep_tokens.dtype not in (torch.int64, torch.int32):
        raise InputValidationError(
            f"keep_tokens must hold integer patch indices or be a bool mask, got {keep_tokens.dtype}"
        )
    if keep_tokens.dim() == 1:
        keep_tokens = keep_tokens.expand(num_examples, -1)
    if keep_tokens.dim() != 2 or keep_tokens.shape[0] != num_examples:
        raise InputValidationError(
            f"keep_tokens must be (N, K) with N = {num_examples} examples, got shape {tuple(keep_tokens.shape)}"
        )
    if keep_tokens.numel() and (keep_tokens.min() < 0 or keep_tokens.max() >= num_patches):
        raise InputValidationError(f"keep_tokens indices must be patch indices in 0..{num_patches - 1}")
    kept = keep_tokens.long().sort(dim=1).values
    if kept.shape[1] > 1 and (kept[:, 1:] == kept[:, :-1]).any():
        raise InputValidationError("keep_tokens contains a repeated patch index")
    prefix = torch.arange(p, device=kept.device).expand(num_examples, -1)
    return torch.cat([prefix, kept + p], dim=1)


def run_block(
    parts: BlockParts,
    x: Tensor,
    block: int,
    kinds: frozenset[str],
    edit: AttentionEdit | None = None,
    token_index: Tensor | None = None,
    internals: dict[str, Tensor] | None = None,
    query_prefix: int | None = None,
    prob_rows: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """One block of the decomposed forward; returns the block output and the requested kinds.

    ``token_index`` is the model-order index (N, T') of the sequence's tokens when tokens were
    dropped (None: the full sequence); position-dependent parts (``rope``, ``attn_bias``) read it.

    When nothing reads or edits the attention probabilities (no ``"attn_probs"`` in ``kinds``,
    no ``edit``, no ``internals``), attention runs as one fused
    :func:`torch.nn.functional.scaled_dot_product_attention` call (the bias as an additive
    float mask), which never materialises the (N, heads, T, T) probabilities. Otherwise the
    probabilities are computed explicitly.

    ``internals``, when given, is filled with the block's intermediate tensors for methods
    that need more than the recordable kinds (LRP): ``q``, ``k``, ``v`` (N, heads, T, head_dim,
    after any rope), ``attn_probs``, ``attn_keys`` (the attention output A v, (N, T,
    heads*head_dim)), ``proj_in``, ``proj_out`` (before ``attn_post``), ``attn_out``,
    ``resid_mid``, ``fc1_out`` (before the activation; absent when ``parts.mlp_in`` is set),
    ``fc2_in``, ``fc2_out`` (before ``mlp_post``), ``mlp_out``. Otherwise every intermediate
    is released as soon as it is used, so the peak memory is that of the model's own block.

    ``query_prefix``, when given, computes the block's output only for the first
    ``query_prefix`` tokens (queries; keys and values still come from the whole sequence), as
    the last block needs for a classifier that reads only prefix tokens. The output and every
    recorded kind and internal then hold only those tokens, except ``resid_pre``, ``k`` and
    ``v``; attention probabilities are (N, heads, query_prefix, T).

    ``prob_rows``, when given, also returns ``acts["attn_prob_rows"]``: the attention
    probabilities of the first ``prob_rows`` query tokens, (N, heads, prob_rows, T), computed on
    their own when the attention itself runs fused (for methods that read only the prefix
    tokens' rows, e.g. the class token's).
    """
    acts: dict[str, Tensor] = {}
    if "resid_pre" in kinds:
        acts["resid_pre"] = x
    # Intermediates go to `internals` when asked for; otherwise each is freed as soon as it is used.
    stash = internals.__setitem__ if internals is not None else _discard
    n, t, _ = x.shape
    q, k, v = parts.qkv(parts.norm1(x))
    if parts.rope is not None:
        q, k = parts.rope(q, k, token_index)
    if query_prefix is not None:
        q, x = q[:, :, :query_prefix], x[:, :query_prefix]
        t = query_prefix
    if internals is not None:
        internals.update(q=q, k=k, v=v)
    if "attn_probs" in kinds or edit is not None or internals is not None:
        bias = None if parts.attn_bias is None else _query_rows(parts.attn_bias(token_index), query_prefix)
        probs = _attention_probs(parts, q, k, bias)
        if edit is not None:
            edited = edit(block, probs)
            if not isinstance(edited, Tensor) or edited.shape != probs.shape:
                raise InputValidationError(
                    f"attention_edit must return a tensor of shape {tuple(probs.shape)} for block {block}"
                )
            probs = edited
        if "attn_probs" in kinds:
            acts["attn_probs"] = probs
        if prob_rows is not None:
            acts["attn_prob_rows"] = probs[:, :, :prob_rows]
        stash("attn_probs", probs)
        heads_out = probs @ v
        del probs
    else:
        # Fused attention: the probabilities are neither read nor edited.
        bias = (
            None
            if parts.attn_bias is None
            else _query_rows(parts.attn_bias(token_index), query_prefix).to(q.dtype)
        )
        heads_out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=parts.scale)
        if prob_rows is not None:  # the first rows on their own
            rows_bias = None if bias is None else _query_rows(bias, prob_rows)
            acts["attn_prob_rows"] = _attention_probs(parts, q[:, :, :prob_rows], k, rows_bias)
    del q, k, v
    z = heads_out.transpose(1, 2).reshape(n, t, -1)
    del heads_out
    if "attn_keys" in kinds:
        acts["attn_keys"] = z
    stash("attn_keys", z)
    proj_in = parts.attn_out_norm(z)
    del z
    stash("proj_in", proj_in)
    proj_out = parts.proj(proj_in)
    del proj_in
    stash("proj_out", proj_out)
    attn_out = parts.attn_post(proj_out)
    del proj_out
    stash("attn_out", attn_out)
    if "attn_out" in kinds:
        acts["attn_out"] = attn_out
    mid = x + attn_out
    del attn_out, x
    stash("resid_mid", mid)
    if "resid_mid" in kinds:
        acts["resid_mid"] = mid
    if parts.mlp_in is None:
        fc1_out = parts.fc1(parts.norm2(mid))
        stash("fc1_out", fc1_out)
        keys = parts.act(fc1_out)
        del fc1_out
    else:
        keys = parts.mlp_in(parts.norm2(mid))
    if "mlp_keys" in kinds:
        acts["mlp_keys"] = keys
    fc2_in = parts.mlp_mid_norm(keys)
    del keys
    stash("fc2_in", fc2_in)
    fc2_out = parts.fc2(fc2_in)
    del fc2_in
    stash("fc2_out", fc2_out)
    mlp_out = parts.mlp_post(fc2_out)
    del fc2_out
    stash("mlp_out", mlp_out)
    if "mlp_out" in kinds:
        acts["mlp_out"] = mlp_out
    out = mid + mlp_out
    if "resid_post" in kinds:
        acts["resid_post"] = out
    return out, acts


def classifier_prefix(adapter: ModelAdapter) -> int | None:
    """How many leading tokens a class-token classifier reads (class and distillation tokens), or
    None when it reads them all (global average pooling)."""
    if adapter.pooling != "token" or not adapter.has_class_token:
        return None
    last = adapter.class_token_index
    if adapter.head_dist is not None:
        last = max(last, adapter.prefix_tokens.index("dist"))
    return last + 1


def _discard(name: str, value: Tensor) -> None:
    pass


def _attention_probs(parts: BlockParts, q: Tensor, k: Tensor, bias: Tensor | None) -> Tensor:
    """softmax(q k^T scale + bias) as the model computes it (scale before or after the product)."""
    if parts.scale_before_matmul:
        scores = (q * parts.scale) @ k.transpose(-2, -1)
    else:
        scores = (q @ k.transpose(-2, -1)) * parts.scale
    if bias is not None:
        scores = scores + bias
    return scores.softmax(dim=-1)


def _query_rows(bias: Tensor, query_prefix: int | None) -> Tensor:
    """The rows of an attention bias (..., T, T) for the first ``query_prefix`` queries."""
    if query_prefix is None or bias.dim() < 2 or bias.shape[-2] == 1:
        return bias
    return bias[..., :query_prefix, :]


def _record_kinds(record: str | Iterable[str]) -> frozenset[str]:
    if record == "all":
        return frozenset(RECORDABLE)
    kinds = frozenset([record] if isinstance(record, str) else record)
    unknown = kinds - set(RECORDABLE)
    if unknown:
        raise InputValidationError(
            f"cannot record {sorted(unknown)}; choose from {sorted(RECORDABLE)} or 'all'"
        )
    return kinds


def trace(
    model: nn.Module | ModelAdapter,
    inputs: Tensor,
    record: str | Iterable[str] = (),
    attention_edit: str | AttentionEdit | None = None,
    edit_blocks: Iterable[int] | None = None,
    keep_tokens: Tensor | None = None,
    on_block: BlockCallback | None = None,
    store: bool = True,
    grad: bool = False,
    record_blocks: Iterable[int] | None = None,
) -> Trace:
    r"""Run one batched decomposed forward, recording activations by name.

    The forward recomputes every block from the model's own modules, so it needs no hooks
    and leaves the model's fused-attention settings alone. Attention probabilities are made
    explicit only in blocks that record or edit them; the other blocks run PyTorch's fused
    ``scaled_dot_product_attention``, which never materialises the (N, heads, T, T) matrix.
    Without interventions, ``trace(model, x).logits`` equals ``model(x)`` (eval mode).
    The model is put in eval mode for the pass and its per-module train/eval flags are
    restored afterwards, also when an error is raised.

    Args:
        model: a supported ViT or its adapter.
        inputs: images (N, C, H, W), preprocessed for the model.
        record: kinds to record per block (see ``RECORDABLE``), or ``"all"``. Default: none.
        attention_edit: ``"self_only"``, ``"no_cls"`` or a callable ``(block, probs) -> probs``
            editing the attention probabilities (N, heads, T, T) of each block.
        edit_blocks: restrict the edit to these blocks. Default: all blocks.
        keep_tokens: drop tokens from the sequence after the position embedding: per-example
            patch indices to keep (N, K), or a boolean mask (N, num_patches). Prefix tokens
            are always kept.
        on_block: called as ``on_block(block, activations)`` after each block with the
            recorded kinds of that block, for streaming consumers.
        store: keep the recorded activations in the returned cache. Set False with
            ``on_block`` to hold only one block at a time.
        grad: build the autograd graph (for gradient methods). Default: False (no_grad).
        record_blocks: record ``record`` only in these blocks (negatives count from the end);
            the other blocks record nothing (and, unless edited, use fused attention), and
            ``on_block`` gets an empty dict for them. Default: all blocks.
    Returns:
        :class:`Trace` with logits, cache and token index.

    Examples::

        >>> tr = trace(model, x, record=["resid_post", "attn_probs"])
        >>> tr.cache["resid_post", -1].shape     # (N, T, d)
        >>> tr.cache.stack("attn_probs").shape   # (N, blocks, heads, T, T)
    """
    adapter = adapt(model)
    x = adapter.check_inputs(inputs)
    kinds = _record_kinds(record)
    if edit_blocks is not None:
        edit_blocks = list(edit_blocks)  # read twice below
    edit = resolve_attention_edit(attention_edit, adapter, edit_blocks)
    nb = adapter.num_blocks
    edited = None if edit is None or edit_blocks is None else set(edit_blocks)
    if record_blocks is None:
        recorded = set(range(nb))
    else:
        recorded = set()
        for b in record_blocks:
            if isinstance(b, bool) or not isinstance(b, int) or not -nb <= b < nb:
                raise InputValidationError(
                    f"record_blocks must hold block indices in {-nb}..{nb - 1} (the model has {nb} blocks), "
                    f"got {b!r}"
                )
            recorded.add(b % nb)
    n = x.shape[0]
    cache = ActivationCache(adapter.num_blocks)
    with adapter.eval_mode(), torch.set_grad_enabled(grad):
        h = adapter.embed(x)
        token_index = torch.arange(h.shape[1], device=h.device).expand(n, -1)
        dropped = None  # the index position-dependent block parts read; None for the full sequence
        if keep_tokens is not None:
            token_index = keep_token_index(adapter, keep_tokens.to(h.device), n)
            h = h.gather(1, token_index.unsqueeze(-1).expand(-1, -1, h.shape[-1]))
            dropped = token_index
        for b in range(nb):
            block_kinds = kinds if b in recorded else frozenset()
            block_edit = edit if edited is None or b in edited else None  # unedited blocks may fuse
            # The last block, when nothing reads it, only for the tokens the classifier reads.
            prefix = (
                classifier_prefix(adapter) if b == nb - 1 and not block_kinds and block_edit is None else None
            )
            h, acts = run_block(
                adapter.block(b), h, b, block_kinds, block_edit, token_index=dropped, query_prefix=prefix
            )
            if on_block is not None:
                on_block(b, acts)
            if store:
                for kind, value in acts.items():
                    cache[kind, b] = value
        logits = adapter.classify(h)
    return Trace(
        logits=logits, cache=cache, token_index=token_index, num_prefix_tokens=adapter.num_prefix_tokens
    )

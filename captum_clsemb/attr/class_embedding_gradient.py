"""Block- and head-specific class-embedding gradients (Vilas et al., NeurIPS 2023, Sec. 7)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import torch
from captum.attr import GradientAttribution
from captum.log import log_usage
from torch import Tensor, nn

from captum_clsemb.adapters import ModelAdapter, adapt
from captum_clsemb.adapters.base import BlockParts
from captum_clsemb.attr._explanation_utils import (
    InputShape,
    MultiTargetType,
    batch_slices,
    captum_attribute,
    check_batch_size,
    check_interpolate_to,
    format_targets,
    require_class_token,
    select_indices,
    upsample,
)
from captum_clsemb.errors import InputValidationError
from captum_clsemb.trace import run_block

RETURN_PER = ("global", "block", "head")
SOURCES = ("resid", "attn", "authors")


class ClassEmbeddingGradient(GradientAttribution):
    r"""How much more attention from the class token to each image token would raise the
    class-token's representation of a class, at every block and head (paper Sec. 7).

    For block :math:`b`, the class token's state is projected onto the class embedding
    space through the model's own classification path (the adapter's lens
    :meth:`~captum_clsemb.adapters.ModelAdapter.project`: final norm, then the head with
    its bias) and scored by the cross-entropy of the target class :math:`c`:

    .. math::
        \ell_b = -\log \operatorname{softmax}\big(\mathrm{lens}(x^b_{cls})\big)_c ,
        \qquad
        \mathrm{attr}_{b,h,j} = -\frac{\partial \ell_b}{\partial A_b[h, cls, j]}

    for image tokens :math:`j` (class, distillation and register tokens are excluded), with
    :math:`A_b` block :math:`b`'s post-softmax attention probabilities. Positive values mark
    tokens to which more attention would lower the loss, i.e. increase the class.

    ``source`` chooses the state :math:`x^b_{cls}`:

    - ``"resid"`` (default, the paper's definition): the class token's residual stream after
      block :math:`b` (``resid_post``).
    - ``"attn"``: the attention sub-layer's output at the class token, as added to the
      residual (``attn_out``, incl. layer scale). This is what the authors' code
      (``vit_edited.Block.attn_cls``) projects.
    - ``"authors"``: the authors' code exactly, to reproduce their perturbation numbers:
      the ``"attn"`` state, projected, then **softmax applied twice**,
      :math:`\ell_b = \mathrm{CrossEntropyLoss}(\operatorname{softmax}(\mathrm{lens}(\cdot)), c)
      = -\log \operatorname{softmax}\big(\operatorname{softmax}(\mathrm{lens}(\cdot))\big)_c`
      (``gradients.ViTGradients``). This is the behaviour of their code, not the paper's
      definition: the inner softmax squashes the logits into [0, 1], so the loss barely
      varies with them (it lies between :math:`\log(C - 1 + e) - 1` and
      :math:`\log(C - 1 + e)` for :math:`C` classes) and its gradients are much smaller and shaped differently.

    Differences from the authors' code (``"resid"`` and ``"attn"``): a single log-softmax
    (their loss applies softmax twice, which ``"authors"`` reproduces), and, for every
    source, one batched pass instead of one backward per token, block and image.

    **How one pass gives every block and head.** :math:`\ell_b` depends on :math:`A_b` only
    through the class-token row of :math:`A_b` (nothing after the attention mixes tokens
    within a block), so the local gradient of :math:`\ell_b` with respect to that row equals
    the full-graph gradient. One no-grad forward (with fused attention) takes, for each block,
    the class-token attention row (computed on its own), the values ``V`` and the class
    token's residual state; then each block's class-token path (attention-weighted values ->
    output projection -> residual -> MLP -> residual -> lens -> cross-entropy) is recomputed
    for that single token from those detached tensors, with the row as a leaf, and
    differentiated: :math:`\partial \ell_b / \partial A_b[h,cls,j] = g^h_b \cdot v^h_{b,j}`.
    With a given target this happens right after the block's forward. The cost is about one
    forward pass plus a per-block computation on one token. Parameters' ``.grad`` are never
    touched.

    Models without a class token (global average pooling) raise
    :class:`~captum_clsemb.errors.InputValidationError`: the method explains the class
    token. For DeiT-distilled models the class token is projected through the class head
    (``adapter.project(head="cls")``); ``target=None`` still uses the model's prediction.

    Args:
        forward_func: a supported timm or Hugging Face ViT (or its adapter).

    Examples::

        >>> import timm
        >>> from captum_clsemb.attr.class_embedding_gradient import ClassEmbeddingGradient
        >>> model = timm.create_model("vit_base_patch32_224", pretrained=False).eval()
        >>> ceg = ClassEmbeddingGradient(model)
        >>> ceg.attribute(images, target=labels).shape                  # (N, 1, 7, 7)
        >>> ceg.attribute(images, target=labels, return_per="head").shape  # (N, 12, 12, 7, 7)
        >>> ceg.attribute(images, target=[[1, 2], [3, 4]]).shape          # (2, 2, 1, 7, 7): K=2
        >>> ceg.attribute(images, interpolate_to=(224, 224)).shape        # (N, 1, 224, 224)
        >>> ceg.attribute(images, interpolate_to="input").shape           # (N, 3, 224, 224)
        >>> ceg.attribute((images,), target=labels)[0].shape              # tuple in, tuple out
    """

    def __init__(self, forward_func: nn.Module | ModelAdapter) -> None:
        self.adapter = adapt(forward_func)
        GradientAttribution.__init__(self, self.adapter.model)

    @log_usage(part_of_slo=True)
    @captum_attribute
    def attribute(
        self,
        inputs: Tensor | tuple[Tensor],
        target: MultiTargetType = None,
        additional_forward_args: None = None,
        return_per: str = "global",
        blocks: int | Iterable[int] | None = None,
        heads: int | Iterable[int] | None = None,
        source: str = "resid",
        interpolate_to: Sequence[int] | str | None = None,
        internal_batch_size: int | None = None,
    ) -> Tensor | tuple[Tensor]:
        r"""
        Args:
            inputs: images (N, C, H, W) preprocessed for the model, or a 1-tuple
                ``(images,)`` (Captum's form; the result is then a 1-tuple too).
            target: class(es) to explain.

                - One class per image, in Captum's forms: an int or a 1-tuple ``(c,)`` (all
                  images), a list of N ints, a tensor (N,) or (N, 1), a list of N 1-tuples;
                  None uses the model's predicted class.
                - Several classes per image, K >= 2: a 2-D integer tensor (N, K) or a list
                  of N lists (or tuples) of K ints. The output then has a K dimension after
                  N. (A single column, (N, 1) or 1-tuples, is one class per image as in
                  Captum, without that dimension.)
            additional_forward_args: must be None (Captum's argument; the models take
                images only).
            return_per: ``"global"`` sums over the selected blocks and heads (the paper's
                global relevancy map :math:`\sum_b \nabla \ell^b`); ``"block"`` sums over
                the selected heads only; ``"head"`` keeps blocks and heads. Default:
                ``"global"``.
            blocks: blocks to include (int or ints, negatives count from the end, in the
                order given). Default: all.
            heads: heads to include. Default: all.
            source: ``"resid"`` (the block's residual output, the paper), ``"attn"``
                (the attention sub-layer output, the state the authors' code projects) or
                ``"authors"`` (their code exactly: the attention sub-layer output and a
                double softmax in the loss). Default: ``"resid"``.
            interpolate_to: (H, W) to upsample the maps to bilinearly with
                ``captum.attr.LayerAttribution.interpolate``, e.g. ``inputs.shape[-2:]``;
                or ``"input"``: maps shaped like the inputs, (N, C, H, W), upsampled and
                repeated over the channels (for ``captum.metrics.infidelity``; needs
                ``return_per="global"`` and one target per image). Default: None (patch
                grid).
            internal_batch_size: split the batch into chunks of this many images.
        Returns:
            *Tensor* (or a 1-tuple for tuple inputs) of attributions over the patch grid
            (h, w) = ``adapter.grid_size`` (or ``interpolate_to``), with B = number of
            selected blocks and H = number of selected heads:

            ============  ==================  =====================
            return_per    one target          K targets per image
            ============  ==================  =====================
            ``global``    (N, 1, h, w)        (N, K, 1, h, w)
            ``block``     (N, B, h, w)        (N, K, B, h, w)
            ``head``      (N, B, H, h, w)     (N, K, B, H, h, w)
            ============  ==================  =====================
        """
        adapter = self.adapter
        x = adapter.check_inputs(inputs)
        cls = require_class_token(adapter, type(self).__name__)
        if return_per not in RETURN_PER:
            raise InputValidationError(f"return_per must be one of {RETURN_PER}, got {return_per!r}")
        if source not in SOURCES:
            raise InputValidationError(
                f"source must be 'resid' (block output, the paper), 'attn' (attention output, the state "
                f"the authors' code projects) or 'authors' (their code exactly: attention output and "
                f"softmax applied twice), got {source!r}"
            )
        block_ids = select_indices(blocks, adapter.num_blocks, "blocks")
        head_ids = select_indices(heads, adapter.num_heads, "heads")
        size = check_interpolate_to(interpolate_to)
        check_batch_size(internal_batch_size)
        n = x.shape[0]
        tgt, multi = format_targets(target, n, adapter.num_classes, x.device)
        if isinstance(interpolate_to, InputShape) and (multi or return_per != "global"):
            raise InputValidationError(
                "interpolate_to='input' gives one map per image shaped like the inputs; it needs "
                "return_per='global' and one target per image. For per-block/head or K-target maps use "
                "interpolate_to=x.shape[-2:]"
            )

        chunks = [
            self._attribute_batch(x[sl], None if tgt is None else tgt[sl], block_ids, cls, source)
            for sl in batch_slices(n, internal_batch_size)
        ]
        attr = torch.cat(chunks, 0)  # (N, K, B_sel, heads, P)
        if len(head_ids) != adapter.num_heads:
            attr = attr[:, :, :, head_ids]
        gh, gw = adapter.grid_size
        attr = attr.reshape(*attr.shape[:-1], gh, gw)
        if return_per == "global":
            attr = attr.sum(dim=(2, 3)).unsqueeze(2)
        elif return_per == "block":
            attr = attr.sum(dim=3)
        if not multi:
            attr = attr.squeeze(1)
        return upsample(attr, size)

    def _attribute_batch(
        self, x: Tensor, target: Tensor | None, block_ids: list[int], cls: int, source: str
    ) -> Tensor:
        r"""(n, K, len(block_ids), heads, num_patches) attributions for one chunk.

        With a given target each block's class-token path is differentiated right after the
        block's forward, while its weights are still in the CPU caches (the path runs on one
        token per image, so reading the weights is its cost); the predicted class needs the full
        pass first, so then the blocks' rows, values and states are kept until the end.
        """
        adapter = self.adapter
        wanted = set(block_ids)
        # With a given target the forward can stop after the last selected block; the
        # predicted class needs the logits of the full pass.
        last = adapter.num_blocks - 1 if target is None else max(block_ids)
        saved: dict[int, tuple[Tensor, Tensor, Tensor, BlockParts]] = {}
        grads: dict[int, Tensor] = {}
        with adapter.eval_mode():
            with torch.no_grad():
                h = adapter.embed(x)
            for b in range(last + 1):
                parts = adapter.block(b)
                with torch.no_grad():
                    if b not in wanted:
                        h, _ = run_block(parts, h, b, frozenset())
                        continue
                    captured: dict[str, Tensor] = {}

                    def qkv(inp: Tensor, _qkv=parts.qkv, _cap=captured) -> tuple[Tensor, Tensor, Tensor]:
                        q, k, v = _qkv(inp)
                        _cap["v"] = v
                        return q, k, v

                    # The class token's outputs of the block's linear layers, for _row_gradient
                    # (a gated MLP calls its own layers, so fc1 may not be called).
                    linears = {
                        name: _ClassRowLinear(getattr(parts, name), name, cls, captured)
                        for name in ("proj", "fc1", "fc2")
                    }
                    # Fused attention; only the class token's probability row is computed on its own.
                    h_out, acts = run_block(
                        dataclasses.replace(parts, qkv=qkv, **linears), h, b, frozenset(), prob_rows=cls + 1
                    )
                    replayed = {
                        name: _ReplayedLinear(getattr(parts, name), captured[name])
                        for name in linears
                        if name in captured
                    }
                    # Copies, so that the attention rows and the qkv output are freed.
                    row = acts["attn_prob_rows"][:, :, cls].clone()
                    v = captured["v"].contiguous()
                    saved[b] = (h[:, cls].clone(), row, v, dataclasses.replace(parts, **replayed))
                    h = h_out
                if target is not None:
                    grads[b] = self._row_gradient(*saved.pop(b), target, source)
            if target is None:
                with torch.no_grad():
                    target = adapter.classify(h).argmax(-1, keepdim=True)  # (n, 1)
                for b in block_ids:
                    grads[b] = self._row_gradient(*saved.pop(b), target, source)
        p = adapter.num_prefix_tokens
        # attribution = -d loss / d A[h, cls, j], image tokens only
        return -torch.stack([grads[b][..., p:] for b in block_ids], dim=2)

    def _row_gradient(
        self, resid_cls: Tensor, row: Tensor, v: Tensor, parts: BlockParts, target: Tensor, source: str
    ) -> Tensor:
        """d loss_b / d A_b[:, :, cls, :] for the K targets, (n, K, heads, T): the block's
        class-token path recomputed from its attention row (a leaf), values and input state.

        ``parts`` holds :class:`_ReplayedLinear` layers: their outputs are the forward's own for
        the class token (the leaf is the forward's row, so the path's inputs are the forward's
        up to rounding), so each weight is read once, for the input gradient."""
        adapter = self.adapter
        k = target.shape[1]
        with torch.enable_grad():
            leaf = row.unsqueeze(1).expand(-1, k, -1, -1).clone().requires_grad_(True)
            z = torch.einsum("nkht,nhtd->nkhd", leaf, v).flatten(2)  # (n, K, heads*head_dim)
            state = parts.attn_post(parts.proj(parts.attn_out_norm(z)))
            if source == "resid":
                mid = resid_cls.unsqueeze(1) + state
                mlp = parts.mlp_post(parts.fc2(parts.mlp_mid_norm(parts.mlp_keys(parts.norm2(mid)))))
                state = mid + mlp
            logits = adapter.project(state)  # (n, K, C)
            if source == "authors":
                # the authors' CrossEntropyLoss(softmax(logits)): softmax applied twice
                logits = logits.softmax(-1)
            logp = logits.log_softmax(-1)
            loss = -logp.gather(-1, target.unsqueeze(-1)).sum()
            (grad,) = torch.autograd.grad(loss, leaf)
        return grad


class _ClassRowLinear:
    """A block's linear layer that also keeps a copy of its output for the class token,
    ``(n, 1, out_features)``, in ``store[name]`` (``name`` is the BlockParts field)."""

    def __init__(self, layer: nn.Module, name: str, cls: int, store: dict[str, Tensor]) -> None:
        self.layer, self.name, self.cls, self.store = layer, name, cls, store

    def __call__(self, x: Tensor) -> Tensor:
        out = self.layer(x)
        self.store[self.name] = out[:, self.cls : self.cls + 1].clone()
        return out


class _ReplayLinearFunction(torch.autograd.Function):
    """Output: the layer's output already computed by the forward (``cached``, broadcast over
    the K targets); input gradient: ``grad @ weight``, exactly the linear layer's."""

    @staticmethod
    def forward(ctx, x: Tensor, cached: Tensor, weight: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(weight)
        return cached.expand(*x.shape[:-1], cached.shape[-1]).clone()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        (weight,) = ctx.saved_tensors
        return grad @ weight, None, None


class _ReplayedLinear:
    """A linear layer on the class-token path whose output is the forward's own (see
    :class:`_ReplayLinearFunction`); it keeps ``weight`` and ``bias`` for any reader."""

    def __init__(self, layer: nn.Module, cached: Tensor) -> None:
        self.layer, self.cached = layer, cached
        self.weight, self.bias = layer.weight, layer.bias

    def __call__(self, x: Tensor) -> Tensor:
        return _ReplayLinearFunction.apply(x, self.cached, self.weight)

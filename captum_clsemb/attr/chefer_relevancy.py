r"""Chefer, Gur & Wolf (CVPR 2021), "Transformer Interpretability Beyond Attention Visualization".

The "transformer attribution" map: LRP relevance of every block's attention probabilities,
weighted by their gradient, rolled out over the blocks. The LRP rules follow the authors'
``modules/layers_ours.py`` and ``baselines/ViT/ViT_LRP.py`` (Transformer-Explainability) and
are written here as small batched functions over tensors so they can be checked in isolation:

=====================================  =============================================================
module                                 rule (function)
=====================================  =============================================================
classifier output                      relevance initialised to one-hot(target) (value 1, not the logit)
Linear (head, qkv, proj, fc1, fc2)     LRP-alpha1-beta0, one shared denominator, bias ignored
                                       (:func:`lrp_linear_alpha1_beta0`)
LayerNorm, GELU, Softmax, Dropout,     relevance passes through unchanged
q/k norms, attention scale
matmuls Q K^T and A V                  z-rule on both operands, each operand's relevance halved
                                       (:func:`lrp_matmul_z`); R_A after halving is kept
residual Add                           z-rule, then rescaled to conserve the total per example
                                       (:func:`lrp_add_conserving`)
Clone (branch point)                   sum of the branch relevances
CLS pooling (index select)             z-rule (:func:`lrp_select_z`)
layer scale (timm ``init_values``)     elementwise linear layer, z-rule (:func:`lrp_elementwise_z`)
=====================================  =============================================================

Then, per block b >= ``start_block``: ``Abar_b = mean_h((dy_t/dA_b * R_{A_b})^+)`` and
``C = (Abar_B + I) ... (Abar_s + I)`` (no row normalisation); the map is the class-token
row of C over the image tokens.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from captum.attr import GradientAttribution, LayerAttribution
from captum.log import log_usage
from torch import Tensor, nn

from captum_clsemb._utils import TargetType, format_target
from captum_clsemb.adapters import ModelAdapter, adapt
from captum_clsemb.adapters.base import BlockParts
from captum_clsemb.attr._explanation_utils import (
    captum_attribute,
    check_batch_size,
    check_grad_mode,
    check_interpolate_to,
)
from captum_clsemb.errors import InputValidationError
from captum_clsemb.trace import ActivationCache, trace

_EPS = 1e-9
_RECORD = ("resid_pre", "resid_mid", "attn_out", "mlp_out", "attn_probs", "attn_keys", "mlp_keys")


# -- LRP rules: pure, batched functions ------------------------------------------------------------
def safe_divide(a: Tensor, b: Tensor) -> Tensor:
    r"""``a / b`` stabilised as in the authors' ``safe_divide``: ``a / (b + 1e-9)``, 0 where ``b == 0``."""
    den = b.clamp(min=_EPS) + b.clamp(max=_EPS)
    den = den + den.eq(0).to(den.dtype) * _EPS
    return a / den * b.ne(0).to(b.dtype)


def lrp_linear_alpha1_beta0(x: Tensor, weight: Tensor, relevance: Tensor) -> Tensor:
    r"""LRP-alpha1-beta0 through ``y = x W^T (+ b)``, as ``layers_ours.Linear.relprop(alpha=1)``.

    Only positive contributions ``x_i w_ji > 0`` receive relevance, over one shared
    denominator ``z_j^+ = sum_i (x_i^+ w_ji^+ + x_i^- w_ji^-)``::

        R_i = sum_j x_i w_ji [x_i w_ji > 0] R_j / z_j^+

    The bias takes no relevance and is not in the denominator, so the rule conserves
    relevance exactly (up to the 1e-9 stabiliser) for every output with ``z_j^+ > 0``.

    Args:
        x: layer input, (..., in_features).
        weight: (out_features, in_features).
        relevance: relevance of the outputs, (..., out_features).
    Returns:
        relevance of the inputs, (..., in_features).
    """
    pw, nw = weight.clamp(min=0), weight.clamp(max=0)
    px, nx = x.clamp(min=0), x.clamp(max=0)
    s = safe_divide(relevance, F.linear(px, pw) + F.linear(nx, nw))
    return px * (s @ pw) + nx * (s @ nw)


def lrp_matmul_z(a: Tensor, b: Tensor, relevance: Tensor, halve: bool = True) -> tuple[Tensor, Tensor]:
    r"""z-rule through the bilinear product ``Z = a @ b`` for both operands (``layers_ours.einsum``).

    ``R_a = a * ((R / Z) @ b^T)`` and ``R_b = b * (a^T @ (R / Z))``: gradient times input with
    the stabilised division. Z is homogeneous of degree 1 in each operand, so each operand
    receives the total relevance; with ``halve`` (the authors' ``cam /= 2`` in
    ``Attention.relprop``) each then gets half of it and the pair conserves the total.

    Args:
        a: (..., n, k).
        b: (..., k, m).
        relevance: relevance of Z, (..., n, m).
        halve: divide both operand relevances by 2. Default: True.
    Returns:
        ``(R_a, R_b)`` with the shapes of ``a`` and ``b``.
    """
    s = safe_divide(relevance, a @ b)
    ra = a * (s @ b.transpose(-1, -2))
    rb = b * (a.transpose(-1, -2) @ s)
    if halve:
        ra, rb = ra / 2, rb / 2
    return ra, rb


def lrp_add_conserving(a: Tensor, b: Tensor, relevance: Tensor) -> tuple[Tensor, Tensor]:
    r"""Residual ``a + b``: z-rule, then rescaling that conserves total relevance (``layers_ours.Add``).

    With ``r_a = a R / (a + b)`` (likewise ``r_b``) and per-example totals ``S_a = sum r_a``,
    ``S_b = sum r_b``, ``S = sum R``::

        R_a = r_a * (|S_a| / (|S_a| + |S_b|)) * S / S_a

    so ``sum R_a + sum R_b = sum R`` for every example. The authors sum over the whole
    tensor with batch size 1; here the sums run over all dims but the first (per example).

    Args:
        a, b: the operands, (N, ...).
        relevance: relevance of the sum, (N, ...).
    Returns:
        ``(R_a, R_b)``.
    """
    s = safe_divide(relevance, a + b)
    ra, rb = a * s, b * s
    dims = tuple(range(1, relevance.dim()))
    sa, sb = ra.sum(dims, keepdim=True), rb.sum(dims, keepdim=True)
    total = relevance.sum(dims, keepdim=True)
    norm = sa.abs() + sb.abs()
    fa = safe_divide(sa.abs(), norm) * total
    fb = safe_divide(sb.abs(), norm) * total
    return ra * safe_divide(fa, sa), rb * safe_divide(fb, sb)


def lrp_select_z(x: Tensor, index: int, relevance: Tensor) -> Tensor:
    r"""z-rule through ``y = x[:, index]`` (the class-token pooling, ``layers_ours.IndexSelect``).

    Args:
        x: token states (N, T, d).
        index: the selected token.
        relevance: relevance of the selected state, (N, d).
    Returns:
        (N, T, d): ``x[:, index] * R / x[:, index]`` at ``index``, zero elsewhere.
    """
    out = torch.zeros_like(x)
    sel = x[:, index]
    out[:, index] = sel * safe_divide(relevance, sel)
    return out


def lrp_elementwise_z(x: Tensor, scale: Tensor, relevance: Tensor) -> Tensor:
    r"""z-rule through an elementwise linear layer ``y = x * scale`` (timm layer scale).

    Each output has a single contribution, so the relevance passes through unchanged
    except where ``y == 0`` (then 0): ``R_x = x * scale * R / (x * scale)``.
    """
    return x * scale * safe_divide(relevance, x * scale)


# -- model plumbing --------------------------------------------------------------------------------
def _qkv_weight(adapter: ModelAdapter, block: int) -> Tensor:
    """The stacked q/k/v projection weight (3 * heads * head_dim, d), rows in (q|k|v, head, dim) order."""
    weight = adapter.block(block).qkv_weight
    inner = adapter.num_heads * adapter.head_dim
    if tuple(weight.shape) != (3 * inner, adapter.embed_dim):
        raise InputValidationError(
            f"block {block}: unexpected q/k/v projection shape {tuple(weight.shape)}; "
            f"CheferRelevancy expects ({3 * inner}, {adapter.embed_dim})"
        )
    return weight


def _layer_scale(module: object) -> Tensor | None:
    """The gamma of a timm ``LayerScale`` (elementwise z-rule), else None (relevance passes through:
    identity, or the block norm of a post-norm ``ResPostBlock``)."""
    try:
        from timm.layers import LayerScale
    except ImportError:
        return None
    return module.gamma if isinstance(module, LayerScale) else None


def _through_post(post: object, linear: nn.Linear, linear_in: Tensor, relevance: Tensor) -> Tensor:
    """Relevance from a sub-layer output back to its linear's output (layer scale / norm / identity)."""
    gamma = _layer_scale(post)
    if gamma is None:
        return relevance
    return lrp_elementwise_z(linear(linear_in), gamma, relevance)


class CheferRelevancy(GradientAttribution):
    r"""Chefer et al. (CVPR 2021) transformer attribution: LRP relevance x gradient, rolled out.

    One traced forward records every block; one backward of the target's pre-softmax logit
    gives ``dy_t/dA_b`` for all blocks; then the relevance one-hot(target) is propagated from
    the classifier output down to each block's attention probabilities with the authors'
    LRP rules (see the module docstring, all batched over the examples), giving ``R_{A_b}``.
    With ``Abar_b = mean_h((dy_t/dA_b * R_{A_b})^+)`` (heads averaged)::

        C = (Abar_{B-1} + I) (Abar_{B-2} + I) ... (Abar_s + I)      (no row normalisation)
        map = C[cls, image tokens]                                   on the patch grid

    ``s = start_block`` defaults to 1: the published ImageNet protocol
    (``generate_visualizations.py`` calls ``start_layer=1``) skips block 0.

    Supported: class-token ViTs: timm ``VisionTransformer`` with ``global_pool='token'``
    (register tokens, ``qkv_bias=False``, qk-norm and layer scale included; layer scale is
    an elementwise linear layer under the z-rule, so relevance passes through it), post-norm
    ``ResPostBlock`` (its block norms are norms: relevance passes through), DeiT-distilled
    two-head models (timm ``VisionTransformerDistilled``, HF
    ``DeiTForImageClassificationWithTeacher``: the output ``(head(cls) + head_dist(dist)) / 2``
    is a residual-type Add of the two halves, split by :func:`lrp_add_conserving`, each head
    then alpha1-beta0 and index-select into its own token; the map is still read from the
    class-token row), Hugging Face ``ViTForImageClassification`` / ``DeiTForImageClassification``.
    Global-average-pooling models raise :class:`InputValidationError`: they have no class
    token whose rollout row is the explanation.

    Args:
        forward_func: a supported timm or Hugging Face ViT (or its adapter).

    Examples::

        >>> import timm
        >>> from captum_clsemb.attr.chefer_relevancy import CheferRelevancy
        >>> model = timm.create_model("vit_base_patch16_224", pretrained=False).eval()
        >>> cr = CheferRelevancy(model)
        >>> maps = cr.attribute(images, target=labels)                  # (N, 1, 14, 14)
        >>> up = cr.attribute(images, target=labels, interpolate_to=224)  # (N, 1, 224, 224)
    """

    def __init__(self, forward_func: nn.Module | ModelAdapter) -> None:
        self.adapter = adapt(forward_func)
        GradientAttribution.__init__(self, self.adapter.model)
        if self.adapter.pooling != "token" or not self.adapter.has_class_token:
            raise InputValidationError(
                f"CheferRelevancy needs a class-token model whose classifier reads the class token; "
                f"{type(self.adapter.model).__name__} uses global average pooling. Use a class-token "
                "model (global_pool='token'), or an attention-only method such as attention rollout"
            )

    # -- public API ---------------------------------------------------------------------------------
    @log_usage(part_of_slo=True)
    @captum_attribute
    def attribute(
        self,
        inputs: Tensor | tuple[Tensor],
        target: TargetType = None,
        additional_forward_args: None = None,
        start_block: int = 1,
        interpolate_to: int | tuple[int, int] | str | None = None,
        internal_batch_size: int | None = None,
    ) -> Tensor | tuple[Tensor]:
        r"""
        Args:
            inputs: images (N, C, H, W) preprocessed for the model, or a 1-tuple
                ``(images,)`` (the result is then a 1-tuple too).
            target: class per example in Captum's forms: int, 1-tuple, list of ints,
                tensor (N,) or (N, 1), list of 1-tuples; None uses the model's predicted
                class.
            additional_forward_args: must be None (the models take images only).
            start_block: first block in the rollout product. Default: 1, the authors'
                ImageNet protocol (block 0 skipped); 0 uses every block.
            interpolate_to: optional output size (int or (H, W)); the map is upsampled
                bilinearly (the authors upsample x16 bilinearly before display). ``"input"``
                gives (N, C, H, W) maps shaped like the inputs. The map is never min-max
                normalised (the authors normalise only for display).
            internal_batch_size: split the batch into chunks of this size.
        Returns:
            *Tensor* (N, 1, h, w) on the patch grid ``adapter.grid_size`` (or
            (N, 1, H, W) with ``interpolate_to``, (N, C, H, W) with ``"input"``),
            detached; a 1-tuple for tuple inputs.
        """
        adapter = self.adapter
        x = adapter.check_inputs(inputs)
        start = self._check_start_block(start_block)
        size = check_interpolate_to(interpolate_to)
        check_batch_size(internal_batch_size)
        n = x.shape[0]
        tgt = format_target(target, n, adapter.num_classes, x.device)
        h, w = adapter.grid_size
        p, cls = adapter.num_prefix_tokens, adapter.class_token_index
        maps = []
        for sl in self._chunks(n, internal_batch_size):
            joint = None
            # Blocks arrive last to first; C = (Abar_{B-1} + I) ... (Abar_s + I) is built from the
            # left, so only one (n, T, T) matrix per block is ever held.
            with torch.no_grad():  # trace() turns grad on for its own forward
                for rel, grad in self._relevance_and_grad(x[sl], None if tgt is None else tgt[sl], start):
                    layer = (grad * rel).clamp(min=0).mean(1)  # (n, T, T), heads averaged
                    layer = layer + torch.eye(layer.shape[-1], dtype=layer.dtype, device=layer.device)
                    joint = layer if joint is None else joint @ layer
            maps.append(joint[:, cls, p:].reshape(-1, 1, h, w))
        out = torch.cat(maps, 0)
        if size is not None:
            out = LayerAttribution.interpolate(out, size, "bilinear")
        return out

    def attention_relevance(
        self,
        inputs: Tensor,
        target: TargetType = None,
        start_block: int = 0,
        internal_batch_size: int | None = None,
    ) -> tuple[Tensor, Tensor]:
        r"""The two ingredients of the map: LRP relevance and gradient of the attention probabilities.

        Args:
            inputs: images (N, C, H, W).
            target: as in :meth:`attribute`.
            start_block: first block returned. Default: 0 (all blocks).
            internal_batch_size: split the batch into chunks of this size.
        Returns:
            ``(R_A, dA)``, each (N, num_blocks - start_block, heads, T, T): the relevance
            ``R_{A_b}`` (after the matmul halving) and ``dy_t / dA_b``.
        """
        adapter = self.adapter
        check_grad_mode(self)
        x = adapter.check_inputs(inputs)
        start = self._check_start_block(start_block)
        check_batch_size(internal_batch_size)
        tgt = format_target(target, x.shape[0], adapter.num_classes, x.device)
        rels, grads = [], []
        for sl in self._chunks(x.shape[0], internal_batch_size):
            with torch.no_grad():  # trace() turns grad on for its own forward
                pairs = list(self._relevance_and_grad(x[sl], None if tgt is None else tgt[sl], start))[::-1]
            rels.append(torch.stack([r for r, _ in pairs], 1))
            grads.append(torch.stack([g for _, g in pairs], 1))
        return torch.cat(rels, 0), torch.cat(grads, 0)

    # -- internals ----------------------------------------------------------------------------------
    def _check_start_block(self, start_block: int) -> int:
        b = self.adapter.num_blocks
        if isinstance(start_block, bool) or not isinstance(start_block, int) or not 0 <= start_block < b:
            raise InputValidationError(
                f"start_block must be an int in 0..{b - 1} (the model has {b} blocks), got {start_block!r}; "
                "use start_block=0 for models with a single block"
            )
        return start_block

    @staticmethod
    def _chunks(n: int, internal_batch_size: int | None) -> list[slice]:
        if internal_batch_size is not None and (
            isinstance(internal_batch_size, bool)
            or not isinstance(internal_batch_size, int)
            or internal_batch_size < 1
        ):
            raise InputValidationError(
                f"internal_batch_size must be a positive int, got {internal_batch_size!r}"
            )
        step = internal_batch_size or max(n, 1)
        return [slice(i, i + step) for i in range(0, n, step)]

    def _relevance_and_grad(
        self, x: Tensor, target: Tensor | None, start: int
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """Yield ``(R_A, dA)``, each (n, H, T, T), for blocks B-1 down to ``start``."""
        adapter = self.adapter
        nb = adapter.num_blocks
        tr = trace(adapter, x, record=_RECORD, grad=True)
        cache, logits = tr.cache, tr.logits
        if target is None:
            target = logits.detach().argmax(-1)
        probs = [cache["attn_probs", b] for b in range(start, nb)]
        # One backward for the batch: examples do not interact in eval mode.
        with torch.enable_grad():
            grads = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), probs)
        del tr, probs, logits  # the graph is freed; the cache tensors stay for LRP
        # Callers consume this under torch.no_grad() (a context held across yields would leak).
        for b, rel in self._propagate(cache, target, start):
            yield rel, grads[b - start]

    def _propagate(self, cache: ActivationCache, target: Tensor, start: int) -> Iterator[tuple[int, Tensor]]:
        """LRP from one-hot(target) at the logits down to the blocks: yield (b, R_A_b), b = B-1..start."""
        adapter = self.adapter
        nb = adapter.num_blocks
        final = cache["resid_mid", nb - 1] + cache["mlp_out", nb - 1]  # block output, as in run_block
        normed = adapter.pre_pool_norm(final)  # final norm: relevance passes through
        cls = adapter.class_token_index
        r_out = F.one_hot(target, adapter.num_classes).to(normed.dtype)
        pooled = adapter.post_pool_norm(normed[:, cls])  # fc_norm (if any): passes through
        if adapter.head_dist is None:
            r_pooled = lrp_linear_alpha1_beta0(pooled, adapter.head.weight, r_out)
            relevance = lrp_select_z(normed, cls, r_pooled)
        else:
            dist = adapter.prefix_tokens.index("dist")
            pooled_d = adapter.post_pool_norm(normed[:, dist])
            # logits = head(cls)/2 + head_dist(dist)/2: a two-operand Add (the /2 passes through).
            r_c, r_d = lrp_add_conserving(adapter.head(pooled) / 2, adapter.head_dist(pooled_d) / 2, r_out)
            relevance = lrp_select_z(normed, cls, lrp_linear_alpha1_beta0(pooled, adapter.head.weight, r_c))
            relevance = relevance + lrp_select_z(  # clone: the two token branches sum
                normed, dist, lrp_linear_alpha1_beta0(pooled_d, adapter.head_dist.weight, r_d)
            )
        for b in reversed(range(start, nb)):
            relevance, r_attn = self._block_relprop(b, adapter.block(b), cache, relevance, b > start)
            yield b, r_attn

    def _block_relprop(
        self, b: int, parts: BlockParts, cache: ActivationCache, relevance: Tensor, go_on: bool
    ) -> tuple[Tensor | None, Tensor]:
        """One block backwards: returns (relevance of the block input or None, R_A after halving)."""
        adapter = self.adapter
        x_in, mid = cache["resid_pre", b], cache["resid_mid", b]
        n, t, _ = x_in.shape
        heads, hd = adapter.num_heads, adapter.head_dim
        # MLP sub-layer: out = mid + mlp_post(fc2(mid_norm(act(fc1(norm2(mid))))))
        r_mid, r_mlp = lrp_add_conserving(mid, cache["mlp_out", b], relevance)
        fc2_in = parts.mlp_mid_norm(cache["mlp_keys", b])
        r_mlp = _through_post(parts.mlp_post, parts.fc2, fc2_in, r_mlp)
        r_keys = lrp_linear_alpha1_beta0(fc2_in, parts.fc2.weight, r_mlp)  # mid norm, act: pass
        r_mid = r_mid + lrp_linear_alpha1_beta0(parts.norm2(mid), parts.fc1.weight, r_keys)  # clone
        # Attention sub-layer: mid = x + attn_post(proj(out_norm(A @ v)))
        r_x, r_attn = lrp_add_conserving(x_in, cache["attn_out", b], r_mid)
        proj_in = parts.attn_out_norm(cache["attn_keys", b])
        r_attn = _through_post(parts.attn_post, parts.proj, proj_in, r_attn)
        r_z = lrp_linear_alpha1_beta0(proj_in, parts.proj.weight, r_attn)
        r_z = r_z.view(n, t, heads, hd).transpose(1, 2)  # (n, H, T, hd)
        u1 = parts.norm1(x_in)
        q, k, v = parts.qkv(u1)
        r_a, r_v = lrp_matmul_z(cache["attn_probs", b], v, r_z)
        if not go_on:
            return None, r_a
        # softmax, scale: pass; Q K^T with the z-rule on the unscaled q, k (as the authors).
        r_q, r_kt = lrp_matmul_z(q, k.transpose(-1, -2), r_a)
        r_qkv = torch.cat(
            [r.transpose(1, 2).reshape(n, t, heads * hd) for r in (r_q, r_kt.transpose(-1, -2), r_v)], -1
        )
        r_u1 = lrp_linear_alpha1_beta0(u1, _qkv_weight(adapter, b), r_qkv)  # then norm1: pass
        return r_x + r_u1, r_a  # clone


__all__ = [
    "CheferRelevancy",
    "safe_divide",
    "lrp_linear_alpha1_beta0",
    "lrp_matmul_z",
    "lrp_add_conserving",
    "lrp_select_z",
    "lrp_elementwise_z",
]

r"""Baseline token rankings for perturbation tests: seeded random orders and linear probes."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from captum.attr import Attribution
from captum.log import log_usage
from torch import Tensor, nn

from captum_clsemb._utils import (
    TargetType,
    check_batch_size,
    check_finite,
    format_inputs,
    format_target,
    rank_of_target,
)
from captum_clsemb.adapters import ModelAdapter, adapt
from captum_clsemb.errors import InputValidationError
from captum_clsemb.trace import trace

# --------------------------------------------------------------------------------------------
# Random rankings
# --------------------------------------------------------------------------------------------

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on uint64 arrays (wrapping arithmetic): a well-mixed integer hash."""
    z = (z + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
    z = ((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
    z = ((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
    return z ^ (z >> np.uint64(31))


def _grid(grid: int | tuple[int, int]) -> tuple[int, int]:
    h, w = (grid, grid) if isinstance(grid, int) else tuple(grid)
    if h < 1 or w < 1:
        raise InputValidationError(f"grid must be positive (h, w), got {grid}")
    return int(h), int(w)


def random_attributions(
    num_examples: int,
    grid: int | tuple[int, int],
    seed: int = 0,
    offset: int = 0,
    per_image: bool = True,
) -> Tensor:
    r"""A seeded random token order per image, as an attribution map (N, 1, h, w).

    Each image gets a random permutation of the ranks ``0 .. h*w - 1`` (float32; no ties),
    so sorting it gives a uniformly random removal order. Example ``offset + i`` always gets
    the same permutation for a given seed, whatever the batch it is drawn in: the values
    are a counter-based hash (SplitMix64) of ``(seed, example index, patch index)``, so the
    orders are reproducible, independent of batching, and different across images.

    The authors' random baseline instead used one ``randperm(seed)`` for all images
    (averaged over 10 seeds); ``per_image=False`` gives every image the order of example 0.

    Args:
        num_examples: N.
        grid: patch grid (h, w) (or an int for a square grid), e.g. ``adapter.grid_size``.
        seed: random seed. Default: 0.
        offset: index of the first example (for drawing a data set batch by batch).
        per_image: a different order per image (default) or the same order for all.
    Returns:
        *Tensor* (N, 1, h, w), float32.

    Examples::

        >>> a = random_attributions(4, (8, 8), seed=0)
        >>> torch.equal(a[2:], random_attributions(2, (8, 8), seed=0, offset=2))   # True
    """
    h, w = _grid(grid)
    if num_examples < 0 or offset < 0:
        raise InputValidationError("num_examples and offset must be >= 0")
    rows = np.arange(offset, offset + num_examples, dtype=np.uint64)
    if not per_image:
        rows = np.zeros_like(rows)
    key = _splitmix64(np.array([seed % 2**64], dtype=np.uint64))  # a negative seed wraps
    row_keys = _splitmix64(key ^ rows)[:, None]
    values = _splitmix64(row_keys ^ _splitmix64(np.arange(h * w, dtype=np.uint64) + np.uint64(1 << 32)))
    ranks = np.argsort(np.argsort(values, axis=1, kind="stable"), axis=1, kind="stable")
    return torch.from_numpy(ranks.astype(np.float32)).view(num_examples, 1, h, w)


class RandomRanking:
    r"""Random-order baseline with the interface of an attribution class.

    ``attribute(inputs)`` returns :func:`random_attributions` for the next ``len(inputs)``
    examples: the n-th image passed since construction (or :meth:`reset`) always gets the
    order of example n, so results do not depend on the batch size.

    Args:
        forward_func: a supported ViT or adapter (for its patch grid), or the grid (h, w).
        seed: random seed. Default: 0.
        per_image: a different order per image (default) or one order for all images.
    """

    def __init__(
        self, forward_func: nn.Module | ModelAdapter | tuple[int, int], seed: int = 0, per_image: bool = True
    ) -> None:
        if isinstance(forward_func, (tuple, list, int)):
            self.grid = _grid(forward_func)
        else:
            self.grid = adapt(forward_func).grid_size
        self.seed = seed
        self.per_image = per_image
        self.offset = 0

    def reset(self) -> None:
        """Restart the example counter at 0."""
        self.offset = 0

    @log_usage(part_of_slo=True)
    def attribute(self, inputs: Tensor, target: TargetType = None) -> Tensor:
        r"""
        Args:
            inputs: images (N, C, H, W); only N is used.
            target: ignored (the ranking is class-agnostic).
        Returns:
            *Tensor* (N, 1, h, w) of random ranks, on the inputs' device (a 1-tuple for a
            1-tuple of inputs).
        """
        inputs, is_inputs_tuple = format_inputs(inputs)
        if not isinstance(inputs, Tensor) or inputs.dim() == 0 or inputs.shape[0] == 0:
            raise InputValidationError("inputs must be a non-empty batch of images (N, C, H, W)")
        check_finite(inputs)
        n = inputs.shape[0]
        out = random_attributions(n, self.grid, self.seed, self.offset, self.per_image)
        self.offset += n
        out = out.to(inputs.device)
        return (out,) if is_inputs_tuple else out


# --------------------------------------------------------------------------------------------
# Linear probes
# --------------------------------------------------------------------------------------------

PROBE_LAYERS = {"block": "resid_post", "attn": "attn_out", "mlp": "mlp_out"}


class LinearProbeRanking(Attribution):
    r"""Few-shot ridge-regression probes per layer and token position, as a token ranking.

    The linear-probing baseline of Vilas et al. (Sec. 8, ``prober.py``, after Raghu et al.):
    for every layer and token position, a ridge regression maps the **raw** token state
    (no final norm, as the authors) to ±1 one-hot class targets. It is fitted in closed
    form in float64, with an unpenalised intercept exactly as ``sklearn.linear_model.Ridge
    (alpha=1.0)`` (which centres X and Y)::

        W = (Xcᵀ Xc + α I)⁻¹ Xcᵀ Yc,   b = ȳ − x̄ W,   Xc = X − x̄, Yc = Y − ȳ

    which is the augmented system ``[X 1]`` with penalty ``α`` on W and 0 on the bias column.
    (The authors used ``solver="lsqr"``, an iterative approximation of the same solution.)
    Fitting streams over the images, one block at a time, accumulating only sufficient
    statistics: memory is ``blocks · tokens · (d² + d·C)`` float64 (ViT-B/32, 12 blocks:
    ~3 GB; pass ``blocks=`` to fit fewer).

    :meth:`attribute` scores every patch token by its class identifiability under the probes,
    ``r = 1 - rank(target) / |C|`` (Eq. 1, as :func:`~captum_clsemb.attr.blockwise_identifiability.
    identifiability_scores`, on the probe outputs), **summed over the fitted blocks**. The
    authors summed the probe ranks over the 12 blocks and removed the lowest-rank sum first;
    since ``sum r = B - sum rank / |C|`` the order is the same. The score is formed from the
    integer rank sum, so equal rank sums tie exactly (and the removal order's tie rule,
    lower patch index first, applies as for any attribution).

    Fit on images other than the evaluated ones (the authors: 10 images per class of the
    ImageNet-S ``test`` split, evaluated on the validation split).

    Args:
        forward_func: a supported timm / Hugging Face ViT or its adapter.
        layers: which states to probe: ``"block"`` (block output, the authors' ``hs``),
            ``"attn"`` / ``"mlp"`` (sub-layer outputs). Default: ``("block",)``.
        blocks: blocks to probe. Default: all.
        alpha: ridge penalty. Default: 1.0 (sklearn's default).

    Examples::

        >>> probe = LinearProbeRanking(model).fit(train_images, train_labels)  # k per class
        >>> attr = probe.attribute(images, target=labels)                     # (N, 1, h, w)
        >>> token_removal_auc(model, images, attr, target=labels, labels=labels)
    """

    def __init__(
        self,
        forward_func: nn.Module | ModelAdapter,
        layers: Iterable[str] = ("block",),
        blocks: Iterable[int] | None = None,
        alpha: float = 1.0,
    ) -> None:
        self.adapter = adapt(forward_func)
        Attribution.__init__(self, self.adapter.model)
        self.layers = tuple(layers)
        bad = [name for name in self.layers if name not in PROBE_LAYERS]
        if bad or not self.layers:
            raise InputValidationError(
                f"layers must be a non-empty subset of {sorted(PROBE_LAYERS)}, got {bad}"
            )
        nb = self.adapter.num_blocks
        self.blocks = tuple(range(nb)) if blocks is None else tuple(sorted({b % nb for b in blocks}))
        if not alpha > 0:
            raise InputValidationError(f"alpha must be > 0, got {alpha}")
        self.alpha = float(alpha)
        #: probe weights per (layer, block): (tokens, d, classes); bias: (tokens, classes)
        self.weights: dict[tuple[str, int], Tensor] = {}
        self.bias: dict[tuple[str, int], Tensor] = {}

    # -- fitting -------------------------------------------------------------------------------
    def fit(self, images: Tensor, labels: TargetType, batch_size: int | None = None) -> LinearProbeRanking:
        r"""Fit all probes in closed form on labelled images (few-shot: k per class).

        Args:
            images: images (N, C, H, W) preprocessed for the model, not the evaluated ones.
            labels: class per image (N,).
            batch_size: images per forward when accumulating statistics. Default: all.
        Returns:
            self.
        """
        adapter = self.adapter
        x = adapter.check_inputs(images)
        check_batch_size(batch_size, "batch_size")
        n, num_classes = x.shape[0], adapter.num_classes
        if n < 2:
            raise InputValidationError("fit needs at least 2 labelled images")
        y = format_target(labels, n, num_classes, x.device)
        kinds = sorted({PROBE_LAYERS[name] for name in self.layers})
        chosen = set(self.blocks)
        stats: dict[tuple[str, int], list[Tensor]] = {}

        for start in range(0, n, batch_size or n):
            xb, yb = x[start : start + (batch_size or n)], y[start : start + (batch_size or n)]
            targets = torch.nn.functional.one_hot(yb, num_classes).double() * 2 - 1  # ±1 one-hot

            def on_block(b: int, acts: dict[str, Tensor], targets: Tensor = targets) -> None:
                if b not in chosen:
                    return
                for kind in kinds:
                    f = acts[kind].double()  # (n, T, d)
                    new = [
                        torch.einsum("ntd,nte->tde", f, f),
                        torch.einsum("ntd,nc->tdc", f, targets),
                        f.sum(0),
                        targets.sum(0),
                    ]
                    old = stats.get((kind, b))
                    stats[(kind, b)] = new if old is None else [o + v for o, v in zip(old, new)]

            trace(adapter, xb, record=kinds, on_block=on_block, store=False)

        dtype = x.dtype
        for name in self.layers:
            for b in self.blocks:
                sxx, sxy, sx, sy = stats[(PROBE_LAYERS[name], b)]
                w, bias = ridge_from_stats(sxx, sxy, sx, sy, n, self.alpha)
                self.weights[(name, b)] = w.to(dtype)
                self.bias[(name, b)] = bias.to(dtype)
        return self

    def _check_fitted(self, layer: str, blocks: Iterable[int]) -> list[int]:
        if not self.weights:
            raise InputValidationError("the probes are not fitted; call .fit(images, labels) first")
        if layer not in self.layers:
            raise InputValidationError(f"no probes for layer {layer!r}; fitted layers: {self.layers}")
        nb = self.adapter.num_blocks
        chosen = sorted({b % nb for b in blocks})
        missing = [b for b in chosen if b not in self.blocks]
        if missing:
            raise InputValidationError(f"no probes for blocks {missing}; fitted blocks: {self.blocks}")
        return chosen

    def probe_logits(self, states: Tensor, layer: str, block: int) -> Tensor:
        """Probe outputs (N, T, C) for token states (N, T, d) of one layer and block."""
        w, bias = self.weights[(layer, block)], self.bias[(layer, block)]
        if states.shape[1] != w.shape[0]:
            raise InputValidationError(
                f"the probes were fitted on {w.shape[0]} token positions, got {states.shape[1]}"
            )
        return torch.einsum("ntd,tdc->ntc", states, w) + bias

    def _stream(self, x: Tensor, layer: str, blocks: list[int], consume) -> None:
        kind, chosen = PROBE_LAYERS[layer], set(blocks)

        def on_block(b: int, acts: dict[str, Tensor]) -> None:
            if b in chosen:
                consume(b, self.probe_logits(acts[kind], layer, b))

        trace(self.adapter, x, record=[kind], on_block=on_block, store=False)

    # -- attribution ----------------------------------------------------------------------------
    @log_usage(part_of_slo=True)
    def attribute(
        self,
        inputs: Tensor,
        target: TargetType = None,
        layer: str = "block",
        blocks: Iterable[int] | None = None,
        internal_batch_size: int | None = None,
    ) -> Tensor:
        r"""
        Args:
            inputs: images (N, C, H, W) preprocessed for the model.
            target: class per example; None uses the model's prediction.
            layer: which fitted probes to use. Default: ``"block"``.
            blocks: blocks whose scores are summed. Default: all fitted blocks.
            internal_batch_size: images per forward. Default: all.
        Returns:
            *Tensor* (N, 1, h, w): per patch token, the sum over blocks of its probe
            identifiability ``1 - rank(target)/|C|`` (higher = more identifiable).
        """
        adapter = self.adapter
        x = adapter.check_inputs(inputs)
        check_batch_size(internal_batch_size)
        chosen = self._check_fitted(layer, self.blocks if blocks is None else blocks)
        n = x.shape[0]
        tgt = format_target(target, n, adapter.num_classes, x.device)
        step = internal_batch_size or n
        out = []
        with torch.no_grad():
            for start in range(0, n, step):
                xb = x[start : start + step]
                t = tgt[start : start + step] if tgt is not None else trace(adapter, xb).logits.argmax(-1)
                rank_sum = torch.zeros(xb.shape[0], adapter.num_tokens, dtype=torch.long, device=x.device)

                def consume(b: int, logits: Tensor, t: Tensor = t, rank_sum: Tensor = rank_sum) -> None:
                    rank_sum.add_(rank_of_target(logits, t[:, None]))

                self._stream(xb, layer, chosen, consume)
                # sum_b (1 - rank_b / C) = B - sum_b rank_b / C, formed once from the integer rank sum
                # so that equal rank sums tie exactly (the authors' order, ties included)
                score = len(chosen) - rank_sum.to(torch.float64) / adapter.num_classes
                out.append(score[:, adapter.num_prefix_tokens :].to(x.dtype))
        h, w = adapter.grid_size
        return torch.cat(out).view(n, 1, h, w)

    def accuracy(
        self, inputs: Tensor, labels: TargetType, layer: str = "block", internal_batch_size: int | None = None
    ) -> Tensor:
        r"""Top-1 accuracy of every probe (the authors' ``plot_top1_acc``).

        Args:
            inputs: held-out images (N, C, H, W).
            labels: their classes (N,).
            layer: which fitted probes. Default: ``"block"``.
            internal_batch_size: images per forward. Default: all.
        Returns:
            *Tensor* (num_fitted_blocks, num_tokens) of accuracies in [0, 1], tokens in model order.
        """
        adapter = self.adapter
        x = adapter.check_inputs(inputs)
        check_batch_size(internal_batch_size)
        chosen = self._check_fitted(layer, self.blocks)
        n = x.shape[0]
        y = format_target(labels, n, adapter.num_classes, x.device)
        correct = torch.zeros(len(chosen), adapter.num_tokens, dtype=torch.float64, device=x.device)
        row = {b: i for i, b in enumerate(chosen)}
        step = internal_batch_size or n
        with torch.no_grad():
            for start in range(0, n, step):
                yb = y[start : start + step]

                def consume(b: int, logits: Tensor, yb: Tensor = yb) -> None:
                    correct[row[b]] += (logits.argmax(-1) == yb[:, None]).sum(0)

                self._stream(x[start : start + step], layer, chosen, consume)
        return (correct / n).to(x.dtype)


def ridge_from_stats(
    sxx: Tensor, sxy: Tensor, sx: Tensor, sy: Tensor, n: int, alpha: float
) -> tuple[Tensor, Tensor]:
    r"""Ridge regression with an unpenalised intercept from sufficient statistics, batched.

    Args:
        sxx: Σ x xᵀ, (..., d, d).  sxy: Σ x yᵀ, (..., d, C).  sx: Σ x, (..., d).  sy: Σ y, (C,)
            or (..., C).  n: number of samples.  alpha: penalty on the weights.
    Returns:
        ``(W, b)`` with W (..., d, C) and b (..., C) minimising ``|Y - XW - b|² + α|W|²``.
    """
    mx, my = sx / n, sy / n
    cxx = sxx - n * mx[..., :, None] * mx[..., None, :]
    cxy = sxy - n * mx[..., :, None] * my[..., None, :]
    eye = torch.eye(cxx.shape[-1], dtype=cxx.dtype, device=cxx.device)
    w = torch.linalg.solve(cxx + alpha * eye, cxy)
    b = my - (mx[..., None, :] @ w)[..., 0, :]
    return w, b

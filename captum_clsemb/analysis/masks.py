r"""Segmentation masks to class/context token labels, and the Fig. 3a comparison with its test.

Masks are read from PNG files: ImageNet-S style (RGB, class id = R + 256 G, 0 background,
1000 ignored) or any single-channel PNG (the pixel value is the class id; e.g. 0/255 binary
masks, or palette PNGs as in Pascal VOC, whose ignore value is 255). They are matched to
images by file stem and brought onto the model's patch grid through the image's own
geometric preprocessing (squash resize, or resize and centre crop). The share of each patch
cell covered by the object is an area-weighted average (``cv2.resize`` with
``INTER_AREA``), and a token is a class token when the share reaches the threshold of
:func:`~captum_clsemb.analysis.patch_labels_from_mask` (0.5 by default).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from captum_clsemb._utils import TargetType
from captum_clsemb.adapters import ModelAdapter, adapt
from captum_clsemb.analysis._common import DataType, iter_batches
from captum_clsemb.analysis.perturbation import _grid, _patch_labels, coverage_to_labels
from captum_clsemb.attr.blockwise_identifiability import BlockwiseIdentifiability
from captum_clsemb.errors import InputValidationError
from captum_clsemb.stats import (
    ConfidenceInterval,
    TestResult,
    bootstrap_ratio_ci,
    permutation_test,
)

IGNORE_VALUE = 1000  #: ImageNet-S's "ignore" class id
MASK_SUFFIXES = (".png",)
Region = tuple[float, float, float, float]  # (top, left, height, width) in mask pixels


# -- reading and matching -------------------------------------------------------------------
def read_mask(path: str | Path) -> np.ndarray:
    r"""Class ids (H, W) of a mask PNG.

    - RGB / RGBA: ImageNet-S encoding, ``id = R + 256 * G`` (0 background, 1000 ignore).
    - Single channel (``L``, ``P``, ``I``, ``I;16``, ``1``): the stored values (palette
      indices for ``P``; 0/1 for ``1``).

    Args:
        path: the PNG file.
    Returns:
        *ndarray* int64 (H, W).
    """
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            arr = np.asarray(img)
    except (OSError, ValueError) as e:
        raise InputValidationError(f"cannot read mask {path}: {e}") from e
    if mode in ("RGB", "RGBA"):
        return arr[..., 0].astype(np.int64) + 256 * arr[..., 1].astype(np.int64)
    if mode in ("L", "P", "I", "I;16", "I;16B", "I;16L", "1"):
        return arr.astype(np.int64)
    raise InputValidationError(
        f"mask {path} has image mode {mode!r}; expected an ImageNet-S RGB mask (id = R + 256 G) or a "
        "single-channel PNG of class ids"
    )


def find_masks(
    mask_dir: str | Path, image_paths: Sequence[str | Path], suffixes: Sequence[str] = MASK_SUFFIXES
) -> list[Path | None]:
    r"""The mask file of each image, matched by file stem, searched recursively under ``mask_dir``.

    ImageNet-S keeps masks in class folders (``validation-segmentation/n01443537/
    ILSVRC2012_val_00000001.png``); any layout works as long as stems are unique among the
    masks that are asked for.

    Args:
        mask_dir: folder holding the masks.
        image_paths: image files (only their stems are used).
        suffixes: mask file suffixes. Default: ``(".png",)``.
    Returns:
        one path per image, None where the image has no mask.
    """
    root = Path(mask_dir)
    if not root.is_dir():
        raise InputValidationError(f"mask folder not found: {root}")
    wanted = {Path(p).stem for p in image_paths}
    found: dict[str, list[Path]] = {}
    for f in sorted(root.rglob("*")):
        if f.is_file() and f.suffix.lower() in suffixes and f.stem in wanted:
            found.setdefault(f.stem, []).append(f)
    clashes = {s: [str(p) for p in ps] for s, ps in found.items() if len(ps) > 1}
    if clashes:
        stem, paths = next(iter(clashes.items()))
        raise InputValidationError(
            f"{len(clashes)} image stems match several masks (e.g. {stem!r}: {paths}); keep one mask per stem"
        )
    return [found[Path(p).stem][0] if Path(p).stem in found else None for p in image_paths]


# -- geometry ---------------------------------------------------------------------------------
def _pair(v: int | Sequence[int], what: str) -> tuple[int, int] | int:
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1:
        return int(v)
    if isinstance(v, (tuple, list)) and len(v) == 1:
        return _pair(v[0], what)
    if (
        isinstance(v, (tuple, list))
        and len(v) == 2
        and all(isinstance(s, (int, np.integer)) and s >= 1 for s in v)
    ):
        return int(v[0]), int(v[1])
    raise InputValidationError(f"{what} must be a positive int or (height, width), got {v!r}")


def input_region(
    image_size: tuple[int, int],
    resize: int | Sequence[int] | None = None,
    crop: int | Sequence[int] | None = None,
) -> Region:
    r"""The part of the original image that the model sees, as (top, left, height, width).

    Follows torchvision's ``Resize`` and ``CenterCrop`` (what timm's eval transform is):
    ``resize`` an int scales the shorter side to it (the longer to ``int(size * long /
    short)``), ``(h, w)`` squashes the image to that size (the ViT image processor);
    ``crop`` then cuts the centre ``(h, w)`` (an int: square) of the resized image, at
    ``round((H' - h) / 2)``. Without ``crop`` the whole image is seen.

    Args:
        image_size: (H, W) of the original image (and of its mask).
        resize: as above, or None (no resize).
        crop: as above, or None (no crop).
    Returns:
        (top, left, height, width) in original pixels (floats).
    """
    h, w = (int(v) for v in image_size)
    if resize is None:
        new_h, new_w = h, w
    else:
        r = _pair(resize, "resize")
        if isinstance(r, int):
            short, long = (w, h) if w <= h else (h, w)
            new_short, new_long = r, int(r * long / short)
            new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
        else:
            new_h, new_w = r
    if crop is None:
        return 0.0, 0.0, float(h), float(w)
    c = _pair(crop, "crop")
    ch, cw = (c, c) if isinstance(c, int) else c
    if ch > new_h or cw > new_w:
        raise InputValidationError(
            f"the {ch}x{cw} crop is larger than the {new_h}x{new_w} resized image (padding is not supported)"
        )
    top, left = int(round((new_h - ch) / 2.0)), int(round((new_w - cw) / 2.0))
    sy, sx = h / new_h, w / new_w
    return top * sy, left * sx, ch * sy, cw * sx


def transform_geometry(transform: Any) -> dict[str, Any]:
    r"""``{"resize": ..., "crop": ...}`` of a torchvision transform (e.g. timm's eval transform).

    Reads the ``Resize`` and ``CenterCrop`` steps of a ``Compose`` (or a single one); other
    steps (tensor conversion, normalisation) do not move pixels. Raises for transforms it
    cannot read: pass ``resize`` and ``crop`` yourself then (a squash to S x S is
    ``resize=(S, S)``; "shorter side to S, centre crop S" is ``resize=S, crop=S``).
    """
    steps = getattr(transform, "transforms", [transform])
    geo: dict[str, Any] = {"resize": None, "crop": None}
    for step in steps:
        kind = type(step).__name__
        if kind == "Resize":
            if getattr(step, "max_size", None) is not None:
                raise InputValidationError(
                    "Resize with max_size is not supported; pass resize/crop explicitly"
                )
            size = step.size
            geo["resize"] = size if isinstance(size, int) else tuple(size)
        elif kind == "CenterCrop":
            size = step.size
            geo["crop"] = size if isinstance(size, int) else tuple(size)
        elif kind in (
            "ToTensor",
            "MaybeToTensor",
            "PILToTensor",
            "Normalize",
            "ConvertImageDtype",
            "ToDtype",
        ):
            continue
        else:
            raise InputValidationError(
                f"cannot read the geometry of transform step {kind}; pass resize= and crop= for the masks"
            )
    return geo


# -- coverage and labels ------------------------------------------------------------------------
def mask_coverage(
    mask: np.ndarray | Tensor,
    grid: int | tuple[int, int],
    class_id: int | None = None,
    region: Region | None = None,
    ignore_value: int | None = IGNORE_VALUE,
) -> np.ndarray:
    r"""Share of each patch cell covered by the object, area-weighted (``cv2.INTER_AREA``).

    The object is ``class_id`` (or, when None, every id other than 0 and ``ignore_value``).
    ``region`` (from :func:`input_region`) is cut out of the mask (rounded to whole mask
    pixels) and resized onto the ``rows x cols`` grid with ``cv2.resize(...,
    interpolation=cv2.INTER_AREA)``, which averages the pixels under each cell with
    fractional weights at cell borders. Pixels with ``ignore_value`` do not count: a cell's
    share is object area over non-ignored area (0 when the whole cell is ignored).

    Args:
        mask: (H, W) class ids (:func:`read_mask`), or a boolean object mask.
        grid: patch grid (rows, cols), e.g. ``adapter.grid_size``, or an int.
        class_id: id of the object's class; None: any labelled id.
        region: (top, left, height, width) of the mask the model sees; None: all of it.
        ignore_value: id of ignored pixels (ImageNet-S: 1000; Pascal VOC: 255); None: none.
    Returns:
        *ndarray* float32 (rows * cols,) in raster order.
    """
    import cv2  # opencv-python-headless; imported here so that importing the package stays light

    m = mask.detach().cpu().numpy() if hasattr(mask, "detach") else np.asarray(mask)
    if m.ndim != 2:
        raise InputValidationError(f"mask must be (H, W), got shape {m.shape}")
    rows, cols = _grid(grid)
    if region is not None:
        top, left, height, width = region
        t, lft = int(round(top)), int(round(left))
        b, r = int(round(top + height)), int(round(left + width))
        if t < 0 or lft < 0 or b > m.shape[0] or r > m.shape[1] or b <= t or r <= lft:
            raise InputValidationError(
                f"region {region} does not lie inside the {m.shape[0]}x{m.shape[1]} mask"
            )
        m = m[t:b, lft:r]
    if m.shape[0] < rows or m.shape[1] < cols:
        raise InputValidationError(
            f"the mask region ({m.shape[0]}x{m.shape[1]} pixels) is smaller than the {rows}x{cols} patch grid"
        )
    if m.dtype == bool:
        obj, valid = m, np.ones_like(m, dtype=bool)
    else:
        valid = np.ones_like(m, dtype=bool) if ignore_value is None else m != ignore_value
        obj = (m == class_id) if class_id is not None else (m != 0)
        obj &= valid
    area = cv2.resize(obj.astype(np.float32), (cols, rows), interpolation=cv2.INTER_AREA)
    seen = cv2.resize(valid.astype(np.float32), (cols, rows), interpolation=cv2.INTER_AREA)
    cover = np.where(seen > 0, area / np.where(seen > 0, seen, 1), 0.0)
    return np.clip(cover, 0.0, 1.0).astype(np.float32).reshape(-1)


def mask_token_labels(
    masks: Iterable[np.ndarray | Tensor | str | Path],
    grid: int | tuple[int, int],
    class_ids: Sequence[int | None] | None = None,
    regions: Sequence[Region | None] | None = None,
    resize: int | Sequence[int] | None = None,
    crop: int | Sequence[int] | None = None,
    threshold: float = 0.5,
    ignore_value: int | None = IGNORE_VALUE,
) -> Tensor:
    r"""Class-token labels (N, P) of images from their masks: covered share >= ``threshold``.

    Each mask (an array or a PNG path, :func:`read_mask`) is brought onto the patch grid
    through the image's geometry (``regions``, or one ``resize``/``crop`` for all, see
    :func:`input_region`; a mask has the size of its image), its per-cell coverage taken
    with :func:`mask_coverage`, and the rule of
    :func:`~captum_clsemb.analysis.patch_labels_from_mask` applied (coverage at least
    ``threshold``, 0.5 by default: the majority of the patch).

    Args:
        masks: N masks or mask files.
        grid: patch grid, e.g. ``adapter.grid_size``.
        class_ids: per image, the id of its class in the mask (None: any labelled id).
        regions: per image, the region the model sees (overrides ``resize``/``crop``).
        resize, crop: the images' preprocessing geometry (:func:`transform_geometry`).
        threshold: in (0, 1]. Default: 0.5.
        ignore_value: see :func:`mask_coverage`.
    Returns:
        *Tensor* bool (N, rows * cols), True for class-labelled tokens, ready as ``masks``
        of :func:`~captum_clsemb.analysis.class_context_identifiability` and
        :func:`class_context_comparison`.

    Examples::

        >>> paths = find_masks("ImageNetS919/validation-segmentation", image_files)
        >>> labels = mask_token_labels(paths, adapter.grid_size, **transform_geometry(transform))
    """
    out = []
    for i, mask in enumerate(masks):
        if mask is None:
            raise InputValidationError(f"image {i} has no mask; keep only the images with a mask")
        m = read_mask(mask) if isinstance(mask, (str, Path)) else mask
        m_shape = tuple(np.shape(m))
        region = regions[i] if regions is not None else None
        if region is None and (resize is not None or crop is not None):
            region = input_region(m_shape[:2], resize, crop)
        cid = class_ids[i] if class_ids is not None else None
        cov = mask_coverage(m, grid, class_id=cid, region=region, ignore_value=ignore_value)
        out.append(coverage_to_labels(torch.from_numpy(cov), threshold))
    if not out:
        raise InputValidationError("no masks given")
    return torch.stack(out)


# -- Fig. 3a: class vs context tokens, with its test ----------------------------------------------
@dataclass
class ClassContextComparison:
    r"""Mean identifiability of class- and context-labelled image tokens per block, and the test.

    Attributes:
        mean: ``{"class": (B,), "context": (B,)}`` pooled over tokens (as Fig. 3a).
        difference: (B,) class minus context.
        ci: ``{"class": ConfidenceInterval, "context": ConfidenceInterval}``, percentile
            bootstrap over images of the pooled means (:func:`~captum_clsemb.stats.bootstrap_ratio_ci`).
        test: :class:`~captum_clsemb.stats.TestResult` per block (permutation test).
        num_tokens: ``{"class": int, "context": int}``.
        num_images: images seen; ``num_images_with_both``: images with tokens of both kinds.
        settings: unit of the test, threshold, seeds.
    """

    mean: dict[str, np.ndarray]
    difference: np.ndarray
    ci: dict[str, ConfidenceInterval]
    test: TestResult
    num_tokens: dict[str, int]
    num_images: int
    num_images_with_both: int
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (lists; NaN -> None)."""

        def plain(v: Any) -> Any:
            if isinstance(v, (ConfidenceInterval, TestResult)):
                return v.to_dict()
            if isinstance(v, np.ndarray):
                return [None if not np.isfinite(x) else float(x) for x in v.tolist()]
            if isinstance(v, Mapping):
                return {k: plain(x) for k, x in v.items()}
            return v

        return {
            "mean_identifiability": plain(self.mean),
            "difference_class_minus_context": plain(self.difference),
            "ci": plain(self.ci),
            "test": self.test.to_dict(),
            "num_tokens": dict(self.num_tokens),
            "num_images": self.num_images,
            "num_images_with_both": self.num_images_with_both,
            "settings": dict(self.settings),
        }


def class_context_comparison(
    forward_func: nn.Module | ModelAdapter,
    inputs: DataType,
    target: TargetType = None,
    masks: Tensor | None = None,
    threshold: float = 0.5,
    unit: str = "tokens",
    alternative: str = "greater",
    n_resamples: int = 9999,
    seed: int | None = 0,
    confidence_level: float = 0.95,
    internal_batch_size: int | None = None,
) -> ClassContextComparison:
    r"""Fig. 3a with its test: are class-labelled tokens more identifiable than context tokens?

    Per block, the mean identifiability of the class-labelled and of the context-labelled
    image tokens, pooled over the dataset (the numbers of
    :func:`~captum_clsemb.analysis.class_context_identifiability` with ``average="tokens"``),
    with percentile bootstrap intervals over images, and a one-sided permutation test of
    the difference (:func:`~captum_clsemb.stats.permutation_test`), BH-adjusted across blocks:

    - ``unit="tokens"`` (default, the authors' test): the class/context labels of all tokens
      are shuffled (independent samples; the authors used 300 shuffles). Tokens of one image
      are not independent, so this p-value is optimistic.
    - ``unit="images"``: per image with tokens of both kinds, the mean of its class tokens
      and of its context tokens, paired; the pairs are swapped at random (sign flips).

    Args:
        forward_func: a supported ViT or its adapter.
        inputs: an image tensor with ``target`` and ``masks``, or an iterable of
            ``(images, labels, masks)`` batches.
        target: labels for tensor inputs; None: the model's prediction.
        masks: token labels (N, P) bool (:func:`mask_token_labels`) or pixel masks (N, H, W)
            aligned with the model input.
        threshold: coverage threshold for pixel masks. Default: 0.5.
        unit: ``"tokens"`` or ``"images"``.
        alternative: of the test (class versus context). Default: ``"greater"``.
        n_resamples, seed: of the permutation test and the bootstrap. Default: 9999, 0.
        confidence_level: of the intervals. Default: 0.95.
        internal_batch_size: chunk size for tensor inputs.
    Returns:
        a :class:`ClassContextComparison`.
    """
    if unit not in ("tokens", "images"):
        raise InputValidationError(f"unit must be 'tokens' or 'images', got {unit!r}")
    adapter = adapt(forward_func)
    bi = BlockwiseIdentifiability(adapter)
    p = adapter.num_prefix_tokens
    pooled: dict[str, list[np.ndarray]] = {"class": [], "context": []}
    sums: dict[str, list[np.ndarray]] = {"class": [], "context": []}
    counts: dict[str, list[np.ndarray]] = {"class": [], "context": []}
    for x, t, m in iter_batches(adapter, inputs, target, masks, internal_batch_size):
        labels = _patch_labels(adapter, m, threshold).to(x.device)
        if labels.shape[0] != x.shape[0]:
            raise InputValidationError(f"a batch holds {x.shape[0]} images but {labels.shape[0]} masks")
        scores = bi.attribute(x, target=t)[:, :, p:].double()  # (n, B, P)
        for name, sel in (("class", labels), ("context", ~labels)):
            s = sel[:, None, :].to(scores.dtype)
            sums[name].append((scores * s).sum(-1).cpu().numpy())  # (n, B)
            counts[name].append(sel.sum(-1).to(torch.float64).cpu().numpy())  # (n,)
            if unit == "tokens":
                pooled[name].append(scores.permute(0, 2, 1)[sel].cpu().numpy())  # (tokens, B)
    if not sums["class"]:
        raise InputValidationError("inputs hold no images")
    sm = {k: np.concatenate(v) for k, v in sums.items()}
    ct = {k: np.concatenate(v) for k, v in counts.items()}
    num_blocks = sm["class"].shape[1]
    num_tokens = {k: int(v.sum()) for k, v in ct.items()}
    if min(num_tokens.values()) == 0:
        empty = [k for k, v in num_tokens.items() if v == 0]
        raise InputValidationError(f"no {empty[0]}-labelled token in any image: the comparison is undefined")
    mean = {k: sm[k].sum(0) / ct[k].sum() for k in sm}
    ci = {
        k: bootstrap_ratio_ci(
            sm[k],
            np.repeat(ct[k][:, None], num_blocks, 1),
            confidence_level=confidence_level,
            n_resamples=n_resamples,
            seed=seed,
        )
        for k in sm
    }
    both = (ct["class"] > 0) & (ct["context"] > 0)
    if unit == "tokens":
        test = permutation_test(
            np.concatenate(pooled["class"]),
            np.concatenate(pooled["context"]),
            alternative=alternative,
            n_resamples=n_resamples,
            seed=seed,
        )
    else:
        if both.sum() < 1:
            raise InputValidationError("no image has tokens of both kinds: unit='images' is undefined")
        per = {k: sm[k][both] / ct[k][both, None] for k in sm}
        test = permutation_test(
            per["class"],
            per["context"],
            alternative=alternative,
            paired=True,
            n_resamples=n_resamples,
            seed=seed,
        )
    test.details["unit"] = unit
    test.details["quantity"] = "mean identifiability, class-labelled minus context-labelled image tokens"
    return ClassContextComparison(
        mean=mean,
        difference=mean["class"] - mean["context"],
        ci=ci,
        test=test,
        num_tokens=num_tokens,
        num_images=int(ct["class"].shape[0]),
        num_images_with_both=int(both.sum()),
        settings={
            "unit": unit,
            "threshold": threshold,
            "alternative": alternative,
            "n_resamples": n_resamples,
            "seed": seed,
            "confidence_level": confidence_level,
            "bootstrap": "percentile, over images",
        },
    )

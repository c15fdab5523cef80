r"""The interactive token explorer: every token's classes at every block, as data and as HTML.

:func:`explorer_data` runs one traced forward per batch of a handful of images and projects
every token (prefix tokens included) after every block through the model's class embedding
lens (:meth:`ModelAdapter.project`: final norm, then the classifier head with its bias). It
keeps, per image, block and token, the top-k classes with their softmax probabilities and the
class identifiability ``r = 1 - rank / |C|`` of the image's target class (Vilas et al.,
NeurIPS 2023, Eq. 1). The result is plain JSON-serialisable data.

:func:`render_explorer` renders the Jinja2 partial ``templates/explorer.html.j2`` (HTML, CSS
and plain JavaScript with the data embedded as JSON; no network) for inclusion in a page;
:func:`render_explorer_page` wraps it in a standalone HTML document.

Example::

    >>> from captum_clsemb import load_demo_images, load_demo_model
    >>> from captum_clsemb.cli.explorer import explorer_data, render_explorer_page
    >>> images, labels, paths = load_demo_images(max_per_class=1)
    >>> data = explorer_data(load_demo_model(), images[:6], labels[:6], class_names=None)
    >>> Path("explorer.html").write_text(render_explorer_page(data))
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import jinja2
import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from captum_clsemb._utils import TargetType, format_target, rank_of_target
from captum_clsemb.adapters import ModelAdapter, adapt
from captum_clsemb.attr.blockwise_identifiability import identifiability_scores
from captum_clsemb.errors import InputValidationError
from captum_clsemb.trace import trace
from captum_clsemb.viz.identifiability import to_hwc_image

__all__ = ["SCORE_DESCRIPTION", "explorer_data", "render_explorer", "render_explorer_page"]

TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"
EXPLORER_TEMPLATE = "explorer.html.j2"
SCHEMA_VERSION = 1

SCORE_DESCRIPTION = (
    "softmax probability of the token's class-embedding-lens logits (the model's final norm and "
    "classifier head, bias included, applied to the token's state after the block)"
)

# how prefix tokens are named for a reader; registers are numbered
_PREFIX_LABELS = {"cls": "class token", "dist": "distillation token", "reg": "register"}


def _prefix_labels(prefix_tokens: Sequence[str]) -> list[str]:
    labels, reg = [], 0
    for name in prefix_tokens:
        if name == "reg":
            reg += 1
            labels.append(f"register {reg}")
        else:
            labels.append(_PREFIX_LABELS.get(name, f"{name} token"))
    return labels


def _image_data_uri(
    image: Tensor, mean: Sequence[float] | None, std: Sequence[float] | None, display_size: int
) -> tuple[str, list[int]]:
    """PNG data URI of one (C, H, W) image, denormalised, scaled so that its longer side is
    about ``display_size``: nearest neighbour (integer factor, patches stay sharp) when smaller,
    area averaging when larger. Returns the URI and the PNG's [height, width]."""
    if image.shape[0] == 1:
        image = image.expand(3, -1, -1)
    rgb = (to_hwc_image(image, mean, std) * 255.0).round().astype(np.uint8)
    pil = Image.fromarray(rgb, mode="RGB")
    h, w = rgb.shape[:2]
    if max(h, w) < display_size:
        factor = max(1, display_size // max(h, w))
        pil = pil.resize((w * factor, h * factor), Image.Resampling.NEAREST)
    elif max(h, w) > display_size:
        scale = display_size / max(h, w)
        pil = pil.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BOX)
    buf = io.BytesIO()
    pil.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii"), [
        pil.height,
        pil.width,
    ]


def _rounded(values: Tensor, digits: int = 4) -> list:
    # float64 before rounding, so that the JSON holds short decimals (0.1234, not 0.12340000271)
    return np.round(values.detach().cpu().double().numpy(), digits).tolist()


def _target_rank_and_r(logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """0-based rank of each example's target among the classes, and r = 1 - rank / |C|, per token."""
    return rank_of_target(logits, target[:, None]), identifiability_scores(logits, target[:, None])


def _explore_batch(adapter: ModelAdapter, x: Tensor, target: Tensor | None, k: int) -> tuple[Tensor, ...]:
    """One traced forward: top-k classes and scores (n, B, T, k), target rank and r (n, B, T),
    the prediction and its probability (n,)."""
    tops: list[tuple[Tensor, Tensor]] = []  # per block: top-k indices and scores (n, T, k)
    targeted: list[tuple[Tensor, Tensor]] = []  # per block: target rank and r (n, T)
    pending: list[Tensor] = []  # block outputs, kept only while the target is unknown

    def on_block(b: int, acts: dict[str, Tensor]) -> None:
        logits = adapter.project(acts["resid_post"])  # (n, T, C)
        top = logits.softmax(-1).topk(k, dim=-1)
        tops.append((top.indices, top.values))
        if target is None:  # the target is the prediction, known after the last block
            pending.append(acts["resid_post"])
        else:
            targeted.append(_target_rank_and_r(logits, target))

    tr = trace(adapter, x, record=["resid_post"], on_block=on_block, store=False)
    probs = tr.logits.softmax(-1)
    pred = probs.argmax(-1)
    if target is None:
        with torch.no_grad():
            targeted = [_target_rank_and_r(adapter.project(s), pred) for s in pending]
    return (
        torch.stack([i for i, _ in tops], dim=1),
        torch.stack([v for _, v in tops], dim=1),
        torch.stack([r for r, _ in targeted], dim=1),
        torch.stack([r for _, r in targeted], dim=1),
        pred,
        probs.gather(-1, pred[:, None])[:, 0],
    )


def _check_norm_stats(name: str, values: Sequence[float] | None, channels: int) -> list[float] | None:
    if values is None:
        return None
    out = [float(v) for v in torch.as_tensor(values, dtype=torch.float64).flatten()]
    if len(out) not in (1, channels):
        raise InputValidationError(
            f"{name} must have one value per image channel ({channels}), got {len(out)}"
        )
    if name == "std" and any(not v > 0 for v in out):
        raise InputValidationError(f"std must be positive, got {out}")
    return out * channels if len(out) == 1 else out


def explorer_data(
    adapter: nn.Module | ModelAdapter,
    images: Tensor,
    targets: TargetType = None,
    class_names: Sequence[str] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    top_k: int = 5,
    image_names: Sequence[str] | None = None,
    *,
    labelled: bool | Sequence[bool] | Tensor | None = None,
    display_size: int = 192,
    batch_size: int = 8,
) -> dict:
    r"""The token explorer's data: top-k classes and identifiability of every token at every block.

    One traced forward per batch records each block's output (the residual stream); every
    token state, prefix tokens included, is projected through the class embedding lens
    (:meth:`ModelAdapter.project`, the model's own final norm and head with bias) and reduced at
    once to its top-k classes, their scores and the rank of the target.

    The score of a class is the softmax probability of the lens logits over all classes: what
    the classifier would output if this token state were the one it reads. For class-token
    models the class token at the last block reproduces the model's output exactly.
    Identifiability is ``r = 1 - rank / |C|`` of the target class (0-based rank, ties favour
    the target; :func:`~captum_clsemb.attr.blockwise_identifiability.identifiability_scores`),
    so r = 1 means the target is the token's top-1 class.

    Args:
        adapter: a supported ViT or its adapter.
        images: a handful of images (N, C, H, W), preprocessed for the model (the JSON grows
            with N x blocks x tokens x top_k).
        targets: class per image in Captum's forms (int, list, tensor (N,)); None uses the
            model's predicted class.
        class_names: one name per class; None takes the model's names (Hugging Face
            ``id2label``) or ``"class i"``.
        mean, std: the per-channel normalisation of ``images``, to show them in true colours;
            give both or neither (neither: each image is min-max scaled for display).
        top_k: classes kept per token (at most the number of classes). Default: 5.
        image_names: a name per image (shown in the picker). Default: ``"image 1"``, ...
        labelled: whether each target is a ground-truth label (one bool, or one per image);
            default: True when ``targets`` is given, False when the targets are predictions.
        display_size: longer side in pixels of the embedded images: smaller images are
            upscaled by an integer factor with nearest neighbour, larger ones shrunk by area
            averaging. Default: 192.
        batch_size: images per traced forward. Default: 8.
    Returns:
        A JSON-serialisable dict (scores rounded to 4 digits)::

            {"schema_version": 1, "score": SCORE_DESCRIPTION,
             "num_classes": C, "class_names": [C str], "num_blocks": B, "top_k": k,
             "image_size": [H, W], "patch_size": [ph, pw], "grid_size": [gh, gw],
             "prefix_tokens": ["cls", ...], "prefix_labels": ["class token", ...],
             "num_tokens": T,            # prefix tokens first, then patches in raster order
             "images": [{"name": str, "src": "data:image/png;base64,...",
                         "display_size": [h, w], "target": int, "target_is_label": bool,
                         "prediction": int, "prediction_score": float,
                         "top_classes": [B][T][k] int, "top_scores": [B][T][k] float,
                         "identifiability": [B][T] float, "target_rank": [B][T] int}, ...]}

        Block ``b`` (0-based in the data, shown as ``b + 1``) holds the states after block
        ``b``; patch ``(i, j)`` of the grid is token ``len(prefix_tokens) + i * gw + j``.

    Examples::

        >>> data = explorer_data(model, images[:6], labels[:6], class_names, mean=mean, std=std)
        >>> data["images"][0]["top_classes"][-1][0]   # class token, last block: top-5 class indices
    """
    adapter = adapt(adapter)
    x = adapter.check_inputs(images)
    n, num_classes = x.shape[0], adapter.num_classes
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise InputValidationError(f"top_k must be a positive int, got {top_k!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputValidationError(f"batch_size must be a positive int, got {batch_size!r}")
    if isinstance(display_size, bool) or not isinstance(display_size, int) or display_size < 8:
        raise InputValidationError(f"display_size must be an int of at least 8 pixels, got {display_size!r}")
    k = min(top_k, num_classes)
    tgt = format_target(targets, n, num_classes, x.device)
    if labelled is None:
        is_label = [tgt is not None] * n
    elif isinstance(labelled, bool):
        is_label = [labelled] * n
    else:
        is_label = [bool(v) for v in torch.as_tensor(labelled).flatten().tolist()]
        if len(is_label) != n:
            raise InputValidationError(f"labelled must hold one bool per image ({n}), got {len(is_label)}")
    if tgt is None and any(is_label):
        raise InputValidationError("labelled=True needs targets; without targets the predicted class is used")
    if class_names is None:
        class_names = adapter.class_names or [f"class {i}" for i in range(num_classes)]
    class_names = [str(c) for c in class_names]
    if len(class_names) != num_classes:
        raise InputValidationError(
            f"class_names must hold one name per class ({num_classes}), got {len(class_names)}"
        )
    if image_names is None:
        image_names = [f"image {i + 1}" for i in range(n)]
    image_names = [str(s) for s in image_names]
    if len(image_names) != n:
        raise InputValidationError(f"image_names must hold one name per image ({n}), got {len(image_names)}")
    if (mean is None) != (std is None):
        raise InputValidationError("give both mean and std to undo the normalisation, or neither")
    mean = _check_norm_stats("mean", mean, x.shape[1])
    std = _check_norm_stats("std", std, x.shape[1])

    parts = [
        _explore_batch(adapter, x[s : s + batch_size], None if tgt is None else tgt[s : s + batch_size], k)
        for s in range(0, n, batch_size)
    ]
    top_idx_t, top_val_t, rank_t, score_t, pred_t, pred_score_t = (torch.cat(p) for p in zip(*parts))
    targets_t = pred_t if tgt is None else tgt

    out_images = []
    for i in range(n):
        src, shown = _image_data_uri(x[i], mean, std, display_size)
        out_images.append(
            {
                "name": image_names[i],
                "src": src,
                "display_size": shown,
                "target": int(targets_t[i]),
                "target_is_label": is_label[i],
                "prediction": int(pred_t[i]),
                "prediction_score": round(float(pred_score_t[i]), 4),
                "top_classes": top_idx_t[i].tolist(),
                "top_scores": _rounded(top_val_t[i]),
                "identifiability": _rounded(score_t[i]),
                "target_rank": rank_t[i].tolist(),
            }
        )
    return {
        "schema_version": SCHEMA_VERSION,
        "score": SCORE_DESCRIPTION,
        "num_classes": num_classes,
        "class_names": class_names,
        "num_blocks": adapter.num_blocks,
        "top_k": k,
        "image_size": list(x.shape[-2:]),
        "patch_size": list(adapter.patch_size),
        "grid_size": list(adapter.grid_size),
        "prefix_tokens": list(adapter.prefix_tokens),
        "prefix_labels": _prefix_labels(adapter.prefix_tokens),
        "num_tokens": adapter.num_tokens,
        "images": out_images,
    }


@lru_cache(maxsize=1)
def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES_DIR)),
        autoescape=jinja2.select_autoescape(("html", "j2")),
        undefined=jinja2.StrictUndefined,
    )


_PAGE = """<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ title }}</title></head>
<body style="margin: 24px; font-family: system-ui, sans-serif;">
<h1 style="font-size: 20px;">{{ title }}</h1>
{% include "explorer.html.j2" %}
</body>
</html>
"""


def render_explorer(data: dict) -> str:
    r"""The explorer as an HTML fragment (the partial ``explorer.html.j2`` rendered with ``explorer=data``).

    The fragment carries its own CSS (scoped under ``.clsemb-explorer``), its data as JSON and
    plain JavaScript (one global, ``window.clsembExplorer``); it loads nothing from the network.
    A Jinja2 page can instead ``{% include "explorer.html.j2" %}`` with ``explorer`` in its context.

    Args:
        data: the output of :func:`explorer_data`.
    Returns:
        HTML text to place in a page's ``<body>``.
    """
    return _environment().get_template(EXPLORER_TEMPLATE).render(explorer=data)


def render_explorer_page(data: dict, title: str = "Token explorer") -> str:
    r"""A standalone HTML page holding only the explorer (see :func:`render_explorer`)."""
    return _environment().from_string(_PAGE).render(explorer=data, title=title)

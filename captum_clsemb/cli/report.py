"""``clsemb report``: the paper's figures and numbers for a model and a folder of labelled images."""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from matplotlib.figure import Figure
from torch import Tensor

from captum_clsemb.adapters import ModelAdapter, adapt
from captum_clsemb.attr.blockwise_identifiability import identifiability_scores
from captum_clsemb.cli.loading import CLIError, ImageSet, LoadedModel, find_images, iter_batches, load_model
from captum_clsemb.trace import trace
from captum_clsemb.viz.identifiability import plot_identifiability_curves, plot_token_maps


@dataclass
class SectionResult:
    """What a report section contributes: numbers for the JSON, figures, and a short text."""

    title: str
    numbers: dict = field(default_factory=dict)
    figures: dict[str, Figure] = field(default_factory=dict)
    text: str = ""


@dataclass
class ReportContext:
    loaded: LoadedModel
    adapter: ModelAdapter
    images: ImageSet
    device: torch.device
    batch_size: int
    max_images: int | None
    progress: bool
    # the first images of the run, kept for per-image figures
    sample_images: Tensor | None = None
    sample_labels: Tensor | None = None
    sample_paths: list[Path] = field(default_factory=list)
    num_sample_images: int = 6

    def batches(self, desc: str):
        """Stream (pixels, targets, labels, paths) over the image set; targets = label, or prediction if unknown."""
        total = self.num_images
        it = iter_batches(self.images, self.loaded.transform, self.batch_size, self.max_images)
        if self.progress:
            from tqdm.auto import tqdm

            it = tqdm(it, total=math.ceil(total / self.batch_size), desc=desc, unit="batch", leave=False)
        yield from it

    @property
    def num_images(self) -> int:
        n = len(self.images.files)
        return n if self.max_images is None else min(n, self.max_images)

    def class_name(self, index: int) -> str:
        names = self.loaded.class_names or self.images.class_names
        return names[index] if names and 0 <= index < len(names) else str(index)


def identifiability_section(ctx: ReportContext) -> SectionResult:
    """Accuracy, identifiability rates, Fig. 2 curves and token maps, streamed over the images."""
    adapter = ctx.adapter
    nb, p = adapter.num_blocks, adapter.num_prefix_tokens
    n_images = n_labelled = n_correct = 0
    sum_image = torch.zeros(nb, dtype=torch.float64)
    sum_cls = torch.zeros(nb, dtype=torch.float64)
    sum_rate = torch.zeros(nb, dtype=torch.float64)  # per-image share of image tokens at r = 1
    n_any_last = 0
    sample_scores: list[Tensor] = []
    stride = max(1, ctx.num_images // ctx.num_sample_images)
    for x, labels, paths in ctx.batches("identifiability"):
        x = x.to(ctx.device)
        labels = labels.to(ctx.device)
        tr = trace(adapter, x, record=["resid_post"])
        pred = tr.logits.argmax(-1)
        known = labels >= 0
        target = torch.where(known, labels, pred)
        scores = torch.stack(
            [
                identifiability_scores(adapter.project(tr.cache["resid_post", b]), target[:, None])
                for b in range(nb)
            ],
            1,
        ).cpu()
        del tr
        n_images += x.shape[0]
        n_labelled += int(known.sum())
        n_correct += int((pred == labels)[known].sum())
        img = scores[:, :, p:]
        sum_image += img.mean(2).sum(0).double()
        if adapter.has_class_token:
            sum_cls += scores[:, :, adapter.class_token_index].sum(0).double()
        sum_rate += (img == 1).float().mean(2).sum(0).double()
        n_any_last += int((img[:, -1] == 1).any(1).sum())
        # keep evenly spaced images (across classes when sorted by class) for the per-image figures
        picks = [i for i in range(x.shape[0]) if (n_images - x.shape[0] + i) % stride == 0]
        picks = picks[: ctx.num_sample_images - len(ctx.sample_paths)]
        if picks:
            ctx.sample_images = _cat(ctx.sample_images, x[picks].cpu())
            ctx.sample_labels = _cat(ctx.sample_labels, target[picks].cpu())
            ctx.sample_paths += [paths[i] for i in picks]
            sample_scores.append(scores[picks])
    if n_images == 0:
        raise CLIError("no readable images: every file was skipped")
    curves = {"image tokens": (sum_image / n_images).tolist()}
    if adapter.has_class_token:
        curves = {"class token": (sum_cls / n_images).tolist(), **curves}
    rate = (sum_rate / n_images * 100).tolist()
    numbers = {
        "num_images": n_images,
        "num_labelled": n_labelled,
        "top1_accuracy": n_correct / n_labelled if n_labelled else None,
        "identifiability_rate_last_block_percent": rate[-1],
        "identifiability_rate_per_block_percent": rate,
        "images_with_identifiable_token_percent": 100 * n_any_last / n_images,
        "mean_identifiability_per_block": curves,
        "chance_mean_identifiability": 0.5 + 0.5 / adapter.num_classes,
        "chance_identifiability_rate_percent": 100 / adapter.num_classes,
        "targets": "ground-truth labels (predicted class where a label is unknown)",
    }
    figures = {
        "identifiability_curves": plot_identifiability_curves(
            curves, chance=numbers["chance_mean_identifiability"]
        )
    }
    if sample_scores:
        s = torch.cat(sample_scores)
        blocks = sorted({round(i * (nb - 1) / 3) for i in range(4)}) if nb > 4 else list(range(nb))
        titles = [
            f"{Path(pth).name}: {ctx.class_name(int(t))}"
            for pth, t in zip(ctx.sample_paths, ctx.sample_labels)
        ]
        mean, std = _norm_stats(ctx.loaded)
        figures["token_maps"] = plot_token_maps(
            s, ctx.sample_images, adapter.grid_size, p, blocks, titles, mean, std
        )
        numbers["token_map_blocks"] = [b + 1 for b in blocks]
    acc = numbers["top1_accuracy"]
    text = (
        f"{n_images} images; top-1 accuracy {acc * 100:.2f}%. " if acc is not None else f"{n_images} images. "
    ) + (
        f"Last-block identifiability rate (image tokens whose top-1 class in class embedding space is the target): "
        f"{rate[-1]:.2f}% (chance {100 / adapter.num_classes:.1f}%); images with at least one such token: "
        f"{numbers['images_with_identifiable_token_percent']:.2f}%."
    )
    return SectionResult("Class identifiability across blocks", numbers, figures, text)


def _cat(a: Tensor | None, b: Tensor) -> Tensor:
    return b if a is None else torch.cat([a, b])


def _norm_stats(loaded: LoadedModel) -> tuple[list[float] | None, list[float] | None]:
    t = loaded.transform
    mean, std = getattr(t, "mean", None), getattr(t, "std", None)
    if mean is None and hasattr(t, "transforms"):  # torchvision Compose from timm
        for step in t.transforms:
            if hasattr(step, "mean") and hasattr(step, "std"):
                mean, std = step.mean, step.std
    if mean is None:
        return None, None
    return [float(v) for v in torch.as_tensor(mean).flatten()], [
        float(v) for v in torch.as_tensor(std).flatten()
    ]


Section = Callable[[ReportContext], SectionResult]
DEFAULT_SECTIONS: list[Section] = [identifiability_section]


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def write_report(results: list[SectionResult], ctx: ReportContext, out: Path) -> dict:
    """Write report.html (figures embedded), the PNG figures and report.json; return the JSON dict."""
    out.mkdir(parents=True, exist_ok=True)
    data: dict = {
        "model": ctx.loaded.description,
        "adapter": repr(ctx.adapter),
        "skipped_files": [{"file": f, "reason": r} for f, r in ctx.images.skipped],
        "sections": {},
    }
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>clsemb report</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "img{max-width:100%;border:1px solid #ddd;margin:.5em 0}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 8px;font-size:13px}</style></head><body>",
        "<h1>Class embedding space report</h1>",
        f"<p><b>Model:</b> {html.escape(ctx.loaded.description)}<br><code>{html.escape(repr(ctx.adapter))}</code></p>",
    ]
    if ctx.images.skipped:
        items = "".join(f"<li>{html.escape(f)}: {html.escape(r)}</li>" for f, r in ctx.images.skipped)
        parts.append(f"<p><b>Skipped {len(ctx.images.skipped)} unreadable file(s):</b></p><ul>{items}</ul>")
    for res in results:
        key = res.title.lower().replace(" ", "_")
        data["sections"][key] = res.numbers
        parts.append(f"<h2>{html.escape(res.title)}</h2><p>{html.escape(res.text)}</p>")
        scalar = {k: v for k, v in res.numbers.items() if isinstance(v, (int, float, str)) and v is not None}
        if scalar:
            rows = "".join(
                f"<tr><td>{html.escape(k)}</td><td>{v:.4g}</td></tr>" if isinstance(v, float)
                else f"<tr><td>{html.escape(k)}</td><td>{html.escape(str(v))}</td></tr>"
                for k, v in scalar.items()
            )  # fmt: skip
            parts.append(f"<table>{rows}</table>")
        for name, fig in res.figures.items():
            png = _png(fig)
            (out / f"{name}.png").write_bytes(png)
            parts.append(f"<h3>{html.escape(name.replace('_', ' '))}</h3>")
            parts.append(f"<img alt='{name}' src='data:image/png;base64,{base64.b64encode(png).decode()}'>")
    parts.append("</body></html>")
    (out / "report.html").write_text("\n".join(parts))
    (out / "report.json").write_text(json.dumps(data, indent=2) + "\n")
    return data


def run_report(
    model: str = "demo",
    checkpoint: str | None = None,
    images: str | None = None,
    labels: str | None = None,
    out: str | Path = "clsemb-report",
    device: str = "cpu",
    batch_size: int = 64,
    max_images: int | None = None,
    sections: list[Section] | None = None,
    progress: bool = True,
) -> dict:
    r"""Run the report and write it to ``out``; returns the JSON data.

    With no arguments: the bundled CIFAR-10 model on its bundled images.
    """
    loaded = load_model(model, checkpoint)
    if images is None:
        from captum_clsemb.demo import DEMO_IMAGES_DIR

        images = str(DEMO_IMAGES_DIR)
    image_set = find_images(images, labels, loaded.class_names)
    try:
        dev = torch.device(device)
        loaded.model.to(dev)
    except (RuntimeError, AssertionError) as e:
        raise CLIError(f"device {device!r} is not available: {str(e).splitlines()[0]}") from e
    adapter = adapt(loaded.model)
    if image_set.class_names and not loaded.class_names and len(image_set.class_names) > adapter.num_classes:
        raise CLIError(
            f"the images have {len(image_set.class_names)} classes but the model only {adapter.num_classes}"
        )
    if any(lab is not None and not 0 <= lab < adapter.num_classes for lab in image_set.labels):
        raise CLIError(f"a label is out of range for a model with {adapter.num_classes} classes")
    ctx = ReportContext(loaded, adapter, image_set, dev, batch_size, max_images, progress)
    results = [section(ctx) for section in (sections or DEFAULT_SECTIONS)]
    return write_report(results, ctx, Path(out))

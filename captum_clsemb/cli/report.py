"""``clsemb report``: the paper's figures and numbers for a model and a folder of labelled images."""

from __future__ import annotations

import base64
import html
import io
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from matplotlib.figure import Figure
from torch import Tensor

from captum_clsemb.adapters import ModelAdapter, adapt
from captum_clsemb.cli.loading import (
    CLIError,
    ImageFileDataset,
    ImageSet,
    LoadedModel,
    collate,
    find_images,
    load_model,
    write_json,
)
from captum_clsemb.stream import IdentifiabilityAccumulator, ShardSampler, score_batch, world
from captum_clsemb.viz.identifiability import plot_identifiability_curves, plot_token_maps

log = logging.getLogger("captum_clsemb")


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
    num_workers: int = 0
    # evenly spaced images of the run, kept for per-image figures
    sample_images: Tensor | None = None
    sample_labels: Tensor | None = None
    sample_paths: list[Path] = field(default_factory=list)
    num_sample_images: int = 6

    @property
    def num_images(self) -> int:
        n = len(self.images.files)
        return n if self.max_images is None else min(n, self.max_images)

    def batches(self, desc: str) -> Iterator[tuple[Tensor, Tensor, list[Path]]]:
        """Stream (pixels, labels (-1 = unknown), paths) over this rank's shard of the images.

        Unreadable files are recorded in ``images.skipped`` and left out.
        """
        subset = torch.utils.data.Subset(
            ImageFileDataset(self.images, self.loaded.transform), range(self.num_images)
        )
        loader = torch.utils.data.DataLoader(
            subset, batch_size=self.batch_size, sampler=ShardSampler(subset), collate_fn=collate,
            num_workers=self.num_workers,
        )  # fmt: skip
        it = iter(loader)
        if self.progress and world()[0] == 0:
            from tqdm.auto import tqdm

            it = tqdm(it, total=len(loader), desc=desc, unit="batch", leave=False)
        for x, labels, paths, skipped in it:
            for item in skipped:  # sections stream the images again: report each file once
                if item not in self.images.skipped:
                    log.warning("skipping unreadable image %s: %s", *item)
                    self.images.skipped.append(item)
            if x is not None:
                yield x, labels, paths

    def class_name(self, index: int) -> str:
        names = self.loaded.class_names or self.images.class_names
        return names[index] if names and 0 <= index < len(names) else str(index)


def identifiability_section(ctx: ReportContext) -> SectionResult:
    """Accuracy, identifiability rates, Fig. 2 curves and token maps, streamed over the images."""
    adapter = ctx.adapter
    nb, p = adapter.num_blocks, adapter.num_prefix_tokens
    acc = IdentifiabilityAccumulator(adapter)
    sample_scores: list[Tensor] = []
    stride = max(1, ctx.num_images // ctx.num_sample_images)
    seen = 0
    for x, labels, paths in ctx.batches("identifiability"):
        x, labels = x.to(ctx.device), labels.to(ctx.device)
        scores, pred, target = score_batch(adapter, x, labels)
        acc.update(scores, pred, labels)
        # keep evenly spaced images (across classes when sorted by class) for the per-image figures
        picks = [i for i in range(x.shape[0]) if (seen + i) % stride == 0]
        picks = picks[: ctx.num_sample_images - len(ctx.sample_paths)]
        seen += x.shape[0]
        if picks:
            ctx.sample_images = _cat(ctx.sample_images, x[picks].cpu())
            ctx.sample_labels = _cat(ctx.sample_labels, target[picks].cpu())
            ctx.sample_paths += [paths[i] for i in picks]
            sample_scores.append(scores[picks].cpu())
    numbers = acc.all_reduce().result()
    if numbers["num_images"] == 0:
        raise CLIError("no readable images: every file was skipped")
    numbers["targets"] = "ground-truth labels (predicted class where a label is unknown)"
    curves = numbers["mean_identifiability_per_block"]
    rate = numbers["identifiability_rate_per_block_percent"]
    n_images = numbers["num_images"]
    figures = {
        "identifiability_curves": plot_identifiability_curves(
            curves, chance=numbers["chance_mean_identifiability"], title="Class identifiability per block"
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
    top1 = numbers["top1_accuracy"]
    text = (
        f"{n_images} images; top-1 accuracy {top1 * 100:.2f}%. "
        if top1 is not None
        else f"{n_images} images. "
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


SECTION_NAMES = ("identifiability", "explanations", "mechanisms", "comparison")


def default_sections(names: Sequence[str] = SECTION_NAMES, compare_images: int = 20) -> list[Section]:
    """The report's sections by name; identifiability always runs first (others reuse its sample images)."""
    import functools

    from captum_clsemb.cli.sections import comparison_section, explanations_section, mechanisms_section

    unknown = set(names) - set(SECTION_NAMES)
    if unknown:
        raise CLIError(f"unknown report section(s) {sorted(unknown)}; choose from {', '.join(SECTION_NAMES)}")
    table = {
        "explanations": explanations_section,
        "mechanisms": mechanisms_section,
        "comparison": functools.partial(comparison_section, num_images=compare_images),
    }
    chosen = [identifiability_section]
    for name in SECTION_NAMES[1:]:
        if name in names and not (name == "comparison" and compare_images <= 0):
            chosen.append(table[name])
    return chosen


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
    write_json(out / "report.json", data)
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
    num_workers: int = 0,
    section_names: Sequence[str] = SECTION_NAMES,
    compare_images: int = 20,
) -> dict:
    r"""Run the report and write it to ``out``; returns the JSON data.

    With no arguments: the bundled CIFAR-10 model on its bundled images. Under ``torchrun``
    (an initialised ``torch.distributed`` process group) every rank processes its shard of
    the images, the numbers are reduced exactly over ranks and rank 0 writes the report.
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
    ctx = ReportContext(
        loaded, adapter, image_set, dev, batch_size, max_images, progress, num_workers=num_workers
    )
    results = []
    for section in sections or default_sections(section_names, compare_images):
        start = time.perf_counter()
        res = section(ctx)
        res.numbers["seconds"] = round(time.perf_counter() - start, 2)
        results.append(res)
    rank, size = world()
    if size > 1:  # every rank saw a shard: gather the skipped files; rank 0 writes
        gathered: list = [None] * size
        dist.all_gather_object(gathered, image_set.skipped)
        image_set.skipped = sorted({tuple(item) for part in gathered for item in part})
        if rank != 0:
            return {}
    return write_report(results, ctx, Path(out))

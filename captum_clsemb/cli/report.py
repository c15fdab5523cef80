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
from matplotlib.figure import Figure
from torch import Tensor

from captum_clsemb.adapters import ModelAdapter, adapt
from captum_clsemb.cli.loading import (
    CLIError,
    ImageFileDataset,
    ImageSet,
    LoadedModel,
    ModelOptions,
    check_positive,
    collate,
    find_images,
    load_model,
    resolve_device,
    write_json,
)
from captum_clsemb.cli.output import OutputDir
from captum_clsemb.stream import (
    IdentifiabilityAccumulator,
    ShardSampler,
    broadcast_object,
    gather_objects,
    score_batch,
    world,
)
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
    # evenly spaced images of the run, kept for per-image figures (the same under torchrun)
    sample_images: Tensor | None = None
    sample_labels: Tensor | None = None  # targets: the label, or the predicted class when unlabelled
    sample_labelled: Tensor | None = None
    sample_paths: list[Path] = field(default_factory=list)
    num_sample_images: int = 6
    # what the targets are (ground-truth labels / predicted class), set by the identifiability section
    targets: str = "ground-truth labels"

    @property
    def num_images(self) -> int:
        n = len(self.images.files)
        return n if self.max_images is None else min(n, self.max_images)

    def batches(
        self, desc: str, shard: bool = True
    ) -> Iterator[tuple[Tensor, Tensor, list[Path], list[int]]]:
        """Stream (pixels, labels (-1 = unknown), paths, file indices) over the images.

        ``shard``: under ``torch.distributed``, only this rank's shard (else every image).
        Unusable files (unreadable, non-finite) are recorded in ``images.skipped`` and left out.
        """
        subset = torch.utils.data.Subset(
            ImageFileDataset(self.images, self.loaded.transform), range(self.num_images)
        )
        sampler = ShardSampler(subset) if shard else ShardSampler(subset, rank=0, world_size=1)
        loader = torch.utils.data.DataLoader(
            subset, batch_size=self.batch_size, sampler=sampler, collate_fn=collate,
            num_workers=self.num_workers,
        )  # fmt: skip
        it = iter(loader)
        if self.progress and world()[0] == 0:
            from tqdm.auto import tqdm

            it = tqdm(it, total=len(loader), desc=desc, unit="batch", leave=False)
        for x, labels, paths, skipped, index in it:
            for item in skipped:  # sections stream the images again: report each file once
                if item not in self.images.skipped:
                    log.warning("skipping image %s: %s", *item)
                    self.images.skipped.append(item)
            if x is not None:
                yield x, labels, paths, index

    def class_name(self, index: int) -> str:
        names = self.loaded.class_names or self.images.class_names
        return names[index] if names and 0 <= index < len(names) else str(index)


def targets_description(num_labelled: int, num_images: int) -> str:
    """Which classes the numbers are computed against, for the report's text and JSON."""
    if num_labelled == num_images:
        return "ground-truth labels"
    if num_labelled == 0:
        return "the predicted class (the images have no labels)"
    return (
        f"ground-truth labels for {num_labelled} images, the predicted class for the "
        f"{num_images - num_labelled} unlabelled ones"
    )


def identifiability_section(ctx: ReportContext) -> SectionResult:
    """Accuracy, identifiability rates, Fig. 2 curves and token maps, streamed over the images."""
    adapter = ctx.adapter
    nb, p = adapter.num_blocks, adapter.num_prefix_tokens
    rank, _ = world()
    acc = IdentifiabilityAccumulator(adapter)
    # sample slot k: the first usable image among files k * stride .. (k + 1) * stride - 1, so that
    # the samples do not depend on batching or sharding
    stride = max(1, ctx.num_images // ctx.num_sample_images)
    samples: dict[int, tuple] = {}
    for x, labels, paths, index in ctx.batches("identifiability"):
        x, labels = x.to(ctx.device), labels.to(ctx.device)
        scores, pred, target = score_batch(adapter, x, labels)
        acc.update(scores, pred, labels)
        for i, j in enumerate(index):
            slot = j // stride
            if slot < ctx.num_sample_images and slot not in samples:
                # clone: a view would keep (and, under torchrun, send) the whole batch
                samples[slot] = (
                    j,
                    x[i].detach().cpu().clone(),
                    int(target[i]),
                    bool(labels[i] >= 0),
                    paths[i],
                    scores[i].detach().cpu().clone(),
                )
    acc.all_reduce()
    if acc.num_images == 0:
        example = (
            f" (e.g. {ctx.images.skipped[0][0]}: {ctx.images.skipped[0][1]})" if ctx.images.skipped else ""
        )
        raise CLIError(f"no usable images: all {ctx.num_images} file(s) were skipped{example}")
    merged: dict[int, tuple] = {}
    for part in gather_objects(samples):  # every rank's candidates; the lowest file index wins
        for slot, item in part.items():
            if slot not in merged or item[0] < merged[slot][0]:
                merged[slot] = item
    chosen = [merged[k] for k in sorted(merged)]
    if chosen:
        ctx.sample_images = torch.stack([c[1] for c in chosen])
        ctx.sample_labels = torch.tensor([c[2] for c in chosen])
        ctx.sample_labelled = torch.tensor([c[3] for c in chosen])
        ctx.sample_paths = [c[4] for c in chosen]
    numbers = acc.result()
    ctx.targets = targets_description(numbers["num_labelled"], numbers["num_images"])
    numbers["targets"] = ctx.targets
    curves = numbers["mean_identifiability_per_block"]
    rate = numbers["identifiability_rate_per_block_percent"]
    n_images = numbers["num_images"]
    figures = {}
    if rank == 0:  # only rank 0 writes the report
        figures["identifiability_curves"] = plot_identifiability_curves(
            curves, chance=numbers["chance_mean_identifiability"], title="Class identifiability per block"
        )
    if chosen:
        blocks = sorted({round(i * (nb - 1) / 3) for i in range(4)}) if nb > 4 else list(range(nb))
        numbers["token_map_blocks"] = [b + 1 for b in blocks]
        numbers["token_map_images"] = [str(pth) for pth in ctx.sample_paths]
        if rank == 0:
            titles = [
                f"{Path(pth).name}: {ctx.class_name(int(t))}" + ("" if known else " (predicted)")
                for pth, t, known in zip(ctx.sample_paths, ctx.sample_labels, ctx.sample_labelled)
            ]
            mean, std = _norm_stats(ctx.loaded)
            figures["token_maps"] = plot_token_maps(
                torch.stack([c[5] for c in chosen]),
                ctx.sample_images,
                adapter.grid_size,
                p,
                blocks,
                titles,
                mean,
                std,
            )
    top1 = numbers["top1_accuracy"]
    text = (
        f"{n_images} images; top-1 accuracy {top1 * 100:.2f}% (over the {numbers['num_labelled']} labelled). "
        if top1 is not None
        else f"{n_images} images (no labels: accuracy unknown). "
    ) + (
        f"Targets: {ctx.targets}. "
        f"Last-block identifiability rate (image tokens whose top-1 class in class embedding space is the target): "
        f"{rate[-1]:.2f}% (chance {100 / adapter.num_classes:.1f}%); images with at least one such token: "
        f"{numbers['images_with_identifiable_token_percent']:.2f}%."
    )
    return SectionResult("Class identifiability across blocks", numbers, figures, text)


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

# the files each section may write (checked against --out before the run)
REPORT_FILES = ("report.html", "report.json")
SECTION_FILES = {
    "identifiability": ("identifiability_curves.png", "token_maps.png"),
    "explanations": ("explanation_block_head_grid.png", "global_maps.png"),
    "mechanisms": (
        "class_value_agreement.png",
        "key_value_agreement.png",
        "class_similarity_change.png",
        "residual_match.png",
    ),
    "comparison": ("perturbation_curves.png",),
}


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
    random_init: bool = False,
    classes: str | None = None,
    templates: str | None = None,
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
    overwrite: bool = False,
) -> dict:
    r"""Run the report and write it to ``out``; returns the JSON data.

    With no arguments: the bundled CIFAR-10 model on its bundled images. Under ``torchrun``
    (an initialised ``torch.distributed`` process group) every rank processes its share of
    the work, the numbers are combined exactly over ranks and rank 0 writes the report
    (other ranks return ``{}``). ``out`` is checked before any work starts and written
    atomically (see :class:`~captum_clsemb.cli.output.OutputDir`); ``overwrite`` allows a
    non-empty folder without earlier clsemb output (its files are left untouched).
    ``checkpoint``, ``random_init``, ``classes`` and ``templates`` say how to load ``model``
    (:class:`~captum_clsemb.cli.loading.ModelOptions`; the ``clsemb`` model options).
    """
    check_positive(batch_size, "--batch-size")
    check_positive(max_images, "--max-images")
    check_positive(num_workers, "--num-workers", minimum=0)
    check_positive(compare_images, "--compare-images", minimum=0)
    dev = resolve_device(device)
    chosen = sections or default_sections(section_names, compare_images)
    if images is None:
        from captum_clsemb.demo import DEMO_IMAGES_DIR

        images = str(DEMO_IMAGES_DIR)
    if Path(images).resolve() == Path(out).resolve():
        raise CLIError("--out must not be the --images folder")
    planned = set(REPORT_FILES)
    for name in SECTION_FILES if sections else ["identifiability", *section_names]:
        planned.update(SECTION_FILES.get(name, ()))
    rank, size = world()
    output = OutputDir(out, "report", planned, overwrite) if rank == 0 else None
    error = None
    if output is not None:
        try:
            output.open()
        except CLIError as e:
            error = str(e)
    error = broadcast_object(error)  # every rank stops if rank 0 cannot write
    if error:
        raise CLIError(error)
    try:
        options = ModelOptions(checkpoint, random_init, classes, templates)
        data = _compute_report(model, options, images, labels, out, dev, batch_size, max_images, chosen,
                               progress, num_workers, output)  # fmt: skip
    except BaseException:
        if output is not None:
            output.discard()
        raise
    if output is not None:
        output.commit()
    return data


def _compute_report(
    model: str,
    options: ModelOptions,
    images: str,
    labels: str | None,
    out: str | Path,
    dev: torch.device,
    batch_size: int,
    max_images: int | None,
    sections: list[Section],
    progress: bool,
    num_workers: int,
    output: OutputDir | None,
) -> dict:
    loaded = load_model(model, options)
    try:
        loaded.model.to(dev)
    except (RuntimeError, AssertionError) as e:
        raise CLIError(f"device {str(dev)!r} is not available: {str(e).splitlines()[0]}") from e
    adapter = adapt(loaded.model)
    image_set = find_images(
        images, labels, loaded.class_names, adapter.num_classes, exclude=(out,), class_ids=loaded.class_ids
    )
    ctx = ReportContext(
        loaded, adapter, image_set, dev, batch_size, max_images, progress, num_workers=num_workers
    )
    results = []
    for section in sections:
        start = time.perf_counter()
        res = section(ctx)
        res.numbers["seconds"] = round(time.perf_counter() - start, 2)
        results.append(res)
    # every rank saw a shard: gather the skipped files (in a fixed order); rank 0 writes
    image_set.skipped = sorted({tuple(item) for part in gather_objects(image_set.skipped) for item in part})
    if output is None:
        return {}
    assert output.tmp is not None
    return write_report(results, ctx, output.tmp)

"""``clsemb report``: the paper's figures and numbers for a model and a folder of labelled images."""

from __future__ import annotations

import base64
import contextlib
import io
import logging
import re
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
from captum_clsemb.cli.report_format import (
    ALPHA,
    CONFIDENCE,
    STATS_SETTINGS,
    Claim,
    ReportTable,
)
from captum_clsemb.stream import ShardSampler, broadcast_object, gather_objects, world

log = logging.getLogger("captum_clsemb")


@dataclass
class SectionResult:
    """What a report section contributes: numbers for the JSON, figures with captions, tables and claims.

    ``key`` is the section's snake_case name in ``report.json`` (default: from the title);
    ``captions`` maps a figure name to ``(heading, caption)``; ``paragraphs`` are plain text
    shown before the tables; ``claims`` are the paper's claims tested in the section.
    """

    title: str
    numbers: dict = field(default_factory=dict)
    figures: dict[str, Figure] = field(default_factory=dict)
    text: str = ""
    key: str = ""
    paragraphs: list[str] = field(default_factory=list)
    tables: list[ReportTable] = field(default_factory=list)
    captions: dict[str, tuple[str, str]] = field(default_factory=dict)
    claims: list[Claim] = field(default_factory=list)
    # data of the interactive token explorer (cli.explorer.explorer_data), shown after the section
    explorer: dict | None = None

    @property
    def section_key(self) -> str:
        return self.key or snake_case(self.title)


def snake_case(text: str) -> str:
    """A snake_case identifier from a title: ``"Key-value memories (Sec. 6)"`` -> ``key_value_memories_sec_6``."""
    return "_".join(re.findall(r"[a-z0-9]+", text.lower())) or "section"


class _Bar:
    """One progress bar for a phase of the report (rank 0 only), with a known total."""

    def __init__(self, name: str, total: int, enabled: bool) -> None:
        self.bar = None
        if enabled and world()[0] == 0:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=max(total, 0), desc=name, unit="batch", leave=False)

    def update(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


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
    # the model's name in tables and plots (its --model value)
    name: str = "demo"
    # further --model values: the identifiability section compares them with this one
    others: list[ReportContext] = field(default_factory=list)
    # --masks folder: the class-vs-context section (mask file per image, by file stem)
    masks: dict | None = None
    # the --images folder
    images_root: str = ""
    _bar: _Bar | None = None

    # number of --model values of the run (progress bars name the model when there are several)
    num_models: int = 1

    @property
    def num_images(self) -> int:
        n = len(self.images.files)
        return n if self.max_images is None else min(n, self.max_images)

    def num_batches(self, shard: bool = True) -> int:
        """Batches of one pass over the images (this rank's shard, or all images)."""
        rank, size = world()
        n = len(range(rank, self.num_images, size)) if shard else self.num_images
        return -(-n // self.batch_size)

    @contextlib.contextmanager
    def phase(self, name: str, total: int) -> Iterator[_Bar]:
        """A progress bar named after a phase of the report; :meth:`batches` inside it advance it."""
        bar = _Bar(name, total, self.progress)
        previous, self._bar = self._bar, bar
        try:
            yield bar
        finally:
            self._bar = previous
            bar.close()

    def batches(
        self, desc: str, shard: bool = True
    ) -> Iterator[tuple[Tensor, Tensor, list[Path], list[int]]]:
        """Stream (pixels, labels (-1 = unknown), paths, file indices) over the images.

        ``shard``: under ``torch.distributed``, only this rank's shard (else every image).
        Unusable files (unreadable, non-finite) are recorded in ``images.skipped`` and left out.
        Inside :meth:`phase` every batch advances the phase's bar; else the pass has its own.
        """
        subset = torch.utils.data.Subset(
            ImageFileDataset(self.images, self.loaded.transform), range(self.num_images)
        )
        sampler = ShardSampler(subset) if shard else ShardSampler(subset, rank=0, world_size=1)
        loader = torch.utils.data.DataLoader(
            subset, batch_size=self.batch_size, sampler=sampler, collate_fn=collate,
            num_workers=self.num_workers,
        )  # fmt: skip
        own = self._bar is None
        bar = _Bar(desc, len(loader), self.progress) if own else self._bar
        try:
            for x, labels, paths, skipped, index in loader:
                bar.update()
                for item in skipped:  # sections stream the images again: report each file once
                    if item not in self.images.skipped:
                        log.warning("skipping image %s: %s", *item)
                        self.images.skipped.append(item)
                if x is not None:
                    yield x, labels, paths, index
        finally:
            if own:
                bar.close()

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
    """Table 1, Fig. 2 against the random-init copy, and token maps (see :mod:`captum_clsemb.cli.identifiability`)."""
    from captum_clsemb.cli.identifiability import identifiability_section as section

    return section(ctx)


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


def _figure_files(*names: str) -> tuple[str, ...]:
    """Every figure is written as PNG and SVG."""
    return tuple(f"{n}.{ext}" for n in names for ext in ("png", "svg"))


# the files each section may write (checked against --out before the run)
REPORT_FILES = ("report.html", "report.json")
SECTION_FILES = {
    "identifiability": _figure_files("identifiability_curves", "identifiability_rate", "token_maps"),
    "explanations": _figure_files("explanation_block_head_grid", "global_maps"),
    "mechanisms": _figure_files(
        "class_value_agreement",
        "key_value_agreement",
        "class_similarity_change",
        "residual_match",
        "attention_edits",
    ),
    "comparison": _figure_files("perturbation_curves"),
    "class_context": _figure_files("class_context"),
}


def default_sections(
    names: Sequence[str] = SECTION_NAMES, compare_images: int = 20, masks: str | Path | None = None
) -> list[Section]:
    """The report's sections by name; identifiability always runs first (others reuse its sample images).

    ``masks`` (a folder of segmentation masks) adds the class-vs-context section (paper Fig. 3a).
    """
    import functools

    from captum_clsemb.cli.masks import class_context_section
    from captum_clsemb.cli.sections import comparison_section, explanations_section, mechanisms_section

    unknown = set(names) - set(SECTION_NAMES)
    if unknown:
        raise CLIError(f"unknown report section(s) {sorted(unknown)}; choose from {', '.join(SECTION_NAMES)}")
    table = {
        "explanations": explanations_section,
        "mechanisms": mechanisms_section,
        "comparison": functools.partial(comparison_section, num_images=compare_images),
    }
    chosen: list[Section] = [identifiability_section]
    for name in SECTION_NAMES[1:]:
        if name in names and not (name == "comparison" and compare_images <= 0):
            chosen.append(table[name])
        if name == "mechanisms" and masks is not None:
            chosen.append(class_context_section)
    return chosen


def _save(fig: Figure, fmt: str) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=110, bbox_inches="tight")
    return buf.getvalue()


def _jsonable(value: object) -> object:
    """numpy and torch numbers -> plain Python for report.json."""
    import numpy as np

    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Tensor):
        return _jsonable(value.tolist())
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    return value


def _describe_model(description: str) -> str:
    """A model description with fractions of accuracy in the report's percent format."""
    return re.sub(r"(top-1 )(0\.\d+)", lambda m: f"{m.group(1)}{100 * float(m.group(2)):.1f}%", description)


def _is_bundled(images_root: str) -> bool:
    """Whether the images are the bundled ones (the report names them, not their install path)."""
    from captum_clsemb.demo import DEMO_IMAGES_DIR

    return bool(images_root) and Path(images_root).resolve() == DEMO_IMAGES_DIR.resolve()


def write_report(results: list[SectionResult], ctx: ReportContext, out: Path) -> dict:
    """Write report.html (from the package's Jinja2 template, figures embedded), every figure as PNG
    and SVG, and report.json; return the JSON dict."""
    out.mkdir(parents=True, exist_ok=True)
    claims = [c for res in results for c in res.claims]
    data: dict = {
        "model": ctx.loaded.description,
        "models": [ctx.name, *[o.name for o in ctx.others]],
        "adapter": repr(ctx.adapter),
        "images": ctx.images_root,
        "skipped_files": [{"file": f, "reason": r} for f, r in ctx.images.skipped],
        "statistics": {
            "confidence_intervals": f"percentile bootstrap over images, {int(100 * CONFIDENCE)}%",
            "alpha": ALPHA,
            **STATS_SETTINGS,
        },
        "claims": [c.to_dict() for c in claims],
        "sections": {},
    }
    sections = []
    for res in results:
        key = res.section_key
        data["sections"][key] = _jsonable(res.numbers)
        figures = []
        for name, fig in res.figures.items():
            png = _save(fig, "png")
            (out / f"{name}.png").write_bytes(png)
            (out / f"{name}.svg").write_bytes(_save(fig, "svg"))
            heading, caption = res.captions.get(name, (name.replace("_", " ").capitalize(), ""))
            figures.append(
                {"name": name, "title": heading, "caption": caption, "png": base64.b64encode(png).decode()}
            )
        paragraphs = list(res.paragraphs) or ([res.text] if res.text else [])
        sections.append(
            {
                "key": key,
                "title": res.title,
                "paragraphs": paragraphs,
                "tables": res.tables,
                "figures": figures,
                "html": None,
            }
        )
        if res.explorer is not None:
            sections.append(_explorer_section(res.explorer))
    html_text = render_report(
        {
            "model": _describe_model(ctx.loaded.description),
            "models": [(c.name, _describe_model(c.loaded.description)) for c in (ctx, *ctx.others)],
            "adapter": repr(ctx.adapter),
            "num_images": ctx.num_images,
            "images": data["images"],
            "images_bundled": _is_bundled(ctx.images_root),
            "targets": ctx.targets,
            "num_classes": ctx.adapter.num_classes,
            "skipped": ctx.images.skipped,
            "claims": claims,
            "sections": sections,
            "settings": STATS_SETTINGS,
            "alpha": ALPHA,
        }
    )
    (out / "report.html").write_text(html_text, encoding="utf-8")
    write_json(out / "report.json", data)
    return data


def _explorer_section(data: dict) -> dict:
    """The token explorer (an interactive HTML partial with its data embedded) as a report section."""
    from markupsafe import Markup

    from captum_clsemb.cli.explorer import render_explorer

    n = len(data["images"])
    return {
        "key": "token_explorer",
        "title": "Token explorer",
        "paragraphs": [
            f"The {n} sample images of the token maps, with every token's classes at every block. Pick an image and "
            "a block, then hover over (or click) a patch, or the class token's button, to see that token's top-"
            f"{data['top_k']} classes in class embedding space with their scores (softmax probability of the "
            "projected state) and its identifiability r of the image's target class across all blocks. Patches "
            "are shaded by r at the chosen block. The target is the label, or the predicted class where the image "
            "has no label."
        ],
        "tables": [],
        "figures": [],
        "html": Markup(render_explorer(data)),
    }


def render_report(context: dict) -> str:
    """report.html from the package's template ``templates/report.html.j2``."""
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(Path(__file__).parent / "templates")),
        autoescape=True,
        trim_blocks=True,
        lstrip_blocks=True,
        undefined=jinja2.StrictUndefined,
    )
    return env.get_template("report.html.j2").render(**context)


def run_report(
    model: str | Sequence[str] | None = "demo",
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
    masks: str | Path | None = None,
) -> dict:
    r"""Run the report and write it to ``out``; returns the JSON data.

    With no arguments: the bundled CIFAR-10 model on its bundled images, compared with its
    random-init copy. ``model`` may list several models: their identifiability curves share
    one plot over normalised depth, with a Table 1 row each; the other sections analyse the
    first one. ``masks``: a folder of segmentation masks (ImageNet-S style or single-channel
    PNGs) matched to the images by file stem, for the class-vs-context section.

    Under ``torchrun`` (an initialised ``torch.distributed`` process group) every rank
    processes its share of the work, the numbers are combined exactly over ranks and rank 0
    writes the report (other ranks return ``{}``). ``out`` is checked before any work starts
    and written atomically (see :class:`~captum_clsemb.cli.output.OutputDir`); ``overwrite``
    allows a non-empty folder without earlier clsemb output (its files are left untouched).
    ``checkpoint``, ``random_init``, ``classes`` and ``templates`` say how to load each
    ``model`` (:class:`~captum_clsemb.cli.loading.ModelOptions`; the ``clsemb`` model options).
    """
    specs = _model_specs(model)
    if checkpoint and len(specs) > 1:
        raise CLIError(
            f"--checkpoint applies to a single --model, got {len(specs)} models; run the models with their own "
            "checkpoints one at a time, or save each as a Hugging Face folder and pass the folders"
        )
    check_positive(batch_size, "--batch-size")
    check_positive(max_images, "--max-images")
    check_positive(num_workers, "--num-workers", minimum=0)
    check_positive(compare_images, "--compare-images", minimum=0)
    if masks is not None and not Path(masks).is_dir():
        raise CLIError(f"--masks {masks}: folder not found")
    dev = resolve_device(device)
    chosen = sections or default_sections(section_names, compare_images, masks)
    if images is None:
        from captum_clsemb.demo import DEMO_IMAGES_DIR

        images = str(DEMO_IMAGES_DIR)
    if Path(images).resolve() == Path(out).resolve():
        raise CLIError("--out must not be the --images folder")
    planned = set(REPORT_FILES)
    for name in SECTION_FILES if sections else ["identifiability", *section_names]:
        planned.update(SECTION_FILES.get(name, ()))
    if masks is not None:
        planned.update(SECTION_FILES["class_context"])
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
        data = _compute_report(specs, options, images, labels, out, dev, batch_size, max_images, chosen,
                               progress, num_workers, output, masks)  # fmt: skip
    except BaseException:
        if output is not None:
            output.discard()
        raise
    if output is not None:
        output.commit()
    return data


def _model_specs(model: str | Sequence[str] | None) -> list[str]:
    """The --model values: one or several, each once."""
    specs = ["demo"] if model is None else [model] if isinstance(model, str) else list(model)
    if not specs:
        specs = ["demo"]
    twice = sorted({s for s in specs if specs.count(s) > 1})
    if twice:
        raise CLIError(f"--model {twice[0]} is given twice; give each model once")
    return specs


def _compute_report(
    specs: list[str],
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
    masks: str | Path | None = None,
) -> dict:
    contexts = []
    for spec in specs:
        loaded = load_model(spec, options)
        try:
            loaded.model.to(dev)
        except (RuntimeError, AssertionError) as e:
            raise CLIError(f"device {str(dev)!r} is not available: {str(e).splitlines()[0]}") from e
        adapter = adapt(loaded.model)
        image_set = find_images(
            images,
            labels,
            loaded.class_names,
            adapter.num_classes,
            exclude=(out,),
            class_ids=loaded.class_ids,
        )
        contexts.append(
            ReportContext(
                loaded,
                adapter,
                image_set,
                dev,
                batch_size,
                max_images,
                progress,
                num_workers=num_workers,
                name=spec,
            )  # fmt: skip
        )
    ctx, ctx.others = contexts[0], contexts[1:]
    for c in contexts:
        c.images_root, c.num_models = str(images), len(contexts)
    if masks is not None:
        from captum_clsemb.cli.masks import check_masks

        ctx.masks = check_masks(ctx, masks)  # before the long work: one clear error
    results = []
    for section in sections:
        start = time.perf_counter()
        res = section(ctx)
        res.numbers["seconds"] = round(time.perf_counter() - start, 2)
        results.append(res)
    # every rank saw a shard: gather the skipped files (in a fixed order); rank 0 writes
    for c in contexts:
        c.images.skipped = sorted({tuple(item) for part in gather_objects(c.images.skipped) for item in part})
    if output is None:
        return {}
    assert output.tmp is not None
    return write_report(results, ctx, output.tmp)

"""``clsemb compare``: perturbation AUC of ClassEmbeddingGradient against Chefer et al. and the other baselines."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch

from captum_clsemb.adapters import adapt
from captum_clsemb.cli.loading import (
    CLIError,
    ImageFileDataset,
    ModelOptions,
    check_positive,
    collate,
    find_images,
    load_model,
    resolve_device,
    write_json,
)
from captum_clsemb.cli.output import OutputDir

log = logging.getLogger("captum_clsemb")

COMPARE_FILES = ("results.md", "results.csv", "curves.png", "run.json")


def _load_tensors(
    images: str, labels: str | None, loaded, num_classes: int, max_images: int | None, out: Path
) -> tuple[torch.Tensor, torch.Tensor, list]:
    image_set = find_images(
        images, labels, loaded.class_names, num_classes, exclude=(out,), class_ids=loaded.class_ids
    )
    n = len(image_set.files) if max_images is None else min(max_images, len(image_set.files))
    unlabelled = [f.name for f, lab in zip(image_set.files[:n], image_set.labels[:n]) if lab is None]
    if unlabelled:
        raise CLIError(
            f"the comparison needs labels for every image in {images} (class sub-folders or --labels): "
            f"{len(unlabelled)} have none ({', '.join(unlabelled[:3])}{', ...' if len(unlabelled) > 3 else ''})"
        )
    x, y, _, skipped, _ = collate([ImageFileDataset(image_set, loaded.transform)[i] for i in range(n)])
    for item in skipped:
        log.warning("skipping image %s: %s", *item)
    skipped = image_set.skipped + skipped
    if x is None:
        example = f" (e.g. {skipped[0][0]}: {skipped[0][1]})" if skipped else ""
        raise CLIError(f"no usable images in {images}: all {n} file(s) were skipped{example}")
    return x, y, skipped


def run_compare(
    model: str = "demo",
    checkpoint: str | None = None,
    random_init: bool = False,
    classes: str | None = None,
    templates: str | None = None,
    images: str | None = None,
    labels: str | None = None,
    probe_images: str | None = None,
    probe_labels: str | None = None,
    out: str | Path = "clsemb-compare",
    num_images: int | None = None,
    batch_size: int = 32,
    explain_target: str = "label",
    protocol: str = "tokens",
    score: str = "accuracy",
    device: str = "cpu",
    progress: bool = True,
    overwrite: bool = False,
) -> dict:
    r"""Negative and positive perturbation AUC for every default method; writes results.md/.csv, curves.png, run.json.

    Linear probes are fitted on ``probe_images`` when given, else on a seeded half of the
    images, which are then not evaluated. ``checkpoint``, ``random_init``, ``classes`` and
    ``templates`` say how to load ``model`` (the ``clsemb`` model options).
    """
    from captum_clsemb.metrics import compare_explanations, default_methods, plot_curves, to_csv, to_markdown

    check_positive(num_images, "--num-images")
    check_positive(batch_size, "--batch-size")
    dev = resolve_device(device)
    if images is None:
        from captum_clsemb.demo import DEMO_IMAGES_DIR

        images = str(DEMO_IMAGES_DIR)
    out = Path(out)
    if any(Path(d).resolve() == out.resolve() for d in (images, probe_images) if d):
        raise CLIError("--out must not be an image folder")
    with OutputDir(out, "compare", COMPARE_FILES, overwrite) as tmp:
        loaded = load_model(model, ModelOptions(checkpoint, random_init, classes, templates))
        try:
            loaded.model.to(dev)
        except (RuntimeError, AssertionError) as e:
            raise CLIError(f"device {str(dev)!r} is not available: {str(e).splitlines()[0]}") from e
        adapter = adapt(loaded.model)
        k = adapter.num_classes
        # without separate probe images, all images are read and split (probes never see evaluated images)
        x, y, skipped = _load_tensors(images, labels, loaded, k, num_images if probe_images else None, out)
        if probe_images:
            xp, yp, skipped_p = _load_tensors(probe_images, probe_labels, loaded, k, None, out)
            skipped += skipped_p
        else:
            if x.shape[0] < 2:
                raise CLIError(
                    f"the comparison needs at least 2 usable images in {images} (half fit the probes)"
                )
            order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))
            half = x.shape[0] // 2
            ev, pr = order[:half], order[half:]
            if num_images is not None:
                ev = ev[:num_images]
            x, y, xp, yp = x[ev], y[ev], x[pr], y[pr]
        if num_images is not None:
            x, y = x[:num_images], y[:num_images]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            methods = default_methods(adapter, probe_data=(xp.to(dev), yp.to(dev)))
        for w in caught:  # what was left out is in the results' notes (printed with the table)
            if str(w.message) not in methods.notes:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        res = compare_explanations(adapter, x.to(dev), y.to(dev), methods=methods, batch_size=batch_size, score=score,
                                   explain_target=explain_target, protocol=protocol, progress=progress)  # fmt: skip
        md = to_markdown(res)
        (tmp / "results.md").write_text(f"# Perturbation tests: {loaded.description}\n\n{md}")
        to_csv(res, tmp / "results.csv")
        plot_curves(res).savefig(tmp / "curves.png", dpi=120)
        data = {
            "model": loaded.description,
            "num_images": res.num_images,
            "num_probe_images": int(xp.shape[0]),
            "clean_score": res.clean_score,
            "auc_trapezoid": {
                m: {mode: res.auc(m, mode) for mode in ("negative", "positive")} for m in res.methods
            },
            "settings": {"score": score, "explain_target": explain_target, "protocol": protocol},
            "notes": res.notes,
            "skipped_files": [{"file": f, "reason": r} for f, r in skipped],
        }
        write_json(tmp / "run.json", data)
    data["markdown"] = md
    return data

"""``clsemb compare``: perturbation AUC of ClassEmbeddingGradient against Chefer et al. and the other baselines."""

from __future__ import annotations

from pathlib import Path

import torch

from captum_clsemb.adapters import adapt
from captum_clsemb.cli.loading import CLIError, ImageFileDataset, collate, find_images, load_model, write_json


def _load_tensors(
    images: str, labels: str | None, loaded, max_images: int | None
) -> tuple[torch.Tensor, torch.Tensor, list]:
    image_set = find_images(images, labels, loaded.class_names)
    n = len(image_set.files) if max_images is None else min(max_images, len(image_set.files))
    x, y, _, skipped = collate([ImageFileDataset(image_set, loaded.transform)[i] for i in range(n)])
    if x is None:
        raise CLIError(f"no readable images in {images}")
    if (y < 0).any():
        raise CLIError(
            f"the comparison needs labels for every image in {images} (class sub-folders or --labels)"
        )
    return x, y, skipped


def run_compare(
    model: str = "demo",
    checkpoint: str | None = None,
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
) -> dict:
    r"""Negative and positive perturbation AUC for every default method; writes results.md/.csv, curves.png, run.json.

    Linear probes are fitted on ``probe_images`` when given, else on a seeded half of the
    images, which are then not evaluated.
    """
    from captum_clsemb.metrics import compare_explanations, default_methods, plot_curves, to_csv, to_markdown

    loaded = load_model(model, checkpoint)
    if images is None:
        from captum_clsemb.demo import DEMO_IMAGES_DIR

        images = str(DEMO_IMAGES_DIR)
    dev = torch.device(device)
    loaded.model.to(dev)
    adapter = adapt(loaded.model)
    # without separate probe images, all images are read and split (probes never see evaluated images)
    x, y, skipped = _load_tensors(images, labels, loaded, num_images if probe_images else None)
    if probe_images:
        xp, yp, skipped_p = _load_tensors(probe_images, probe_labels, loaded, None)
        skipped += skipped_p
    else:
        order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))
        half = x.shape[0] // 2
        ev, pr = order[:half], order[half:]
        if num_images is not None:
            ev = ev[:num_images]
        x, y, xp, yp = x[ev], y[ev], x[pr], y[pr]
    if num_images is not None:
        x, y = x[:num_images], y[:num_images]
    methods = default_methods(adapter, probe_data=(xp.to(dev), yp.to(dev)))
    res = compare_explanations(adapter, x.to(dev), y.to(dev), methods=methods, batch_size=batch_size, score=score,
                               explain_target=explain_target, protocol=protocol, progress=progress)  # fmt: skip
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    md = to_markdown(res)
    (out / "results.md").write_text(f"# Perturbation tests: {loaded.description}\n\n{md}")
    to_csv(res, out / "results.csv")
    plot_curves(res).savefig(out / "curves.png", dpi=120)
    data = {
        "model": loaded.description,
        "num_images": res.num_images,
        "num_probe_images": int(xp.shape[0]),
        "clean_score": res.clean_score,
        "auc_trapezoid": {
            m: {mode: res.auc(m, mode) for mode in ("negative", "positive")} for m in res.methods
        },
        "settings": {"score": score, "explain_target": explain_target, "protocol": protocol},
        "skipped_files": [{"file": f, "reason": r} for f, r in skipped],
    }
    write_json(out / "run.json", data)
    data["markdown"] = md
    return data

"""`clsemb compare` on bundled images: the table equals the library's comparison on the same split."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from captum_clsemb.cli.main import main
from captum_clsemb.demo import load_demo_images, load_demo_model
from captum_clsemb.metrics import compare_explanations, default_methods


def test_compare_cli_matches_library(tmp_path: Path, capsys) -> None:
    out = tmp_path / "cmp"
    assert main(["compare", "--num-images", "6", "--out", str(out), "--no-progress"]) == 0
    assert {"results.md", "results.csv", "curves.png", "run.json"} <= {p.name for p in out.iterdir()}
    data = json.loads((out / "run.json").read_text())
    assert data["num_images"] == 6 and data["num_probe_images"] == 100
    assert "| ClassEmbeddingGradient |" in capsys.readouterr().out
    # the same split by hand: all 200 bundled images, seeded half for evaluation, the rest for the probes
    x, y, _ = load_demo_images()
    order = torch.randperm(200, generator=torch.Generator().manual_seed(0))
    ev, pr = order[:100][:6], order[100:]
    model = load_demo_model()
    res = compare_explanations(model, x[ev], y[ev], methods=default_methods(model, probe_data=(x[pr], y[pr])))
    for m in res.methods:
        for mode in ("negative", "positive"):
            assert data["auc_trapezoid"][m][mode] == pytest.approx(res.auc(m, mode), abs=1e-9)


def test_compare_needs_labels(tmp_path: Path, capsys) -> None:
    from PIL import Image

    for i in range(3):
        Image.new("RGB", (32, 32), (i * 40, 0, 0)).save(tmp_path / f"{i}.png")
    assert main(["compare", "--images", str(tmp_path), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "needs labels" in capsys.readouterr().err

"""`clsemb report` end to end on a handful of bundled images."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import BUNDLED_REPORT, BUNDLED_REPORT_ARGS
from PIL import Image

from captum_clsemb.attr import BlockwiseIdentifiability
from captum_clsemb.cli.loading import write_json
from captum_clsemb.cli.main import main
from captum_clsemb.demo import DEMO_IMAGES_DIR, demo_transform, load_demo_config, load_demo_model

CLASSES = ["cat", "ship", "truck"]


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    """3 classes x 2 bundled images, plus a grayscale copy and a corrupt file."""
    root = tmp_path_factory.mktemp("imgs")
    for c in CLASSES:
        (root / c).mkdir()
        for f in sorted((DEMO_IMAGES_DIR / c).iterdir())[:2]:
            shutil.copy(f, root / c / f.name)
    first = sorted((DEMO_IMAGES_DIR / "cat").iterdir())[2]
    Image.open(first).convert("L").save(root / "cat" / "gray.png")
    (root / "ship" / "broken.jpg").write_bytes(b"not a jpeg at all")
    return root


def _run(args: list[str]) -> int:
    return main(["report", "--no-progress", "--batch-size", "3", "--compare-images", "3", *args])


def test_report_end_to_end(image_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "rep"
    assert _run(["--images", str(image_dir), "--out", str(out)]) == 0
    assert {"report.html", "report.json", "identifiability_curves.png", "token_maps.png"} <= {
        p.name for p in out.iterdir()
    }
    data = json.loads((out / "report.json").read_text())
    assert [Path(s["file"]).name for s in data["skipped_files"]] == ["broken.jpg"]
    sec = data["sections"]["class_identifiability_across_blocks"]
    assert sec["num_images"] == 7  # 6 + grayscale; the corrupt file is skipped
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "broken.jpg" in html
    assert f"image files from <code>{image_dir}</code>" in html  # a user's folder is named by its path
    assert "skipped 1 file(s)" in capsys.readouterr().out

    # Independent computation of the same numbers with the library on the same pixels.
    model, cfg, tf = load_demo_model("timm"), load_demo_config(), demo_transform()
    files = [f for c in CLASSES for f in sorted((image_dir / c).iterdir()) if f.name != "broken.jpg"]
    x = torch.stack([tf(Image.open(f)) for f in files])
    y = torch.tensor([cfg["class_names"].index(f.parent.name) for f in files])
    with torch.no_grad():
        acc = (model(x).argmax(-1) == y).float().mean().item()
    bi = BlockwiseIdentifiability(model)
    scores = bi.attribute(x, target=y)
    assert sec["top1_accuracy"] == pytest.approx(acc)
    assert sec["identifiability_rate_last_block_percent"] == pytest.approx(
        bi.identifiability_rate(scores).item()
    )
    assert sec["images_with_identifiable_token_percent"] == pytest.approx(
        bi.images_with_identifiable_token(scores).item()
    )
    curves = bi.mean_identifiability(scores)
    assert sec["mean_identifiability_per_block"]["image_tokens"] == pytest.approx(
        curves["image"].tolist(), abs=1e-6
    )
    assert sec["mean_identifiability_per_block"]["class_token"] == pytest.approx(
        curves["cls"].tolist(), abs=1e-6
    )


@pytest.mark.xdist_group(BUNDLED_REPORT)
def test_timm_and_hf_twins_give_the_same_report_numbers(bundled_report: dict, tmp_path: Path) -> None:
    # the timm side is the bundled report shared with the other report tests (tests/conftest.py)
    hf_dir = tmp_path / "hf_model"
    load_demo_model("hf").save_pretrained(hf_dir)
    cfg = load_demo_config()
    (hf_dir / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": cfg["mean"], "image_std": cfg["std"]})
    )
    out = tmp_path / "b"
    assert (
        main(["report", "--no-progress", *BUNDLED_REPORT_ARGS, "--model", str(hf_dir), "--out", str(out)])
        == 0
    )
    a = _strict_json(bundled_report["out"] / "report.json")["sections"]
    b = _strict_json(out / "report.json")["sections"]
    _assert_close_nested(a, b)


def _strict_json(path: Path) -> dict:
    def reject(name: str) -> None:
        raise AssertionError(f"{path} is not strict JSON: it contains {name}")

    return json.loads(path.read_text(), parse_constant=reject)


def test_json_output_is_strict_with_null_for_undefined_numbers(tmp_path: Path) -> None:
    write_json(
        tmp_path / "r.json", {"rate": [1.5, float("nan"), float("inf")], "g": {"empty": float("nan")}, "n": 3}
    )
    assert _strict_json(tmp_path / "r.json") == {"rate": [1.5, None, None], "g": {"empty": None}, "n": 3}


def _assert_close_nested(a: object, b: object, path: str = "") -> None:
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), path
        # timings differ run to run; the random-init baseline uses each framework's own initialisation;
        # the model's name and description differ
        skip = {
            "seconds",
            "ms_per_image",
            "model",
            "description",
            "random_init",
            "random_init_note",
            "random_init_mean_per_block",
            "test_trained_vs_random_init",
            "trained_vs_random_init_image_tokens",
            "trained_vs_random_init_class_token",
            "images_with_identifiable_token_vs_random_init",
        }
        for k in set(a) - skip:
            _assert_close_nested(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), path
        for i, (u, v) in enumerate(zip(a, b)):
            _assert_close_nested(u, v, f"{path}[{i}]")
    elif isinstance(a, float):
        assert a == pytest.approx(b, abs=1e-6), path
    else:
        assert a == b, path


def test_labels_csv_and_max_images(image_dir: Path, tmp_path: Path) -> None:
    csv = tmp_path / "labels.csv"
    csv.write_text("file,label\ncat/gray.png,cat\nship/broken.jpg,8\n" + "".join(
        f"{c}/{f.name},{c}\n" for c in CLASSES for f in sorted((image_dir / c).iterdir()) if f.suffix == ".jpg"
        and f.name != "broken.jpg"))  # fmt: skip
    assert (
        _run(
            [
                "--images",
                str(image_dir),
                "--labels",
                str(csv),
                "--out",
                str(tmp_path / "r"),
                "--max-images",
                "4",
            ]
        )
        == 0
    )
    data = json.loads((tmp_path / "r" / "report.json").read_text())
    # the first 4 rows: gray.png, broken.jpg (skipped) and two cat images
    assert data["sections"]["class_identifiability_across_blocks"]["num_images"] == 3
    assert [Path(s["file"]).name for s in data["skipped_files"]] == ["broken.jpg"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--images", "/nonexistent/folder"], "image folder not found"),
        (["--model", "timm:not_a_model"], "unknown timm model name"),
        (["--model", "resnet"], "unknown model 'resnet'"),
        (["--sections", "identifiability,bogus"], "unknown report section"),
        (["--model", "timm:vit_tiny_patch16_224", "--checkpoint", "CKPT"], "does not fit timm model"),
        (
            ["--model", "demo", "--model", "timm:vit_tiny_patch16_224", "--checkpoint", "x.pt"],
            "--checkpoint applies to a single --model",
        ),
        (["--model", "demo", "--model", "demo"], "--model demo is given twice"),
        (["--masks", "/nonexistent/masks"], "--masks /nonexistent/masks: folder not found"),
    ],
)
def test_clear_one_line_errors(args: list[str], message: str, tmp_path: Path, capsys) -> None:
    if "CKPT" in args:
        ckpt = tmp_path / "demo.pt"
        torch.save(load_demo_model("timm").state_dict(), ckpt)
        args = [str(ckpt) if a == "CKPT" else a for a in args]
    extra = [] if "--sections" in args else ["--sections", "identifiability"]
    assert _run([*args, "--out", str(tmp_path / "o"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1

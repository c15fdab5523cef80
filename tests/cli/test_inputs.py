"""Image folders and labels in the CLI: no silent mislabelling, high-bit and non-finite images, one-line errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from captum_clsemb.cli.loading import ImageFileDataset, ImageSet, find_images
from captum_clsemb.cli.main import main
from captum_clsemb.demo import DEMO_IMAGES_DIR, demo_transform, load_demo_config, load_demo_model

CIFAR = load_demo_config()["class_names"]


def _copy(src_class: str, dst: Path, n: int = 2) -> list[Path]:
    dst.mkdir(parents=True, exist_ok=True)
    files = sorted((DEMO_IMAGES_DIR / src_class).iterdir())[:n]
    for f in files:
        shutil.copy(f, dst / f.name)
    return [dst / f.name for f in files]


def _report(images: Path, out: Path, *extra: str) -> int:
    return main(["report", "--images", str(images), "--out", str(out), "--no-progress",
                 "--sections", "identifiability", *extra])  # fmt: skip


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("clsemb: error: "), err
    return err


def _ident(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())["sections"]["class_identifiability_across_blocks"]


def _top1(files: list[Path], labels: list[int]) -> float:
    tf = demo_transform()
    x = torch.stack([tf(Image.open(f)) for f in files])
    with torch.no_grad():
        pred = load_demo_model("timm")(x).argmax(-1)
    return (pred == torch.tensor(labels)).float().mean().item()


# -- class sub-folders -----------------------------------------------------------------------------


def test_folders_that_are_not_class_names_are_an_error(tmp_path: Path, capsys) -> None:
    # before: cat/ and dogs/ silently became classes 0 and 1 (airplane, automobile)
    _copy("cat", tmp_path / "imgs" / "cat")
    _copy("dog", tmp_path / "imgs" / "dogs")
    assert _report(tmp_path / "imgs", tmp_path / "out") == 2
    err = _error(capsys)
    assert "'dogs'" in err and "'cat'" not in err and "did you mean 'dog'" in err
    assert not (tmp_path / "out").exists()


def test_folder_names_match_case_and_underscore_insensitively(tmp_path: Path) -> None:
    names = sorted(["airplane", "Automobile", "CAT"])  # the folder order
    files: list[Path] = []
    labels: list[int] = []
    for folder in names:
        files += _copy(folder.lower(), tmp_path / "imgs" / folder)
        labels += [CIFAR.index(folder.lower())] * 2
    assert _report(tmp_path / "imgs", tmp_path / "out") == 0
    ident = _ident(tmp_path / "out")
    assert ident["num_labelled"] == 6
    assert ident["top1_accuracy"] == pytest.approx(_top1(files, labels))
    s = find_images(tmp_path / "imgs", None, CIFAR, 10)
    assert [f.name for f in s.files] == [f.name for f in files] and s.labels == labels
    # '_' and spaces are the same, so are runs of spaces; a unique comma-separated alias counts
    _copy("cat", tmp_path / "more" / "sea_lion", 1)
    _copy("cat", tmp_path / "more" / "Great  White Shark", 1)
    _copy("cat", tmp_path / "more" / "tench", 1)
    names = ["tench, Tinca tinca", "great white shark", "Sea Lion"]
    assert find_images(tmp_path / "more", None, names, 3).labels == [1, 2, 0]


def test_integer_folder_names_are_class_indices(tmp_path: Path) -> None:
    files = _copy("cat", tmp_path / "imgs" / "3") + _copy("ship", tmp_path / "imgs" / "8")
    assert _report(tmp_path / "imgs", tmp_path / "out") == 0
    assert _ident(tmp_path / "out")["top1_accuracy"] == pytest.approx(_top1(files, [3, 3, 8, 8]))
    assert find_images(tmp_path / "imgs", None, CIFAR, 10).labels == [3, 3, 8, 8]


def test_integer_folder_out_of_range(tmp_path: Path, capsys) -> None:
    _copy("cat", tmp_path / "imgs" / "3")
    _copy("ship", tmp_path / "imgs" / "12")
    assert _report(tmp_path / "imgs", tmp_path / "out") == 2
    err = _error(capsys)
    assert "'12'" in err and "10 classes" in err


def _hf_without_class_names(folder: Path) -> Path:
    """A small random Hugging Face ViT whose labels are LABEL_0..LABEL_4 (no class names)."""
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                    intermediate_size=64, num_labels=5)  # fmt: skip
    ViTForImageClassification(cfg).save_pretrained(folder)
    return folder


def test_model_without_class_names_needs_index_folders_or_csv(tmp_path: Path, capsys) -> None:
    _copy("cat", tmp_path / "imgs" / "cat", 1)
    _copy("ship", tmp_path / "imgs" / "ship", 1)
    hf = _hf_without_class_names(tmp_path / "hf")
    capsys.readouterr()
    assert _report(tmp_path / "imgs", tmp_path / "out", "--model", str(hf)) == 2
    err = _error(capsys)
    assert "no class names" in err and "--labels" in err and "'cat'" in err
    # class-index folders work without class names
    (tmp_path / "imgs" / "cat").rename(tmp_path / "imgs" / "1")
    (tmp_path / "imgs" / "ship").rename(tmp_path / "imgs" / "4")
    assert _report(tmp_path / "imgs", tmp_path / "out", "--model", str(hf)) == 0
    assert _ident(tmp_path / "out")["num_labelled"] == 2


def test_imagenet_folders_for_timm_models(tmp_path: Path) -> None:
    # timm models carry no class names: ImageNet's (WordNet ids or names) are used for 1000 classes
    from captum_clsemb.cli.loading import ModelOptions, load_model

    loaded = load_model("timm:vit_tiny_patch16_224", ModelOptions(random_init=True))
    for name in ("n01443537", "tench", "Great_White_Shark"):  # goldfish (1), tench (0), great white shark (2)
        _copy("cat", tmp_path / "imgs" / name, 1)
    s = find_images(tmp_path / "imgs", None, loaded.class_names, 1000, class_ids=loaded.class_ids)
    assert {f.parent.name: lab for f, lab in zip(s.files, s.labels)} == {
        "n01443537": 1,
        "tench": 0,
        "Great_White_Shark": 2,
    }
    # before: sorted folder order, 0, 1, 2, whatever the names
    ds = ImageFileDataset(s, loaded.transform)
    assert [ds[i][1] for i in range(3)] == [2, 1, 0]


# -- labels CSV ------------------------------------------------------------------------------------


@pytest.fixture
def flat(tmp_path: Path) -> Path:
    """6 images in one folder: 2 cats, 2 ships, 2 trucks."""
    root = tmp_path / "flat"
    root.mkdir()
    for c in ("cat", "ship", "truck"):
        for f in sorted((DEMO_IMAGES_DIR / c).iterdir())[:2]:
            shutil.copy(f, root / f"{c}_{f.name}")
    return root


def test_images_missing_from_the_csv_are_used_unlabelled_and_reported(
    flat: Path, tmp_path: Path, caplog
) -> None:
    csv = tmp_path / "labels.csv"
    csv.write_text("file,label\ncat_0000.jpg,cat\ncat_0001.jpg,3\nship_0000.jpg,ship\n")
    assert _report(flat, tmp_path / "out", "--labels", str(csv)) == 0
    ident = _ident(tmp_path / "out")
    assert ident["num_images"] == 6 and ident["num_labelled"] == 3  # before: 3 images, 3 silently dropped
    assert "ground-truth labels for 3 images" in ident["targets"]
    msg = [r.getMessage() for r in caplog.records if "not in labels.csv" in r.getMessage()]
    assert len(msg) == 1 and "3 image(s)" in msg[0] and "ship_0001.jpg" in msg[0]


def test_csv_file_listed_twice_names_both_lines(flat: Path, tmp_path: Path, capsys) -> None:
    csv = tmp_path / "labels.csv"
    csv.write_text("file,label\ncat_0000.jpg,cat\nship_0000.jpg,ship\n./cat_0000.jpg,3\n")
    assert _report(flat, tmp_path / "out", "--labels", str(csv)) == 2
    err = _error(capsys)
    assert "'./cat_0000.jpg' is listed twice, on lines 2 and 4" in err


def test_csv_out_of_range_label_names_file_and_line(flat: Path, tmp_path: Path, capsys) -> None:
    csv = tmp_path / "labels.csv"
    csv.write_text("file,label\ncat_0000.jpg,cat\nship_0000.jpg,10\n")
    assert _report(flat, tmp_path / "out", "--labels", str(csv)) == 2
    err = _error(capsys)
    assert "labels.csv:3" in err and "ship_0000.jpg" in err and "out of range (0..9)" in err


def test_csv_header_after_a_blank_line_and_byte_order_mark(flat: Path, tmp_path: Path) -> None:
    csv = tmp_path / "labels.csv"
    csv.write_bytes("\ufeff\nfile , label\ncat_0000.jpg , Cat\n\nship_0000.jpg,8\n".encode())
    assert _report(flat, tmp_path / "out", "--labels", str(csv)) == 0
    ident = _ident(tmp_path / "out")
    assert ident["num_labelled"] == 2
    assert ident["top1_accuracy"] == pytest.approx(
        _top1([flat / "cat_0000.jpg", flat / "ship_0000.jpg"], [3, 8])
    )
    s = find_images(flat, csv, CIFAR, 10)
    assert [(f.name, lab) for f, lab in zip(s.files, s.labels)][:2] == [
        ("cat_0000.jpg", 3),
        ("ship_0000.jpg", 8),
    ]
    assert s.labels[2:] == [None] * 4


def test_csv_row_for_a_missing_file_is_reported(flat: Path, tmp_path: Path) -> None:
    csv = tmp_path / "labels.csv"
    csv.write_text("file,label\ncat_0000.jpg,cat\nnot_there.jpg,cat\n")
    assert _report(flat, tmp_path / "out", "--labels", str(csv)) == 0
    skipped = json.loads((tmp_path / "out" / "report.json").read_text())["skipped_files"]
    assert [s["reason"] for s in skipped] == ["listed in labels.csv (line 3) but not found"]
    assert Path(skipped[0]["file"]).name == "not_there.jpg"


def test_labels_csv_in_the_image_folder_is_used(flat: Path, tmp_path: Path, caplog) -> None:
    (flat / "labels.csv").write_text("file,label\n" + "".join(
        f"{f.name},{f.name.split('_')[0]}\n" for f in sorted(flat.glob("*.jpg"))))  # fmt: skip
    assert _report(flat, tmp_path / "out") == 0
    ident = _ident(tmp_path / "out")
    assert ident["num_labelled"] == 6 and ident["targets"] == "ground-truth labels"
    files = sorted(flat.glob("*.jpg"))
    assert ident["top1_accuracy"] == pytest.approx(
        _top1(files, [CIFAR.index(f.name.split("_")[0]) for f in files])
    )
    assert any("using the labels in" in r.getMessage() for r in caplog.records)


def test_unlabelled_images_say_which_targets_were_used(flat: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert main(["report", "--images", str(flat), "--out", str(out), "--no-progress",
                 "--sections", "identifiability,explanations"]) == 0  # fmt: skip
    data = json.loads((out / "report.json").read_text())
    ident = data["sections"]["class_identifiability_across_blocks"]
    assert ident["num_labelled"] == 0 and ident["top1_accuracy"] is None
    assert ident["targets"] == "the predicted class (the images have no labels)"
    html = (out / "report.html").read_text()
    assert "ground-truth" not in html and "Targets: the predicted class" in html


# -- pixel formats ---------------------------------------------------------------------------------


def test_high_bit_depth_images_are_scaled_to_8_bit(tmp_path: Path) -> None:
    src = Image.open(sorted((DEMO_IMAGES_DIR / "cat").iterdir())[0]).convert("L")
    a8 = np.asarray(src)
    src.save(tmp_path / "g8.png")
    Image.fromarray(a8.astype(np.uint16) * 257).save(tmp_path / "g16.png")  # 16-bit PNG, mode I;16
    Image.fromarray(a8.astype(np.int32) * 257, mode="I").save(tmp_path / "g32.tif")
    Image.fromarray(a8.astype(np.float32) / 255, mode="F").save(tmp_path / "gf.tif")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    names = ["g8.png", "g16.png", "g32.tif", "gf.tif"]
    ds = ImageFileDataset(ImageSet([tmp_path / n for n in names], [None] * 4, None), demo_transform())
    x = [ds[i][0] for i in range(4)]
    assert all(t is not None for t in x)
    for t in x[1:]:  # before: 16-bit pixels clipped to 255 (near white)
        assert torch.allclose(t, x[0], atol=1e-6)


def test_non_finite_images_are_skipped_with_a_message(tmp_path: Path, caplog) -> None:
    root = tmp_path / "imgs"
    _copy("cat", root / "cat")
    nan = np.full((32, 32), 0.5, dtype=np.float32)
    nan[3, 4] = np.nan
    Image.fromarray(nan, mode="F").save(root / "cat" / "nan.tif")
    Image.fromarray(np.full((32, 32), np.inf, dtype=np.float32), mode="F").save(root / "cat" / "inf.tif")
    out = tmp_path / "out"
    assert _report(root, out) == 0
    data = json.loads((out / "report.json").read_text())
    assert data["sections"]["class_identifiability_across_blocks"]["num_images"] == 2
    assert sorted((Path(s["file"]).name, s["reason"]) for s in data["skipped_files"]) == [
        ("inf.tif", "non-finite pixel values (NaN or inf)"),
        ("nan.tif", "non-finite pixel values (NaN or inf)"),
    ]
    lines = [r.getMessage() for r in caplog.records if "non-finite" in r.getMessage()]
    assert len(lines) == 2 and all("\n" not in m for m in lines)


def test_preprocessing_that_produces_non_finite_values_skips_the_image(tmp_path: Path, capsys) -> None:
    # a Hugging Face folder whose preprocessor has std 0: every image becomes inf/NaN
    hf = tmp_path / "hf"
    load_demo_model("hf").save_pretrained(hf)
    (hf / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": [0.5] * 3, "image_std": [0.0] * 3})
    )
    _copy("cat", tmp_path / "imgs" / "cat")
    capsys.readouterr()
    assert _report(tmp_path / "imgs", tmp_path / "out", "--model", str(hf)) == 2
    err = _error(capsys)
    assert "no usable images" in err and "non-finite values (NaN or inf) after preprocessing" in err


# -- one-line errors -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        (["report", "--max-images", "0"], "--max-images must be at least 1"),
        (["report", "--max-images", "-3"], "--max-images must be at least 1"),
        (["report", "--batch-size", "0"], "--batch-size must be at least 1"),
        (["report", "--compare-images", "-1"], "--compare-images must be at least 0"),
        (["report", "--num-workers", "-1"], "--num-workers must be at least 0"),
        (["report", "--device", "meta"], "--device 'meta' cannot run the model"),
        (["report", "--device", "banana"], "is not a torch device"),
        (["compare", "--num-images", "0"], "--num-images must be at least 1"),
        (["compare", "--batch-size", "-2"], "--batch-size must be at least 1"),
        (["compare", "--device", "meta"], "--device 'meta' cannot run the model"),
    ],
)
def test_bad_options_are_one_line_errors(args: list[str], message: str, tmp_path: Path, capsys) -> None:
    assert main([*args, "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert message in _error(capsys)
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("command", ["report", "compare"])
def test_cuda_without_cuda_is_a_one_line_error(command: str, tmp_path: Path, capsys) -> None:
    assert main([command, "--device", "cuda", "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "CUDA is not available" in _error(capsys)


def test_folder_of_unreadable_images_is_a_one_line_error(tmp_path: Path, capsys) -> None:
    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(3):
        (root / f"{i}.jpg").write_bytes(b"not an image")
    assert _report(root, tmp_path / "out") == 2  # before: KeyError: 'images'
    err = _error(capsys)
    assert "no usable images: all 3 file(s) were skipped" in err and "0.jpg" in err
    assert main(["compare", "--images", str(root), "--labels", str(_labels(root)), "--out", str(tmp_path / "o"),
                 "--no-progress"]) == 2  # fmt: skip
    assert "no usable images" in _error(capsys)


def _labels(root: Path) -> Path:
    csv = root.parent / "labels.csv"
    csv.write_text("".join(f"{f.name},1\n" for f in sorted(root.iterdir())))
    return csv

"""`clsemb report --model A --model B` (Fig. 2 over normalised depth, Table 1) and `--masks DIR` (Fig. 3a)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from captum_clsemb.attr import BlockwiseIdentifiability
from captum_clsemb.cli.main import main
from captum_clsemb.demo import DEMO_IMAGES_DIR, demo_transform, load_demo_config, load_demo_model
from captum_clsemb.stats import permutation_test

N = 24


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    """12 airplanes and 12 birds of the bundled images, in class folders."""
    root = tmp_path_factory.mktemp("imgs")
    for c in ("airplane", "bird"):
        (root / c).mkdir()
        for f in sorted((DEMO_IMAGES_DIR / c).iterdir())[:12]:
            shutil.copy(f, root / c / f.name)
    return root


def pixels(image_dir: Path) -> tuple[list[Path], torch.Tensor, torch.Tensor]:
    cfg, tf = load_demo_config(), demo_transform()
    files = [f for c in ("airplane", "bird") for f in sorted((image_dir / c).iterdir())]
    x = torch.stack([tf(Image.open(f)) for f in files])
    y = torch.tensor([cfg["class_names"].index(f.parent.name) for f in files])
    return files, x, y


def hf_folder(path: Path) -> tuple[Path, torch.nn.Module]:
    """A 3-block Hugging Face ViT with CIFAR-10 class names and the demo's normalisation (random weights)."""
    cfg = load_demo_config()
    torch.manual_seed(0)
    config = transformers.ViTConfig(
        image_size=32, patch_size=4, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
        intermediate_size=64, num_labels=10, id2label=dict(enumerate(cfg["class_names"])),
        label2id={n: i for i, n in enumerate(cfg["class_names"])},
    )  # fmt: skip
    model = transformers.ViTForImageClassification(config).eval()
    model.save_pretrained(path)
    (path / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": cfg["mean"], "image_std": cfg["std"]})
    )
    return path, model


def test_two_models_share_fig2_over_normalised_depth_and_table1(image_dir: Path, tmp_path: Path) -> None:
    folder, hf_model = hf_folder(tmp_path / "hf3")
    out = tmp_path / "o"
    args = ["report", "--no-progress", "--images", str(image_dir), "--sections", "identifiability",
            "--model", "demo", "--model", str(folder), "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    data = json.loads((out / "report.json").read_text())
    sec = data["sections"]["class_identifiability_across_blocks"]
    assert data["models"] == ["demo", str(folder)]
    demo, hf = sec["models"]
    assert (demo["num_blocks"], hf["num_blocks"]) == (6, 3) and demo["num_images"] == hf["num_images"] == N
    # the common grid has as many points as the shallowest model has blocks: 3; the 6-block model's
    # curve averages its blocks in pairs (the paper's ViT-L averaging), the 3-block model's is its own
    assert sec["normalised_depth"] == pytest.approx([1 / 3, 2 / 3, 1.0])
    per_block = np.asarray(demo["mean_identifiability_per_block"]["image_tokens"]["estimate"])
    on_grid = demo["normalised_depth_curves"]["mean"]["image_tokens"]["estimate"]
    assert on_grid == pytest.approx(per_block.reshape(3, 2).mean(1).tolist())
    assert hf["normalised_depth_curves"]["mean"]["class_token"]["estimate"] == pytest.approx(
        hf["mean_identifiability_per_block"]["class_token"]["estimate"]
    )
    # Table 1 numbers of the second model, against the library on the same pixels
    files, x, y = pixels(image_dir)
    scores = BlockwiseIdentifiability(hf_model).attribute(x, target=y)
    rates = 100 * (scores[:, -1, 1:] == 1).double().mean(-1)
    assert hf["identifiability_rate_last_block_percent"]["estimate"] == pytest.approx(rates.mean().item())
    with torch.no_grad():
        acc = 100 * (hf_model(pixel_values=x).logits.argmax(-1) == y).double().mean().item()
    assert hf["top1_accuracy_percent"]["estimate"] == pytest.approx(acc)
    # each model against its own random-init copy, with the tests
    for m in (demo, hf):
        t = m["tests"]["trained_vs_random_init_image_tokens"]
        assert t["test"] == "wilcoxon_signed_rank" and len(t["p_value"]) == m["num_blocks"]
    claims = [c for c in data["claims"] if c["claim_id"] == "identifiability_above_random_init"]
    assert [c["model"] for c in claims] == ["demo", str(folder)]
    html = (out / "report.html").read_text()
    table = html.split("Table 1: identifiability in the last block")[1].split("</table>")[0]
    assert table.count("<tr>") == 2 + 1 and f"<td>{folder}</td>" in table and "<td>demo</td>" in table
    assert "normalised depth" in html and f"Per block: {folder}" in html


def write_imagenet_s_mask(path: Path, ids: np.ndarray) -> None:
    """ImageNet-S encoding: class id = R + 256 G."""
    rgb = np.zeros((*ids.shape, 3), dtype=np.uint8)
    rgb[..., 0], rgb[..., 1] = ids % 256, ids // 256
    Image.fromarray(rgb, mode="RGB").save(path)


def test_masks_add_the_class_vs_context_section(image_dir: Path, tmp_path: Path) -> None:
    files, x, y = pixels(image_dir)
    masks = tmp_path / "masks"
    with_mask = list(range(0, N, 3))  # 8 of the 24 images
    object_cols = 12  # the left 12 of 32 pixel columns: patch columns 0-2 of the 8 x 8 grid
    for i in with_mask:
        # the bundled file names repeat across class folders (airplane/0003.jpg, bird/0003.jpg): the
        # masks mirror the image folders, as ImageNet-S's validation-segmentation/<wnid>/<stem>.png
        folder = masks / files[i].parent.name
        folder.mkdir(parents=True, exist_ok=True)
        ids = np.zeros((32, 32), dtype=np.int64)
        ids[:, :object_cols] = 404 if i % 2 else 1  # any labelled id is the object
        ids[28:, 28:] = 1000  # an ignored corner: a context patch either way
        if i == 3:  # a single-channel 0/255 mask works too
            Image.fromarray(np.where(ids == 404, 255, 0).astype(np.uint8), mode="L").save(
                folder / f"{files[i].stem}.png"
            )
        else:
            write_imagenet_s_mask(folder / f"{files[i].stem}.png", ids)
    out = tmp_path / "o"
    args = ["report", "--no-progress", "--images", str(image_dir), "--masks", str(masks), "--sections",
            "identifiability", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    data = json.loads((out / "report.json").read_text())
    sec = data["sections"]["class_context"]
    assert sec["num_images_with_mask"] == 8 and sec["num_images_without_mask"] == N - 8
    assert sec["matched_by"].startswith("sub-folder and file stem")
    # independent: class tokens are the patches of grid columns 0-2, everything else is context
    is_class = torch.arange(64) % 8 < 3
    scores = BlockwiseIdentifiability(load_demo_model("timm")).attribute(x[with_mask], target=y[with_mask])
    img = scores[:, :, 1:].double()  # (8, blocks, 64)
    pooled = sec["pooled_tokens"]
    assert pooled["num_tokens"] == {"class": 8 * 24, "context": 8 * 40}
    assert pooled["mean_identifiability"]["class"] == pytest.approx(img[:, :, is_class].mean((0, 2)).tolist())
    assert pooled["mean_identifiability"]["context"] == pytest.approx(
        img[:, :, ~is_class].mean((0, 2)).tolist()
    )
    # the paired test on images: per image, the class-token mean against the context-token mean
    ref = permutation_test(
        img[:, :, is_class].mean(-1).numpy(),
        img[:, :, ~is_class].mean(-1).numpy(),
        paired=True,
        n_resamples=2000,
    )
    t = sec["test_images_paired"]
    assert t["test"] == "permutation_test" and t["paired"] is True
    assert t["p_value"] == pytest.approx(ref.p_value.tolist())
    assert t["statistic"] == pytest.approx(ref.statistic.tolist())
    assert pooled["test"]["test"] == "permutation_test" and pooled["test"]["unit"] == "tokens"
    claim = next(c for c in data["claims"] if c["claim_id"] == "class_tokens_more_identifiable_than_context")
    assert claim["test"]["p_value"] == t["p_value"]
    assert (out / "class_context.png").is_file() and (out / "class_context.svg").is_file()
    html = (out / "report.html").read_text()
    assert 'id="class_context"' in html and "Fig. 3a: class- versus context-labelled tokens" in html


def test_masks_matched_by_unique_file_stem_anywhere(tmp_path: Path) -> None:
    images = tmp_path / "imgs"
    images.mkdir()
    for f in sorted((DEMO_IMAGES_DIR / "ship").iterdir())[:4]:
        shutil.copy(f, images / f"ship_{f.name}")
    masks = tmp_path / "masks" / "validation-segmentation" / "n04273569"
    masks.mkdir(parents=True)
    ids = np.zeros((32, 32), dtype=np.int64)
    ids[8:24, 8:24] = 511
    for name in ("ship_0000", "ship_0002"):
        write_imagenet_s_mask(masks / f"{name}.png", ids)
    out = tmp_path / "o"
    args = ["report", "--no-progress", "--images", str(images), "--masks", str(tmp_path / "masks"), "--sections",
            "identifiability", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    sec = json.loads((out / "report.json").read_text())["sections"]["class_context"]
    assert sec["matched_by"] == "file stem" and sec["num_images_with_mask"] == 2
    assert sec["pooled_tokens"]["num_tokens"] == {
        "class": 2 * 16,
        "context": 2 * 48,
    }  # the 4 x 4 centre patches


def test_masks_that_match_no_image_are_one_clear_error(image_dir: Path, tmp_path: Path, capsys) -> None:
    masks = tmp_path / "masks"
    masks.mkdir()
    write_imagenet_s_mask(masks / "unrelated.png", np.ones((32, 32), dtype=np.int64))
    args = [
        "report",
        "--no-progress",
        "--images",
        str(image_dir),
        "--masks",
        str(masks),
        "--out",
        str(tmp_path / "o"),
    ]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no mask PNG matches an image of --images" in err
    assert "airplane/0000.jpg needs airplane/0000.png" in err  # stems repeat: sub-folder and stem
    assert not (tmp_path / "o").exists()

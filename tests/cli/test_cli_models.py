"""`clsemb report` / `clsemb compare` on the model families, loaded as users load them, never from the network.

Small random models of the real architectures are saved with ``save_pretrained`` into a
temporary folder (DINOv2, CLIP, SigLIP) or built by timm with ``--random-init``; the hub is
forced offline where a test could reach it.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import transformers
from conftest import small_clip, small_dinov2, tiny_tokenizer
from PIL import Image

from captum_clsemb import BlockwiseIdentifiability, ZeroShotClassifier
from captum_clsemb.cli.main import build_parser, main, model_options
from captum_clsemb.demo import DEMO_IMAGES_DIR, load_demo_config

ROOT = Path(__file__).resolve().parents[2]
CIFAR = load_demo_config()["class_names"]
FOLDERS = ["cat", "dog", "ship", "truck"]
FAST = ["--no-progress", "--batch-size", "4", "--sections", "identifiability", "--max-images", "8"]


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    """8 bundled images: 2 per class in folders named after 4 CIFAR-10 classes."""
    root = tmp_path_factory.mktemp("imgs")
    for c in FOLDERS:
        (root / c).mkdir()
        for f in sorted((DEMO_IMAGES_DIR / c).iterdir())[:2]:
            shutil.copy(f, root / c / f.name)
    return root


def _files(root: Path) -> list[Path]:
    return [f for c in FOLDERS for f in sorted((root / c).iterdir())]


def _labels(root: Path) -> torch.Tensor:
    return torch.tensor([CIFAR.index(f.parent.name) for f in _files(root)])


def _ident(out: Path) -> tuple[dict, dict]:
    data = json.loads((out / "report.json").read_text())
    return data, data["sections"]["class_identifiability_across_blocks"]


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("clsemb: error: "), err
    return err


def _expected(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float, list[float]]:
    """Top-1 accuracy, last-block identifiability rate and the image-token curve, with the library."""
    with torch.no_grad():
        logits = model(x)
        logits = getattr(logits, "logits", logits)  # Hugging Face output
        acc = (logits.argmax(-1) == y).float().mean().item()
    bi = BlockwiseIdentifiability(model)
    scores = bi.attribute(x, target=y)
    return acc, bi.identifiability_rate(scores).item(), bi.mean_identifiability(scores)["image"].tolist()


# -- the options -----------------------------------------------------------------------------------


def test_report_and_compare_share_the_model_options() -> None:
    parser = build_parser()
    argv = ["--model", "hf:o/n", "--checkpoint", "w.pth", "--random-init", "--classes", "c.txt", "--templates", "t.txt"]  # fmt: skip
    expected = {"checkpoint": "w.pth", "random_init": True, "classes": "c.txt", "templates": "t.txt"}
    for command in ("report", "compare"):
        args = parser.parse_args([command, *argv])
        # report's --model is repeatable (several models in one report): a list
        assert (
            args.model == (["hf:o/n"] if command == "report" else "hf:o/n")
            and model_options(args) == expected
        )
        defaults = parser.parse_args([command])
        assert defaults.model == (None if command == "report" else "demo")  # report: None is the demo model
        assert model_options(defaults) == {"checkpoint": None, "random_init": False, "classes": None, "templates": None}  # fmt: skip


def _code_lines(path: Path) -> list[str]:
    """The lines of the fenced (Markdown) or ``code-block`` (reST) blocks of a file."""
    lines, out, i = path.read_text().splitlines(), [], 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            i += 1
            while not lines[i].startswith("```"):
                out.append(lines[i])
                i += 1
        elif line.strip().startswith(".. code-block::"):
            i += 1
            while i < len(lines) and (not lines[i].strip() or lines[i].startswith("   ")):
                out.append(lines[i])
                i += 1
            continue
        i += 1
    return out


def _documented_commands() -> list[tuple[str, list[str]]]:
    """(file, arguments) of every clsemb report / compare command in README.md and the docs."""
    found = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.rst"))]:
        for line in _code_lines(path):
            for part in line.split("   #")[0].split("&&"):
                words = (
                    shlex.split(part)
                    if re.search(r"\b(clsemb|captum_clsemb) (report|compare)\b", part)
                    else []
                )
                names = [Path(w).name for w in words]
                for k, name in enumerate(names[:-1]):
                    if name in ("clsemb", "captum_clsemb") and names[k + 1] in ("report", "compare"):
                        found.append((path.name, words[k + 1 :]))
    return found


def test_documented_commands_parse() -> None:
    commands = _documented_commands()
    parser = build_parser()
    for where, words in commands:
        args = parser.parse_args(words)  # exits (a test error) on an unknown option
        assert args.command in ("report", "compare"), (where, words)
    # the model options are shown in use, in the README and in the quickstart
    for where in ("README.md", "quickstart.rst"):
        joined = " ".join(w for name, words in commands if name == where for w in words)
        for option in ("--random-init", "--classes", "--templates", "--checkpoint", "hf:", "timm:"):
            assert option in joined, (where, option)


# -- Hugging Face folders: DINOv2, CLIP, SigLIP ------------------------------------------------------


@pytest.fixture(scope="module")
def dinov2_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("dinov2")
    model = small_dinov2(
        num_labels=10, id2label=dict(enumerate(CIFAR)), label2id={n: i for i, n in enumerate(CIFAR)}
    )
    model.save_pretrained(folder)
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def _processor_pixels(folder: Path, files: list[Path]) -> torch.Tensor:
    proc = transformers.AutoImageProcessor.from_pretrained(folder, local_files_only=True)
    return proc(images=[Image.open(f).convert("RGB") for f in files], return_tensors="pt")["pixel_values"]


def test_report_on_a_local_dinov2_folder_and_a_checkpoint(
    dinov2_dir: Path, image_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "rep"
    assert (
        main(["report", "--model", str(dinov2_dir), "--images", str(image_dir), "--out", str(out), *FAST])
        == 0
    )
    data, sec = _ident(out)
    assert "Dinov2ForImageClassification" in data["model"] and str(dinov2_dir) in data["model"]
    assert sec["num_images"] == 8 and sec["num_labelled"] == 8  # folders labelled by the model's class names
    x, y = _processor_pixels(dinov2_dir, _files(image_dir)), _labels(image_dir)
    model = transformers.Dinov2ForImageClassification.from_pretrained(dinov2_dir).eval()
    acc, rate, curve = _expected(model, x, y)
    assert sec["top1_accuracy"] == pytest.approx(acc)
    assert sec["identifiability_rate_last_block_percent"] == pytest.approx(rate, abs=1e-6)
    assert sec["mean_identifiability_per_block"]["image_tokens"] == pytest.approx(curve, abs=1e-6)

    # --checkpoint: other weights for the same architecture
    other = small_dinov2(num_labels=10)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.3 * torch.randn_like(p))
    torch.save(other.state_dict(), tmp_path / "w.pth")
    out2 = tmp_path / "rep2"
    args = [
        "report",
        "--model",
        str(dinov2_dir),
        "--checkpoint",
        str(tmp_path / "w.pth"),
        "--images",
        str(image_dir),
    ]
    assert main([*args, "--out", str(out2), *FAST]) == 0
    data2, sec2 = _ident(out2)
    assert f"weights from {tmp_path / 'w.pth'}" in data2["model"]
    acc2, rate2, curve2 = _expected(other.eval(), x, y)
    assert sec2["identifiability_rate_last_block_percent"] == pytest.approx(rate2, abs=1e-6)
    assert sec2["mean_identifiability_per_block"]["image_tokens"] == pytest.approx(curve2, abs=1e-6)
    assert sec2["mean_identifiability_per_block"]["image_tokens"] != pytest.approx(curve, abs=1e-3)


def _save_image_text_model(kind: str, folder: Path) -> torch.nn.Module:
    model = small_clip(kind)
    model.save_pretrained(folder)
    tiny_tokenizer(folder / "tok_src").save_pretrained(folder)
    transformers.CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    ).save_pretrained(folder)
    return model


def test_report_on_a_clip_folder_with_classes_and_templates(image_dir: Path, tmp_path: Path, capsys) -> None:
    folder = tmp_path / "clip"
    _save_image_text_model("clip", folder)
    (tmp_path / "classes.txt").write_text("\n".join(CIFAR) + "\n")
    (tmp_path / "templates.txt").write_text("a photo of a {}.\n\na {}.\n")
    out = tmp_path / "rep"
    args = [
        "report",
        "--model",
        str(folder),
        "--classes",
        str(tmp_path / "classes.txt"),
        "--images",
        str(image_dir),
    ]
    assert main([*args, "--templates", str(tmp_path / "templates.txt"), "--out", str(out), *FAST]) == 0
    data, sec = _ident(out)
    assert "CLIPModel zero-shot classifier over 10 classes (2 prompt template(s))" in data["model"]
    assert sec["num_labelled"] == 8  # folder names matched the --classes names
    clip = transformers.CLIPModel.from_pretrained(folder).eval()
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    zs = ZeroShotClassifier.from_prompts(clip, tok, CIFAR, templates=["a photo of a {}.", "a {}."])
    acc, rate, curve = _expected(zs, _processor_pixels(folder, _files(image_dir)), _labels(image_dir))
    assert sec["top1_accuracy"] == pytest.approx(acc)
    assert sec["identifiability_rate_last_block_percent"] == pytest.approx(rate, abs=1e-6)
    assert sec["mean_identifiability_per_block"]["image_tokens"] == pytest.approx(curve, abs=1e-6)

    # one-line errors, before any work: no --classes; a template without {}; --classes on timm
    capsys.readouterr()
    assert main(["report", "--model", str(folder), "--out", str(tmp_path / "e1"), *FAST]) == 2
    err = _one_line_error(capsys)
    assert "image-text model (CLIPModel)" in err and "--classes FILE" in err
    (tmp_path / "bad.txt").write_text("a photo of a {}.\na photo\n")
    bad = [*args, "--templates", str(tmp_path / "bad.txt"), "--out", str(tmp_path / "e2"), *FAST]
    assert main(bad) == 2
    assert f"{tmp_path / 'bad.txt'}:2: a template needs exactly one {{}}" in _one_line_error(capsys)
    timm_args = ["--model", "timm:vit_tiny_patch16_224", "--classes", str(tmp_path / "classes.txt")]
    assert main(["report", *timm_args, "--out", str(tmp_path / "e3"), *FAST]) == 2
    assert "--classes FILE" in _one_line_error(capsys)
    assert not any((tmp_path / e).exists() and any((tmp_path / e).iterdir()) for e in ("e1", "e2", "e3"))


def test_compare_on_siglip_leaves_out_the_class_token_methods(
    image_dir: Path, tmp_path: Path, capsys
) -> None:
    # SigLIP has no class token (attention-pooling head): before, `clsemb compare` failed on the
    # first batch; now the class-token methods are left out with a note and the others run
    folder = tmp_path / "siglip"
    _save_image_text_model("siglip", folder)
    (tmp_path / "classes.txt").write_text("\n".join(CIFAR) + "\n")
    out = tmp_path / "cmp"
    args = [
        "compare",
        "--model",
        str(folder),
        "--classes",
        str(tmp_path / "classes.txt"),
        "--images",
        str(image_dir),
    ]
    capsys.readouterr()
    assert main([*args, "--num-images", "4", "--batch-size", "4", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr()
    data = json.loads((out / "run.json").read_text())
    assert "SiglipModel zero-shot classifier over 10 classes" in data["model"]
    assert list(data["auc_trapezoid"]) == ["LinearProbe", "Random"]
    assert len(data["notes"]) == 1
    note = data["notes"][0]
    assert note.startswith("ClassEmbeddingGradient, CheferRelevancy, CheferGradientRollout, AttentionRollout, RawAttention left out")  # fmt: skip
    assert "has none" in note and "attention-pooling head" in note
    assert f"- {note}" in printed.out and f"- {note}" in (out / "results.md").read_text()
    assert "UserWarning" not in printed.err  # said once, in the results
    for method in ("LinearProbe", "Random"):
        for mode in ("negative", "positive"):
            assert 0 <= data["auc_trapezoid"][method][mode] <= 90


# -- timm: --random-init, and no network --------------------------------------------------------------


def _offline_env(tmp_path: Path) -> dict[str, str]:
    """The hub forced offline, an empty cache and an unreachable endpoint: nothing can be downloaded."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "TORCH_HOME": str(tmp_path / "th"),
            "HF_ENDPOINT": "http://127.0.0.1:9", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}  # fmt: skip


def _clsemb(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "captum_clsemb", *args], env=env, capture_output=True, text=True, timeout=600
    )


def test_random_init_timm_report_offline_with_imagenet_folders(tmp_path: Path) -> None:
    # a real timm architecture (RoPE ViT-S/16, 224 px) with random weights: no download
    name = "vit_small_patch16_rope_224"
    imgs = tmp_path / "imgs"
    for folder, src in (("tench", "cat"), ("n01443537", "dog")):  # ImageNet 0 (name), 1 (WordNet id)
        (imgs / folder).mkdir(parents=True)
        for f in sorted((DEMO_IMAGES_DIR / src).iterdir())[:2]:
            shutil.copy(f, imgs / folder / f.name)
    out = tmp_path / "rep"
    args = [
        "report",
        "--model",
        f"timm:{name}",
        "--random-init",
        "--images",
        str(imgs),
        "--out",
        str(out),
        *FAST,
    ]
    res = _clsemb(args, _offline_env(tmp_path))
    assert res.returncode == 0, res.stderr[-2000:]
    data, sec = _ident(out)
    assert data["model"] == f"timm {name} (random weights); class names of ImageNet (1000 classes)"
    assert sec["num_images"] == 4 and sec["num_labelled"] == 4
    # the same seeded random weights, built here with timm directly
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False).eval()
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    files = [f for d in ("n01443537", "tench") for f in sorted((imgs / d).iterdir())]
    x = torch.stack([transform(Image.open(f).convert("RGB")) for f in files])
    acc, rate, curve = _expected(model, x, torch.tensor([1, 1, 0, 0]))
    assert sec["top1_accuracy"] == pytest.approx(acc)
    assert sec["identifiability_rate_last_block_percent"] == pytest.approx(rate, abs=1e-5)
    assert sec["mean_identifiability_per_block"]["image_tokens"] == pytest.approx(curve, abs=1e-5)


@pytest.mark.parametrize(
    "command, model, extra, says",
    [
        (
            "report",
            "timm:vit_tiny_patch16_224",
            [],
            ["could not download timm weights", "--checkpoint FILE", "--random-init"],
        ),  # fmt: skip
        (
            "compare",
            "hf:openai/clip-vit-base-patch32",
            ["--classes", "CLASSES"],
            ["local Hugging Face model folder"],
        ),
    ],
)
def test_without_network_one_line_error_says_how_to_load_locally(
    command: str, model: str, extra: list[str], says: list[str], tmp_path: Path
) -> None:
    (tmp_path / "classes.txt").write_text("cat\ndog\n")
    extra = [str(tmp_path / "classes.txt") if a == "CLASSES" else a for a in extra]
    out = tmp_path / "out"
    res = _clsemb(
        [command, "--model", model, *extra, "--out", str(out), "--no-progress"], _offline_env(tmp_path)
    )
    assert res.returncode == 2, res.stderr[-2000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("clsemb: error: "), res.stderr
    assert "offline (HF_HUB_OFFLINE=1)" in lines[0]
    for text in says:
        assert text in lines[0]
    assert not out.exists() or not any(out.iterdir())
    assert not any((tmp_path / "hf").rglob("*.safetensors"))


def test_option_conflicts_are_one_line_errors(tmp_path: Path, capsys) -> None:
    for argv, says in [
        (["--model", "timm:vit_tiny_patch16_224", "--random-init", "--checkpoint", "w.pth"], "not both"),
        (["--model", "demo", "--random-init"], "ships its own weights"),
        (["--model", "hf:", "--random-init"], "needs a model id"),
    ]:
        assert main(["compare", *argv, "--out", str(tmp_path / "o"), "--no-progress"]) == 2
        err = _one_line_error(capsys)
        assert says in err, err
        if "not both" in says:
            assert "--checkpoint FILE" in err and "--random-init" in err

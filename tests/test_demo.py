"""The bundled demo model, images and preprocessing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from timm.models.vision_transformer import VisionTransformer

from captum_clsemb.demo import (
    DEMO_IMAGES_DIR,
    FRAMEWORKS,
    demo_transform,
    load_demo_config,
    load_demo_images,
    load_demo_model,
)

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def test_config_keys() -> None:
    config = load_demo_config()
    for key in ("model_kwargs", "class_names", "mean", "std", "input_size", "test_top1"):
        assert key in config
    assert config["class_names"] == CIFAR10_CLASSES
    assert config["input_size"] == [3, 32, 32]
    config["class_names"].append("mutated")
    assert load_demo_config()["class_names"] == CIFAR10_CLASSES


def test_timm_and_hf_models_agree_on_demo_images() -> None:
    timm_model = load_demo_model("timm")
    hf_model = load_demo_model("hf")
    assert isinstance(timm_model, VisionTransformer)
    assert isinstance(hf_model, transformers.ViTForImageClassification)
    assert not timm_model.training and not hf_model.training
    assert hf_model.config.id2label[0] == "airplane" and hf_model.config.id2label[9] == "truck"
    images, labels, _ = load_demo_images()
    with torch.no_grad():
        timm_logits = timm_model(images)
        hf_logits = hf_model(pixel_values=images).logits
    assert timm_logits.shape == (200, 10)
    assert (timm_logits - hf_logits).abs().max().item() < 1e-5
    # Accuracy on these 200 test images is close to the recorded test top-1 (far above chance).
    accuracy = (timm_logits.argmax(-1) == labels).float().mean().item()
    assert accuracy > max(0.2, load_demo_config()["test_top1"] - 0.15)


def test_load_demo_images_shapes_and_labels() -> None:
    images, labels, paths = load_demo_images()
    assert images.shape == (200, 3, 32, 32) and images.dtype == torch.float32
    assert labels.dtype == torch.long and labels.shape == (200,)
    assert torch.bincount(labels, minlength=10).tolist() == [20] * 10
    assert labels.tolist() == sorted(labels.tolist())
    assert len(paths) == 200
    for path, label in zip(paths, labels.tolist()):
        assert path.parent.name == CIFAR10_CLASSES[label]
        assert path.parent.parent == DEMO_IMAGES_DIR
    # Normalised with the training mean/std: roughly zero mean, unit spread.
    assert abs(images.mean().item()) < 0.5 and 0.5 < images.std().item() < 1.5


def test_load_demo_images_max_per_class() -> None:
    images, labels, paths = load_demo_images(max_per_class=2)
    assert images.shape == (20, 3, 32, 32)
    assert labels.tolist() == [index for index in range(10) for _ in range(2)]
    assert [p.name for p in paths[:2]] == ["0000.jpg", "0001.jpg"]
    with pytest.raises(ValueError):
        load_demo_images(max_per_class=-1)


def test_transform_matches_manual_normalisation() -> None:
    config = load_demo_config()
    rgb = np.random.default_rng(0).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    tensor = demo_transform()(Image.fromarray(rgb, mode="RGB"))
    mean = torch.tensor(config["mean"]).view(3, 1, 1)
    std = torch.tensor(config["std"]).view(3, 1, 1)
    expected = (torch.from_numpy(rgb).permute(2, 0, 1).float() / 255 - mean) / std
    torch.testing.assert_close(tensor, expected)


@pytest.mark.parametrize(
    ("mode", "size"),
    [("L", (32, 32)), ("RGBA", (32, 32)), ("L", (64, 48)), ("RGBA", (20, 50)), ("P", (32, 32))],
)
def test_transform_handles_modes_and_sizes(mode: str, size: tuple[int, int]) -> None:
    image = Image.new(mode, size, color=128 if mode in ("L", "P") else (10, 200, 30, 90))
    tensor = demo_transform()(image)
    assert tensor.shape == (3, 32, 32) and tensor.dtype == torch.float32
    assert torch.isfinite(tensor).all()
    if mode == "L":
        # Grey pixels: all three channels hold the same raw value before normalisation.
        config = load_demo_config()
        raw = tensor * torch.tensor(config["std"]).view(3, 1, 1) + torch.tensor(config["mean"]).view(3, 1, 1)
        torch.testing.assert_close(raw, torch.full_like(raw, 128 / 255))


@pytest.mark.parametrize("framework", ["pytorch", "", "TIMMX"])
def test_bad_framework_raises(framework: str) -> None:
    with pytest.raises(ValueError, match="choose one of") as error_info:
        load_demo_model(framework)
    for choice in FRAMEWORKS:
        assert repr(choice) in str(error_info.value)

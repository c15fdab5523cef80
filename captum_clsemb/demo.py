"""The bundled demo: a small CIFAR-10 Vision Transformer and 200 CIFAR-10 test images.

The model is a timm ``VisionTransformer`` at 32x32 input with 4x4 patches (an 8x8 token
grid plus the class token), trained by ``scripts/train_demo_model.py``. Its weights and
config live in ``captum_clsemb/data/demo_model/``; the images (the first 20 test images of
each class, written by ``scripts/make_demo_images.py``) in ``captum_clsemb/data/demo_images/``.

Example:
    >>> from captum_clsemb.demo import load_demo_images, load_demo_model
    >>> model = load_demo_model("timm")
    >>> images, labels, paths = load_demo_images(max_per_class=2)
    >>> logits = model(images)  # (20, 10)
"""

from __future__ import annotations

import copy
import json
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

__all__ = [
    "DEMO_IMAGES_DIR",
    "DEMO_MODEL_DIR",
    "FRAMEWORKS",
    "DemoTransform",
    "demo_transform",
    "load_demo_config",
    "load_demo_images",
    "load_demo_model",
]

DATA_DIR = Path(__file__).resolve().parent / "data"
DEMO_MODEL_DIR = DATA_DIR / "demo_model"
DEMO_IMAGES_DIR = DATA_DIR / "demo_images"
FRAMEWORKS = ("timm", "hf")
_FRAMEWORK_ALIASES = {"timm": "timm", "hf": "hf", "huggingface": "hf", "transformers": "hf"}
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


@lru_cache(maxsize=1)
def _read_demo_config() -> dict:
    config_path = DEMO_MODEL_DIR / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(
            f"demo model config not found at {config_path}; "
            "create it with `python scripts/train_demo_model.py --export` after training"
        )
    return json.loads(config_path.read_text())


def load_demo_config() -> dict:
    r"""Read the demo model's config.

    Returns:
        A fresh dict with keys ``model_kwargs`` (timm ``VisionTransformer`` arguments),
        ``class_names`` (index order), ``mean``, ``std``, ``input_size`` ``[3, 32, 32]``,
        ``test_top1`` (CIFAR-10 test accuracy) and training provenance.

    Raises:
        FileNotFoundError: if the bundled config is missing.
    """
    return copy.deepcopy(_read_demo_config())


def load_demo_model(framework: str = "timm") -> nn.Module:
    r"""Load the bundled CIFAR-10 ViT in eval mode.

    Args:
        framework: ``"timm"`` for a ``timm.models.vision_transformer.VisionTransformer``,
            ``"hf"`` (aliases ``"huggingface"``, ``"transformers"``) for the equivalent
            ``transformers.ViTForImageClassification`` with ``id2label`` set from the class names.

    Returns:
        The model, in eval mode, on CPU in float32.

    Raises:
        ValueError: if ``framework`` is not one of :data:`FRAMEWORKS`.
        FileNotFoundError: if the bundled weights or config are missing.
    """
    key = _FRAMEWORK_ALIASES.get(framework.lower()) if isinstance(framework, str) else None
    if key is None:
        raise ValueError(f"unknown framework {framework!r}; choose one of {', '.join(map(repr, FRAMEWORKS))}")

    from safetensors.torch import load_file
    from timm.models.vision_transformer import VisionTransformer

    config = load_demo_config()
    weights_path = DEMO_MODEL_DIR / "model.safetensors"
    if not weights_path.is_file():
        raise FileNotFoundError(
            f"demo model weights not found at {weights_path}; "
            "create them with `python scripts/train_demo_model.py --export` after training"
        )
    model = VisionTransformer(**config["model_kwargs"], weight_init="skip")
    model.load_state_dict(load_file(str(weights_path)), strict=True)
    model.eval()
    if key == "timm":
        return model

    from captum_clsemb.convert import timm_to_hf

    return timm_to_hf(model, class_names=config["class_names"]).eval()


class DemoTransform:
    r"""PIL image -> normalised float tensor ``(3, size, size)`` for the demo model.

    Converts any mode (grayscale, palette, RGBA, CMYK ...) to RGB, resizes the shorter
    side to ``size`` (bicubic) and centre-crops when the image is not already
    ``size`` x ``size``, scales to [0, 1] and normalises with the per-channel mean and std.

    Args:
        mean: Per-channel mean of the RGB values in [0, 1].
        std: Per-channel standard deviation.
        size: Output height and width.
    """

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], size: int = 32) -> None:
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.size = int(size)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mean={self.mean}, std={self.std}, size={self.size})"

    def __call__(self, image: Image.Image) -> Tensor:
        r"""Transform one image.

        Args:
            image: A PIL image of any mode and size.

        Returns:
            Float32 tensor of shape ``(3, size, size)``.
        """
        if image.mode == "P" and "transparency" in image.info:
            image = image.convert("RGBA")
        if image.mode != "RGB":
            image = image.convert("RGB")
        if image.size != (self.size, self.size):
            width, height = image.size
            scale = self.size / min(width, height)
            new_width, new_height = (
                max(self.size, round(width * scale)),
                max(self.size, round(height * scale)),
            )
            image = image.resize((new_width, new_height), Image.Resampling.BICUBIC)
            left, top = (new_width - self.size) // 2, (new_height - self.size) // 2
            image = image.crop((left, top, left + self.size, top + self.size))
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1)
        return ((pixels - mean) / std).contiguous()


def demo_transform() -> DemoTransform:
    r"""The preprocessing the demo model was trained with.

    Returns:
        A callable mapping a PIL image to a normalised tensor ``(3, 32, 32)`` using the
        mean and std from the demo config.
    """
    config = load_demo_config()
    return DemoTransform(config["mean"], config["std"], size=int(config["input_size"][-1]))


def load_demo_images(max_per_class: int | None = None) -> tuple[Tensor, Tensor, list[Path]]:
    r"""Load the bundled CIFAR-10 test images, preprocessed for the demo model.

    Images are ordered by class index (alphabetical class names) and, within a class,
    by file name.

    Args:
        max_per_class: Keep at most this many images per class; None keeps all (20).

    Returns:
        ``(images, labels, paths)``: float tensor ``(N, 3, 32, 32)``, LongTensor ``(N,)``
        of class indices, and the image file paths in the same order.

    Raises:
        FileNotFoundError: if the bundled images are missing.
        ValueError: if ``max_per_class`` is negative.
    """
    if max_per_class is not None and max_per_class < 0:
        raise ValueError(f"max_per_class must be >= 0 or None, got {max_per_class}")
    if not DEMO_IMAGES_DIR.is_dir():
        raise FileNotFoundError(
            f"demo images not found at {DEMO_IMAGES_DIR}; create them with `python scripts/make_demo_images.py`"
        )
    config = load_demo_config()
    transform = DemoTransform(config["mean"], config["std"], size=int(config["input_size"][-1]))
    tensors: list[Tensor] = []
    labels: list[int] = []
    paths: list[Path] = []
    for class_index, class_name in enumerate(config["class_names"]):
        class_dir = DEMO_IMAGES_DIR / class_name
        files = sorted(p for p in class_dir.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
        if max_per_class is not None:
            files = files[:max_per_class]
        for path in files:
            with Image.open(path) as image:
                tensors.append(transform(image))
            labels.append(class_index)
            paths.append(path)
    if not tensors:
        size = transform.size
        return torch.empty(0, 3, size, size), torch.empty(0, dtype=torch.long), []
    return torch.stack(tensors), torch.tensor(labels, dtype=torch.long), paths

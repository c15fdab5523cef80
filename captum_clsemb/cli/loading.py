"""Model and image loading for the command line: demo, timm names, local HF folders, image folders."""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor, nn

log = logging.getLogger("captum_clsemb")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class CLIError(Exception):
    """An error the command line reports as one line (no traceback)."""


@dataclass
class LoadedModel:
    model: nn.Module
    transform: Callable[[Image.Image], Tensor]
    class_names: list[str] | None
    description: str


def load_model(spec: str, checkpoint: str | None = None) -> LoadedModel:
    r"""Load ``demo``, ``timm:NAME`` (random init, or weights from ``checkpoint``), or a local HF folder."""
    if spec == "demo":
        from captum_clsemb.demo import demo_transform, load_demo_config, load_demo_model

        if checkpoint:
            raise CLIError("--checkpoint is for timm models; the demo model ships its own weights")
        cfg = load_demo_config()
        return LoadedModel(load_demo_model("timm"), demo_transform(), list(cfg["class_names"]),
                           f"bundled CIFAR-10 ViT (test top-1 {cfg.get('test_top1', float('nan')):.4f})")  # fmt: skip
    if spec.startswith("timm:"):
        return _load_timm(spec[5:], checkpoint)
    path = Path(spec)
    if path.is_dir():
        if checkpoint:
            raise CLIError("--checkpoint is for timm models; a Hugging Face folder carries its own weights")
        return _load_hf_folder(path)
    raise CLIError(
        f"unknown model {spec!r}: use 'demo', 'timm:<model name>' (e.g. timm:vit_base_patch32_224) "
        "or the path of a local Hugging Face model folder"
    )


def _load_timm(name: str, checkpoint: str | None) -> LoadedModel:
    import timm
    from timm.data import create_transform, resolve_data_config

    if not timm.is_model(name):
        raise CLIError(f"unknown timm model name {name!r}; list names with timm.list_models('vit*')")
    model = timm.create_model(name, pretrained=False)
    desc = f"timm {name} (random weights)"
    if checkpoint:
        ckpt = Path(checkpoint)
        if not ckpt.is_file():
            raise CLIError(f"checkpoint file not found: {ckpt}")
        try:
            if ckpt.suffix == ".safetensors":
                from safetensors.torch import load_file

                state = load_file(str(ckpt))
            else:
                state = torch.load(ckpt, map_location="cpu", weights_only=True)
                for key in ("state_dict", "model", "state_dict_ema"):
                    if isinstance(state, dict) and key in state and isinstance(state[key], dict):
                        state = state[key]
                        break
            missing, unexpected = model.load_state_dict(state, strict=True), None
        except Exception as e:  # noqa: BLE001 - report any load failure as one line
            raise CLIError(
                f"checkpoint {ckpt} does not fit timm model {name!r}: {str(e).splitlines()[0]}"
            ) from e
        del missing, unexpected
        desc = f"timm {name} with weights from {ckpt}"
    model.eval()
    cfg = resolve_data_config({}, model=model)
    return LoadedModel(model, create_transform(**cfg), None, desc)


def _load_hf_folder(path: Path) -> LoadedModel:
    import transformers

    if not (path / "config.json").is_file():
        raise CLIError(f"{path} is not a Hugging Face model folder (no config.json)")
    try:
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
        arch = (config.architectures or ["ViTForImageClassification"])[0]
        cls = getattr(transformers, arch, None)
        if cls is None:
            raise CLIError(f"{path}: unknown architecture {arch!r}")
        model = cls.from_pretrained(path, local_files_only=True).eval()
    except CLIError:
        raise
    except Exception as e:  # noqa: BLE001
        raise CLIError(f"could not load the Hugging Face model in {path}: {str(e).splitlines()[0]}") from e
    size = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
    mean, std, resize = [0.5] * 3, [0.5] * 3, True
    if (path / "preprocessor_config.json").is_file():
        import json

        pp = json.loads((path / "preprocessor_config.json").read_text())
        mean, std = pp.get("image_mean", mean), pp.get("image_std", std)
    transform = SquashTransform(size, mean, std) if resize else None
    id2label = getattr(config, "id2label", {}) or {}
    names = [id2label.get(i) for i in range(len(id2label))]
    names = names if names and all(names) and names[0] != "LABEL_0" else None
    return LoadedModel(model, transform, names, f"Hugging Face {arch} from {path}")


class SquashTransform:
    """Resize to size x size (the ViT image processor's default), scale to [0, 1], normalise."""

    def __init__(self, size: int, mean: list[float], std: list[float]) -> None:
        self.size, self.mean, self.std = size, [float(v) for v in mean], [float(v) for v in std]

    def __call__(self, img: Image.Image) -> Tensor:
        import numpy as np

        img = img.convert("RGB").resize((self.size, self.size), Image.Resampling.BILINEAR)
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (x - torch.tensor(self.mean).view(3, 1, 1)) / torch.tensor(self.std).view(3, 1, 1)


@dataclass
class ImageSet:
    """Labelled image files: from class sub-folders or a CSV (file, label)."""

    files: list[Path]
    labels: list[int | None]
    class_names: list[str] | None
    skipped: list[tuple[str, str]] = field(default_factory=list)


def find_images(root: str | Path, labels_csv: str | None, class_names: list[str] | None) -> ImageSet:
    r"""List images under ``root`` with labels from class sub-folders or a CSV.

    Sub-folder names are matched to the model's class names when it has them (else sorted
    folder order gives the index). CSV rows are ``file,label`` with label an index or a
    class name; a header row is skipped.
    """
    root = Path(root)
    if not root.is_dir():
        raise CLIError(f"image folder not found: {root}")
    if labels_csv:
        return _from_csv(root, Path(labels_csv), class_names)
    subdirs = sorted(d for d in root.iterdir() if d.is_dir())
    files: list[Path] = []
    labels: list[int | None] = []
    if subdirs:
        folder_names = [d.name for d in subdirs]
        if class_names and all(n in class_names for n in folder_names):
            index = {n: class_names.index(n) for n in folder_names}
        else:
            index = {n: i for i, n in enumerate(folder_names)}
            class_names = class_names or folder_names
        for d in subdirs:
            for f in sorted(d.iterdir()):
                if f.suffix.lower() in IMAGE_SUFFIXES:
                    files.append(f)
                    labels.append(index[d.name])
    else:
        files = sorted(f for f in root.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        labels = [None] * len(files)
    if not files:
        raise CLIError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found in {root}")
    return ImageSet(files, labels, class_names)


def _from_csv(root: Path, csv_path: Path, class_names: list[str] | None) -> ImageSet:
    if not csv_path.is_file():
        raise CLIError(f"labels CSV not found: {csv_path}")
    files: list[Path] = []
    labels: list[int | None] = []
    with csv_path.open(newline="") as fh:
        for i, row in enumerate(csv.reader(fh)):
            if len(row) < 2 or not row[0].strip():
                continue
            name, label = row[0].strip(), row[1].strip()
            if label.lstrip("-").isdigit():
                lab: int | None = int(label)
            elif class_names and label in class_names:
                lab = class_names.index(label)
            elif i == 0:
                continue  # header
            else:
                raise CLIError(f"{csv_path}:{i + 1}: label {label!r} is neither an index nor a class name")
            files.append(root / name)
            labels.append(lab)
    if not files:
        raise CLIError(f"no rows in labels CSV {csv_path}")
    return ImageSet(files, labels, class_names)


class ImageFileDataset(torch.utils.data.Dataset):
    """Map-style dataset over an :class:`ImageSet`; unreadable files yield ``None`` (skipped by :func:`collate`)."""

    def __init__(self, images: ImageSet, transform: Callable[[Image.Image], Tensor]) -> None:
        self.images = images
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images.files)

    def __getitem__(self, i: int) -> tuple[Tensor | None, int, str, str]:
        f, lab = self.images.files[i], self.images.labels[i]
        try:
            with Image.open(f) as img:
                img.load()
                x = self.transform(img)
        except (OSError, UnidentifiedImageError, ValueError) as e:
            return None, -1, str(f), str(e).splitlines()[0] if str(e) else type(e).__name__
        return x, -1 if lab is None else lab, str(f), ""


def collate(items: list) -> tuple[Tensor | None, Tensor, list[Path], list[tuple[str, str]]]:
    """Stack readable images; return (pixels or None, labels, paths, skipped (file, reason))."""
    ok = [it for it in items if it[0] is not None]
    skipped = [(it[2], it[3]) for it in items if it[0] is None]
    if not ok:
        return None, torch.zeros(0, dtype=torch.long), [], skipped
    return (
        torch.stack([it[0] for it in ok]),
        torch.tensor([it[1] for it in ok]),
        [Path(it[2]) for it in ok],
        skipped,
    )


def iter_batches(
    images: ImageSet,
    transform: Callable[[Image.Image], Tensor],
    batch_size: int,
    max_images: int | None = None,
) -> Iterator[tuple[Tensor, Tensor, list[Path]]]:
    """Yield (pixels, labels (-1 = unknown), paths); unreadable files are logged and skipped."""
    batch: list[Tensor] = []
    labs: list[int] = []
    paths: list[Path] = []
    used = 0
    for f, lab in zip(images.files, images.labels):
        if max_images is not None and used >= max_images:
            break
        try:
            with Image.open(f) as img:
                img.load()
                x = transform(img)
        except (OSError, UnidentifiedImageError, ValueError) as e:
            images.skipped.append((str(f), str(e).splitlines()[0] if str(e) else type(e).__name__))
            log.warning("skipping unreadable image %s: %s", f, e)
            continue
        used += 1
        batch.append(x)
        labs.append(-1 if lab is None else lab)
        paths.append(f)
        if len(batch) == batch_size:
            yield torch.stack(batch), torch.tensor(labs), paths
            batch, labs, paths = [], [], []
    if batch:
        yield torch.stack(batch), torch.tensor(labs), paths


def write_json(path: Path, data: object) -> None:
    """Write strict JSON: undefined numbers (NaN, e.g. a rate over an empty group) become ``null``."""

    def clean(obj: object) -> object:
        if isinstance(obj, float) and not math.isfinite(obj):
            return None
        if isinstance(obj, dict):
            return {k: clean(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [clean(v) for v in obj]
        return obj

    Path(path).write_text(json.dumps(clean(data), indent=2, allow_nan=False) + "\n")

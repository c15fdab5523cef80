"""Model and image loading for the command line: demo, timm names, local HF folders, image folders."""

from __future__ import annotations

import csv
import difflib
import json
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor, nn

log = logging.getLogger("captum_clsemb")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


class CLIError(Exception):
    """An error the command line reports as one line (no traceback)."""


@dataclass
class LoadedModel:
    model: nn.Module
    transform: Callable[[Image.Image], Tensor]
    class_names: list[str] | None
    description: str
    # other names of the classes that image folders may use (ImageNet: WordNet ids such as n01440764)
    class_ids: list[str] | None = None


def _imagenet_names(num_classes: int) -> tuple[list[str], list[str]] | None:
    """(descriptions, WordNet ids) of the ImageNet subset with ``num_classes`` classes, as timm infers it."""
    try:
        from timm.data import ImageNetInfo, infer_imagenet_subset
    except ImportError:
        return None
    subset = infer_imagenet_subset({"num_classes": num_classes})
    if subset is None:
        return None
    info = ImageNetInfo(subset)
    return list(info.label_descriptions()), list(info.label_names())


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
    # timm models carry no class names; like timm's own tools, take ImageNet's from the class count
    imagenet = _imagenet_names(model.num_classes)
    if imagenet is None:
        return LoadedModel(model, create_transform(**cfg), None, desc)
    desc += f"; class names of ImageNet ({model.num_classes} classes)"
    return LoadedModel(model, create_transform(**cfg), imagenet[0], desc, class_ids=imagenet[1])


def _load_hf_folder(path: Path) -> LoadedModel:
    import transformers

    if not (path / "config.json").is_file():
        raise CLIError(f"{path} is not a Hugging Face model folder (no config.json)")
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()  # no "Loading weights" bar around one-line messages
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
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()
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
    ids = None
    imagenet = _imagenet_names(len(names)) if names else None
    if imagenet is not None and sum(a == b for a, b in zip(names, imagenet[0])) >= 0.95 * len(names):
        ids = imagenet[1]  # ImageNet labels: folders may also use the WordNet ids
    return LoadedModel(model, transform, names, f"Hugging Face {arch} from {path}", class_ids=ids)


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
    """Image files with labels (None = unlabelled) from class sub-folders or a CSV (file, label).

    ``skipped`` collects (file, reason) for files left out: unreadable, non-finite, or listed
    in the CSV but missing.
    """

    files: list[Path]
    labels: list[int | None]
    class_names: list[str] | None
    skipped: list[tuple[str, str]] = field(default_factory=list)


def normalise_name(name: str) -> str:
    """Class-name key: case-insensitive, ``_`` and runs of spaces count as one space."""
    return " ".join(name.replace("_", " ").split()).casefold()


def _is_index(text: str) -> bool:
    return text.isascii() and text.isdigit()


class _ClassNames:
    """Looks up class names (normalised) and their comma-separated aliases ("tench, Tinca tinca")."""

    def __init__(self, class_names: list[str] | None, class_ids: list[str] | None = None) -> None:
        self.names = class_names or []
        self.full: dict[str, set[int]] = {}
        self.alias: dict[str, set[int]] = {}
        for i, n in enumerate(self.names):
            self.full.setdefault(normalise_name(n), set()).add(i)
            for part in n.split(","):
                if part.strip():
                    self.alias.setdefault(normalise_name(part), set()).add(i)
        for i, n in enumerate(class_ids or []):
            self.full.setdefault(normalise_name(n), set()).add(i)

    def lookup(self, name: str) -> int | None:
        """The class index of ``name``; None when it matches no class or several."""
        key = normalise_name(name)
        hits = self.full.get(key) or self.alias.get(key) or set()
        return next(iter(hits)) if len(hits) == 1 else None

    def suggest(self, name: str) -> str:
        close = difflib.get_close_matches(normalise_name(name), list(self.full), n=1, cutoff=0.75)
        return f" (did you mean {close[0]!r}?)" if close else ""


def _has_images(folder: Path) -> bool:
    return any(f.suffix.lower() in IMAGE_SUFFIXES and f.is_file() for f in folder.iterdir())


def _visible(path: Path, root: Path, exclude: tuple[Path, ...]) -> bool:
    """Not hidden (no part below ``root`` starts with '.') and not inside an excluded folder."""
    if any(part.startswith(".") for part in path.relative_to(root).parts):
        return False
    p = Path(os.path.abspath(path))
    return not any(p == e or e in p.parents for e in exclude)


def find_images(
    root: str | Path,
    labels_csv: str | Path | None,
    class_names: list[str] | None,
    num_classes: int | None = None,
    exclude: tuple[str | Path, ...] = (),
    class_ids: list[str] | None = None,
) -> ImageSet:
    r"""List images under ``root`` with labels from class sub-folders or a CSV.

    Labels come from, in this order: ``labels_csv``; a ``labels.csv`` inside ``root``
    (used automatically, with a message); class sub-folders. Sub-folders give labels only
    when every folder name is a class name of the model (case, ``_`` and space
    insensitive; a comma-separated alias such as "tench" for "tench, Tinca tinca" counts
    when it is unique) or every name is a class index (``0/``, ``7/``); otherwise a
    :class:`CLIError` lists the names that match nothing. Without sub-folders the images
    are unlabelled (the model's predicted class is the target).

    Args:
        root: the image folder.
        labels_csv: CSV of ``file,label`` rows (label: class index or class name; a
            header row is recognised), files relative to ``root``.
        class_names: the model's class names, or None.
        num_classes: the model's number of classes, for range checks.
        exclude: paths under ``root`` to leave out (e.g. the output folder).
        class_ids: other names of the classes, in class order (e.g. ImageNet's WordNet ids).
    Returns:
        an :class:`ImageSet`.
    """
    root = Path(root)
    if not root.is_dir():
        raise CLIError(f"image folder not found: {root}")
    excl = tuple(Path(os.path.abspath(e)) for e in exclude)
    if labels_csv is None and (root / "labels.csv").is_file():
        labels_csv = root / "labels.csv"
        log.warning("using the labels in %s (pass --labels to use another file)", labels_csv)
    if labels_csv is not None:
        return _from_csv(root, Path(labels_csv), _ClassNames(class_names, class_ids), num_classes, excl)
    subdirs = sorted(d for d in root.iterdir() if d.is_dir() and _visible(d, root, excl) and _has_images(d))
    if not subdirs:
        files = sorted(f for f in root.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
        if not files:
            raise CLIError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found in {root}")
        return ImageSet(files, [None] * len(files), class_names)
    index = _folder_labels([d.name for d in subdirs], _ClassNames(class_names, class_ids), num_classes, root)
    loose = [f for f in root.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file()]
    if loose:
        log.warning(
            "ignoring %d image(s) directly in %s (labels come from its class sub-folders): %s",
            len(loose), root, ", ".join(f.name for f in sorted(loose)[:3]),
        )  # fmt: skip
    files: list[Path] = []
    labels: list[int | None] = []
    for d in subdirs:
        for f in sorted(d.iterdir()):
            if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file():
                files.append(f)
                labels.append(index[d.name])
    return ImageSet(files, labels, class_names)


def _folder_labels(
    names: list[str], lookup: _ClassNames, num_classes: int | None, root: Path
) -> dict[str, int]:
    """Folder name -> class index: all names are class names, or all are class indices."""
    class_names = lookup.names
    by_name = {n: lookup.lookup(n) for n in names} if class_names else {}
    named_ok = bool(class_names) and all(v is not None for v in by_name.values())
    if all(_is_index(n) for n in names):
        by_index = {n: int(n) for n in names}
        if named_ok and by_name != by_index:
            raise CLIError(
                f"class folder names in {root} are both class indices and (other) class names of the model; "
                "pass --labels with a CSV of file,label to say which"
            )
        out = [n for n, i in by_index.items() if num_classes is not None and i >= num_classes]
        if out:
            raise CLIError(
                f"class folder(s) {out} in {root} are out of range for a model with {num_classes} classes "
                f"(indices 0..{num_classes - 1})"
            )
        return by_index
    if named_ok:
        return by_name  # type: ignore[return-value]
    if not class_names:
        bad = [n for n in names if not _is_index(n)]
        raise CLIError(
            f"class folder names {_first(bad)} in {root} are not class indices and the model has no class "
            "names: name the folders by class index (0/, 1/, ...) or pass --labels with a CSV of file,label index"
        )
    bad = [n for n in names if by_name[n] is None]
    hint = lookup.suggest(bad[0])
    raise CLIError(
        f"class folder name(s) {_first(bad)} in {root} match no (unique) class name of the model{hint}; "
        "every folder must be a class name (case, '_' and space insensitive) or every folder a class index, "
        "or pass --labels with a CSV of file,label"
    )


def _first(items: list, k: int = 5) -> str:
    """The first ``k`` items, quoted, and how many there are in all."""
    shown = ", ".join(repr(str(v)) for v in items[:k])
    return f"[{shown}, ... ({len(items)} in all)]" if len(items) > k else f"[{shown}]"


def _from_csv(
    root: Path,
    csv_path: Path,
    lookup: _ClassNames,
    num_classes: int | None,
    exclude: tuple[Path, ...],
) -> ImageSet:
    if not csv_path.is_file():
        raise CLIError(f"labels CSV not found: {csv_path}")
    class_names = lookup.names or None
    try:
        with csv_path.open(newline="", encoding="utf-8-sig") as fh:
            rows = list(enumerate(csv.reader(fh), start=1))
    except (UnicodeDecodeError, csv.Error) as e:
        raise CLIError(f"{csv_path} is not a readable UTF-8 CSV: {str(e).splitlines()[0]}") from e
    files: list[Path] = []
    labels: list[int | None] = []
    first_line: dict[str, int] = {}  # normalised path -> CSV line
    missing: list[tuple[str, int]] = []
    first_row = True
    for line, row in rows:
        cells = [c.strip() for c in row]
        if not any(cells):
            continue  # blank line
        is_first, first_row = first_row, False
        if len(cells) < 2 or not cells[0] or not cells[1]:
            raise CLIError(f"{csv_path}:{line}: expected 'file,label', got {','.join(row)[:80]!r}")
        name, label = cells[0], cells[1]
        if _is_index(label) or (label.startswith("-") and _is_index(label[1:])):
            lab = int(label)
        else:
            found = lookup.lookup(label)
            if found is None:
                if is_first:
                    continue  # a header row such as file,label
                what = (
                    "a class index or a (unique) class name of the model" if class_names else "a class index"
                )
                raise CLIError(
                    f"{csv_path}:{line}: label {label!r} of {name!r} is not {what}{lookup.suggest(label)}"
                )
            lab = found
        if lab < 0 or (num_classes is not None and lab >= num_classes):
            limit = f"0..{num_classes - 1}" if num_classes is not None else "0 or more"
            raise CLIError(f"{csv_path}:{line}: label {lab} of {name!r} is out of range ({limit})")
        path = root / name
        key = os.path.abspath(path)
        if key in first_line:
            raise CLIError(f"{csv_path}: {name!r} is listed twice, on lines {first_line[key]} and {line}")
        first_line[key] = line
        if not os.path.isfile(path):
            missing.append((name, line))
            continue
        files.append(path)
        labels.append(lab)
    if not first_line:
        raise CLIError(f"no file,label rows in labels CSV {csv_path}")
    skipped = [(str(root / n), f"listed in {csv_path.name} (line {ln}) but not found") for n, ln in missing]
    if missing:
        log.warning(
            "%d file(s) listed in %s do not exist under %s and are skipped (first: %s)",
            len(missing), csv_path, root, ", ".join(f"{n} (line {ln})" for n, ln in missing[:3]),
        )  # fmt: skip
    unlisted = [
        f for f in sorted(root.rglob("*"))
        if f.suffix.lower() in IMAGE_SUFFIXES and os.path.abspath(f) not in first_line
        and _visible(f, root, exclude) and f.is_file()
    ]  # fmt: skip
    if unlisted:
        log.warning(
            "%d image(s) in %s are not in %s and are used unlabelled (the predicted class is their target): %s%s",
            len(unlisted), root, csv_path.name, ", ".join(str(f.relative_to(root)) for f in unlisted[:3]),
            ", ..." if len(unlisted) > 3 else "",
        )  # fmt: skip
        files += unlisted
        labels += [None] * len(unlisted)
    if not files:
        raise CLIError(
            f"none of the {len(missing)} files listed in {csv_path} exist under {root} "
            "(CSV paths are relative to --images)"
        )
    return ImageSet(files, labels, class_names, skipped)


def to_8bit(img: Image.Image) -> Image.Image:
    r"""Bring high-bit-depth images to the 8-bit range that the transforms expect.

    16-bit and 32-bit integer images (modes ``I;16*``, ``I``) are read as 0..65535;
    float images (mode ``F``) as 0..1, or 0..255 when values exceed 1. Other modes are
    returned unchanged. Raises ``ValueError`` (the image is skipped) for NaN/inf pixels or
    values outside these ranges.
    """
    import numpy as np

    if img.mode not in ("I", "F") and not img.mode.startswith("I;16"):
        return img
    a = np.asarray(img, dtype=np.float64)
    if not np.isfinite(a).all():
        raise ValueError("non-finite pixel values (NaN or inf)")
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if img.mode == "F":
        scale = 255.0 if hi <= 1.0 else 1.0
        top = 1.0 if hi <= 1.0 else 255.0
    else:
        scale, top = 255.0 / 65535.0, 65535.0
    if lo < 0 or hi > top:
        raise ValueError(f"{img.mode} image with values in [{lo:g}, {hi:g}], outside 0..{top:g}")
    return Image.fromarray(np.clip(np.rint(a * scale), 0, 255).astype(np.uint8), mode="L")


def load_image(path: Path, transform: Callable[[Image.Image], Tensor]) -> Tensor:
    """Read, bring to 8 bits and transform one image; ``ValueError``/``OSError`` when it cannot be used."""
    with Image.open(path) as img:
        img.load()
        x = transform(to_8bit(img))
    if not torch.isfinite(x).all():
        raise ValueError("non-finite values (NaN or inf) after preprocessing")
    return x


class ImageFileDataset(torch.utils.data.Dataset):
    """Map-style dataset over an :class:`ImageSet`; unusable files yield ``None`` (skipped by :func:`collate`)."""

    def __init__(self, images: ImageSet, transform: Callable[[Image.Image], Tensor]) -> None:
        self.images = images
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images.files)

    def __getitem__(self, i: int) -> tuple[Tensor | None, int, str, str, int]:
        """(pixels or None, label (-1 = unknown), file, reason it was skipped, index)."""
        f, lab = self.images.files[i], self.images.labels[i]
        try:
            x = load_image(f, self.transform)
        except (OSError, UnidentifiedImageError, ValueError) as e:
            return None, -1, str(f), str(e).splitlines()[0] if str(e) else type(e).__name__, i
        return x, -1 if lab is None else lab, str(f), "", i


def collate(items: list) -> tuple[Tensor | None, Tensor, list[Path], list[tuple[str, str]], list[int]]:
    """Stack usable images; return (pixels or None, labels, paths, skipped (file, reason), indices)."""
    ok = [it for it in items if it[0] is not None]
    skipped = [(it[2], it[3]) for it in items if it[0] is None]
    if not ok:
        return None, torch.zeros(0, dtype=torch.long), [], skipped, []
    return (
        torch.stack([it[0] for it in ok]),
        torch.tensor([it[1] for it in ok]),
        [Path(it[2]) for it in ok],
        skipped,
        [it[4] for it in ok],
    )


def resolve_device(spec: str) -> torch.device:
    """A torch device that exists here, or a :class:`CLIError` naming what is available."""
    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError) as e:
        raise CLIError(f"--device {spec!r} is not a torch device (use cpu, cuda or cuda:N)") from e
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise CLIError(f"--device {spec!r}: CUDA is not available on this machine; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise CLIError(
                f"--device {spec!r}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                f"(cuda:0..cuda:{torch.cuda.device_count() - 1})"
            )
        return dev
    if dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise CLIError(f"--device {spec!r}: MPS is not available on this machine; use --device cpu")
        return dev
    raise CLIError(f"--device {spec!r} cannot run the model (use cpu, cuda or cuda:N)")


def check_positive(value: int | None, option: str, minimum: int = 1) -> None:
    """One-line error unless ``value`` is None or an int >= ``minimum``."""
    if value is not None and (not isinstance(value, int) or value < minimum):
        raise CLIError(f"{option} must be at least {minimum}, got {value}")


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

"""Model and image loading for the command line: model options, image folders, labels, devices."""

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


# how the library's loading errors name the options on the command line
CLI_OPTION_NAMES = {
    "checkpoint": "--checkpoint FILE (local weights)",
    "random_init": "--random-init",
    "classes": "--classes FILE (one class name per line)",
    "templates": "--templates FILE (one prompt template with {} per line)",
}


@dataclass(frozen=True)
class ModelOptions:
    """How to load ``--model``: local weights, random weights, CLIP / SigLIP classes and templates."""

    checkpoint: str | None = None
    random_init: bool = False
    classes: str | None = None  # file of class names
    templates: str | None = None  # file of prompt templates


@dataclass
class LoadedModel:
    """:class:`captum_clsemb.hub.LoadedModel` plus what the command line adds for labelling folders."""

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


def read_templates(path: str | os.PathLike) -> list[str]:
    """Prompt templates from a text file, one per line with exactly one ``{}`` (blank lines ignored)."""
    path = Path(path)
    if not path.is_file():
        raise CLIError(f"--templates file not found: {path}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise CLIError(
            f"--templates {path} is not a readable UTF-8 text file: {str(e).splitlines()[0]}"
        ) from e
    templates = []
    for number, line in enumerate(lines, start=1):
        text = line.strip()
        if not text:
            continue
        if text.count("{}") != 1:
            raise CLIError(
                f"{path}:{number}: a template needs exactly one {{}} for the class name "
                f"(e.g. 'a photo of a {{}}.'), got {text[:80]!r}"
            )
        templates.append(text)
    if not templates:
        raise CLIError(f"--templates {path} holds no template (one per line, with {{}} for the class name)")
    return templates


def load_model(spec: str, options: ModelOptions | None = None) -> LoadedModel:
    r"""Load ``--model`` with :func:`captum_clsemb.hub.load_model` and the command line's extras.

    The extras: 1000-class (and other ImageNet-subset) timm models without class names
    from their pretrained config (random or local weights) get ImageNet's class names, said
    in the description; ImageNet-labelled models also accept WordNet ids (``n01440764``) as
    folder names. Loading errors are :class:`~captum_clsemb.errors.ModelLoadError` naming the
    command line's options.
    """
    import transformers

    from captum_clsemb.hub import load_model as hub_load_model

    opts = options or ModelOptions()
    templates = read_templates(opts.templates) if opts.templates is not None else None
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()  # no "Loading weights" bar around one-line messages
    try:
        model, transform, names, desc = hub_load_model(
            spec,
            checkpoint=opts.checkpoint,
            random_init=opts.random_init,
            classes=opts.classes,
            templates=templates,
            option_names=CLI_OPTION_NAMES,
        )
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()
    ids = None
    if names is None and spec.startswith("timm:"):
        # timm models carry no class names; like timm's own tools, take ImageNet's from the class count
        imagenet = _imagenet_names(getattr(model, "num_classes", 0))
        if imagenet is not None:
            names, ids = imagenet
            desc += f"; class names of ImageNet ({len(names)} classes)"
    elif names:
        imagenet = _imagenet_names(len(names))
        if imagenet is not None and sum(a == b for a, b in zip(names, imagenet[0])) >= 0.95 * len(names):
            ids = imagenet[1]  # ImageNet labels: folders may also use the WordNet ids
    return LoadedModel(model, transform, names, desc, class_ids=ids)


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

r"""Load the models people analyse: timm and Hugging Face hub names, local folders, the bundled demo.

:func:`load_model` returns the model (in eval mode), the preprocessing transform that turns a
PIL image into the tensor the model expects, the class names when known, and a one-line
description::

    >>> from captum_clsemb import load_model
    >>> model, transform, class_names, description = load_model("timm:eva02_base_patch14_448.mim_in22k_ft_in1k")
    >>> clip = load_model("hf:openai/clip-vit-base-patch32", classes=["cat", "dog", "car"])

Weights come from the hub (timm ``pretrained=True``, Hugging Face ``from_pretrained``) unless
``random_init=True`` (random weights of the same architecture) or ``checkpoint`` (a local
state dict) is given. Without network access (or with ``HF_HUB_OFFLINE=1``) a model that is not
in the local cache raises one :class:`ModelLoadError` saying how to pass local weights.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor, nn

from captum_clsemb.errors import ModelLoadError

__all__ = ["API_OPTION_NAMES", "ImageProcessorTransform", "LoadedModel", "ModelLoadError", "load_model"]


class LoadedModel(NamedTuple):
    r"""Result of :func:`load_model` (a named tuple: unpack it or read the fields).

    Attributes:
        model: the model in eval mode (a :class:`~captum_clsemb.zero_shot.ZeroShotClassifier`
            for CLIP / SigLIP).
        transform: PIL image -> (C, H, W) float tensor at the model's input size.
        class_names: one name per output class, or None when unknown.
        description: what was loaded, from where, with which weights.
    """

    model: nn.Module
    transform: Callable[[object], Tensor]
    class_names: list[str] | None
    description: str


# how the error messages name the options; a command line passes its own flags (``option_names``)
API_OPTION_NAMES: dict[str, str] = {
    "checkpoint": "checkpoint=<local weights file>",
    "random_init": "random_init=True",
    "classes": "classes=[...]",
    "templates": "templates=[...]",
}


def _timm_hint(words: Mapping[str, str]) -> str:
    return (
        f"without network access pass {words['checkpoint']} for timm's architecture, or {words['random_init']} "
        "for random weights"
    )


_HF_HINT = (
    "without network access pass the path of a local Hugging Face model folder (save_pretrained: config.json, "
    "weights, preprocessor config) instead of hf:<name>"
)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _offline() -> bool:
    flag = os.environ.get("HF_HUB_OFFLINE", "") or os.environ.get("TRANSFORMERS_OFFLINE", "")
    if flag.strip().lower() in ("1", "true", "yes", "on"):
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:  # pragma: no cover - a dependency of timm and transformers
        return False


def _seeded(active: bool) -> contextlib.AbstractContextManager:
    """Seed 0 for random weights (reproducible), without touching the caller's random state."""
    if not active:
        return contextlib.nullcontext()
    return _fork_seeded()


@contextlib.contextmanager
def _fork_seeded() -> Iterator[None]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        yield


def _download_error(what: str, e: BaseException, hint: str) -> ModelLoadError:
    reason = "the hub is offline (HF_HUB_OFFLINE=1)" if _offline() else _first_line(e)
    return ModelLoadError(f"could not download {what}: {reason}; {hint}")


def load_model(
    spec: str | os.PathLike,
    checkpoint: str | os.PathLike | None = None,
    random_init: bool = False,
    classes: Sequence[str] | str | os.PathLike | None = None,
    templates: Sequence[str] | None = None,
    *,
    option_names: Mapping[str, str] | None = None,
) -> LoadedModel:
    r"""Load a model for analysis by name, folder or the bundled demo.

    Args:
        spec: one of

            - ``"demo"``: the bundled CIFAR-10 ViT (:func:`captum_clsemb.load_demo_model`);
            - ``"timm:NAME"``: a timm model with timm's pretrained weights (``pretrained=True``),
              e.g. ``"timm:eva02_base_patch14_448.mim_in22k_ft_in1k"``;
            - ``"hf:ORG/NAME"``: a Hugging Face model with ``from_pretrained``, e.g.
              ``"hf:facebook/dinov2-small-imagenet1k-1-layer"``, ``"hf:openai/clip-vit-base-patch32"``;
            - the path of a local Hugging Face model folder (``config.json`` and weights).
        checkpoint: a local weights file (``.safetensors``, or a ``torch.save`` state dict,
            optionally under ``"state_dict"`` / ``"model"``) loaded into the architecture
            (strict); the hub is then only asked for a Hugging Face config.
        random_init: random weights of the architecture instead of pretrained ones (the
            library's own initialisation under seed 0, so every call gives the same weights;
            the global random state is left as it was).
        classes: CLIP / SigLIP only (required there): the class names of the zero-shot
            classifier, as a list or the path of a text file with one name per line.
        templates: CLIP / SigLIP prompt templates with one ``{}`` (default
            ``("a photo of a {}.",)``), ensembled as in
            :meth:`~captum_clsemb.zero_shot.ZeroShotClassifier.from_prompts`.
        option_names: how error messages name the options ``checkpoint``, ``random_init``,
            ``classes`` and ``templates`` (default ``API_OPTION_NAMES``, Python keyword
            arguments; the ``clsemb`` command passes its flags, e.g. ``"--random-init"``).
    Returns:
        :class:`LoadedModel` ``(model, transform, class_names, description)``.
    Raises:
        ModelLoadError: unknown name, no network (with the hub offline, or a model not in the
            cache), unreadable or mismatched checkpoint, CLIP without ``classes``.

    Examples::

        >>> model, transform, names, desc = load_model("timm:vit_base_patch16_224.augreg2_in21k_ft_in1k")
        >>> x = torch.stack([transform(img) for img in pil_images])
        >>> loaded = load_model("timm:vit_small_patch16_rope_224", random_init=True)  # no download
        >>> clip = load_model("hf:openai/clip-vit-base-patch32", classes=["cat", "dog"],
        ...                   templates=["a photo of a {}.", "a blurry photo of a {}."])
    """
    words = {**API_OPTION_NAMES, **(option_names or {})}
    if not isinstance(random_init, bool):
        raise ModelLoadError(f"random_init must be True or False, got {random_init!r}")
    if checkpoint is not None and random_init:
        raise ModelLoadError(
            f"pass either {words['checkpoint']} (local weights) or {words['random_init']}, not both"
        )
    spec_str = os.fspath(spec)
    is_clip_args = classes is not None or templates is not None
    clip_only = f"{words['classes']} and {words['templates']} are for CLIP / SigLIP models"
    if spec_str == "demo":
        if checkpoint is not None or random_init or is_clip_args:
            raise ModelLoadError("the demo model ships its own weights and classes; pass no other option")
        return _load_demo()
    if spec_str.startswith("timm:"):
        if is_clip_args:
            raise ModelLoadError(f"{clip_only} (hf:ORG/NAME or a folder)")
        return _load_timm(spec_str[5:], checkpoint, random_init, words)
    # checked before anything is built or downloaded
    names = _read_classes(classes) if classes is not None else None
    prompts = _check_templates(templates, words) if templates is not None else None
    if spec_str.startswith("hf:"):
        return _load_hf(spec_str[3:], checkpoint, random_init, names, prompts, words, local=False)
    path = Path(spec_str)
    if path.is_dir():
        return _load_hf(str(path), checkpoint, random_init, names, prompts, words, local=True)
    raise ModelLoadError(
        f"unknown model {spec_str!r}: use 'demo', 'timm:<name>' (e.g. timm:eva02_base_patch14_448.mim_in22k_ft_in1k), "
        "'hf:<org>/<name>' (e.g. hf:openai/clip-vit-base-patch32) or the path of a local Hugging Face model folder"
    )


# -- demo ------------------------------------------------------------------------------------------
def _load_demo() -> LoadedModel:
    from captum_clsemb.demo import demo_transform, load_demo_config, load_demo_model

    cfg = load_demo_config()
    top1 = cfg.get("test_top1", float("nan"))
    return LoadedModel(
        load_demo_model("timm"),
        demo_transform(),
        [str(n) for n in cfg["class_names"]],
        f"bundled CIFAR-10 ViT (test top-1 {top1:.4f})",
    )


# -- weights files ----------------------------------------------------------------------------------
def _read_state_dict(checkpoint: str | os.PathLike) -> dict[str, Tensor]:
    ckpt = Path(checkpoint)
    if not ckpt.is_file():
        raise ModelLoadError(f"checkpoint file not found: {ckpt}")
    try:
        if ckpt.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(ckpt))
        else:
            state = torch.load(ckpt, map_location="cpu", weights_only=True)
            for key in ("state_dict", "model", "state_dict_ema"):
                if isinstance(state, dict) and isinstance(state.get(key), dict):
                    state = state[key]
                    break
    except Exception as e:  # noqa: BLE001 - any unreadable file is one line
        raise ModelLoadError(f"could not read checkpoint {ckpt}: {_first_line(e)}") from e
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ModelLoadError(f"checkpoint {ckpt} is not a state dict of tensors")
    return state


def _load_state(model: nn.Module, checkpoint: str | os.PathLike, what: str) -> None:
    state = _read_state_dict(checkpoint)
    try:
        model.load_state_dict(state, strict=True)
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"checkpoint {checkpoint} does not fit {what}: {_first_line(e)}") from e


# -- timm ------------------------------------------------------------------------------------------
def _timm_class_names(model: nn.Module) -> list[str] | None:
    """ImageNet class descriptions for timm models trained on an ImageNet label set, else None."""
    try:
        from timm.data import ImageNetInfo, infer_imagenet_subset

        subset = infer_imagenet_subset(model)
        if not subset:
            return None
        names = ImageNetInfo(subset).label_descriptions()
    except Exception:  # noqa: BLE001 - names are optional
        return None
    head = getattr(model, "num_classes", None)
    return [str(n) for n in names] if head == len(names) else None


def _load_timm(
    name: str, checkpoint: str | os.PathLike | None, random_init: bool, words: Mapping[str, str]
) -> LoadedModel:
    import timm
    from timm.data import create_transform, resolve_data_config

    if not name or not timm.is_model(name):
        raise ModelLoadError(
            f"unknown timm model name {name!r}; list names with timm.list_models('vit*', pretrained=True)"
        )
    pretrained = checkpoint is None and not random_init
    try:
        with _seeded(random_init):
            model = timm.create_model(name, pretrained=pretrained)
    except ModelLoadError:
        raise
    except Exception as e:  # noqa: BLE001 - download / cache failures become one line
        if pretrained:
            raise _download_error(f"timm weights for {name!r}", e, _timm_hint(words)) from e
        raise ModelLoadError(f"could not build timm model {name!r}: {_first_line(e)}") from e
    if checkpoint is not None:
        _load_state(model, checkpoint, f"timm model {name!r}")
        desc = f"timm {name} with weights from {checkpoint}"
    elif random_init:
        desc = f"timm {name} (random weights)"
    else:
        desc = f"timm {name} (pretrained weights)"
    model.eval()
    cfg = resolve_data_config({}, model=model)
    names = None if random_init else _timm_class_names(model)
    return LoadedModel(model, create_transform(**cfg), names, desc)


# -- Hugging Face ----------------------------------------------------------------------------------
class ImageProcessorTransform:
    r"""A Hugging Face image processor as a PIL -> tensor transform at the model's input size.

    The processor's own resizing, cropping and normalisation are used; when its output size
    differs from the size the model is configured for (e.g. DINOv2 checkpoints configured at
    518 with a 224 crop), the crop is resized (bicubic) to the configured size, which is the
    size the adapters analyse the model at.

    Attributes:
        mean, std: the per-channel normalisation the processor applies to pixels in [0, 1]
            (to undo it when drawing the images), or None when it does not normalise.
    """

    def __init__(self, processor: object, size: tuple[int, int]) -> None:
        self.processor = processor
        self.size = tuple(size)
        self.mean: list[float] | None = None
        self.std: list[float] | None = None
        mean, std = getattr(processor, "image_mean", None), getattr(processor, "image_std", None)
        if getattr(processor, "do_normalize", True) and mean is not None and std is not None:
            self.mean = [float(v) for v in torch.as_tensor(mean, dtype=torch.float64).flatten().expand(3)]
            self.std = [float(v) for v in torch.as_tensor(std, dtype=torch.float64).flatten().expand(3)]

    def __call__(self, img: object) -> Tensor:
        x = self.processor(images=img.convert("RGB"), return_tensors="pt")["pixel_values"][0]
        if tuple(x.shape[-2:]) != self.size:
            x = torch.nn.functional.interpolate(x[None], size=self.size, mode="bicubic", align_corners=False)[
                0
            ]
        return x

    def __repr__(self) -> str:
        return f"ImageProcessorTransform({type(self.processor).__name__}, size={self.size})"


def _read_classes(classes: Sequence[str] | str | os.PathLike) -> list[str]:
    if isinstance(classes, (str, os.PathLike)):
        path = Path(classes)
        if not path.is_file():
            raise ModelLoadError(
                f"classes file not found: {path} (give a list of names or a file with one per line)"
            )
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    else:
        names = [str(n).strip() for n in classes]
    if not names or not all(names):
        raise ModelLoadError("classes must hold at least one non-empty class name")
    if len(set(names)) != len(names):
        raise ModelLoadError("classes contains a repeated name")
    return names


def _check_templates(templates: Sequence[str], words: Mapping[str, str]) -> list[str]:
    items = [templates] if isinstance(templates, str) else list(templates)
    bad = [t for t in items if not isinstance(t, str) or t.count("{}") != 1]
    if not items or bad:
        raise ModelLoadError(
            f"{words['templates']}: each template needs exactly one '{{}}' for the class name "
            f"(e.g. 'a photo of a {{}}.'), got {(bad or items)[:3]!r}"
        )
    return items


def _hf_call(what: str, fn: Callable[[], object], local: bool, spec: str) -> object:
    try:
        return fn()
    except ModelLoadError:
        raise
    except Exception as e:  # noqa: BLE001 - hub / file failures become one line
        if local:
            raise ModelLoadError(f"could not load the {what} in {spec}: {_first_line(e)}") from e
        raise _download_error(f"the {what} of {spec!r} from the Hugging Face hub", e, _HF_HINT) from e


def _load_hf(
    spec: str,
    checkpoint: str | os.PathLike | None,
    random_init: bool,
    names: list[str] | None,
    templates: list[str] | None,
    words: Mapping[str, str],
    local: bool,
) -> LoadedModel:
    import transformers

    from captum_clsemb.adapters import adapt
    from captum_clsemb.adapters.hf_beit import hf_class_names
    from captum_clsemb.zero_shot import DEFAULT_TEMPLATES, ZeroShotClassifier

    if not spec:
        raise ModelLoadError("hf: needs a model id, e.g. hf:openai/clip-vit-base-patch32")
    if local and not (Path(spec) / "config.json").is_file():
        raise ModelLoadError(f"{spec} is not a Hugging Face model folder (no config.json)")
    kw = {"local_files_only": True} if local else {}
    config = _hf_call("config", lambda: transformers.AutoConfig.from_pretrained(spec, **kw), local, spec)
    arch = (getattr(config, "architectures", None) or [None])[0]
    if arch is None:
        mapping = transformers.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES.get(config.model_type)
        arch = mapping if isinstance(mapping, str) else None
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        raise ModelLoadError(f"{spec}: unknown or missing architecture {arch!r} in its config.json")
    is_clip = arch in ("CLIPModel", "SiglipModel")
    if is_clip and names is None:
        raise ModelLoadError(
            f"{spec} is an image-text model ({arch}): pass {words['classes']} (class names, or a file with one "
            "per line) to build its zero-shot classifier"
        )
    if not is_clip and (names is not None or templates is not None):
        raise ModelLoadError(
            f"{words['classes']} and {words['templates']} are for CLIP / SigLIP models; {spec} is a {arch}"
        )
    if random_init or checkpoint is not None:
        with _seeded(random_init):
            model = cls(config)
        if checkpoint is not None:
            _load_state(model, checkpoint, f"{arch} of {spec}")
            weights = f"weights from {checkpoint}"
        else:
            weights = "random weights"
    else:
        model = _hf_call("weights", lambda: cls.from_pretrained(spec, **kw), local, spec)
        weights = "pretrained weights"
    model = model.float().eval()
    where = f"{spec}" if local else f"hf:{spec}"
    if is_clip:
        tokenizer = _hf_call(
            "tokenizer", lambda: transformers.AutoTokenizer.from_pretrained(spec, **kw), local, spec
        )
        model = ZeroShotClassifier.from_prompts(
            model, tokenizer, names, templates=templates or DEFAULT_TEMPLATES
        )
        n_t = len(templates or DEFAULT_TEMPLATES)
        desc = f"{arch} zero-shot classifier over {len(names)} classes ({n_t} prompt template(s)) from {where}, {weights}"
    else:
        names = hf_class_names(config, getattr(config, "num_labels", 0))
        desc = f"Hugging Face {arch} from {where}, {weights}"
    try:
        size = adapt(model).img_size
    except Exception:  # noqa: BLE001 - an unsupported family still loads; analyses will say why
        size = _config_size(model.config)
    pp_file = Path(spec) / "preprocessor_config.json"
    pp_sizeless = _sizeless_processor_config(pp_file) if local else None
    if local and not pp_file.is_file():
        # the ViT image processor's defaults, said in the description
        processor = transformers.ViTImageProcessor(size={"height": size[0], "width": size[1]})
        desc += f"; no preprocessor_config.json: images resized to {size[0]}x{size[1]}, mean = std = 0.5"
    elif pp_sizeless is not None:
        # a processor config without a size (e.g. only mean and std) would get the processor
        # class's default size (224, or a 224 crop): resize to the model's input size instead
        processor = transformers.ViTImageProcessor(size={"height": size[0], "width": size[1]}, **pp_sizeless)
        desc += f"; preprocessor_config.json gives no size: images resized to {size[0]}x{size[1]}"
    else:
        processor = _hf_call(
            "image processor",
            lambda: transformers.AutoImageProcessor.from_pretrained(spec, **kw),
            local,
            spec,
        )
    return LoadedModel(model.eval(), ImageProcessorTransform(processor, size), names, desc)


# the settings of a processor config that a plain resize-and-normalise processor takes over
_PLAIN_PROCESSOR_KEYS = (
    "image_mean",
    "image_std",
    "do_normalize",
    "do_rescale",
    "rescale_factor",
    "resample",
)


def _sizeless_processor_config(pp_file: Path) -> dict | None:
    """A processor config that names no size: its normalisation settings; else None."""
    try:
        data = json.loads(pp_file.read_text())
    except (OSError, ValueError):
        return None  # absent, or unreadable: the image processor reports the problem
    if not isinstance(data, dict) or "size" in data or "crop_size" in data:
        return None
    return {k: data[k] for k in _PLAIN_PROCESSOR_KEYS if k in data}


def _config_size(config: object) -> tuple[int, int]:
    cfg = getattr(config, "vision_config", config)
    size = getattr(cfg, "image_size", 224)
    return tuple(size) if isinstance(size, (tuple, list)) else (int(size), int(size))

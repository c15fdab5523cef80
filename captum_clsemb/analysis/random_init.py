r"""A randomly initialised copy of a model: the paper's random-init baseline."""

from __future__ import annotations

import copy
import inspect

import torch
from torch import nn

from captum_clsemb.adapters import ModelAdapter, adapt
from captum_clsemb.errors import InputValidationError
from captum_clsemb.zero_shot import ZeroShotClassifier


def random_init_copy(
    model: nn.Module | ModelAdapter, seed: int = 0, init_mode: str | None = None
) -> nn.Module:
    r"""The same architecture with the family's default random initialisation, seeded.

    The model is deep-copied (the original is untouched, and the copy keeps its device,
    dtype and attention settings) and every parameter is re-initialised:

    - timm: ``model.init_weights(mode)``, by default the standard timm ViT init
      (``mode=''``: truncated normal std 0.02 for linear layers, zero biases), which is what
      ``timm.create_model(name, pretrained=False)`` gives, i.e. the authors' random
      baseline, also for a model built with ``weight_init='skip'``.
    - Hugging Face: the ``_is_hf_initialized`` flags of the copy are cleared and
      ``model.init_weights()`` re-runs the model's ``_init_weights`` on every module
      (normal with ``config.initializer_range``), the initialisation of
      ``model.__class__(model.config)``. For a
      :class:`~captum_clsemb.zero_shot.ZeroShotClassifier` the CLIP / SigLIP model is
      re-initialised and the class text embeddings are kept.
    - timm ``Eva`` and ``Beit`` have a single initialisation (``init_weights()``).

    The global RNG state is left unchanged (the init runs under ``torch.random.fork_rng``);
    the same seed gives the same weights.

    Args:
        model: a supported timm or Hugging Face ViT (or its adapter).
        seed: seed of the initialisation. Default: 0.
        init_mode: timm only, one of ``''``, ``'jax'``, ``'jax_nlhb'``, ``'moco'``, ``'reset'``.
    Returns:
        the re-initialised copy, in eval mode.

    Examples::

        >>> from captum_clsemb.analysis import random_init_copy
        >>> baseline = random_init_copy(model, seed=0)
    """
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise InputValidationError(f"seed must be an int, got {seed!r}")
    adapter = adapt(model)
    copied = copy.deepcopy(adapter.model)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        if adapter.family == "timm":
            has_modes = "mode" in inspect.signature(copied.init_weights).parameters
            if init_mode is None or init_mode == "":
                if has_modes:
                    # init_weights('') falls back to weight_init_mode ('reset' after weight_init='skip').
                    copied.weight_init_mode = ""
                copied.init_weights()
            elif not has_modes:
                raise InputValidationError(
                    f"init_mode applies to timm VisionTransformer models; {type(copied).__name__} has a "
                    "single initialisation: leave init_mode None"
                )
            else:
                copied.init_weights(mode=init_mode)
        elif adapter.family == "hf":
            if init_mode is not None:
                raise InputValidationError("init_mode applies to timm models only; leave it None")
            # a zero-shot classifier re-initialises its image-text model; its class text matrix is kept
            hf_model = copied.model if isinstance(copied, ZeroShotClassifier) else copied
            for module in hf_model.modules():
                if hasattr(module, "_is_hf_initialized"):
                    module._is_hf_initialized = False
                for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
                    if hasattr(t, "_is_hf_initialized"):
                        t._is_hf_initialized = False
            hf_model.init_weights()
        else:  # pragma: no cover - adapt() only returns the two families
            raise InputValidationError(f"no random initialisation known for family {adapter.family!r}")
    return copied.eval()

"""Convert class-token Vision Transformers between timm and Hugging Face transformers.

:func:`timm_to_hf` turns a timm ``VisionTransformer`` (class-token pooling, standard
pre-norm ``Block``) into ``transformers.ViTForImageClassification`` and a timm
``VisionTransformerDistilled`` (DeiT) into ``transformers.DeiTForImageClassificationWithTeacher``.
:func:`hf_to_timm` goes the other way. Both copy every weight and load with
``strict=True``, so the converted model computes the same logits.

The Hugging Face side is located by module structure (the single ``Conv2d`` of the
embeddings, the ``ModuleList`` of encoder layers, the ``Linear`` and ``LayerNorm``
modules of each layer in registration order), not by hard-coded parameter names, so the
mapping works with both the transformers 4.x naming (``attention.attention.query`` ...)
and the 5.x naming (``attention.q_proj`` ...).

Features the Hugging Face classes cannot express raise :class:`UnsupportedConversionError`
(a ``ValueError``) naming the feature.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from functools import partial

import torch
from torch import Tensor, nn

__all__ = ["UnsupportedConversionError", "hf_to_timm", "timm_to_hf"]

# timm activation -> transformers ``hidden_act`` name (checked by class name and ``approximate``).
_GELU_EXACT = "gelu"
_GELU_TANH = "gelu_pytorch_tanh"
_QUICK_GELU = "quick_gelu"

# Roles of the six Linear layers of one encoder layer, in registration order, with the
# module names used by known transformers versions (used only as a sanity check).
_LAYER_LINEAR_ROLES = ("q", "k", "v", "o", "fc1", "fc2")
_ROLE_NAME_HINTS = {
    "q": re.compile(r"(^|\.)(q_proj|query|q)$"),
    "k": re.compile(r"(^|\.)(k_proj|key|k)$"),
    "v": re.compile(r"(^|\.)(v_proj|value|v)$"),
    "o": re.compile(r"(^|\.)(o_proj|out_proj|output\.dense|proj)$"),
    "fc1": re.compile(r"(^|\.)(fc1|intermediate\.dense)$"),
    "fc2": re.compile(r"(^|\.)(fc2|output\.dense)$"),
}


class UnsupportedConversionError(ValueError):
    """The model uses a feature that the target framework's classes cannot represent."""


# ---------------------------------------------------------------------------------------
# Canonical weights: a framework-neutral dict shared by both directions.
#   cls_token (1,1,D), dist_token (1,1,D) or absent, pos_embed (1, P+N, D) with prefix slots,
#   patch.weight/bias, layers.{i}.{norm1,q,k,v,o,norm2,fc1,fc2}.{weight,bias},
#   norm.weight/bias, head.weight/bias and head_dist.weight/bias when there is a classifier.
# Every bias the target needs is present (zeros stand in for a missing timm bias), except
# the q/k/v biases, which are absent when ``qkv_bias`` is False.
# ---------------------------------------------------------------------------------------


def _unsupported(feature: str, hint: str = "") -> UnsupportedConversionError:
    message = f"cannot convert: {feature} is not supported by the target model classes"
    return UnsupportedConversionError(message + (f" ({hint})" if hint else ""))


def _is_identity(module: nn.Module | None) -> bool:
    return module is None or isinstance(module, nn.Identity)


def _dropout_p(module: nn.Module | None) -> float:
    return float(module.p) if isinstance(module, nn.Dropout) else 0.0


def _linear_weights(linear: nn.Linear, require_bias: bool = True) -> dict[str, Tensor]:
    weights = {"weight": linear.weight.detach()}
    if linear.bias is not None:
        weights["bias"] = linear.bias.detach()
    elif require_bias:
        weights["bias"] = torch.zeros(
            linear.out_features, dtype=linear.weight.dtype, device=linear.weight.device
        )
    return weights


def _layer_norm_weights(norm: nn.LayerNorm) -> dict[str, Tensor]:
    (dim,) = norm.normalized_shape
    weight = norm.weight.detach() if norm.weight is not None else torch.ones(dim)
    bias = (
        norm.bias.detach()
        if norm.bias is not None
        else torch.zeros(dim, dtype=weight.dtype, device=weight.device)
    )
    return {"weight": weight, "bias": bias}


def _prefixed(prefix: str, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    return {f"{prefix}.{name}": tensor for name, tensor in tensors.items()}


def _timm_activation_name(activation: nn.Module) -> str:
    r"""Map a timm MLP activation module to a transformers ``hidden_act`` name.

    Args:
        activation: The ``mlp.act`` module of a timm block.

    Returns:
        The transformers activation name computing the same function.
    """
    class_name = type(activation).__name__
    if isinstance(activation, nn.GELU):
        return _GELU_TANH if activation.approximate == "tanh" else _GELU_EXACT
    if class_name == "GELU":  # timm.layers.GELU: exact erf GELU
        return _GELU_EXACT
    if class_name == "GELUTanh":
        return _GELU_TANH
    if class_name == "QuickGELU":
        return _QUICK_GELU
    raise _unsupported(
        f"MLP activation {class_name}", "only GELU, tanh-GELU and QuickGELU map to a hidden_act"
    )


def _check_layer_norm(norm: nn.Module, dim: int, where: str) -> float:
    if not isinstance(norm, nn.LayerNorm):
        raise _unsupported(
            f"normalization layer {type(norm).__name__} at {where}", "only LayerNorm is supported"
        )
    if tuple(norm.normalized_shape) != (dim,):
        raise _unsupported(f"LayerNorm over shape {tuple(norm.normalized_shape)} at {where}")
    return float(norm.eps)


def _check_timm_model(model: nn.Module) -> dict:
    r"""Validate that a timm ViT maps exactly onto the Hugging Face classes.

    Args:
        model: A timm ``VisionTransformer`` or ``VisionTransformerDistilled``.

    Returns:
        Architecture facts: ``distilled``, ``dim``, ``heads``, ``mlp_dim``, ``eps``,
        ``act``, ``qkv_bias``, ``img_size``, ``patch_size``, ``in_chans``, ``num_classes``,
        ``attn_drop``, ``hidden_drop``.

    Raises:
        UnsupportedConversionError: naming the first feature that cannot be represented.
    """
    from timm.layers import Attention, Mlp, PatchEmbed
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.vision_transformer import Block, VisionTransformer

    if type(model) not in (VisionTransformer, VisionTransformerDistilled):
        raise _unsupported(
            f"model class {type(model).__module__}.{type(model).__name__}",
            "expected timm VisionTransformer or VisionTransformerDistilled",
        )
    distilled = isinstance(model, VisionTransformerDistilled)
    if getattr(model, "cls_token", None) is None:
        raise _unsupported("a model without class token (class_token=False)")
    if model.global_pool != "token":
        raise _unsupported(
            f"global_pool={model.global_pool!r}", "only class-token pooling 'token' is supported"
        )
    if getattr(model, "num_reg_tokens", 0) or getattr(model, "reg_token", None) is not None:
        raise _unsupported(f"register tokens (reg_tokens={model.num_reg_tokens})")
    if getattr(model, "attn_pool", None) is not None:
        raise _unsupported("attention pooling (attn_pool)")
    if not _is_identity(model.norm_pre):
        raise _unsupported("pre-norm (norm_pre, pre_norm=True)")
    if not _is_identity(getattr(model, "fc_norm", None)):
        raise _unsupported("fc_norm after pooling")
    if _is_identity(model.norm):
        raise _unsupported("no final norm (final_norm=False)")
    if distilled and getattr(model, "distilled_training", False):
        warnings.warn(
            "distilled_training=True: the Hugging Face model always averages the two heads", stacklevel=3
        )

    patch_embed = model.patch_embed
    if type(patch_embed) is not PatchEmbed:
        raise _unsupported(
            f"patch embedding {type(patch_embed).__name__}", "only timm PatchEmbed is supported"
        )
    if not _is_identity(patch_embed.norm):
        raise _unsupported("a norm inside the patch embedding (embed_norm_layer)")
    proj = patch_embed.proj
    if tuple(proj.kernel_size) != tuple(proj.stride) or tuple(proj.padding) != (0, 0):
        raise _unsupported("a patch projection whose kernel size differs from its stride or that pads")
    if patch_embed.img_size is None:
        raise _unsupported("a patch embedding without fixed img_size")

    dim = model.embed_dim
    eps_values = {_check_layer_norm(model.norm, dim, "norm")}
    act_names, mlp_dims, qkv_biases, heads = set(), set(), set(), set()
    attn_drops, hidden_drops = set(), set()
    for index, block in enumerate(model.blocks):
        where = f"blocks.{index}"
        if type(block) is not Block:
            raise _unsupported(
                f"block type {type(block).__name__} at {where}", "only the pre-norm timm Block is supported"
            )
        if not (_is_identity(block.ls1) and _is_identity(block.ls2)):
            raise _unsupported(f"layer scale (init_values) at {where}")
        if not (_is_identity(block.drop_path1) and _is_identity(block.drop_path2)):
            warnings.warn(
                "drop_path (stochastic depth) has no Hugging Face counterpart; outputs match in eval mode only",
                stacklevel=3,
            )
        eps_values.add(_check_layer_norm(block.norm1, dim, f"{where}.norm1"))
        eps_values.add(_check_layer_norm(block.norm2, dim, f"{where}.norm2"))
        attn = block.attn
        if type(attn) is not Attention:
            raise _unsupported(
                f"attention type {type(attn).__name__} at {where}", "only timm Attention is supported"
            )
        if not (_is_identity(attn.q_norm) and _is_identity(attn.k_norm)):
            raise _unsupported(f"qk_norm at {where}")
        if not _is_identity(attn.norm):
            raise _unsupported(f"scale_attn_norm at {where}")
        if getattr(attn, "gate", None) is not None:
            raise _unsupported(f"gated attention at {where}")
        if attn.num_heads * attn.head_dim != dim or attn.proj.out_features != dim:
            raise _unsupported(
                f"attention width {attn.num_heads}x{attn.head_dim} != embed_dim {dim} at {where}"
            )
        heads.add(attn.num_heads)
        qkv_biases.add(attn.qkv.bias is not None)
        attn_drops.add(_dropout_p(attn.attn_drop))
        hidden_drops.add(_dropout_p(attn.proj_drop))
        mlp = block.mlp
        if type(mlp) is not Mlp:
            raise _unsupported(
                f"MLP type {type(mlp).__name__} at {where}", "only the plain timm Mlp is supported"
            )
        if not isinstance(mlp.fc1, nn.Linear) or not isinstance(mlp.fc2, nn.Linear):
            raise _unsupported(f"convolutional MLP (use_conv=True) at {where}")
        if not _is_identity(mlp.norm):
            raise _unsupported(f"scale_mlp_norm at {where}")
        act_names.add(_timm_activation_name(mlp.act))
        mlp_dims.add(mlp.fc1.out_features)
    for name, values in (
        ("LayerNorm eps", eps_values),
        ("MLP activation", act_names),
        ("MLP width", mlp_dims),
        ("qkv bias", qkv_biases),
        ("number of heads", heads),
    ):
        if len(values) > 1:
            raise _unsupported(f"per-layer differences in {name} ({sorted(values, key=str)})")
    if not model.blocks:
        raise _unsupported("a model without transformer blocks (depth=0)")

    head_modules = [model.head] + ([model.head_dist] if distilled else [])
    for head in head_modules:
        if not (isinstance(head, nn.Linear) or _is_identity(head)):
            raise _unsupported(f"classifier head {type(head).__name__}", "expected nn.Linear or nn.Identity")
    return {
        "distilled": distilled,
        "dim": dim,
        "depth": len(model.blocks),
        "heads": heads.pop(),
        "mlp_dim": mlp_dims.pop(),
        "eps": eps_values.pop(),
        "act": act_names.pop(),
        "qkv_bias": qkv_biases.pop(),
        "img_size": tuple(patch_embed.img_size),
        "patch_size": tuple(patch_embed.patch_size),
        "in_chans": proj.in_channels,
        "num_classes": model.head.out_features if isinstance(model.head, nn.Linear) else 0,
        "attn_drop": max(attn_drops),
        "hidden_drop": max(hidden_drops),
    }


def _timm_to_canonical(model: nn.Module, distilled: bool) -> dict[str, Tensor]:
    r"""Read a validated timm ViT into the canonical weight dict.

    Args:
        model: timm ``VisionTransformer`` or ``VisionTransformerDistilled`` (already checked).
        distilled: Whether the model carries a distillation token and head.

    Returns:
        Canonical weights (see module comment).
    """
    dim = model.embed_dim
    weights: dict[str, Tensor] = {"cls_token": model.cls_token.detach()}
    num_prefix = 1
    if distilled:
        weights["dist_token"] = model.dist_token.detach()
        num_prefix = 2
    reference = model.cls_token.detach()
    num_patches = model.patch_embed.num_patches
    if model.pos_embed is None:
        pos_embed = reference.new_zeros(1, num_prefix + num_patches, dim)
    elif model.no_embed_class:
        # timm adds pos_embed to the patches only; a zero slot for each prefix token is the same.
        pos_embed = torch.cat([reference.new_zeros(1, num_prefix, dim), model.pos_embed.detach()], dim=1)
    else:
        pos_embed = model.pos_embed.detach()
    if pos_embed.shape[1] != num_prefix + num_patches:
        raise _unsupported(f"pos_embed of length {pos_embed.shape[1]} for {num_patches} patches")
    weights["pos_embed"] = pos_embed

    proj = model.patch_embed.proj
    weights["patch.weight"] = proj.weight.detach()
    weights["patch.bias"] = (
        proj.bias.detach() if proj.bias is not None else reference.new_zeros(proj.out_channels).view(-1)
    )
    for index, block in enumerate(model.blocks):
        prefix = f"layers.{index}"
        qkv = _linear_weights(block.attn.qkv, require_bias=False)
        for role, weight in zip(("q", "k", "v"), qkv["weight"].chunk(3, dim=0)):
            weights[f"{prefix}.{role}.weight"] = weight
        if "bias" in qkv:
            for role, bias in zip(("q", "k", "v"), qkv["bias"].chunk(3, dim=0)):
                weights[f"{prefix}.{role}.bias"] = bias
        weights.update(_prefixed(f"{prefix}.o", _linear_weights(block.attn.proj)))
        weights.update(_prefixed(f"{prefix}.norm1", _layer_norm_weights(block.norm1)))
        weights.update(_prefixed(f"{prefix}.norm2", _layer_norm_weights(block.norm2)))
        weights.update(_prefixed(f"{prefix}.fc1", _linear_weights(block.mlp.fc1)))
        weights.update(_prefixed(f"{prefix}.fc2", _linear_weights(block.mlp.fc2)))
    weights.update(_prefixed("norm", _layer_norm_weights(model.norm)))
    if isinstance(model.head, nn.Linear):
        weights.update(_prefixed("head", _linear_weights(model.head)))
    if distilled and isinstance(model.head_dist, nn.Linear):
        weights.update(_prefixed("head_dist", _linear_weights(model.head_dist)))
    return weights


def _canonical_to_timm_state(weights: dict[str, Tensor], depth: int, distilled: bool) -> dict[str, Tensor]:
    r"""Lay canonical weights out as a timm ViT ``state_dict``.

    Args:
        weights: Canonical weights with every bias present except possibly q/k/v.
        depth: Number of transformer blocks.
        distilled: Whether to emit ``dist_token`` and ``head_dist``.

    Returns:
        A state dict for timm ``VisionTransformer`` / ``VisionTransformerDistilled``.
    """
    state = {
        "cls_token": weights["cls_token"],
        "pos_embed": weights["pos_embed"],
        "patch_embed.proj.weight": weights["patch.weight"],
        "patch_embed.proj.bias": weights["patch.bias"],
        "norm.weight": weights["norm.weight"],
        "norm.bias": weights["norm.bias"],
    }
    if distilled:
        state["dist_token"] = weights["dist_token"]
    for index in range(depth):
        src, dst = f"layers.{index}", f"blocks.{index}"
        state[f"{dst}.attn.qkv.weight"] = torch.cat(
            [weights[f"{src}.{r}.weight"] for r in ("q", "k", "v")], dim=0
        )
        if f"{src}.q.bias" in weights:
            state[f"{dst}.attn.qkv.bias"] = torch.cat(
                [weights[f"{src}.{r}.bias"] for r in ("q", "k", "v")], dim=0
            )
        for canonical_name, timm_name in (
            ("o", "attn.proj"),
            ("norm1", "norm1"),
            ("norm2", "norm2"),
            ("fc1", "mlp.fc1"),
            ("fc2", "mlp.fc2"),
        ):
            for kind in ("weight", "bias"):
                state[f"{dst}.{timm_name}.{kind}"] = weights[f"{src}.{canonical_name}.{kind}"]
    for head_name in ("head", "head_dist"):
        if f"{head_name}.weight" in weights:
            state[f"{head_name}.weight"] = weights[f"{head_name}.weight"]
            state[f"{head_name}.bias"] = weights[f"{head_name}.bias"]
    return state


# ---------------------------------------------------------------------------------------
# Hugging Face side, located by module structure.
# ---------------------------------------------------------------------------------------


def _hf_parameter_map(hf_model: nn.Module) -> dict[str, str]:
    r"""Map canonical weight names to parameter names of a Hugging Face ViT / DeiT classifier.

    The encoder layers are found as the ``ModuleList`` of ``num_hidden_layers`` entries;
    inside each layer the six ``Linear`` modules (q, k, v, output, fc1, fc2) and two
    ``LayerNorm`` modules (before, after attention) are taken in registration order, which
    is the same in transformers 4.x and 5.x. Known module names are checked against those roles.

    Args:
        hf_model: ``ViTForImageClassification`` or ``DeiTForImageClassificationWithTeacher``.

    Returns:
        Canonical name -> ``hf_model.state_dict()`` key, for every parameter of the model.

    Raises:
        RuntimeError: if the module structure is not the expected one.
    """
    config = hf_model.config
    base_prefix = hf_model.base_model_prefix
    base = getattr(hf_model, base_prefix)
    names: dict[str, str] = {}

    embeddings = base.embeddings
    names["cls_token"] = f"{base_prefix}.embeddings.cls_token"
    names["pos_embed"] = f"{base_prefix}.embeddings.position_embeddings"
    if getattr(embeddings, "distillation_token", None) is not None:
        names["dist_token"] = f"{base_prefix}.embeddings.distillation_token"
    convs = [name for name, module in embeddings.named_modules() if isinstance(module, nn.Conv2d)]
    if len(convs) != 1:
        raise RuntimeError(f"expected one Conv2d patch projection in the embeddings, found {convs}")
    names["patch.weight"] = f"{base_prefix}.embeddings.{convs[0]}.weight"
    names["patch.bias"] = f"{base_prefix}.embeddings.{convs[0]}.bias"

    layer_lists = [
        (name, module)
        for name, module in base.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) == config.num_hidden_layers and name
    ]
    if len(layer_lists) != 1:
        raise RuntimeError(
            f"expected one ModuleList of {config.num_hidden_layers} encoder layers, found {layer_lists}"
        )
    layers_name, layers = layer_lists[0]
    for index, layer in enumerate(layers):
        prefix = f"{base_prefix}.{layers_name}.{index}"
        linears = [name for name, module in layer.named_modules() if isinstance(module, nn.Linear)]
        norms = [name for name, module in layer.named_modules() if isinstance(module, nn.LayerNorm)]
        if len(linears) != len(_LAYER_LINEAR_ROLES) or len(norms) != 2:
            raise RuntimeError(f"unexpected encoder layer structure: Linear {linears}, LayerNorm {norms}")
        for role, name in zip(_LAYER_LINEAR_ROLES, linears):
            clashing = [
                other for other, pattern in _ROLE_NAME_HINTS.items() if other != role and pattern.search(name)
            ]
            if clashing and not _ROLE_NAME_HINTS[role].search(name):
                raise RuntimeError(f"module {name!r} in position of {role!r} looks like {clashing}")
            module = layer.get_submodule(name)
            names[f"layers.{index}.{role}.weight"] = f"{prefix}.{name}.weight"
            if module.bias is not None:
                names[f"layers.{index}.{role}.bias"] = f"{prefix}.{name}.bias"
        for role, name in zip(("norm1", "norm2"), norms):
            names[f"layers.{index}.{role}.weight"] = f"{prefix}.{name}.weight"
            names[f"layers.{index}.{role}.bias"] = f"{prefix}.{name}.bias"

    final_norms = [
        name
        for name, module in base.named_modules()
        if isinstance(module, nn.LayerNorm) and not name.startswith(f"{layers_name}.")
    ]
    if len(final_norms) != 1:
        raise RuntimeError(f"expected one final LayerNorm outside the encoder layers, found {final_norms}")
    names["norm.weight"] = f"{base_prefix}.{final_norms[0]}.weight"
    names["norm.bias"] = f"{base_prefix}.{final_norms[0]}.bias"

    head_names = ["cls_classifier", "distillation_classifier"] if "dist_token" in names else ["classifier"]
    for canonical, attribute in zip(("head", "head_dist"), head_names):
        if isinstance(getattr(hf_model, attribute), nn.Linear):
            names[f"{canonical}.weight"] = f"{attribute}.weight"
            names[f"{canonical}.bias"] = f"{attribute}.bias"

    expected = set(hf_model.state_dict().keys())
    if set(names.values()) != expected:
        raise RuntimeError(
            f"parameter mapping incomplete: unmapped {sorted(expected - set(names.values()))}, "
            f"unknown {sorted(set(names.values()) - expected)}"
        )
    return names


def timm_to_hf(
    model: nn.Module,
    class_names: Sequence[str] | None = None,
    attn_implementation: str | None = None,
) -> nn.Module:
    r"""Convert a timm class-token ViT into the equivalent Hugging Face classifier.

    ``VisionTransformer`` becomes ``ViTForImageClassification``; ``VisionTransformerDistilled``
    becomes ``DeiTForImageClassificationWithTeacher`` (whose logits average both heads, as
    timm does outside distilled training). The result is on the same device and dtype and in
    the same train/eval mode as ``model``.

    Args:
        model: timm ``VisionTransformer`` with ``global_pool='token'`` and standard blocks,
            or ``timm.models.deit.VisionTransformerDistilled``.
        class_names: Optional label per class, stored as ``config.id2label`` / ``label2id``.
        attn_implementation: Optional transformers attention backend (e.g. ``"eager"`` to
            get attention weights back, ``"sdpa"``); None keeps the library default.

    Returns:
        The Hugging Face model holding a copy of every weight.

    Raises:
        UnsupportedConversionError: (a ``ValueError``) naming a feature the Hugging Face
            classes cannot represent, e.g. average pooling, register tokens, no class
            token, layer scale, qk-norm, ``ResPostBlock``.
    """
    from transformers import (
        DeiTConfig,
        DeiTForImageClassificationWithTeacher,
        ViTConfig,
        ViTForImageClassification,
    )

    facts = _check_timm_model(model)
    num_classes = facts["num_classes"]
    config_kwargs: dict = {}
    if class_names is not None:
        class_names = [str(name) for name in class_names]
        if len(class_names) != num_classes:
            raise ValueError(f"got {len(class_names)} class names for a model with {num_classes} classes")
        config_kwargs["id2label"] = dict(enumerate(class_names))
        config_kwargs["label2id"] = {name: index for index, name in enumerate(class_names)}
    else:
        config_kwargs["num_labels"] = num_classes
    if attn_implementation is not None:
        config_kwargs["attn_implementation"] = attn_implementation
    img_size, patch_size = facts["img_size"], facts["patch_size"]
    config_class, model_class = (
        (DeiTConfig, DeiTForImageClassificationWithTeacher)
        if facts["distilled"]
        else (ViTConfig, ViTForImageClassification)
    )
    config = config_class(
        hidden_size=facts["dim"],
        num_hidden_layers=facts["depth"],
        num_attention_heads=facts["heads"],
        intermediate_size=facts["mlp_dim"],
        hidden_act=facts["act"],
        hidden_dropout_prob=facts["hidden_drop"],
        attention_probs_dropout_prob=facts["attn_drop"],
        layer_norm_eps=facts["eps"],
        image_size=img_size[0] if img_size[0] == img_size[1] else list(img_size),
        patch_size=patch_size[0] if patch_size[0] == patch_size[1] else list(patch_size),
        num_channels=facts["in_chans"],
        qkv_bias=facts["qkv_bias"],
        encoder_stride=patch_size[0],
        **config_kwargs,
    )
    if num_classes == 0 and class_names is None:
        config.num_labels = 0

    hf_model = model_class(config)
    reference = next(model.parameters())
    weights = _timm_to_canonical(model, facts["distilled"])
    name_map = _hf_parameter_map(hf_model)
    missing = sorted(set(name_map) ^ set(weights))
    if missing:
        raise RuntimeError(f"canonical weights and Hugging Face parameters disagree on {missing}")
    state = {name_map[name]: tensor.detach().to("cpu", torch.float32) for name, tensor in weights.items()}
    hf_model.load_state_dict(state, strict=True)
    hf_model.to(device=reference.device, dtype=reference.dtype)
    hf_model.train(model.training)
    return hf_model


def _hf_activation_layer(hidden_act: str) -> type[nn.Module] | partial:
    from timm.layers import QuickGELU

    if hidden_act == _GELU_EXACT:
        return nn.GELU
    if hidden_act in (_GELU_TANH, "gelu_new", "gelu_fast"):
        if hidden_act != _GELU_TANH:
            warnings.warn(f"hidden_act={hidden_act!r} is approximated by tanh-GELU in timm", stacklevel=3)
        return partial(nn.GELU, approximate="tanh")
    if hidden_act == _QUICK_GELU:
        return QuickGELU
    raise _unsupported(f"hidden_act={hidden_act!r}", "timm Mlp supports GELU, tanh-GELU and QuickGELU here")


def hf_to_timm(hf_model: nn.Module) -> nn.Module:
    r"""Convert a Hugging Face ViT classifier into the equivalent timm model.

    ``ViTForImageClassification`` becomes ``timm.models.vision_transformer.VisionTransformer``;
    ``DeiTForImageClassificationWithTeacher`` becomes ``timm.models.deit.VisionTransformerDistilled``.
    The result is on the same device and dtype and in the same train/eval mode as ``hf_model``.

    Args:
        hf_model: A Hugging Face ``ViTForImageClassification`` or
            ``DeiTForImageClassificationWithTeacher``.

    Returns:
        The timm model holding a copy of every weight.

    Raises:
        UnsupportedConversionError: (a ``ValueError``) for other model classes or an
            activation timm's ``Mlp`` cannot express.
    """
    from timm.layers import LayerNorm
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.vision_transformer import VisionTransformer

    class_name = type(hf_model).__name__
    if class_name == "ViTForImageClassification":
        distilled, timm_class = False, VisionTransformer
    elif class_name == "DeiTForImageClassificationWithTeacher":
        distilled, timm_class = True, VisionTransformerDistilled
    else:
        raise _unsupported(
            f"model class {class_name}",
            "expected ViTForImageClassification or DeiTForImageClassificationWithTeacher",
        )
    config = hf_model.config
    dim, mlp_dim = config.hidden_size, config.intermediate_size
    if getattr(config, "head_dim", None) not in (None, dim // config.num_attention_heads):
        raise _unsupported(f"head_dim={config.head_dim} != hidden_size / num_attention_heads")
    mlp_ratio = mlp_dim / dim
    if int(dim * mlp_ratio) != mlp_dim:
        raise _unsupported(f"intermediate_size={mlp_dim} not reachable as int(hidden_size * mlp_ratio)")
    image_size, patch_size = config.image_size, config.patch_size
    head = hf_model.cls_classifier if distilled else hf_model.classifier
    num_classes = head.out_features if isinstance(head, nn.Linear) else 0
    timm_model = timm_class(
        img_size=tuple(image_size) if isinstance(image_size, (list, tuple)) else image_size,
        patch_size=tuple(patch_size) if isinstance(patch_size, (list, tuple)) else patch_size,
        in_chans=config.num_channels,
        num_classes=num_classes,
        global_pool="token",
        embed_dim=dim,
        depth=config.num_hidden_layers,
        num_heads=config.num_attention_heads,
        mlp_ratio=mlp_ratio,
        qkv_bias=config.qkv_bias,
        norm_layer=partial(LayerNorm, eps=config.layer_norm_eps),
        act_layer=_hf_activation_layer(config.hidden_act),
        proj_drop_rate=config.hidden_dropout_prob,
        pos_drop_rate=config.hidden_dropout_prob,
        attn_drop_rate=config.attention_probs_dropout_prob,
        weight_init="skip",
    )
    hf_state = hf_model.state_dict()
    name_map = _hf_parameter_map(hf_model)
    weights = {name: hf_state[key].detach().to("cpu", torch.float32) for name, key in name_map.items()}
    state = _canonical_to_timm_state(weights, config.num_hidden_layers, distilled)
    timm_model.load_state_dict(state, strict=True)
    reference = next(hf_model.parameters())
    timm_model.to(device=reference.device, dtype=reference.dtype)
    timm_model.train(hf_model.training)
    return timm_model

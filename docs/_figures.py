"""The figures of the method pages, computed at build time on the bundled model and images.

Each public function runs one analysis of the package on the bundled CIFAR-10 ViT
(``load_demo_model``) and its 200 bundled test images (``load_demo_images``), draws it with
the package's own plotting functions and hands the figure to pyplot, where the
``matplotlib.sphinxext.plot_directive`` of the page picks it up::

    .. plot::
       :caption: ...

       from _figures import blockwise_identifiability_curves
       blockwise_identifiability_curves()

The model and images are loaded once per build; the whole set of figures takes a few
seconds on one CPU core.
"""

from __future__ import annotations

import dataclasses
import functools

import matplotlib.pyplot as plt
import torch
from matplotlib.figure import Figure

from captum_clsemb import BlockwiseIdentifiability, adapt, load_demo_images, load_demo_model
from captum_clsemb.analysis import (
    ValueVectorProjector,
    attention_edit_effect,
    class_similarity_change_rate,
    compare_models,
    per_image_identifiability,
    random_init_copy,
    residual_match_rate,
)
from captum_clsemb.attr.attention_rollout import AttentionRollout
from captum_clsemb.attr.chefer_gradient_rollout import CheferGradientRollout
from captum_clsemb.attr.chefer_relevancy import CheferRelevancy
from captum_clsemb.attr.class_embedding_gradient import ClassEmbeddingGradient
from captum_clsemb.attr.raw_attention import RawAttention
from captum_clsemb.demo import load_demo_config
from captum_clsemb.metrics import ComparisonResults, RandomRanking, compare_explanations, plot_curves
from captum_clsemb.viz.explanations import plot_block_head_grid, plot_method_grid
from captum_clsemb.viz.identifiability import plot_identifiability_curves, plot_token_maps
from captum_clsemb.viz.mechanisms import (
    plot_class_similarity_change,
    plot_class_value_agreement,
    plot_residual_match,
)
from captum_clsemb.viz.models import plot_model_comparison

# An airplane, a cat and a horse of the bundled images (20 per class, ordered by class).
SHOWN = [0, 60, 140]
# Perturbation tests: the first 5 images of each class are evaluated (50 images keep the
# build fast), images 10-14 of each class fit the linear probes (disjoint, as the authors).
EVALUATED = [c * 20 + i for c in range(10) for i in range(5)]
PROBE = [c * 20 + i for c in range(10) for i in range(10, 15)]


@functools.cache
def _demo() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor, dict]:
    torch.manual_seed(0)
    model = load_demo_model()
    images, labels, _ = load_demo_images()
    return model, images, labels, load_demo_config()


def _chance(num_classes: int) -> float:
    """Mean identifiability of a random ranking: 1 - E[rank] / |C| = 0.5 + 0.5 / |C|."""
    return 0.5 + 0.5 / num_classes


def _show(fig: Figure) -> None:
    """Hand a Figure made by the package (not attached to pyplot) to the plot directive."""
    plt.figure(fig)


def _method_grid(maps: dict[str, torch.Tensor]) -> None:
    _, images, labels, config = _demo()
    names = config["class_names"]
    _show(
        plot_method_grid(
            maps,
            images[SHOWN],
            titles=[names[int(labels[i])] for i in SHOWN],
            mean=config["mean"],
            std=config["std"],
        )
    )


# -- attributions --------------------------------------------------------------------------------
def blockwise_identifiability_curves() -> None:
    model, images, labels, config = _demo()
    bi = BlockwiseIdentifiability(model)
    scores = bi.attribute(images, target=labels)
    _show(
        plot_identifiability_curves(
            bi.mean_identifiability(scores),
            chance=_chance(len(config["class_names"])),
            title=f"Bundled CIFAR-10 ViT, {len(images)} images",
        )
    )


def blockwise_identifiability_maps() -> None:
    model, images, labels, config = _demo()
    scores = BlockwiseIdentifiability(model).attribute(images[SHOWN], target=labels[SHOWN])
    names = config["class_names"]
    adapter = adapt(model)
    _show(
        plot_token_maps(
            scores,
            images[SHOWN],
            adapter.grid_size,
            adapter.num_prefix_tokens,
            blocks=[0, 2, 5],
            titles=[names[int(labels[i])] for i in SHOWN],
            mean=config["mean"],
            std=config["std"],
        )
    )


def class_embedding_gradient() -> None:
    model, images, labels, config = _demo()
    i = SHOWN[1]
    maps = ClassEmbeddingGradient(model).attribute(
        images[i : i + 1], target=labels[i : i + 1], return_per="head"
    )
    _show(
        plot_block_head_grid(
            maps[0],
            images[i],
            blocks=range(1, maps.shape[1] + 1),
            mean=config["mean"],
            std=config["std"],
            title=f"target: {config['class_names'][int(labels[i])]}",
        )
    )


def raw_attention() -> None:
    model, images, _, _ = _demo()
    ra = RawAttention(model)
    _method_grid({f"block {b + 1}": ra.attribute(images[SHOWN], block=b) for b in (0, 2, 5)})


def attention_rollout() -> None:
    model, images, _, _ = _demo()
    ro = AttentionRollout(model)
    x = images[SHOWN]
    _method_grid(
        {
            "mean over heads": ro.attribute(x),
            "start_block=1": ro.attribute(x, start_block=1),
            "max, discard 0.9": ro.attribute(x, head_fusion="max", discard_ratio=0.9),
        }
    )


def _runner_up(model: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The highest-scoring class other than the label, per image."""
    with torch.no_grad():
        logits = model(x)
    return logits.scatter(1, labels[:, None], float("-inf")).argmax(1)


def chefer_gradient_rollout() -> None:
    model, images, labels, _ = _demo()
    x, y = images[SHOWN], labels[SHOWN]
    cgr = CheferGradientRollout(model)
    _method_grid(
        {
            "target: label": cgr.attribute(x, target=y),
            "target: runner-up class": cgr.attribute(x, target=_runner_up(model, x, y)),
        }
    )


def chefer_relevancy() -> None:
    model, images, labels, _ = _demo()
    x, y = images[SHOWN], labels[SHOWN]
    cr = CheferRelevancy(model)
    _method_grid(
        {
            "start_block=1 (default)": cr.attribute(x, target=y),
            "start_block=0": cr.attribute(x, target=y, start_block=0),
            "runner-up class": cr.attribute(x, target=_runner_up(model, x, y)),
        }
    )


# -- metrics -------------------------------------------------------------------------------------
def _compare(methods: dict, **kwargs) -> None:
    model, images, labels, _ = _demo()
    results = compare_explanations(
        model, images[EVALUATED], labels[EVALUATED], methods=methods, batch_size=100, **kwargs
    )
    _show(plot_curves(results))


@functools.cache
def _default_comparison() -> ComparisonResults:
    """Token removal of the default methods on EVALUATED, the linear probe fitted on PROBE (computed
    once per build: the token-removal page shows two of its methods)."""
    model, images, labels, _ = _demo()
    return compare_explanations(
        model,
        images[EVALUATED],
        labels[EVALUATED],
        probe_data=(images[PROBE], labels[PROBE]),
        batch_size=100,
    )


def _only(results: ComparisonResults, methods: list[str]) -> ComparisonResults:
    """The results of some of the methods (each method's curves do not depend on the others)."""
    return dataclasses.replace(
        results,
        methods=methods,
        curves={m: results.curves[m] for m in methods},
        seconds={m: results.seconds[m] for m in methods},
    )


def token_removal_auc() -> None:
    # the default comparison's ClassEmbeddingGradient and its random ranking, RandomRanking(model, seed=0)
    _show(plot_curves(_only(_default_comparison(), ["ClassEmbeddingGradient", "Random"])))


def pixel_removal_auc() -> None:
    model, _, _, config = _demo()
    # black in [0, 1] pixel space, in the model's input normalisation
    black = (-torch.tensor(config["mean"]) / torch.tensor(config["std"])).view(1, 3, 1, 1)
    _compare(
        {
            "ClassEmbeddingGradient": ClassEmbeddingGradient(model),
            "CheferRelevancy": CheferRelevancy(model),
            "Random": RandomRanking(model, seed=0),
        },
        protocol="pixels",
        baseline=black,
    )


def rankings_and_comparison() -> None:
    # the default methods, a linear probe fitted on PROBE and a random ranking
    _show(plot_curves(_default_comparison()))


# -- analyses ------------------------------------------------------------------------------------
def value_vectors() -> None:
    model, _, _, config = _demo()
    vvp = ValueVectorProjector(model, class_names=config["class_names"])
    random_vvp = vvp.random_baseline(seed=0)
    layers = ("attn", "mlp")
    _show(
        plot_class_value_agreement(
            {layer: vvp.class_value_agreement(layer) for layer in layers},
            {layer: random_vvp.class_value_agreement(layer) for layer in layers},
        )
    )


def class_building() -> None:
    model, images, labels, _ = _demo()
    _show(plot_class_similarity_change(class_similarity_change_rate(model, images, target=labels)))


def residual_match() -> None:
    model, images, _, _ = _demo()
    _show(plot_residual_match(residual_match_rate(model, images), group="image", title="image tokens"))


def attention_perturbation() -> None:
    model, images, labels, _ = _demo()
    curves = {}
    for edit in ("self_only", "no_cls"):
        effect = attention_edit_effect(model, images, target=labels, attention_edit=edit)
        curves.setdefault("unperturbed", effect["clean"]["rate"]["image"])
        curves[edit] = effect["edited"]["rate"]["image"]
    _show(plot_identifiability_curves(curves, stat="rate", title="image tokens, identifiability rate"))


def model_comparison() -> None:
    model, images, labels, _ = _demo()
    trained = per_image_identifiability(model, images, target=labels, name="bundled ViT")
    baseline = per_image_identifiability(random_init_copy(model, seed=0), images, target=labels)
    comparison = compare_models(
        {"bundled ViT": trained}, baselines={"bundled ViT": baseline}, n_resamples=2000
    )
    _show(plot_model_comparison(comparison, title=f"Trained vs random-init copy, {len(images)} images"))

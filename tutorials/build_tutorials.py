#!/usr/bin/env python3
r"""Write the tutorial notebooks and execute them, saving them with their outputs.

Each tutorial is a list of cells below (markdown text and Python source as strings). The
notebooks are committed *with* outputs so that the Sphinx docs render them without running
anything (``nb_execution_mode = "off"`` in ``docs/conf.py``). Run this script after
changing a tutorial, the library or the bundled demo model::

    python tutorials/build_tutorials.py            # write + execute all
    python tutorials/build_tutorials.py 1 3        # only tutorials whose name starts with 1 or 3
    python tutorials/build_tutorials.py --no-execute

Everything runs on CPU on the bundled CIFAR-10 demo model in well under two minutes per
notebook.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent
Cell = tuple[str, str]  # ("md" | "code", source)


def md(text: str) -> Cell:
    return ("md", text.strip("\n"))


def code(src: str) -> Cell:
    return ("code", src.strip("\n"))


# ---------------------------------------------------------------------------------------
# 1. The class embedding lens and block-wise identifiability
# ---------------------------------------------------------------------------------------
T1: list[Cell] = [
    md(r"""
# 1. The class embedding lens

A Vision Transformer classifies an image by sending the class token's final state through
its final norm and its linear head, whose weight matrix $\mathbf{E}$ holds one row (a *class
prototype*) per class. Vilas, Schaumlöffel & Roig (NeurIPS 2023) send **every token's state
at every block** through the same path, and ask how early and in which tokens the correct
class can be read off. The score they use is the **class identifiability** (Eq. 1):

$$ r = 1 - \frac{\operatorname{rank}(c)}{|C|}, $$

where $\operatorname{rank}(c)$ is the 0-based position of the correct class $c$ when the
class logits of the token are sorted from high to low. $r = 1$ means the token's top-1 class
is the correct one.

This tutorial runs the lens on the bundled CIFAR-10 ViT (6 blocks, 4 heads, 4×4 patches
on 32×32 images, so 64 image tokens plus the class token), first as a **timm** model and
then as its **Hugging Face** twin, and shows the built-in interventions.
"""),
    code(r"""
%matplotlib inline
import captum_clsemb
import torch
from captum_clsemb import BlockwiseIdentifiability, adapt, load_demo_model
from captum_clsemb.demo import load_demo_config, load_demo_images
from captum_clsemb.trace import trace
from captum_clsemb.viz.identifiability import (
    plot_identifiability_curves,
    plot_token_maps,
)

torch.manual_seed(0)
config = load_demo_config()
class_names = config["class_names"]
model = load_demo_model()  # timm VisionTransformer, eval mode
images, labels, paths = load_demo_images()  # 200 CIFAR-10 test images, 20 per class
print(captum_clsemb.__version__, images.shape, labels.bincount().tolist())
"""),
    md(r"""
## The adapter: one view of any supported ViT

`adapt(model)` reads the model's modules (it never edits them) and exposes the sizes and
the pieces every analysis needs. The class embedding $\mathbf{E}$ is the head's weight.
"""),
    code(r"""
adapter = adapt(model)
print(adapter)
print(
    "E:",
    tuple(adapter.class_embedding.shape),
    " prefix tokens:",
    adapter.prefix_tokens,
    " grid:",
    adapter.grid_size,
)
with torch.no_grad():
    predictions = model(images).argmax(-1)
print(
    f"top-1 accuracy on the 200 demo images: {(predictions == labels).float().mean():.1%}"
)
"""),
    md(r"""
## The lens by hand

`trace` runs one batched, decomposed forward that recomputes each block from the model's
own weights and records what you ask for (`resid_post` is each block's output, the
residual stream). `adapter.project` is the lens: final norm, then the head **with its
bias**. Applied to the class token after the last block it gives exactly the model's
logits; applied to any other token or block it gives that state's reading in class space.
"""),
    code(r"""
tr = trace(model, images, record=["resid_post"])
states = tr.cache.stack("resid_post")  # (N, blocks, tokens, dim)
lens_logits = adapter.project(states)  # (N, blocks, tokens, classes)
print("states", tuple(states.shape), "-> lens logits", tuple(lens_logits.shape))

cls = adapter.class_token_index
print(
    "lens(class token, last block) == model(x):",
    torch.allclose(lens_logits[:, -1, cls], model(images), atol=1e-5),
)

# The top-1 class of a few image tokens of the first image, block by block
first = lens_logits[0, :, adapter.num_prefix_tokens :].argmax(-1)  # (blocks, 64)
for b in range(adapter.num_blocks):
    print(f"block {b + 1}:", [class_names[c][:5] for c in first[b, :8].tolist()])
"""),
    md(r"""
## Block-wise identifiability

`BlockwiseIdentifiability` is a Captum `Attribution`: `attribute(inputs, target)` returns
the score $r$ of every token at every block, `(N, blocks, tokens)`, tokens in model order
(class token first). It streams: each block's states are turned into ranks right away.
"""),
    code(r"""
bi = BlockwiseIdentifiability(model)
scores = bi.attribute(images, target=labels)
print("scores:", tuple(scores.shape))

# Eq. 1 by hand for one token: 1 - rank / |C|
b, t = 3, 10
logit = lens_logits[0, b, t]
rank = (logit > logit[labels[0]]).sum().item()
print(
    f"block {b + 1}, token {t}: rank {rank} -> r = {1 - rank / 10:.2f};"
    f" attribute() gives {scores[0, b, t].item():.2f}"
)

print(
    f"identifiability rate, last block: {bi.identifiability_rate(scores).item():.2f}%"
)
print(
    "images with >= 1 identifiable image token:",
    f"{bi.images_with_identifiable_token(scores).item():.1f}%",
)
print(
    "rate per block (%):",
    [round(v, 1) for v in bi.identifiability_rate(scores, block=None).tolist()],
)
"""),
    md(r"""
The paper's Fig. 2 shows the mean score per block for the class token and the image
tokens. With 10 classes a random ranking scores $0.5 + 0.5/|C| = 0.55$ on average.
"""),
    code(r"""
curves = bi.mean_identifiability(scores)
plot_identifiability_curves(
    {k: v.tolist() for k, v in curves.items()},
    chance=0.5 + 0.5 / 10,
    title="Demo ViT: mean identifiability per block",
)
"""),
    md(r"""
## Token maps

Where in the image is the class readable? `plot_token_maps` draws each image token's score
over the image (upsampled with Captum's `LayerAttribution.interpolate` and drawn with
`captum.attr.visualization`).
"""),
    code(r"""
show = [0, 40, 60, 140]  # an airplane, a bird, a cat and a horse
plot_token_maps(
    scores[show],
    images[show],
    adapter.grid_size,
    adapter.num_prefix_tokens,
    blocks=[0, 2, 5],
    titles=[class_names[labels[i]] for i in show],
    mean=config["mean"],
    std=config["std"],
)
"""),
    md(r"""
## Sub-layers and lens options

`layer="attn"` and `layer="mlp"` score the attention and MLP sub-layer outputs as they are
added to the residual stream (each through the final norm on its own, as in the authors'
code). `apply_norm=False, include_bias=False` is the paper's bare formula
$\mathbf{p} = \mathbf{E}\mathbf{x}$ without the final norm and bias.
"""),
    code(r"""
for layer in ("block", "attn", "mlp"):
    s = bi.attribute(images, target=labels, layer=layer)
    print(
        f"{layer:>5}: image-token rate per block (%)",
        [round(v, 1) for v in bi.identifiability_rate(s, block=None).tolist()],
    )
bare = bi.attribute(images, target=labels, apply_norm=False, include_bias=False)
print(
    "E x without norm and bias, last-block rate:",
    f"{bi.identifiability_rate(bare).item():.2f}%",
)
"""),
    md(r"""
## The same model in Hugging Face transformers

`load_demo_model("hf")` converts the timm weights into a `ViTForImageClassification`
(`captum_clsemb.convert.timm_to_hf`). The HF adapter gives the same decomposed view, so
every score agrees up to float rounding.
"""),
    code(r"""
hf_model = load_demo_model("hf")
print(type(hf_model).__name__, adapt(hf_model))
hf_scores = BlockwiseIdentifiability(hf_model).attribute(images, target=labels)
with torch.no_grad():
    hf_logits = hf_model(pixel_values=images).logits
print("logits max |timm - hf|:", (hf_logits - model(images)).abs().max().item())
print(
    "scores identical:",
    torch.equal(hf_scores, scores),
    "| tokens with a different score:",
    (hf_scores != scores).sum().item(),
    "of",
    scores.numel(),
)
"""),
    md(r"""
## Interventions: attention and tokens

The traced forward can edit the attention probabilities of every block (or of
`edit_blocks`) and drop tokens:

- `attention_edit="self_only"`: every image token attends only to itself (its attention to
  other image tokens **and** to the class token is removed; rows still sum to 1). This is
  the paper's test of whether image tokens need attention to build class representations.
- `attention_edit="no_cls"`: image tokens do not attend to the class token (no
  renormalisation, as in the authors' code).
- `keep_tokens=...`: drop image tokens from the sequence after the position embedding.

The model itself is never modified.
"""),
    code(r"""
rates = {"unperturbed": bi.identifiability_rate(scores).item()}
edited = {}
for edit in ("self_only", "no_cls"):
    edited[edit] = bi.attribute(images, target=labels, attention_edit=edit)
    rates[edit] = bi.identifiability_rate(edited[edit]).item()
for name, rate in rates.items():
    print(f"{name:>12}: {rate:6.2f}% of last-block image tokens identifiable")

plot_identifiability_curves(
    {
        name: bi.mean_identifiability(s)["image"].tolist()
        for name, s in {"unperturbed": scores, **edited}.items()
    },
    chance=0.55,
    title="Image tokens under attention edits",
)
"""),
    code(r"""
# Keep only the 16 central patches (a 4x4 square of the 8x8 grid) of every image
rows, cols = torch.meshgrid(torch.arange(2, 6), torch.arange(2, 6), indexing="ij")
centre = (rows * 8 + cols).flatten()
kept = bi.attribute(images, target=labels, keep_tokens=centre)
print("scores with 16 of 64 patches kept:", tuple(kept.shape))
print(
    f"last-block rate of the kept tokens: {bi.identifiability_rate(kept).item():.2f}%"
    f" (all 64 tokens: {rates['unperturbed']:.2f}%)"
)


# A custom edit: any callable (block, probs) -> probs; here uniform attention in block 1
def uniform_first_block(block, probs):
    return torch.full_like(probs, 1 / probs.shape[-1]) if block == 0 else probs


custom = bi.attribute(images, target=labels, attention_edit=uniform_first_block)
print(
    f"uniform attention in block 1: rate {bi.identifiability_rate(custom).item():.2f}%"
)
"""),
    md(r"""
## Next

- [Tutorial 2](2_explanations.ipynb): which image tokens would raise the class in the class
  token, per block and head.
- The command line gives the same analyses as an HTML report:
  `clsemb report --out clsemb-report`.
"""),
]


# ---------------------------------------------------------------------------------------
# 2. Explanations
# ---------------------------------------------------------------------------------------
T2: list[Cell] = [
    md(r"""
# 2. Explanations in class embedding space

The paper's explainability method (Sec. 7) asks, for every block $b$ and head $h$: *if the
class token attended more to image token $t$, would its representation of class $c$ get
better?* The class token's state after block $b$ is read through the class embedding lens
and scored with the cross-entropy of $c$,

$$ \ell^b = -\log \operatorname{softmax}\big(\mathbf{E}\,\mathrm{LN}_f(\mathbf{x}^b_{cls}) + \mathbf{b}\big)_c , $$

and the attribution of token $t$ is the negated gradient with respect to the class token's
attention weight, $-\partial \ell^b / \partial A^b_h[cls, t]$. Summing over blocks and heads
gives a global relevance map.

`ClassEmbeddingGradient` computes all blocks and heads from one batched forward and one
backward. This tutorial draws the maps with `captum.attr.visualization`, checks what the
numbers mean, and compares with the baselines.
"""),
    code(r"""
%matplotlib inline
import matplotlib.pyplot as plt
import torch
from captum.attr import LayerAttribution
from captum.attr import visualization as viz
from captum_clsemb import adapt, load_demo_model
from captum_clsemb.attr.class_embedding_gradient import ClassEmbeddingGradient
from captum_clsemb.demo import load_demo_config, load_demo_images
from captum_clsemb.viz.explanations import plot_block_head_grid

config = load_demo_config()
class_names, mean, std = config["class_names"], config["mean"], config["std"]
model = load_demo_model()
adapter = adapt(model)
images, labels, _ = load_demo_images()
with torch.no_grad():
    predictions = model(images).argmax(-1)
print(adapter)
"""),
    md(r"""
## Maps per block, per head and global

`return_per` chooses the granularity; all maps are on the 8×8 patch grid.
"""),
    code(r"""
ceg = ClassEmbeddingGradient(model)
per_head = ceg.attribute(
    images, target=labels, return_per="head"
)  # (N, blocks, heads, 8, 8)
per_block = ceg.attribute(
    images, target=labels, return_per="block"
)  # (N, blocks, 8, 8)
global_map = ceg.attribute(images, target=labels)  # (N, 1, 8, 8)
print(tuple(per_head.shape), tuple(per_block.shape), tuple(global_map.shape))

# the coarser maps are sums of the finer ones
print("block = sum over heads:", torch.allclose(per_block, per_head.sum(2), atol=1e-6))
print(
    "global = sum over blocks and heads:",
    torch.allclose(global_map[:, 0], per_head.sum((1, 2)), atol=1e-5),
)
"""),
    md(r"""
## What the numbers mean: a finite-difference check

The attribution is a derivative, so nudging the attention by $\pm\varepsilon$ should move
the loss by about $\mp\varepsilon \cdot \mathrm{attr}$. The traced forward accepts any
`attention_edit`; here it adds $\pm\varepsilon$ to one entry of the class token's attention
row in one block and head, and the lens of the class token after that block gives
$\ell^b$ (a central difference).
"""),
    code(r"""
from captum_clsemb.trace import trace

i, b, h, t = 0, 3, 1, 20  # image, block, head, patch token
cls, p = adapter.class_token_index, adapter.num_prefix_tokens
eps = 1e-3


def nudge(delta):
    def edit(block, probs):
        if block != b:
            return probs
        probs = probs.clone()
        probs[:, h, cls, p + t] += (
            delta  # more (or less) attention from the class token to token t
        )
        return probs

    return edit


def loss(delta):
    tr = trace(
        model, images[i : i + 1], record=["resid_post"], attention_edit=nudge(delta)
    )
    logits = adapter.project(tr.cache["resid_post", b][:, cls])
    return torch.nn.functional.cross_entropy(logits, labels[i : i + 1]).item()


finite_difference = -(loss(eps) - loss(-eps)) / (2 * eps)
print(f"-(l(A + eps) - l(A - eps)) / (2 eps) = {finite_difference:.5f}")
print(
    f"attribution                         = {per_head[i, b, h].flatten()[t].item():.5f}"
)
"""),
    md(r"""
## Block × head maps with Captum's visualization

`plot_block_head_grid` draws one panel per block (rows) and head (columns) with
`captum.attr.visualization.visualize_image_attr` (signed maps: green raises the class, red
lowers it). CIFAR-10 images are 32×32, so each patch is 4×4 pixels.
"""),
    code(r"""
i = 40  # a bird
print("label:", class_names[labels[i]], "| predicted:", class_names[predictions[i]])
plot_block_head_grid(
    per_head[i],
    images[i],
    blocks=range(1, adapter.num_blocks + 1),
    mean=mean,
    std=std,
    title=f"{class_names[labels[i]]}: -dl_b/dA_b[h, cls, t]",
)
"""),
    md(r"""
The same with Captum directly: upsample a map to the image size with
`LayerAttribution.interpolate` and hand it to `visualize_image_attr_multiple`.
"""),
    code(r"""
def to_image(x):  # normalised (3, H, W) tensor -> (H, W, 3) array in [0, 1]
    return (
        (x * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1))
        .clamp(0, 1)
        .permute(1, 2, 0)
        .numpy()
    )


up = LayerAttribution.interpolate(global_map[i : i + 1], images.shape[-2:], "bilinear")[
    0
]  # (1, 32, 32)
fig, _ = viz.visualize_image_attr_multiple(
    up.permute(1, 2, 0).numpy(),
    to_image(images[i]),
    methods=["original_image", "blended_heat_map", "heat_map"],
    signs=["all", "positive", "all"],
    titles=["image", "global map, positive part", "global map"],
    fig_size=(9, 3),
    use_pyplot=False,
)
fig
"""),
    md(r"""
## Several classes at once

The method is class-generalisable: passing several targets per image, `(N, K)`, explains
each of them from the same forward. For a misclassified image this shows what supports the
correct class and what supports the prediction.
"""),
    code(r"""
wrong = (predictions != labels).nonzero()[:, 0]
j = int(wrong[0])
both = torch.stack([labels, predictions], 1)  # (N, 2): label and prediction
maps = ceg.attribute(images[j : j + 1], target=both[j : j + 1])  # (1, 2, 1, 8, 8)
print(tuple(maps.shape))
fig = plt.figure(figsize=(7, 2.6))
for k, name in enumerate(
    ["label: " + class_names[labels[j]], "predicted: " + class_names[predictions[j]]]
):
    ax = fig.add_subplot(1, 2, k + 1)
    m = LayerAttribution.interpolate(maps[0, k : k + 1], images.shape[-2:], "bilinear")[
        0, 0
    ]  # (32, 32)
    viz.visualize_image_attr(
        m[..., None].numpy(),
        to_image(images[j]),
        method="blended_heat_map",
        sign="all",
        plt_fig_axis=(fig, ax),
        use_pyplot=False,
        title=name,
    )
"""),
    md(r"""
## The authors' variant

The authors' code projects the **attention sub-layer output** of each block instead of the
class token's residual state (and applies softmax twice; we never do). `source="attn"`
reproduces the projected state. The difference is the MLP sub-layer (and the residual)
that the paper's state includes, so the two maps are related but not identical:
"""),
    code(r"""
attn_source = ceg.attribute(images, target=labels, return_per="block", source="attn")


def corr(a, b):
    a, b = a.flatten(1), b.flatten(1)
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return ((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + 1e-12)).mean().item()


for blk in range(adapter.num_blocks):
    print(
        f"block {blk + 1}: mean correlation of the two sources",
        f"{corr(per_block[:, blk], attn_source[:, blk]):+.2f}",
    )
"""),
    md(r"""
## Baselines

The same image explained by the baselines shipped with the package (see the docs for their
formulas and conventions). Every method returns `(N, 1, h, w)` maps on the patch grid.
"""),
    code(r"""
from captum_clsemb.attr.attention_rollout import AttentionRollout
from captum_clsemb.attr.chefer_gradient_rollout import CheferGradientRollout
from captum_clsemb.attr.chefer_relevancy import CheferRelevancy
from captum_clsemb.attr.raw_attention import RawAttention

methods = {
    "class-emb. gradient": ceg,
    "raw attention": RawAttention(model),
    "attention rollout": AttentionRollout(model),
    "Chefer ICCV'21": CheferGradientRollout(model),
    "Chefer CVPR'21": CheferRelevancy(model),
}
sel = [i, 60, 140]
fig = plt.figure(figsize=(2.0 * (len(methods) + 1), 2.0 * len(sel)))
for r, idx in enumerate(sel):
    ax = fig.add_subplot(len(sel), len(methods) + 1, r * (len(methods) + 1) + 1)
    ax.imshow(to_image(images[idx]))
    ax.set_axis_off()
    ax.set_title(class_names[labels[idx]], fontsize=8)
    for c, (name, method) in enumerate(methods.items()):
        m = method.attribute(images[idx : idx + 1], target=labels[idx : idx + 1])
        m = LayerAttribution.interpolate(m, images.shape[-2:], "bilinear")[0, 0]
        ax = fig.add_subplot(len(sel), len(methods) + 1, r * (len(methods) + 1) + c + 2)
        viz.visualize_image_attr(
            m[..., None].numpy(),
            to_image(images[idx]),
            method="blended_heat_map",
            sign="positive",
            plt_fig_axis=(fig, ax),
            use_pyplot=False,
            title=name if r == 0 else None,
        )
fig.tight_layout()
"""),
    md(r"""
## Next

[Tutorial 3](3_perturbation_auc.ipynb) measures which of these maps best predicts the
tokens the model needs, with the token-removal perturbation test.
"""),
]


# ---------------------------------------------------------------------------------------
# 3. Perturbation AUC
# ---------------------------------------------------------------------------------------
T3: list[Cell] = [
    md(r"""
# 3. Perturbation tests: token-removal AUC

Which explanation best predicts the image tokens the model needs? The perturbation test of
Vilas et al. (Sec. 7-8) ranks the image tokens by an explanation and **drops** them from
the sequence after the position embedding, recording the accuracy at each removal fraction
$f \in \{0, 0.1, \dots, 0.9\}$:

- **negative** test: least important tokens first; a good explanation keeps accuracy up
  (**higher AUC is better**);
- **positive** test: most important tokens first (**lower AUC is better**).

The area under the curve is the trapezoid over the fractions ×100, the convention of Chefer
et al. (a curve flat at 1 scores 90). This tutorial compares the class-embedding gradients
with Chefer et al.'s methods, attention rollout, raw attention, a linear-probe ranking and a
random ranking on the demo model.
"""),
    code(r"""
%matplotlib inline
import torch
from captum_clsemb import adapt, load_demo_model
from captum_clsemb.attr.chefer_gradient_rollout import CheferGradientRollout
from captum_clsemb.attr.class_embedding_gradient import ClassEmbeddingGradient
from captum_clsemb.demo import load_demo_config, load_demo_images
from captum_clsemb.metrics import (
    RandomRanking,
    authors_auc,
    compare_explanations,
    pixel_removal_auc,
    plot_curves,
    to_markdown,
    token_removal_auc,
    trapezoid_auc,
)

config = load_demo_config()
model = load_demo_model()
adapter = adapt(model)
images, labels, _ = load_demo_images()

# Disjoint splits of the 20 images per class: 5 fit the linear probes, 10 are evaluated.
within_class = torch.arange(len(images)) % 20
x_probe, y_probe = images[within_class < 5], labels[within_class < 5]
x, y = images[within_class >= 10], labels[within_class >= 10]
print("probe images:", len(x_probe), "| evaluated images:", len(x))
"""),
    md(r"""
## One method, both tests

`token_removal_auc(model, inputs, attributions, ...)` works like `captum.metrics`: it takes
the attributions and returns one value per example (their mean is the AUC of the mean
curve). `return_curve=True` also returns the curves.
"""),
    code(r"""
attr = ClassEmbeddingGradient(model).attribute(x, target=y)  # (N, 1, 8, 8)
neg, neg_curves = token_removal_auc(
    model, x, attr, target=y, labels=y, mode="negative", return_curve=True
)
pos, pos_curves = token_removal_auc(
    model, x, attr, target=y, labels=y, mode="positive", return_curve=True
)
print(
    f"negative AUC {neg.mean():.2f} (higher is better) |",
    f"positive AUC {pos.mean():.2f} (lower is better)",
)
print("mean accuracy per removal fraction")
print("  negative:", [round(v, 3) for v in neg_curves.mean(0).tolist()])
print("  positive:", [round(v, 3) for v in pos_curves.mean(0).tolist()])

# the AUC is the trapezoid over the fractions, x 100
print("trapezoid of the mean curve:", trapezoid_auc(neg_curves.mean(0)).item())
"""),
    md(r"""
A random ranking is the reference: a useful explanation beats it in both tests.
"""),
    code(r"""
rand = RandomRanking(model, seed=0).attribute(x)
for mode in ("negative", "positive"):
    r = token_removal_auc(model, x, rand, target=y, labels=y, mode=mode)
    print(f"random ranking, {mode}: {r.mean():.2f}")
"""),
    md(r"""
## All methods

`compare_explanations` runs both tests for every method, streaming over batches. By default
it builds the class-embedding gradients, Chefer et al.'s relevancy (CVPR 2021) and gradient
rollout (ICCV 2021), attention rollout, raw attention, a linear-probe ranking fitted on
`probe_data` and a random ranking.
"""),
    code(r"""
results = compare_explanations(
    model, x, y, probe_data=(x_probe, y_probe), batch_size=50
)
print(to_markdown(results))
"""),
    code(r"""
plot_curves(results)
"""),
    md(r"""
## Conventions matter

Vilas et al.'s code summarised the curve as $\sum_s m_s / (\max_s m_s \cdot S)$, normalised
by the curve's own maximum. It is available as `auc="authors"` (and `authors_auc`), but it
is not an area: every flat curve scores 1, whatever its level.
"""),
    code(r"""
for method in ("ClassEmbeddingGradient", "CheferGradientRollout", "Random"):
    if method in results.methods:
        m = results.curves[method]["negative"]
        print(
            f"{method:>24}: trapezoid {trapezoid_auc(m.mean(0)).item():6.2f} |",
            f"authors' sum {authors_auc(m).mean().item():.4f}",
        )
print(
    "a flat curve at 0.2 and one at 0.9 under the authors' sum:",
    authors_auc(torch.full((10,), 0.2)).item(),
    authors_auc(torch.full((10,), 0.9)).item(),
)
"""),
    md(r"""
## Pixels instead of tokens

Chefer et al. remove *pixels* (set to black) rather than tokens. `pixel_removal_auc`
implements their protocol for any classifier; patch-grid maps are upsampled bilinearly.
"""),
    code(r"""
black = (-torch.tensor(config["mean"]) / torch.tensor(config["std"])).view(1, 3, 1, 1)
chefer = CheferGradientRollout(model).attribute(x, target=y)
for name, a in (("class-emb. gradient", attr), ("Chefer ICCV'21", chefer)):
    aucs = [
        pixel_removal_auc(model, x, a, target=y, labels=y, mode=mode, baseline=black)
        .mean()
        .item()
        for mode in ("negative", "positive")
    ]
    print(f"{name:>20}: pixel removal negative {aucs[0]:.2f} | positive {aucs[1]:.2f}")
"""),
    md(r"""
These numbers are for a small CIFAR-10 model on 100 images; the full comparison is produced
by `benchmarks/compare_cifar10.py` (see the *Comparison* page of the docs).
"""),
]


# ---------------------------------------------------------------------------------------
# 4. Value vectors
# ---------------------------------------------------------------------------------------
T4: list[Cell] = [
    md(r"""
# 4. Value vectors and key-value memories

Attention and MLP sub-layers can be read as **key-value memories** (paper Sec. 3 and 6,
after Geva et al.): the MLP computes $\mathrm{GELU}(\mathbf{X}\mathbf{W}_{inp})\,\mathbf{W}_{out}$,
so each hidden unit $j$ has a *key coefficient* (its activation) and a *value vector* (row
$j$ of $\mathbf{W}_{out}$) that is added to the residual stream in proportion to it. In
attention, the attention-weighted values concatenated over heads are the coefficients and
the columns of the output projection the value vectors.

Projecting value vectors onto the class embedding $\mathbf{E}$ shows which classes each
memory promotes. `ValueVectorProjector` does this and measures whether the memories that
fire on a token promote its class.
"""),
    code(r"""
%matplotlib inline

from captum_clsemb import load_demo_model
from captum_clsemb.analysis import (
    ValueVectorProjector,
    class_similarity_change_rate,
    residual_match_rate,
)
from captum_clsemb.demo import load_demo_config, load_demo_images
from captum_clsemb.viz.mechanisms import (
    plot_class_similarity_change,
    plot_class_value_agreement,
    plot_key_value_agreement,
    plot_residual_match,
)

config = load_demo_config()
class_names = config["class_names"]
model = load_demo_model()
images, labels, _ = load_demo_images()
vvp = ValueVectorProjector(model, class_names=class_names)
print(
    "MLP value vectors of block 1:",
    tuple(vvp.value_vectors(0, "mlp").shape),
    "| attention value vectors:",
    tuple(vvp.value_vectors(0, "attn").shape),
)
"""),
    md(r"""
## What a memory promotes

`value_projection` is the raw projection $\mathbf{E}\,\mathbf{W}_{out}^\top$ (classes ×
memories); `top_classes` lists the classes a memory pushes up most.
"""),
    code(r"""
block = -2  # the penultimate block, where the paper finds MLP peaks
proj = vvp.value_projection(block, "mlp")  # (10 classes, 256 memories)
strongest = proj.max(0).values.topk(3).indices.tolist()
for j in strongest:
    top = vvp.top_classes(block, "mlp", memory=j, k=3)
    print(f"memory {j:3d}:", ", ".join(f"{c.name} ({c.score:+.2f})" for c in top))
"""),
    md(r"""
## Class-value agreement

For each class, the highest cosine similarity between its prototype (row of $\mathbf{E}$)
and any value vector of a layer (Fig. 4a). The paper compares with a randomly initialised
model: `random_baseline()` re-initialises a copy with timm's own initialisation.
"""),
    code(r"""
random_vvp = vvp.random_baseline(seed=0)
agreement = {layer: vvp.class_value_agreement(layer) for layer in ("attn", "mlp")}
baseline = {layer: random_vvp.class_value_agreement(layer) for layer in ("attn", "mlp")}
for layer in ("attn", "mlp"):
    print(
        f"{layer}: median over classes per block,",
        f"trained {agreement[layer].median(1).values.numpy().round(2)}",
        f"| random {baseline[layer].median(1).values.numpy().round(2)}",
    )
plot_class_value_agreement(agreement, baseline)
"""),
    md(r"""
## Key-value agreement at inference

A token *agrees* at a block when one of its 5 most activated keys has a value vector whose
top classes include the target (the paper's definition; `variant="authors"` gives the
authors' code, which takes the top memories of the target class instead). The paper uses
the top-5 of 1,000 ImageNet classes; with 10 classes we use the top-2 (`k_classes=2`). The
rates are reported separately for correctly and wrongly classified images.
"""),
    code(r"""
agree = vvp.attribute(
    images, target=labels, layer="mlp", k=5, k_classes=2
)  # (N, blocks, tokens) bool
print(
    "per-token agreement:", tuple(agree.shape), f"| overall {agree.float().mean():.1%}"
)
rates = {
    layer: vvp.key_value_agreement_rate(
        images, target=labels, layer=layer, k=5, k_classes=2
    )
    for layer in ("attn", "mlp")
}
print(
    "correctly classified images:",
    int(rates["mlp"]["num_correct"]),
    "of",
    int(rates["mlp"]["num_images"]),
)
plot_key_value_agreement(rates, groups=("image", "cls"), split=True)
"""),
    md(r"""
## Compositionality

Does a layer's top-1 prediction at a token match the top class of one of its 5 most
activated memories? A low share means the prediction is *composed* from many memories.
"""),
    code(r"""
for layer in ("attn", "mlp"):
    comp = vvp.compositionality(images, layer=layer, k=5)
    print(
        f"{layer}: % of image tokens matching a top-5 memory, per block:",
        comp["image"].numpy().round(1),
    )
"""),
    md(r"""
## How attention and MLP build the class

Two more analyses of Sec. 6 read sub-layer outputs through the lens:

- **class similarity change rate** (Fig. 3b): the share of tokens whose target logit is
  higher for a sub-layer's output than for its input;
- **residual match** (Fig. 3c): whether the block output's top-1 class comes from the
  attention output, the MLP output, the incoming stream, or none of them (composite).
"""),
    code(r"""
change = class_similarity_change_rate(model, images, target=labels)
plot_class_similarity_change(change)
"""),
    code(r"""
match = residual_match_rate(model, images)
plot_residual_match(match, group="image")
"""),
]


# ---------------------------------------------------------------------------------------
TUTORIALS: dict[str, list[Cell]] = {
    "1_class_embedding_lens": T1,
    "2_explanations": T2,
    "3_perturbation_auc": T3,
    "4_value_vectors": T4,
}


def build(name: str, cells: list[Cell]) -> nbformat.NotebookNode:
    nb = new_notebook()
    nb.metadata["kernelspec"] = {
        "display_name": "Python 3",
        "language": "python",
        "name": "python3",
    }
    nb.metadata["language_info"] = {"name": "python"}
    nb.cells = [
        new_markdown_cell(src) if kind == "md" else new_code_cell(src)
        for kind, src in cells
    ]
    return nb


# Environment noise that says nothing about the tutorial (tqdm without ipywidgets).
NOISE = ("TqdmWarning: IProgress not found",)


def use_this_interpreter() -> None:
    """Point the ``python3`` kernel at this interpreter (ahead of any user kernelspec)."""
    root = Path(tempfile.mkdtemp(prefix="clsemb-kernel-"))
    atexit.register(shutil.rmtree, root, True)
    spec = root / "kernels" / "python3"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    kernel = {"argv": argv, "display_name": "Python 3", "language": "python"}
    (spec / "kernel.json").write_text(json.dumps(kernel))
    os.environ["JUPYTER_PATH"] = str(root)


def execute(nb: nbformat.NotebookNode, timeout: int = 120) -> float:
    """Execute in place (cwd = tutorials/); returns the wall time in seconds."""
    from nbclient import NotebookClient

    start = time.perf_counter()
    NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="python3",
        resources={"metadata": {"path": str(HERE)}},
    ).execute()
    elapsed = time.perf_counter() - start
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = [
                o
                for o in cell.outputs
                if not (
                    o.output_type == "stream"
                    and o.name == "stderr"
                    and any(n in o.text for n in NOISE)
                )
            ]
    return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "only", nargs="*", help="build only tutorials whose file name starts with these"
    )
    parser.add_argument(
        "--no-execute", action="store_true", help="write the notebooks without outputs"
    )
    args = parser.parse_args(argv)
    if not args.no_execute:
        use_this_interpreter()
    for name, cells in TUTORIALS.items():
        if args.only and not any(name.startswith(p) for p in args.only):
            continue
        nb = build(name, cells)
        msg = "written"
        if not args.no_execute:
            msg = f"executed in {execute(nb):.1f} s"
        nbformat.validate(nb)
        nbformat.write(nb, HERE / f"{name}.ipynb")
        print(f"{name}.ipynb: {msg}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 2. Explanations in class embedding space
#
# The paper's explainability method (Sec. 7) asks, for every block $b$ and head $h$: *if the
# class token attended more to image token $t$, would its representation of class $c$ get
# better?* The class token's state after block $b$ is read through the class embedding lens
# and scored with the cross-entropy of $c$,
#
# $$ \ell^b = -\log \operatorname{softmax}\big(\mathbf{E}\,\mathrm{LN}_f(\mathbf{x}^b_{cls}) + \mathbf{b}\big)_c , $$
#
# and the attribution of token $t$ is the negated gradient with respect to the class token's
# attention weight, $-\partial \ell^b / \partial A^b_h[cls, t]$. Summing over blocks and heads
# gives a global relevance map.
#
# `ClassEmbeddingGradient` computes all blocks and heads from one batched forward and one
# backward. This tutorial draws the maps with `captum.attr.visualization`, checks what the
# numbers mean, and compares with the baselines.

# %%
# %matplotlib inline
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

# %% [markdown]
# ## Maps per block, per head and global
#
# `return_per` chooses the granularity; all maps are on the 8×8 patch grid.

# %%
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

# %% [markdown]
# ## What the numbers mean: a finite-difference check
#
# The attribution is a derivative, so nudging the attention by $\pm\varepsilon$ should move
# the loss by about $\mp\varepsilon \cdot \mathrm{attr}$. The traced forward accepts any
# `attention_edit`; here it adds $\pm\varepsilon$ to one entry of the class token's attention
# row in one block and head, and the lens of the class token after that block gives
# $\ell^b$ (a central difference).

# %%
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

# %% [markdown]
# ## Block × head maps with Captum's visualization
#
# `plot_block_head_grid` draws one panel per block (rows) and head (columns) with
# `captum.attr.visualization.visualize_image_attr` (signed maps: green raises the class, red
# lowers it). CIFAR-10 images are 32×32, so each patch is 4×4 pixels.

# %%
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


# %% [markdown]
# The same with Captum directly: upsample a map to the image size with
# `LayerAttribution.interpolate` and hand it to `visualize_image_attr_multiple`.


# %%
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

# %% [markdown]
# ## Several classes at once
#
# The method is class-generalisable: passing several targets per image, `(N, K)`, explains
# each of them from the same forward. For a misclassified image this shows what supports the
# correct class and what supports the prediction.

# %%
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

# %% [markdown]
# ## The authors' variant
#
# The authors' code projects the **attention sub-layer output** of each block instead of the
# class token's residual state (and applies softmax twice). `source="attn"` reproduces the
# projected state with one log-softmax; `source="authors"` reproduces the code exactly, double
# softmax included. The difference is the MLP sub-layer (and the residual)
# that the paper's state includes, so the two maps are related but not identical:

# %%
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

# %% [markdown]
# ## Baselines
#
# The same image explained by the baselines shipped with the package (see the docs for their
# formulas and conventions). Every method returns `(N, 1, h, w)` maps on the patch grid.

# %%
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

# %% [markdown]
# ## Next
#
# [Tutorial 3](3_perturbation_auc.ipynb) measures which of these maps best predicts the
# tokens the model needs, with the token-removal perturbation test.

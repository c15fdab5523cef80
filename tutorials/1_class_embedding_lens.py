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
# # 1. The class embedding lens
#
# A Vision Transformer classifies an image by sending the class token's final state through
# its final norm and its linear head, whose weight matrix $\mathbf{E}$ holds one row (a *class
# prototype*) per class. Vilas, Schaumlöffel & Roig (NeurIPS 2023) send **every token's state
# at every block** through the same path, and ask how early and in which tokens the correct
# class can be read off. The score they use is the **class identifiability** (Eq. 1):
#
# $$ r = 1 - \frac{\operatorname{rank}(c)}{|C|}, $$
#
# where $\operatorname{rank}(c)$ is the 0-based position of the correct class $c$ when the
# class logits of the token are sorted from high to low. $r = 1$ means the token's top-1 class
# is the correct one.
#
# This tutorial runs the lens on the bundled CIFAR-10 ViT (6 blocks, 4 heads, 4×4 patches
# on 32×32 images, so 64 image tokens plus the class token), first as a **timm** model and
# then as its **Hugging Face** twin, and shows the built-in interventions.

# %%
# %matplotlib inline
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

# %% [markdown]
# ## The adapter: one view of any supported ViT
#
# `adapt(model)` reads the model's modules (it never edits them) and exposes the sizes and
# the pieces every analysis needs. The class embedding $\mathbf{E}$ is the head's weight.

# %%
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

# %% [markdown]
# ## The lens by hand
#
# `trace` runs one batched, decomposed forward that recomputes each block from the model's
# own weights and records what you ask for (`resid_post` is each block's output, the
# residual stream). `adapter.project` is the lens: final norm, then the head **with its
# bias**. Applied to the class token after the last block it gives exactly the model's
# logits; applied to any other token or block it gives that state's reading in class space.

# %%
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

# %% [markdown]
# ## Block-wise identifiability
#
# `BlockwiseIdentifiability` is a Captum `Attribution`: `attribute(inputs, target)` returns
# the score $r$ of every token at every block, `(N, blocks, tokens)`, tokens in model order
# (class token first). It streams: each block's states are turned into ranks right away.

# %%
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

# %% [markdown]
# The paper's Fig. 2 shows the mean score per block for the class token and the image
# tokens. With 10 classes a random ranking scores $0.5 + 0.5/|C| = 0.55$ on average.

# %%
curves = bi.mean_identifiability(scores)
plot_identifiability_curves(
    {k: v.tolist() for k, v in curves.items()},
    chance=0.5 + 0.5 / 10,
    title="Demo ViT: mean identifiability per block",
)

# %% [markdown]
# ## Token maps
#
# Where in the image is the class readable? `plot_token_maps` draws each image token's score
# over the image (upsampled with Captum's `LayerAttribution.interpolate` and drawn with
# `captum.attr.visualization`).

# %%
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

# %% [markdown]
# ## Sub-layers and lens options
#
# `layer="attn"` and `layer="mlp"` score the attention and MLP sub-layer outputs as they are
# added to the residual stream (each through the final norm on its own, as in the authors'
# code). `apply_norm=False, include_bias=False` is the paper's bare formula
# $\mathbf{p} = \mathbf{E}\mathbf{x}$ without the final norm and bias.

# %%
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

# %% [markdown]
# ## The same model in Hugging Face transformers
#
# `load_demo_model("hf")` converts the timm weights into a `ViTForImageClassification`
# (`captum_clsemb.convert.timm_to_hf`). The HF adapter gives the same decomposed view, so
# every score agrees up to float rounding.

# %%
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

# %% [markdown]
# ## Interventions: attention and tokens
#
# The traced forward can edit the attention probabilities of every block (or of
# `edit_blocks`) and drop tokens:
#
# - `attention_edit="self_only"`: every image token attends only to itself (its attention to
#   other image tokens **and** to the class token is removed; rows still sum to 1). This is
#   the paper's test of whether image tokens need attention to build class representations.
# - `attention_edit="no_cls"`: image tokens do not attend to the class token (no
#   renormalisation, as in the authors' code).
# - `keep_tokens=...`: drop image tokens from the sequence after the position embedding.
#
# The model itself is never modified.

# %%
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

# %%
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

# %% [markdown]
# ## Next
#
# - [Tutorial 2](2_explanations.ipynb): which image tokens would raise the class in the class
#   token, per block and head.
# - The command line gives the same analyses as an HTML report:
#   `clsemb report --out clsemb-report`.

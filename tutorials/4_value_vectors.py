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
# # 4. Value vectors and key-value memories
#
# Attention and MLP sub-layers can be read as **key-value memories** (paper Sec. 3 and 6,
# after Geva et al.): the MLP computes $\mathrm{GELU}(\mathbf{X}\mathbf{W}_{inp})\,\mathbf{W}_{out}$,
# so each hidden unit $j$ has a *key coefficient* (its activation) and a *value vector* (row
# $j$ of $\mathbf{W}_{out}$) that is added to the residual stream in proportion to it. In
# attention, the attention-weighted values concatenated over heads are the coefficients and
# the columns of the output projection the value vectors.
#
# Projecting value vectors onto the class embedding $\mathbf{E}$ shows which classes each
# memory promotes. `ValueVectorProjector` does this and measures whether the memories that
# fire on a token promote its class.

# %%
# %matplotlib inline

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

# %% [markdown]
# ## What a memory promotes
#
# `value_projection` is the raw projection $\mathbf{E}\,\mathbf{W}_{out}^\top$ (classes ×
# memories); `top_classes` lists the classes a memory pushes up most.

# %%
block = -2  # the penultimate block, where the paper finds MLP peaks
proj = vvp.value_projection(block, "mlp")  # (10 classes, 256 memories)
strongest = proj.max(0).values.topk(3).indices.tolist()
for j in strongest:
    top = vvp.top_classes(block, "mlp", memory=j, k=3)
    print(f"memory {j:3d}:", ", ".join(f"{c.name} ({c.score:+.2f})" for c in top))

# %% [markdown]
# ## Class-value agreement
#
# For each class, the highest cosine similarity between its prototype (row of $\mathbf{E}$)
# and any value vector of a layer (Fig. 4a). The paper compares with a randomly initialised
# model: `random_baseline()` re-initialises a copy with timm's own initialisation.

# %%
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

# %% [markdown]
# ## Key-value agreement at inference
#
# A token *agrees* at a block when one of its 5 most activated keys has a value vector whose
# top classes include the target (the paper's definition; `variant="authors"` gives the
# authors' code, which takes the top memories of the target class instead). The paper uses
# the top-5 of 1,000 ImageNet classes; with 10 classes we use the top-2 (`k_classes=2`). The
# rates are reported separately for correctly and wrongly classified images.

# %%
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

# %% [markdown]
# ## Compositionality
#
# Does a layer's top-1 prediction at a token match the top class of one of its 5 most
# activated memories? A low share means the prediction is *composed* from many memories.

# %%
for layer in ("attn", "mlp"):
    comp = vvp.compositionality(images, layer=layer, k=5)
    print(
        f"{layer}: % of image tokens matching a top-5 memory, per block:",
        comp["image"].numpy().round(1),
    )

# %% [markdown]
# ## How attention and MLP build the class
#
# Two more analyses of Sec. 6 read sub-layer outputs through the lens:
#
# - **class similarity change rate** (Fig. 3b): the share of tokens whose target logit is
#   higher for a sub-layer's output than for its input;
# - **residual match** (Fig. 3c): whether the block output's top-1 class comes from the
#   attention output, the MLP output, the incoming stream, or none of them (composite).

# %%
change = class_similarity_change_rate(model, images, target=labels)
plot_class_similarity_change(change)

# %%
match = residual_match_rate(model, images)
plot_residual_match(match, group="image")

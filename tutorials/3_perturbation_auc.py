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
# # 3. Perturbation tests: token-removal AUC
#
# Which explanation best predicts the image tokens the model needs? The perturbation test of
# Vilas et al. (Sec. 7-8) ranks the image tokens by an explanation and **drops** them from
# the sequence after the position embedding, recording the accuracy at each removal fraction
# $f \in \{0, 0.1, \dots, 0.9\}$:
#
# - **negative** test: least important tokens first; a good explanation keeps accuracy up
#   (**higher AUC is better**);
# - **positive** test: most important tokens first (**lower AUC is better**).
#
# The area under the curve is the trapezoid over the fractions ×100, the convention of Chefer
# et al. (a curve flat at 1 scores 90). This tutorial compares the class-embedding gradients
# with Chefer et al.'s methods, attention rollout, raw attention, a linear-probe ranking and a
# random ranking on the demo model.

# %%
# %matplotlib inline
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

# Disjoint splits of the 20 images per class: 5 fit the linear probes, 5 others are evaluated.
within_class = torch.arange(len(images)) % 20
x_probe, y_probe = images[within_class < 5], labels[within_class < 5]
x, y = images[within_class >= 15], labels[within_class >= 15]
print("probe images:", len(x_probe), "| evaluated images:", len(x))

# %% [markdown]
# ## One method, both tests
#
# `token_removal_auc(model, inputs, attributions, ...)` works like `captum.metrics`: it takes
# the attributions and returns one value per example (their mean is the AUC of the mean
# curve). `return_curve=True` also returns the curves.

# %%
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

# %% [markdown]
# A random ranking is the reference: a useful explanation beats it in both tests.

# %%
rand = RandomRanking(model, seed=0).attribute(x)
for mode in ("negative", "positive"):
    r = token_removal_auc(model, x, rand, target=y, labels=y, mode=mode)
    print(f"random ranking, {mode}: {r.mean():.2f}")

# %% [markdown]
# ## All methods
#
# `compare_explanations` runs both tests for every method, streaming over batches. By default
# it builds the class-embedding gradients, Chefer et al.'s relevancy (CVPR 2021) and gradient
# rollout (ICCV 2021), attention rollout, raw attention, a linear-probe ranking fitted on
# `probe_data` and a random ranking.

# %%
results = compare_explanations(
    model, x, y, probe_data=(x_probe, y_probe), batch_size=50
)
print(to_markdown(results))

# %%
plot_curves(results)

# %% [markdown]
# ## Conventions matter
#
# Vilas et al.'s code summarised their curve of $1, \dots, P-1$ kept tokens as
# $\sum_s m_s / (\max_s m_s \cdot P)$, normalised by the curve's own maximum ($P$ patches, one
# more than the curve's points). It is available as `auc="authors"` (and `authors_auc`), but it
# is not an area: every flat curve scores the same, $(P-1)/P$, whatever its level.

# %%
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

# %% [markdown]
# ## Pixels instead of tokens
#
# Chefer et al. remove *pixels* (set to black) rather than tokens. `pixel_removal_auc`
# implements their protocol for any classifier; patch-grid maps are upsampled bilinearly.

# %%
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

# %% [markdown]
# These numbers are for a small CIFAR-10 model on 50 images (5 per class), where differences of a
# few AUC points are within the noise (see the ± s.e.m. in the table above); the full comparison
# is produced by `benchmarks/compare_cifar10.py` (see the *Comparison* page of the docs).

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
# # 5. captum-clsemb inside Captum
#
# Every attribution class of the package is a Captum `Attribution` (the gradient methods
# are `GradientAttribution`s) and follows Captum's calling conventions, so Captum's own
# tools take them unchanged:
#
# - `NoiseTunnel` (SmoothGrad, SmoothGrad², VarGrad) around any of them;
# - `captum.metrics.sensitivity_max` and `captum.metrics.infidelity`;
# - `captum.attr.visualization`, through `captum_clsemb.viz.to_captum_arrays`, which
#   upsamples patch-grid maps to the image;
# - and the other way round: the package's token-removal test
#   `captum_clsemb.metrics.token_removal_auc` scores plain Captum methods (Saliency,
#   Integrated Gradients, GradCAM) next to the package's own.
#
# Everything runs on the bundled CIFAR-10 ViT (32×32 images, 4×4 patches, an 8×8 patch grid)
# and its bundled test images.

# %%
# %matplotlib inline
import warnings

# Captum imports tqdm, which notes in notebooks that ipywidgets is missing
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import captum.attr  # noqa: F401

import torch
import torch.nn.functional as F
from captum.attr import (
    GradientAttribution,
    IntegratedGradients,
    LayerGradCam,
    NoiseTunnel,
    Saliency,
)
from captum.metrics import infidelity, sensitivity_max
from captum_clsemb import load_demo_images, load_demo_model
from captum_clsemb.attr import (
    AttentionRollout,
    CheferGradientRollout,
    CheferRelevancy,
    ClassEmbeddingGradient,
    RawAttention,
)
from captum_clsemb.demo import load_demo_config
from captum_clsemb.metrics import token_removal_auc
from captum_clsemb.viz import visualize_image_attr_multiple
from IPython.display import display

# Captum's Saliency notes that it sets requires_grad on the inputs itself
warnings.filterwarnings("ignore", message="Input Tensor 0 did not already")
torch.manual_seed(0)
config = load_demo_config()
mean, std = config["mean"], config["std"]
model = load_demo_model("timm")
x, y, _ = load_demo_images(max_per_class=3)  # 30 images, 3 per class
print(x.shape, y.shape)

# %% [markdown]
# ## Captum's conventions
#
# A tensor in gives a tensor out, a 1-tuple in gives a 1-tuple out, `target` takes every
# form Captum accepts (an int, a list, a tensor `(N,)` or `(N, 1)`, a list of 1-tuples), and
# `additional_forward_args` may be given as `None`.

# %%
methods = {
    "ClassEmbeddingGradient": ClassEmbeddingGradient(model),
    "CheferRelevancy": CheferRelevancy(model),
    "CheferGradientRollout": CheferGradientRollout(model),
    "AttentionRollout": AttentionRollout(model),
    "RawAttention": RawAttention(model),
}
ceg = methods["ClassEmbeddingGradient"]
print({name: isinstance(m, GradientAttribution) for name, m in methods.items()})
maps = ceg.attribute(x, target=y)
as_tuple = ceg.attribute((x,), target=y[:, None], additional_forward_args=None)
print(type(as_tuple).__name__, maps.shape, torch.equal(as_tuple[0], maps))

# %% [markdown]
# ## NoiseTunnel
#
# `NoiseTunnel` adds Gaussian noise to the images and averages the maps. The noise is in
# the model's normalised input space; `stdevs=0.2` is a fifth of a standard deviation of the
# training pixels. Below, one image with its class-embedding-gradient map and the
# SmoothGrad map over 16 noisy copies, drawn by Captum's `visualize_image_attr_multiple`
# (the 8×8 patch-grid maps are upsampled bilinearly to 32×32 by the helper).

# %%
i = 3
nt = NoiseTunnel(ceg)
smooth = nt.attribute(x[i : i + 1], nt_type="smoothgrad", nt_samples=16, nt_samples_batch_size=8,
                      stdevs=0.2, target=y[i : i + 1])  # fmt: skip
print(smooth.shape)
fig, axes = visualize_image_attr_multiple(
    maps[i], x[i], ["original_image", "blended_heat_map"], ["all", "all"],
    mean=mean, std=std, titles=["image", "ClassEmbeddingGradient"], fig_size=(6, 3),
)  # fmt: skip
display(fig)

# %%
fig, axes = visualize_image_attr_multiple(
    smooth[0], x[i], ["blended_heat_map", "heat_map"], ["all", "all"],
    mean=mean, std=std, titles=["SmoothGrad (16 samples)", "SmoothGrad map"], fig_size=(6, 3),
)  # fmt: skip
display(fig)

# %% [markdown]
# Every method works the same way inside `NoiseTunnel`, also under `torch.no_grad()`
# (the gradient methods enable gradients for their own pass):

# %%
with torch.no_grad():
    for name, m in methods.items():
        torch.manual_seed(0)
        out = NoiseTunnel(m).attribute(
            x[:4], nt_type="vargrad", nt_samples=4, stdevs=0.2, target=y[:4]
        )
        print(f"{name:24s} VarGrad {tuple(out.shape)}  mean {out.mean():.3g}")

# %% [markdown]
# ## sensitivity_max
#
# The maximum relative change of the map when the image moves by at most 0.02 (in
# normalised units) per pixel, over 5 random moves. Lower means a more stable explanation.
# The package's maps live on the 8×8 patch grid; sensitivity compares maps with themselves,
# so they are used as they are. Numbers are over 10 images (one per class) of the small demo
# model: indicative only.

# %%
x10, y10 = x[::3], y[::3]
torch.manual_seed(0)
sens = {
    name: sensitivity_max(m.attribute, x10, target=y10, n_perturb_samples=5)
    for name, m in methods.items()
}
sens["Saliency (Captum)"] = sensitivity_max(
    Saliency(model).attribute, x10, target=y10, n_perturb_samples=5
)
for name, s in sens.items():
    print(f"{name:24s} {s.mean():.3f} ± {s.std():.3f}")

# %% [markdown]
# `CheferRelevancy` stands out: its LRP rules divide by sums of contributions (the z-rule at
# every residual addition), which can be close to zero, so a small change of the input can
# move its map far.
#
# ## infidelity
#
# `infidelity` compares the attribution's prediction of the effect of a perturbation,
# $\sum_p I_p\, a_p$, with the effect itself, $f(x) - f(x - I)$, so it needs attributions
# shaped like the inputs. `interpolate_to="input"` gives exactly that: the patch-grid map
# upsampled bilinearly and repeated over the three channels, `(N, 3, 32, 32)`.
#
# The maps of different methods have different scales (gradients, relevances, attention
# weights), and infidelity is not scale-invariant; `normalize=True` rescales every
# attribution by its best factor $\beta$ first, so that the methods can be compared.


# %%
def perturb(inputs):
    noise = 0.1 * torch.randn_like(inputs)
    return noise, inputs - noise


infid = {}
for name, m in methods.items():
    attr = m.attribute(x10, target=y10, interpolate_to="input")
    torch.manual_seed(0)
    infid[name] = infidelity(
        model, perturb, x10, attr, target=y10, n_perturb_samples=8, normalize=True
    )
sal = Saliency(model).attribute(x10, target=y10)
torch.manual_seed(0)
infid["Saliency (Captum)"] = infidelity(
    model, perturb, x10, sal, target=y10, n_perturb_samples=8, normalize=True
)
print("attribution shape for infidelity:", tuple(attr.shape))
for name, v in infid.items():
    print(f"{name:24s} {v.mean():.4f}")

# %% [markdown]
# ## Plain Captum methods in the token-removal test
#
# `token_removal_auc` ranks the 64 patch tokens by an attribution on the patch grid, drops
# the least (negative test) or most (positive test) important ones from the sequence, and
# integrates the top-1 accuracy over the removed fraction. Pixel-level maps of Captum
# methods are brought to the patch grid by summing the absolute attribution over channels
# and over the 4×4 pixels of each patch. `LayerGradCam` is applied to the patch-embedding
# convolution, whose output already lies on the 8×8 grid (Captum's GradCAM averages over the
# wrong axes on token layers, so it is not applied there).

# %%
patch = 4


def to_patch_grid(pixel_attr):
    """(N, C, 32, 32) pixel attributions -> (N, 1, 8, 8): |a| summed over channels and each patch."""
    return F.avg_pool2d(pixel_attr.abs().sum(1, keepdim=True), patch) * patch * patch


captum_maps = {
    "Saliency (Captum)": to_patch_grid(Saliency(model).attribute(x, target=y)),
    "IntegratedGradients (Captum)": to_patch_grid(
        IntegratedGradients(model).attribute(x, target=y, n_steps=16)
    ),
    "LayerGradCam (Captum)": LayerGradCam(model, model.patch_embed.proj).attribute(
        x, target=y
    ),
}
ours = {name: m.attribute(x, target=y) for name, m in methods.items()}
rows = []
for name, a in {**ours, **captum_maps}.items():
    neg = token_removal_auc(model, x, a, target=y, labels=y, mode="negative").mean()
    pos = token_removal_auc(model, x, a, target=y, labels=y, mode="positive").mean()
    rows.append((name, tuple(a.shape[1:]), float(neg), float(pos)))
print(f"{'method':30s} {'map':12s} {'negative AUC':>13s} {'positive AUC':>13s}")
for name, shape, neg, pos in sorted(rows, key=lambda r: -r[2]):
    print(f"{name:30s} {str(shape):12s} {neg:13.1f} {pos:13.1f}")

# %% [markdown]
# Higher negative AUC and lower positive AUC are better (trapezoid over removal fractions
# 0, 0.1, ..., 0.9, in percent: a curve flat at 100 % accuracy scores 90). The labels are the
# images' ground truth. With 30 images of a small CIFAR-10 model these numbers show how to
# run the comparison, not a ranking of the methods; `captum_clsemb.metrics.compare_explanations`
# runs the same test over a whole dataset and reports standard errors.

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
# # 6. CLIP zero-shot in class embedding space
#
# CLIP classifies an image *zero-shot*: it embeds the image, embeds one text prompt per
# class ("a photo of a dog."), and predicts the class whose text embedding is most similar
# to the image's. The matrix of class text embeddings plays the role the classifier head
# plays in an ordinary ViT: it **is the class embedding**, defined by language instead of
# trained weights.
#
# `captum_clsemb.ZeroShotClassifier` turns a CLIP (or SigLIP) model and that matrix into an
# ordinary image classifier, so that every analysis of the package runs on it: which blocks
# and tokens already point at the class in the text-defined class space, which image tokens
# the class token draws that evidence from, and which MLP memories promote which classes.
#
# This notebook runs on a **randomly initialised CLIP ViT-B/32** so that it needs no
# download; its numbers are those of an untrained network (chance level). With hub access,
# set `USE_PRETRAINED_CLIP = True` in the next code cell to analyse the real
# `openai/clip-vit-base-patch32`: nothing else changes.

# %%
# %matplotlib inline
import tempfile
from pathlib import Path

import torch
import transformers
from captum_clsemb import (
    BlockwiseIdentifiability,
    ClassEmbeddingGradient,
    ValueVectorProjector,
    ZeroShotClassifier,
    adapt,
    token_removal_auc,
)
from captum_clsemb.demo import load_demo_config, load_demo_images
from captum_clsemb.hub import ImageProcessorTransform
from captum_clsemb.trace import trace
from captum_clsemb.viz.explanations import plot_global_map
from captum_clsemb.viz.identifiability import plot_identifiability_curves
from PIL import Image

torch.manual_seed(0)
CLASS_NAMES = load_demo_config()["class_names"]  # the 10 CIFAR-10 classes
TEMPLATES = [
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a low resolution photo of a {}.",
]

# %%
USE_PRETRAINED_CLIP = False  # <-- True: openai/clip-vit-base-patch32 (hub)

# %% [markdown]
# With hub access the model, its tokenizer and its image processor come from
# `openai/clip-vit-base-patch32`. Without, the same architecture (the `CLIPConfig`
# defaults are ViT-B/32) gets random weights, and a toy letter-level tokenizer written
# to a temporary folder stands in for CLIP's (the real one is a download too).
# `captum_clsemb.load_model("hf:openai/clip-vit-base-patch32", classes=..., templates=...)`
# does the pretrained branch in one call.

# %%
HUB_ID = "openai/clip-vit-base-patch32"


def random_clip():
    """CLIP ViT-B/32 with random weights, a toy tokenizer and the default CLIP preprocessing."""
    import json
    import string

    folder = Path(tempfile.mkdtemp())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in string.ascii_lowercase + ".":
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = transformers.CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt")
    )
    config = transformers.CLIPConfig(
        text_config={"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}
    )
    return (
        transformers.CLIPModel(config).eval(),
        tokenizer,
        transformers.CLIPImageProcessor(),
    )


if USE_PRETRAINED_CLIP:
    clip = transformers.CLIPModel.from_pretrained(HUB_ID).eval()
    tokenizer = transformers.CLIPTokenizer.from_pretrained(HUB_ID)
    processor = transformers.CLIPImageProcessor.from_pretrained(HUB_ID)
else:
    clip, tokenizer, processor = random_clip()

model = ZeroShotClassifier.from_prompts(
    clip, tokenizer, CLASS_NAMES, templates=TEMPLATES
)
adapter = adapt(model)
transform = ImageProcessorTransform(processor, adapter.img_size)
print(model.extra_repr())
print(adapter)

# %% [markdown]
# `from_prompts` embeds every (class, template) prompt with `get_text_features`, normalises
# each embedding, averages over the templates and normalises again: the usual template
# ensembling. The classifier's forward is CLIP's own `logits_per_image` for these texts,
# `exp(logit_scale) * cos(image embedding, class text)`.
#
# The images: one bundled CIFAR-10 test image per class, through CLIP's preprocessing
# (resized to 224 × 224, CLIP's mean and std).

# %%
_, labels, paths = load_demo_images(max_per_class=1)
x = torch.stack([transform(Image.open(p)) for p in paths])
with torch.no_grad():
    logits = model(x)
pred = logits.argmax(-1)
print(f"images {tuple(x.shape)}, logits {tuple(logits.shape)}")
print(f"zero-shot accuracy: {(pred == labels).float().mean():.0%} (chance: 10%)")
for label, p in zip(labels.tolist(), pred.tolist()):
    print(f"  {CLASS_NAMES[label]:>10s} -> {CLASS_NAMES[p]}")

# %% [markdown]
# ## The lens in text-defined class space
#
# The lens sends any vision token state $x$ through the model's own image head and then
# the class matrix $T_n$ (unit rows):
#
# $$ \mathrm{lens}(x) = s \cdot \frac{P\,\mathrm{LN}(x)}{\lVert P\,\mathrm{LN}(x)\rVert}\, T_n^\top, $$
#
# with LN the vision tower's `post_layernorm`, $P$ the visual projection and
# $s = \exp(\texttt{logit\_scale})$. CLIP's image embedding is its class token's, so the lens
# of the last block's class token is exactly the zero-shot prediction:

# %%
tr = trace(model, x, record=["resid_post"])
final_cls = tr.cache["resid_post", -1][:, adapter.class_token_index]
print(
    "lens(final class token) == zero-shot logits:",
    torch.allclose(adapter.project(final_cls), logits, atol=1e-5),
)
print(
    "class embedding in the residual stream, E = s T_n P:",
    tuple(adapter.class_embedding.shape),
)

# %% [markdown]
# ## Block-wise identifiability
#
# How early, and in which tokens, does the true class rank first in the text-defined
# class space? $r = 1 - \mathrm{rank}/|C|$ for every token at every block (paper Eq. 1).
# A trained CLIP shows the paper's picture: identifiability rises in the last blocks,
# first in the class token. The random model stays near chance ($0.5 + 0.5/|C|$).

# %%
bi = BlockwiseIdentifiability(model)
scores = bi.attribute(x, target=labels)  # (N, blocks, tokens)
curves = bi.mean_identifiability(scores)
print({k: [round(v, 2) for v in c.tolist()] for k, c in curves.items()})
plot_identifiability_curves(
    curves,
    chance=0.5 + 0.5 / len(CLASS_NAMES),
    title="CLIP zero-shot: identifiability per block",
)

# %% [markdown]
# ## Which image tokens raise the class in the class token
#
# `ClassEmbeddingGradient` differentiates the class token's lens (log-probability of the
# class among the prompts) with respect to its attention to each image token, summed over
# blocks and heads. Positive: attending more to this token would raise the class.

# %%
attr = ClassEmbeddingGradient(model).attribute(x, target=labels)  # (N, 1, 7, 7)
i = 5
plot_global_map(
    attr[i],
    x[i],
    mean=processor.image_mean,
    std=processor.image_std,
    title=f"class embedding gradient: {CLASS_NAMES[labels[i]]}",
)

# %% [markdown]
# The token-removal test (paper Sec. 7) keeps the most (negative mode) or drops the most
# (positive mode) important tokens by the map and scores the prediction on the shorter
# sequence: a faithful map gives a high negative and a low positive AUC. Scored here is
# the probability of the true class among the 10 prompts (AUC over removal fractions
# 0-0.9, times 100: at most 90). With random weights both are near the chance level of 9.

# %%
for mode in ("negative", "positive"):
    auc = token_removal_auc(
        model, x, attr, target=labels, mode=mode, score="probability"
    )
    print(f"{mode:>8s} AUC: {auc.mean():.1f}")

# %% [markdown]
# ## Memories that promote classes
#
# Each MLP hidden unit writes its value vector (a column of `fc2`) into the residual
# stream. Projected onto the class embedding, it shows which prompts' classes the memory
# promotes. The paper's class-value agreement (per class, the best cosine with any value
# vector) of a trained model exceeds that of a random one in the last blocks.

# %%
vvp = ValueVectorProjector(model, class_names=CLASS_NAMES)
agreement = vvp.class_value_agreement("mlp")  # (blocks, classes)
print(
    "class-value agreement per block (mean over classes):",
    [round(v, 3) for v in agreement.mean(1).tolist()],
)
top = vvp.value_projection(-1, "mlp").max(0).values.argmax().item()
print(
    f"last block, memory {top}:",
    vvp.top_classes(block=-1, layer="mlp", memory=top, k=3),
)

# %% [markdown]
# ## New classes, no training
#
# The class embedding is only a matrix of text embeddings: a new label set is a new
# classifier over the same image model. Here two coarse classes, and the identifiability of
# the last block's class token for the model's own prediction, which is 1 by construction
# (the lens at the last block is the model's head).

# %%
coarse = ZeroShotClassifier.from_prompts(
    clip, tokenizer, ["animal", "vehicle"], templates=TEMPLATES
)
coarse_scores = BlockwiseIdentifiability(coarse).attribute(x)  # target: the prediction
print("last block, class token:", coarse_scores[:, -1, 0].tolist())

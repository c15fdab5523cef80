"""ZeroShotClassifier: CLIP / SigLIP with a class text matrix as an image classifier (tiny random models)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import CLIP_TEXT, images, small_clip, tiny_tokenizer

from captum_clsemb import InputValidationError, UnsupportedModelError, ZeroShotClassifier
from captum_clsemb.adapters import adapt


def _text_features(model, tok, prompts, kind) -> torch.Tensor:
    enc = tok(
        prompts, padding="max_length" if kind == "siglip" else True, truncation=True, return_tensors="pt"
    )
    args = {"input_ids": enc["input_ids"]}
    if kind == "clip":
        args["attention_mask"] = enc["attention_mask"]
    with torch.no_grad():
        return model.get_text_features(**args).pooler_output


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_forward_is_the_models_logits_per_image(kind: str, tmp_path) -> None:
    model = small_clip(kind)
    tok = tiny_tokenizer(tmp_path)
    prompts = ["a cat.", "a dog.", "a car.", "a bus."]
    enc = tok(
        prompts, padding="max_length" if kind == "siglip" else True, truncation=True, return_tensors="pt"
    )
    x = images(3)
    with torch.no_grad():
        if kind == "clip":
            out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], pixel_values=x)
        else:
            out = model(input_ids=enc["input_ids"], pixel_values=x)
    clf = ZeroShotClassifier(model, _text_features(model, tok, prompts, kind), class_names=prompts)
    with torch.no_grad():
        logits = clf(x)
    assert logits.shape == (3, 4) and clf.num_classes == 4
    torch.testing.assert_close(logits, out.logits_per_image, atol=1e-5, rtol=0)
    if kind == "siglip":
        assert clf.logit_bias is model.logit_bias and clf.logit_bias.item() == -2.0
    else:
        assert clf.logit_bias is None


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_from_prompts_ensembles_normalised_template_embeddings(kind: str, tmp_path) -> None:
    model = small_clip(kind)
    tok = tiny_tokenizer(tmp_path)
    names = ["cat", "dog", "bird"]
    templates = ["a photo of a {}.", "a {}.", "the {}"]
    model.train()  # from_prompts embeds in eval mode and restores the flags
    clf = ZeroShotClassifier.from_prompts(model, tok, names, templates=templates, batch_size=4)
    assert model.training and all(m.training for m in model.modules())
    model.eval()
    expected = []
    for n in names:
        feats = _text_features(model, tok, [t.format(n) for t in templates], kind)
        mean = F.normalize(feats, dim=-1).mean(0)
        expected.append(mean / mean.norm())
    torch.testing.assert_close(clf.class_embeddings, torch.stack(expected), atol=1e-6, rtol=0)
    assert clf.class_names == names
    # one template: the plain normalised prompt embedding
    single = ZeroShotClassifier.from_prompts(model, tok, names)
    torch.testing.assert_close(
        single.class_embeddings,
        F.normalize(_text_features(model, tok, [f"a photo of a {n}." for n in names], kind)),
    )


def test_lens_of_the_final_class_token_is_the_zero_shot_prediction(tmp_path) -> None:
    model = small_clip("clip")
    clf = ZeroShotClassifier.from_prompts(model, tiny_tokenizer(tmp_path), ["cat", "dog", "car", "bus"])
    adapter = adapt(clf)
    from captum_clsemb import BlockwiseIdentifiability
    from captum_clsemb.trace import trace

    x = images(5)
    tr = trace(clf, x, record=["resid_post"])
    torch.testing.assert_close(tr.logits, clf(x), atol=1e-5, rtol=0)
    torch.testing.assert_close(
        adapter.project(tr.cache["resid_post", -1][:, 0]), tr.logits, atol=1e-5, rtol=0
    )
    assert (BlockwiseIdentifiability(clf).attribute(x)[:, -1, 0] == 1).all()


def test_class_matrix_is_kept_as_a_buffer_and_the_model_untouched() -> None:
    model = small_clip("clip")
    emb = torch.randn(3, 24)
    clf = ZeroShotClassifier(model, emb)
    assert "class_embeddings" in dict(clf.named_buffers())
    emb.zero_()  # the classifier holds its own copy
    assert clf.class_embeddings.abs().sum() > 0
    assert clf.model is model and clf.class_names is None
    torch.testing.assert_close(clf.normalized_class_embeddings().norm(dim=-1), torch.ones(3))


@pytest.mark.parametrize(
    "args, match",
    [
        ((torch.randn(3, 5),), r"\(num_classes, 24\)"),
        ((torch.randn(24),), "num_classes, embed_dim"),
        ((torch.zeros(2, 24),), "zero vector"),
        ((torch.full((2, 24), float("nan")),), "finite"),
        ((torch.randn(2, 24), ["only one"]), "2 class embeddings"),
    ],
)
def test_bad_class_embeddings_are_refused(args, match: str) -> None:
    with pytest.raises(InputValidationError, match=match):
        ZeroShotClassifier(small_clip("clip"), *args)


def test_bad_prompts_and_models_are_refused(tmp_path) -> None:
    model = small_clip("clip")
    tok = tiny_tokenizer(tmp_path)
    with pytest.raises(InputValidationError, match="exactly one"):
        ZeroShotClassifier.from_prompts(model, tok, ["cat"], templates=["no placeholder"])
    with pytest.raises(InputValidationError, match="empty"):
        ZeroShotClassifier.from_prompts(model, tok, [])
    with pytest.raises(UnsupportedModelError, match="CLIPModel or SiglipModel"):
        ZeroShotClassifier(torch.nn.Linear(3, 4), torch.randn(2, 4))
    import transformers
    from conftest import CLIP_VISION

    headless = transformers.SiglipModel(
        transformers.SiglipConfig(
            vision_config={**CLIP_VISION, "vision_use_head": False}, text_config=CLIP_TEXT
        )
    )
    with pytest.raises(UnsupportedModelError, match="attention-pooling head"):
        ZeroShotClassifier(headless, torch.randn(2, 32))

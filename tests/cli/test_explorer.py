"""The token explorer's data against an independent lens (forward hooks + the model's own head) and
BlockwiseIdentifiability; its HTML partial as text (the browser test drives it)."""

from __future__ import annotations

import base64
import io
import json
import re

import jinja2
import numpy as np
import pytest
import torch
import transformers
from conftest import HF_VARIANTS, TIMM_VARIANTS, images
from PIL import Image

from captum_clsemb.attr import BlockwiseIdentifiability
from captum_clsemb.cli.explorer import TEMPLATES_DIR, explorer_data, render_explorer, render_explorer_page
from captum_clsemb.demo import load_demo_config, load_demo_images, load_demo_model
from captum_clsemb.errors import InputValidationError


def hooked_lens_logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Logits (N, blocks, T, C) of every token after every block, read with forward hooks (timm) or
    hidden_states (Hugging Face) and the model's own final norm and classifier head."""
    with torch.no_grad():
        if isinstance(model, transformers.PreTrainedModel):
            states = model(pixel_values=x, output_hidden_states=True).hidden_states[1:]
            base = getattr(model, model.base_model_prefix)
            head = model.classifier if hasattr(model, "classifier") else model.cls_classifier
            return torch.stack([head(base.layernorm(h)) for h in states], dim=1)
        outs: list[torch.Tensor] = []
        handles = [blk.register_forward_hook(lambda m, i, o: outs.append(o)) for blk in model.blocks]
        try:
            model(x)
        finally:
            for h in handles:
                h.remove()
        return torch.stack([model.head(model.fc_norm(model.norm(h))) for h in outs], dim=1)


def check_against(data: dict, model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor) -> None:
    """Every number of ``data`` against the hooked lens and BlockwiseIdentifiability."""
    logits = hooked_lens_logits(model, x)  # (N, B, T, C)
    probs = logits.softmax(-1)
    k = data["top_k"]
    r = BlockwiseIdentifiability(model).attribute(x, target=target)  # (N, B, T)
    target_logit = logits.gather(-1, target.view(-1, 1, 1, 1).expand(*logits.shape[:-1], 1))
    rank = (logits > target_logit).sum(-1)
    assert len(data["images"]) == x.shape[0]
    for i, im in enumerate(data["images"]):
        got_cls = torch.tensor(im["top_classes"])
        assert got_cls.shape == (*logits.shape[1:3], k)
        # the top-k classes are the k most probable, in descending order
        expected_cls = probs[i].argsort(-1, descending=True)[..., :k]
        assert torch.equal(got_cls, expected_cls)
        got_p = torch.tensor(im["top_scores"], dtype=torch.float64)
        assert torch.allclose(got_p, probs[i].gather(-1, expected_cls).double(), atol=6e-5, rtol=0)
        assert torch.equal(torch.tensor(im["target_rank"]), rank[i])
        assert np.allclose(im["identifiability"], r[i].double().numpy(), atol=5.1e-5, rtol=0)
        assert im["target"] == int(target[i])


@pytest.mark.parametrize(
    "name",
    ["cls_token", "gap_fc_norm", "registers", "registers_gap", "distilled", "no_embed_class", "hf_vit"],
)
def test_matches_hooked_lens_and_blockwise_identifiability(name: str) -> None:
    model = {**TIMM_VARIANTS, **HF_VARIANTS}[name]()
    x = images(3)
    target = torch.tensor([0, 3, 6])
    data = explorer_data(model, x, target, top_k=5, batch_size=2)  # two traced forwards: 2 + 1 images
    check_against(data, model, x, target)
    prefix = {
        "cls_token": ["class token"],
        "gap_fc_norm": [],
        "registers": ["class token", "register 1", "register 2", "register 3", "register 4"],
        "registers_gap": ["register 1", "register 2"],
        "distilled": ["class token", "distillation token"],
        "no_embed_class": ["class token"],
        "hf_vit": ["class token"],
    }[name]
    assert data["prefix_labels"] == prefix
    assert data["num_tokens"] == len(prefix) + 16 == len(data["images"][0]["identifiability"][0])
    assert data["grid_size"] == [4, 4] and data["patch_size"] == [8, 8] and data["num_blocks"] == 3
    assert data["class_names"] == [f"class {i}" for i in range(7)] or name == "hf_vit"
    assert all(im["target_is_label"] for im in data["images"])
    # the model's own prediction, from model(x)
    with torch.no_grad():
        out = model(pixel_values=x).logits if name == "hf_vit" else model(x)
    for i, im in enumerate(data["images"]):
        assert im["prediction"] == int(out[i].argmax())
        assert im["prediction_score"] == pytest.approx(float(out[i].softmax(-1).max()), abs=6e-5)


def test_predicted_targets_when_unlabelled() -> None:
    model = TIMM_VARIANTS["registers"]()
    x = images(4, seed=3)
    data = explorer_data(model, x)
    with torch.no_grad():
        pred = model(x).argmax(-1)
    check_against(data, model, x, pred)
    assert [im["target"] for im in data["images"]] == pred.tolist()
    assert not any(im["target_is_label"] for im in data["images"])
    # mixed: labels for some images, predictions for the others, as the report's samples
    mixed = explorer_data(model, x, pred, labelled=[True, False, True, False])
    assert [im["target_is_label"] for im in mixed["images"]] == [True, False, True, False]


def test_all_classes_sum_to_one_and_json_round_trip() -> None:
    model = TIMM_VARIANTS["distilled"]()
    x = images(2)
    data = explorer_data(model, x, 2, top_k=50)  # more than the 7 classes: all of them, ranked
    assert data["top_k"] == 7
    for im in data["images"]:
        scores = np.asarray(im["top_scores"])
        assert np.allclose(scores.sum(-1), 1.0, atol=4e-4)  # 7 values rounded to 4 digits
        assert (np.diff(scores, axis=-1) <= 0).all()
        assert (np.sort(im["top_classes"], axis=-1) == np.arange(7)).all()
        # r = 1 exactly where the target is the top class
        assert (
            (np.asarray(im["identifiability"]) == 1.0) == (np.asarray(im["top_classes"])[..., 0] == 2)
        ).all()
    text = json.dumps(data)
    assert json.loads(text) == data
    # 4 decimals at most in every score (compact JSON)
    assert not re.search(r"\d\.\d{5,}", re.sub(r'"data:image/png;base64,[^"]*"', '""', text))


def test_image_is_denormalised_and_upscaled_by_nearest_neighbour() -> None:
    model = TIMM_VARIANTS["cls_token"]()
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    raw = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    x = (raw - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    data = explorer_data(model, x, [1, 2], mean=mean, std=std, image_names=["a", "b"], display_size=100)
    for i, im in enumerate(data["images"]):
        assert im["src"].startswith("data:image/png;base64,")
        png = Image.open(io.BytesIO(base64.b64decode(im["src"].split(",", 1)[1])))
        assert png.size == (96, 96) and im["display_size"] == [96, 96]  # factor 100 // 32 = 3
        got = np.asarray(png.convert("RGB"))
        expected = np.round(raw[i].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        assert np.array_equal(got[::3, ::3], expected)
        assert np.array_equal(got[2::3, 1::3], expected)
    assert [im["name"] for im in data["images"]] == ["a", "b"]
    # larger images are shrunk (area averaging) to the display size
    big = explorer_data(model, x, [1, 2], display_size=16)
    assert big["images"][0]["display_size"] == [16, 16]


def test_bundled_model_timm_and_hf_agree_with_independent_lens() -> None:
    config = load_demo_config()
    x, labels, paths = load_demo_images(max_per_class=1)
    x, labels = x[:6], labels[:6]
    timm_model, hf_model = load_demo_model("timm"), load_demo_model("hf")
    data = explorer_data(timm_model, x, labels, config["class_names"], config["mean"], config["std"],
                         image_names=[p.name for p in paths[:6]])  # fmt: skip
    check_against(data, timm_model, x, labels)
    assert data["class_names"] == config["class_names"] and data["grid_size"] == [8, 8]
    assert data["num_blocks"] == 6 and data["prefix_labels"] == ["class token"]
    # the class token after the last block is the model's own output
    with torch.no_grad():
        out = timm_model(x).softmax(-1)
    for i, im in enumerate(data["images"]):
        assert im["top_classes"][-1][0] == out[i].topk(5).indices.tolist()
        assert im["top_classes"][-1][0][0] == im["prediction"]
    hf = explorer_data(hf_model, x, labels)  # class names from the model's id2label
    assert hf["class_names"] == config["class_names"]
    for a, b in zip(data["images"], hf["images"]):
        assert a["top_classes"] == b["top_classes"] and a["target_rank"] == b["target_rank"]
        assert np.allclose(a["top_scores"], b["top_scores"], atol=2e-4)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(mean=[0.5] * 3), "both mean and std"),
        (dict(mean=[0.5] * 3, std=[0.0] * 3), "std must be positive"),
        (dict(mean=[0.5] * 2, std=[0.2] * 2), "one value per image channel"),
        (dict(class_names=["a", "b"]), "one name per class"),
        (dict(image_names=["a"]), "one name per image"),
        (dict(top_k=0), "top_k"),
        (dict(batch_size=0), "batch_size"),
        (dict(labelled=[True]), "one bool per image"),
        (dict(targets=None, labelled=True), "labelled=True needs targets"),
        (dict(targets=[0, 9]), "target"),
    ],
)
def test_bad_input_is_one_clear_error(kwargs: dict, message: str) -> None:
    model = TIMM_VARIANTS["cls_token"]()
    kw = {"targets": [0, 1], **kwargs}
    with pytest.raises(InputValidationError, match=message):
        explorer_data(model, images(2), **kw)


def test_partial_embeds_data_safely_and_needs_no_network() -> None:
    model = TIMM_VARIANTS["registers"]()
    names = ["</script><script>alert(1)</script>", "a & b", *[f"c{i}" for i in range(5)]]
    data = explorer_data(model, images(2), [0, 1], class_names=names, image_names=["x<y", "2"])
    html = render_explorer(data)
    assert "<script>alert(1)" not in html
    blob = re.search(r'<script type="application/json" class="clsemb-ex-data">(.*?)</script>', html, re.S)
    assert json.loads(blob.group(1)) == data
    # no URL of any kind outside the embedded images: nothing to fetch
    assert not re.search(r"https?:|//[a-z]", re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", html))
    # one global name; every style rule scoped under the root class
    assert re.findall(r"window\.(\w+)", html) and set(re.findall(r"window\.(\w+)", html)) == {
        "clsembExplorer"
    }
    css = re.sub(r"/\*.*?\*/", "", re.search(r"<style>(.*?)</style>", html, re.S).group(1), flags=re.S)
    selectors = [s.strip() for rule in re.findall(r"([^{}]+)\{", css) for s in rule.split(",")]
    assert selectors and all(s.startswith(".clsemb-explorer") for s in selectors)
    assert 'max="3"' in html  # blocks counted from 1 in the slider
    page = render_explorer_page(data, title="T & T")
    assert page.startswith("<!doctype html>") and "<title>T &amp; T</title>" in page and html in page


def test_partial_is_includable_from_another_template() -> None:
    model = TIMM_VARIANTS["gap_fc_norm"]()
    data = explorer_data(model, images(1), [0])
    for autoescape in (True, False):
        env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES_DIR)), autoescape=autoescape)
        page = env.from_string('<main>{% include "explorer.html.j2" %}</main>').render(explorer=data)
        blob = re.search(r'class="clsemb-ex-data">(.*?)</script>', page, re.S)
        assert json.loads(blob.group(1)) == data

"""load_model: demo, timm names, Hugging Face folders, CLIP zero-shot; offline errors (never the network)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import transformers
from conftest import small_clip, small_dinov2, tiny_tokenizer
from PIL import Image

from captum_clsemb import ModelLoadError, ZeroShotClassifier, load_model
from captum_clsemb.adapters import adapt
from captum_clsemb.hub import LoadedModel

ROOT = Path(__file__).resolve().parents[1]


def _image(size: int = 40) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (size, size + 8, 3), dtype=np.uint8))


def test_demo() -> None:
    loaded = load_model("demo")
    assert isinstance(loaded, LoadedModel)
    model, transform, names, desc = loaded
    assert len(names) == 10 and names[0] == "airplane" and "CIFAR-10" in desc
    x = transform(_image())[None]
    assert model(x).shape == (1, 10)
    with pytest.raises(ModelLoadError, match="ships its own weights"):
        load_model("demo", random_init=True)


def test_timm_random_init_builds_the_architecture_without_download() -> None:
    model, transform, names, desc = load_model("timm:vit_small_patch16_rope_224", random_init=True)
    assert type(model).__name__ == "Eva" and not model.training
    assert names is None and desc == "timm vit_small_patch16_rope_224 (random weights)"
    x = transform(_image(300))
    assert x.shape == (3, 224, 224)
    assert adapt(model).img_size == (224, 224)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_timm_checkpoint_loads_local_weights(tmp_path, suffix: str) -> None:
    torch.manual_seed(3)
    src = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(src.state_dict(), str(path))
    else:
        torch.save({"state_dict": src.state_dict()}, path)
    model, _, _, desc = load_model("timm:vit_tiny_patch16_224", checkpoint=path)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), src.state_dict().values()))
    assert str(path) in desc
    with pytest.raises(ModelLoadError, match="does not fit timm model 'vit_small_patch16_224'"):
        load_model("timm:vit_small_patch16_224", checkpoint=path)


@pytest.mark.parametrize(
    "spec, kwargs, match",
    [
        ("nope", {}, "unknown model 'nope'"),
        ("timm:not_a_model", {}, "unknown timm model name"),
        ("timm:vit_tiny_patch16_224", {"checkpoint": "missing.pth"}, "checkpoint file not found"),
        ("timm:vit_tiny_patch16_224", {"checkpoint": "x.pth", "random_init": True}, "not both"),
        ("timm:vit_tiny_patch16_224", {"classes": ["cat"]}, "CLIP / SigLIP"),
        ("hf:", {}, "needs a model id"),
    ],
)
def test_bad_specs_raise_one_clear_error(spec: str, kwargs: dict, match: str) -> None:
    with pytest.raises(ModelLoadError, match=match):
        load_model(spec, **kwargs)


def test_hf_folder_loads_weights_processor_and_names(tmp_path) -> None:
    src = small_dinov2(id2label={i: f"c{i}" for i in range(7)}, label2id={f"c{i}": i for i in range(7)})
    src.save_pretrained(tmp_path)
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    model, transform, names, desc = load_model(tmp_path)
    assert type(model).__name__ == "Dinov2ForImageClassification" and not model.training
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), src.state_dict().values()))
    assert names == [f"c{i}" for i in range(7)] and "pretrained weights" in desc
    x = transform(_image())
    assert x.shape == (3, 32, 32)
    expected = transformers.ViTImageProcessor(size={"height": 32, "width": 32})(
        images=_image(), return_tensors="pt"
    )["pixel_values"][0]
    torch.testing.assert_close(x, expected)
    # random weights of the same architecture; a local state dict
    rnd = load_model(str(tmp_path), random_init=True).model
    assert not torch.equal(rnd.classifier.weight, src.classifier.weight)
    torch.save(src.state_dict(), tmp_path / "w.pth")
    again = load_model(tmp_path, checkpoint=tmp_path / "w.pth").model
    assert torch.equal(again.classifier.weight, src.classifier.weight)


def test_hf_folder_without_processor_says_which_preprocessing_it_assumes(tmp_path) -> None:
    small_dinov2().save_pretrained(tmp_path)
    _, transform, _, desc = load_model(tmp_path)
    assert "mean = std = 0.5" in desc and transform(_image()).shape == (3, 32, 32)
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(tmp_path / "..")


def test_clip_folder_with_classes_is_a_zero_shot_classifier(tmp_path) -> None:
    clip = small_clip("clip")
    clip.save_pretrained(tmp_path)
    tok = tiny_tokenizer(tmp_path / "tok_src")
    tok.save_pretrained(tmp_path)
    transformers.CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    ).save_pretrained(tmp_path)
    (tmp_path / "classes.txt").write_text("cat\ndog\n\nbird\n")
    model, transform, names, desc = load_model(
        tmp_path, classes=tmp_path / "classes.txt", templates=["a {}."]
    )
    assert isinstance(model, ZeroShotClassifier) and names == ["cat", "dog", "bird"]
    assert "3 classes" in desc and "1 prompt template" in desc
    ref = ZeroShotClassifier.from_prompts(clip.eval(), tok, names, templates=["a {}."])
    torch.testing.assert_close(model.class_embeddings, ref.class_embeddings, atol=1e-6, rtol=0)
    x = transform(_image())[None]
    assert x.shape == (1, 3, 32, 32) and model(x).shape == (1, 3)
    with pytest.raises(ModelLoadError, match="pass classes="):
        load_model(tmp_path)
    with pytest.raises(ModelLoadError, match="repeated"):
        load_model(tmp_path, classes=["cat", "cat"])


OFFLINE_SCRIPT = """
import json
from captum_clsemb import ModelLoadError, load_model
out = {}
for key, spec, kw in [("timm", "timm:vit_tiny_patch16_224", {}),
                      ("hf", "hf:openai/clip-vit-base-patch32", {"classes": ["cat", "dog"]}),
                      ("hf_random", "hf:google/vit-base-patch16-224", {"random_init": True})]:
    try:
        load_model(spec, **kw)
        out[key] = "LOADED"
    except ModelLoadError as e:
        out[key] = str(e)
print(json.dumps(out))
"""


def test_without_network_one_line_says_how_to_pass_local_weights(tmp_path) -> None:
    # A fresh interpreter with the hub forced offline, an empty cache and an unreachable endpoint:
    # nothing can be downloaded, and each failure is one line naming the local alternatives.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "TORCH_HOME": str(tmp_path / "th"),
           "HF_ENDPOINT": "http://127.0.0.1:9", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}  # fmt: skip
    res = subprocess.run(
        [sys.executable, "-c", OFFLINE_SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    for key, msg in out.items():
        assert "\n" not in msg and "offline (HF_HUB_OFFLINE=1)" in msg, (key, msg)
    assert "checkpoint=" in out["timm"] and "random_init=True" in out["timm"]
    assert (
        "local Hugging Face model folder" in out["hf"]
        and "local Hugging Face model folder" in out["hf_random"]
    )
    assert not any((tmp_path / "hf").rglob("*.safetensors")) and not any((tmp_path / "hf").rglob("*.bin"))


def test_model_load_error_lives_in_errors() -> None:
    from captum_clsemb import errors, hub

    assert hub.ModelLoadError is errors.ModelLoadError is ModelLoadError
    assert issubclass(ModelLoadError, errors.InputValidationError)


def test_random_init_is_seeded_and_leaves_the_random_state_alone() -> None:
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = load_model("timm:vit_tiny_patch16_224", random_init=True).model
    assert torch.equal(torch.get_rng_state(), state)  # the caller's random stream is untouched
    b = load_model("timm:vit_tiny_patch16_224", random_init=True).model
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    torch.manual_seed(0)
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), ref.state_dict().values()))


def test_messages_name_the_options_as_the_caller_spells_them(tmp_path) -> None:
    words = {"checkpoint": "--checkpoint FILE", "random_init": "--random-init", "classes": "--classes FILE",
             "templates": "--templates FILE"}  # fmt: skip
    with pytest.raises(ModelLoadError, match="either --checkpoint FILE .* or --random-init, not both"):
        load_model("timm:vit_tiny_patch16_224", checkpoint="w.pth", random_init=True, option_names=words)
    with pytest.raises(ModelLoadError, match="--classes FILE and --templates FILE are for CLIP"):
        load_model("timm:vit_tiny_patch16_224", templates=["a {}."], option_names=words)
    small_clip("clip").save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match=r"pass --classes FILE \(class names"):
        load_model(tmp_path, option_names=words)


def test_classes_and_templates_are_checked_before_the_model_is_loaded(tmp_path, monkeypatch) -> None:
    small_clip("clip").save_pretrained(tmp_path)

    def no_load(*args, **kwargs):
        raise AssertionError("the weights were loaded before the options were checked")

    monkeypatch.setattr(transformers.CLIPModel, "from_pretrained", no_load)
    with pytest.raises(ModelLoadError, match="exactly one '{}'"):
        load_model(tmp_path, classes=["cat"], templates=["a photo of a cat"])
    with pytest.raises(ModelLoadError, match="classes file not found"):
        load_model(tmp_path, classes=tmp_path / "missing.txt")


def test_processor_config_without_a_size_resizes_to_the_model_input(tmp_path) -> None:
    # A preprocessor_config.json with only mean and std: before, the processor class's default
    # size (224) was used and the result interpolated back to 32 x 32.
    small_dinov2().save_pretrained(tmp_path)
    mean, std = [0.4, 0.45, 0.5], [0.2, 0.25, 0.3]
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_mean": mean, "image_std": std}))
    _, transform, _, _ = load_model(tmp_path)
    img = _image(40)  # 40 x 48
    expected = transformers.ViTImageProcessor(
        size={"height": 32, "width": 32}, image_mean=mean, image_std=std
    )(images=img, return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(transform(img), expected)
    assert transform.mean == pytest.approx(mean) and transform.std == pytest.approx(std)  # to draw the images

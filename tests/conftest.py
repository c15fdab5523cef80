"""Shared model builders: randomly initialised models of real architectures (no downloads), and one
bundled `clsemb report` run shared by the report tests."""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

import pytest
import timm
import torch
import transformers
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import ResPostBlock, VisionTransformer

SHARED_DATA = Path(
    os.environ.get("CLSEMB_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")
)


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist, give each worker its share of the CPU cores for torch's intra-op threads.

    Each worker (and every process it starts: notebook kernels, Sphinx, CLI runs) would otherwise
    use every core: ``-n 2`` on two cores runs four busy threads, and the spinning OpenMP threads
    more than double the CPU time of the suite. An ``OMP_NUM_THREADS`` set by the user is kept.
    """
    workerinput = getattr(config, "workerinput", None)
    if workerinput is None or "OMP_NUM_THREADS" in os.environ:
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = max(1, cores // int(workerinput["workercount"]))
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)


SMALL = dict(img_size=32, patch_size=8, num_classes=7, embed_dim=32, depth=3, num_heads=4, mlp_ratio=2.0)


def small_timm(**overrides) -> torch.nn.Module:
    """A small timm ViT (16 patches) with a given variant; random weights, eval mode."""
    torch.manual_seed(0)
    kw = {**SMALL, **overrides}
    cls = kw.pop("cls", VisionTransformer)
    return cls(**kw).eval()


# Small versions of every supported timm variant.
TIMM_VARIANTS = {
    "cls_token": lambda: small_timm(),
    "gap_fc_norm": lambda: small_timm(global_pool="avg", class_token=False),
    "gap_respost": lambda: small_timm(
        global_pool="avg", class_token=False, block_fn=ResPostBlock, init_values=0.5
    ),
    "gap_with_cls": lambda: small_timm(global_pool="avg"),
    "registers": lambda: small_timm(reg_tokens=4),
    "registers_gap": lambda: small_timm(reg_tokens=2, class_token=False, global_pool="avg"),
    "layer_scale": lambda: small_timm(init_values=0.3),
    "no_qkv_bias": lambda: small_timm(qkv_bias=False),
    "no_embed_class": lambda: small_timm(no_embed_class=True, init_values=0.3),
    "distilled": lambda: small_timm(cls=VisionTransformerDistilled),
}

# Real architectures from the timm registry (random weights).
TIMM_REAL = [
    "vit_base_patch32_224",
    "vit_base_patch16_rpn_224",
    "deit_tiny_distilled_patch16_224",
    "vit_base_patch16_224_miil",
    "vit_small_patch16_224",
    "vit_medium_patch16_gap_256",
    "vit_base_patch16_reg4_gap_256",
    "deit3_small_patch16_224",
]


def real_timm(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False).eval()


def small_hf(kind: str = "vit", **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    kw = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
              intermediate_size=64, num_labels=7, layer_norm_eps=1e-6)  # fmt: skip
    kw.update(overrides)
    if kind == "vit":
        return transformers.ViTForImageClassification(transformers.ViTConfig(**kw)).eval()
    cfg = transformers.DeiTConfig(**kw)
    if kind == "deit":
        return transformers.DeiTForImageClassification(cfg).eval()
    return transformers.DeiTForImageClassificationWithTeacher(cfg).eval()


HF_VARIANTS = {
    "hf_vit": lambda: small_hf("vit"),
    "hf_vit_no_qkv_bias": lambda: small_hf("vit", qkv_bias=False),
    "hf_deit": lambda: small_hf("deit"),
    "hf_deit_teacher": lambda: small_hf("deit_teacher"),
}


def images(n: int = 3, size: int = 32, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g)


def model_logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = (
            model(x) if not isinstance(model, transformers.PreTrainedModel) else model(pixel_values=x).logits
        )
    return out


def needs_shared_data() -> pytest.MarkDecorator:
    return pytest.mark.skipif(not SHARED_DATA.exists(), reason="../shared/data is absent")


# -- more ViT families: small random models of the real architectures --------------------------------
def spread(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Re-draw weights at unit scale (logits of order 1-10) so that exactness checks are not trivial:
    linear/conv weights ~ N(0, 1/fan_in), embeddings ~ N(0, 0.5), 1-D parameters (biases, norm gains,
    layer scale) and relative-position tables get N(0, 0.2) / N(0, 0.5) noise. Learned RoPE frequencies
    and logit scales are left as initialised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 0 or "freqs" in name or "logit_scale" in name:
                continue
            noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
            if (
                "table" in name
                or "token" in name
                or "pos" in name
                or "class_embedding" in name
                or "probe" in name
            ):
                p.copy_(noise * 0.5)
            elif p.dim() >= 2:
                p.copy_(noise * p[0].numel() ** -0.5)
            else:
                p.add_(noise * 0.2)
    return model.eval()


FAM = dict(img_size=32, patch_size=8, num_classes=7, embed_dim=32, depth=3, num_heads=4)
HF_FAM = dict(
    image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_labels=7
)


def small_eva(**kw) -> torch.nn.Module:
    from timm.models.eva import Eva

    torch.manual_seed(0)
    return spread(Eva(**{**FAM, **kw}))


def small_beit(**kw) -> torch.nn.Module:
    from timm.models.beit import Beit

    torch.manual_seed(0)
    return spread(Beit(**{**FAM, **kw}))


def small_hf_beit(**kw) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.BeitConfig(**{**HF_FAM, "intermediate_size": 64, **kw})
    return spread(transformers.BeitForImageClassification(cfg))


def small_dinov2(registers: int = 0, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    if registers:
        cfg = transformers.Dinov2WithRegistersConfig(
            **{**HF_FAM, "mlp_ratio": 2, **kw}, num_register_tokens=registers
        )
        return spread(transformers.Dinov2WithRegistersForImageClassification(cfg))
    cfg = transformers.Dinov2Config(**{**HF_FAM, "mlp_ratio": 2, **kw})
    return spread(transformers.Dinov2ForImageClassification(cfg))


CLIP_VISION = dict(
    image_size=32,
    patch_size=8,
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    intermediate_size=64,
)
CLIP_TEXT = dict(
    vocab_size=64,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=16,
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=1,
)


def small_clip(kind: str = "clip", vision: dict | None = None) -> torch.nn.Module:
    """A random CLIPModel / SiglipModel (vision tower 32x32, patch 8) with a tiny text tower."""
    torch.manual_seed(0)
    v = {**CLIP_VISION, **(vision or {})}
    if kind == "clip":
        model = transformers.CLIPModel(
            transformers.CLIPConfig(vision_config=v, text_config=CLIP_TEXT, projection_dim=24)
        )
    else:
        model = transformers.SiglipModel(transformers.SiglipConfig(vision_config=v, text_config=CLIP_TEXT))
    model = spread(model)
    with torch.no_grad():
        model.logit_scale.fill_(1.5)  # exp(1.5) ~ 4.5
        if kind == "siglip":
            model.logit_bias.fill_(-2.0)
    return model


def small_zero_shot(kind: str = "clip", num_classes: int = 7, vision: dict | None = None) -> torch.nn.Module:
    from captum_clsemb.zero_shot import ZeroShotClassifier

    model = small_clip(kind, vision)
    dim = model.visual_projection.out_features if kind == "clip" else model.config.vision_config.hidden_size
    g = torch.Generator().manual_seed(3)
    return ZeroShotClassifier(
        model, torch.randn(num_classes, dim, generator=g), [f"class {i}" for i in range(num_classes)]
    )


# family -> small random model; every adapter family and its main variants
FAMILY_VARIANTS = {
    # timm Eva: EVA-02 (RoPE 'cat', SwiGLU, average pooling with the class token kept), RoPE ViTs
    "eva02_avg": lambda: small_eva(
        mlp_ratio=4 * 2 / 3, swiglu_mlp=True, use_rot_pos_emb=True, ref_feat_shape=(4, 4)
    ),
    "eva02_token_scale_mlp": lambda: small_eva(
        global_pool="token",
        qkv_fused=False,
        mlp_ratio=4 * 2 / 3,
        swiglu_mlp=True,
        scale_mlp=True,
        use_rot_pos_emb=True,
    ),
    "vit_rope_token": lambda: small_eva(
        attn_type="rope",
        init_values=0.3,
        global_pool="token",
        use_abs_pos_emb=False,
        use_rot_pos_emb=True,
        rope_grid_indexing="xy",
        rope_temperature=100.0,
    ),
    "vit_rope_mixed": lambda: small_eva(
        attn_type="rope",
        init_values=0.3,
        global_pool="token",
        use_abs_pos_emb=False,
        use_rot_pos_emb=True,
        rope_grid_indexing="xy",
        rope_temperature=10.0,
        rope_type="mixed",
    ),
    "vit_rope_reg_gap": lambda: small_eva(
        init_values=0.3, class_token=False, num_reg_tokens=1, use_rot_pos_emb=True, use_abs_pos_emb=False
    ),
    "eva_post_norm_glu": lambda: small_eva(use_post_norm=True, swiglu_mlp=True, use_rot_pos_emb=True),
    "vit_rope_dinov3_registers": lambda: small_eva(
        attn_type="rope",
        use_rot_pos_emb=True,
        rope_type="dinov3",
        use_abs_pos_emb=False,
        global_pool="token",
        num_reg_tokens=2,
        qk_norm=True,
        init_values=0.2,
    ),  # DINOv3-style (timm's vit_*_dinov3 with a head)
    # timm Beit
    "beit_avg": lambda: small_beit(use_rel_pos_bias=True, init_values=0.2),
    "beit_token_shared": lambda: small_beit(
        use_shared_rel_pos_bias=True, use_abs_pos_emb=True, global_pool="token"
    ),
    "beit_swiglu": lambda: small_beit(
        use_rel_pos_bias=True, swiglu_mlp=True, scale_mlp=True, init_values=0.2
    ),
    # Hugging Face BEiT, DINOv2
    "hf_beit_mean": lambda: small_hf_beit(use_relative_position_bias=True),
    "hf_beit_cls_shared": lambda: small_hf_beit(
        use_shared_relative_position_bias=True, use_mean_pooling=False, use_absolute_position_embeddings=True
    ),
    "hf_dinov2": lambda: small_dinov2(),
    "hf_dinov2_swiglu": lambda: small_dinov2(use_swiglu_ffn=True),
    "hf_dinov2_registers": lambda: small_dinov2(registers=4),
    # zero-shot CLIP / SigLIP
    "clip_zero_shot": lambda: small_zero_shot("clip"),
    "siglip_zero_shot": lambda: small_zero_shot("siglip"),
}


def tiny_tokenizer(tmp_path):
    """A CLIP BPE tokenizer over lowercase letters, '.' and two merges, written to tmp_path (no download)."""
    import json
    import string

    from transformers import CLIPTokenizer

    tmp_path.mkdir(parents=True, exist_ok=True)

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in string.ascii_lowercase + ".":
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    vocab["ca"] = len(vocab)
    vocab["cat</w>"] = len(vocab)
    assert len(vocab) <= CLIP_TEXT["vocab_size"]
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\nc a\nca t</w>\n")
    return CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"), model_max_length=16)


# -- one `clsemb report` on the bundled model and images, shared by the report tests ---------------------
# The first 41 bundled files (20 airplanes, 20 automobiles, 1 bird), 6 of them for the perturbation
# comparison, in batches of 8 (with two processes the shards are uneven and the batches do not line up
# with them). Its content, its page in a browser, its progress bars, its Hugging Face twin and its
# two-process torchrun twin are checked by tests marked `xdist_group(BUNDLED_REPORT)`: with
# `--dist loadgroup` (pyproject.toml) pytest-xdist runs them in one worker, which computes the report once.
BUNDLED_REPORT = "bundled_report"
BUNDLED_REPORT_ARGS = ["--max-images", "41", "--compare-images", "6", "--batch-size", "8"]


@pytest.fixture(scope="session")
def bundled_report(tmp_path_factory) -> dict:
    """``clsemb report`` with :data:`BUNDLED_REPORT_ARGS` and progress bars, run in this process.

    Returns ``out`` (the folder), ``json``, ``html``, ``stderr`` (what the progress bars wrote) and
    ``bars``: ``(name, total, done)`` of every progress bar when it closed.
    """
    from captum_clsemb.cli import report as report_module
    from captum_clsemb.cli.main import main

    out = tmp_path_factory.mktemp("bundled_report") / "out"
    bars = []
    real_close = report_module._Bar.close

    def close(bar) -> None:  # every bar, when it ends: its name, its total and how far it got
        bars.append((bar.bar.desc, bar.bar.total, bar.bar.n))
        real_close(bar)

    stderr = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stderr(stderr):
        patch.setattr(report_module._Bar, "close", close)
        assert main(["report", *BUNDLED_REPORT_ARGS, "--out", str(out)]) == 0
    return {
        "out": out,
        "json": json.loads((out / "report.json").read_text()),
        "html": (out / "report.html").read_text(encoding="utf-8"),
        "stderr": stderr.getvalue(),
        "bars": bars,
    }

"""More ViT families: EVA-02 / RoPE ViTs, BEiT (timm, HF), DINOv2 (HF), CLIP / SigLIP zero-shot.

Exactness of the decomposed forward, the model left untouched, the lens at the last block,
dropped tokens keeping their own rotary / relative positions, and the errors of unsupported
variants.
"""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
import transformers
from conftest import (
    FAMILY_VARIANTS,
    images,
    small_beit,
    small_clip,
    small_dinov2,
    small_eva,
    small_hf_beit,
    spread,
)

from captum_clsemb import (
    BlockwiseIdentifiability,
    InputValidationError,
    UnsupportedModelError,
    ZeroShotClassifier,
)
from captum_clsemb.adapters import (
    HFBeitAdapter,
    HFDinov2Adapter,
    TimmBeitAdapter,
    TimmEvaAdapter,
    ZeroShotAdapter,
    adapt,
)
from captum_clsemb.trace import trace

ATOL = 1e-5


def expected_adapter(name: str) -> type:
    if name.startswith(("eva", "vit_rope")):
        return TimmEvaAdapter
    if name.startswith("beit"):
        return TimmBeitAdapter
    if name.startswith("hf_beit"):
        return HFBeitAdapter
    if name.startswith("hf_dinov2"):
        return HFDinov2Adapter
    return ZeroShotAdapter


# variants whose classifier reads the class token alone: the lens at the last block is the head
CLASS_TOKEN_HEADS = [
    "eva02_token_scale_mlp",
    "vit_rope_token",
    "vit_rope_mixed",
    "vit_rope_dinov3_registers",
    "beit_token_shared",
    "hf_beit_cls_shared",
    "clip_zero_shot",
]
MEAN_POOLED = [
    "eva02_avg",
    "vit_rope_reg_gap",
    "beit_avg",
    "beit_swiglu",
    "hf_beit_mean",
    "eva_post_norm_glu",
]


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", sorted(FAMILY_VARIANTS))
def test_family_decomposed_forward_is_exact_and_leaves_model_untouched(name: str) -> None:
    model = FAMILY_VARIANTS[name]()
    adapter = adapt(model)
    assert type(adapter) is expected_adapter(name)
    x = images(4)
    before = _state(model)
    # train mode (all dropouts are 0, so the outputs agree) must come back as it was, per module
    model.train()
    flags = {n: m.training for n, m in model.named_modules()}
    attn_impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    fused = [getattr(m, "fused_attn", None) for m in model.modules()]
    with torch.no_grad():
        model.eval()
        ref = adapter.model_logits(x)
        model.train()
    out = trace(model, x).logits
    diff = (out - ref).abs().max().item()
    print(
        f"\n[family exactness] {name}: max |trace - model| = {diff:.3e} (logit scale {ref.abs().max():.2f})"
    )
    assert out.shape == ref.shape == (4, adapter.num_classes)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    assert ref.abs().max() > 0.5  # logits of order 1: the tolerance is a real test
    assert {n: m.training for n, m in model.named_modules()} == flags
    after = _state(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert getattr(getattr(model, "config", None), "_attn_implementation", None) == attn_impl
    assert [getattr(m, "fused_attn", None) for m in model.modules()] == fused


def _real_models() -> dict[str, callable]:
    """Registry / default-config architectures at full size, random weights at unit scale (spread)."""

    def timm_real(name: str):
        def build():
            torch.manual_seed(0)
            return spread(timm.create_model(name, pretrained=False))

        return build

    def hf_real(cfg_cls, model_cls, **kw):
        def build():
            torch.manual_seed(0)
            return spread(model_cls(cfg_cls(**kw)))

        return build

    def zero_shot_real(kind: str, **vision):
        def build():
            from conftest import CLIP_TEXT

            torch.manual_seed(0)
            if kind == "clip":
                m = transformers.CLIPModel(
                    transformers.CLIPConfig(vision_config=vision, text_config=CLIP_TEXT)
                )
                dim = m.visual_projection.out_features
            else:
                m = transformers.SiglipModel(
                    transformers.SiglipConfig(vision_config=vision, text_config=CLIP_TEXT)
                )
                dim = vision["hidden_size"]
            spread(m)
            with torch.no_grad():
                m.logit_scale.fill_(2.3)
                if kind == "siglip":
                    m.logit_bias.fill_(-1.0)
            return ZeroShotClassifier(m, torch.randn(10, dim, generator=torch.Generator().manual_seed(1)))

        return build

    vit_b16 = dict(image_size=224, patch_size=16, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                   intermediate_size=3072)  # fmt: skip
    return {
        "timm:eva02_tiny_patch14_336": timm_real("eva02_tiny_patch14_336"),
        "timm:vit_small_patch16_rope_224": timm_real("vit_small_patch16_rope_224"),
        "timm:vit_small_patch16_rope_mixed_224": timm_real("vit_small_patch16_rope_mixed_224"),
        "timm:vit_medium_patch16_rope_reg1_gap_256": timm_real("vit_medium_patch16_rope_reg1_gap_256"),
        "timm:beitv2_base_patch16_224": timm_real("beitv2_base_patch16_224"),
        "hf:BEiT-B/16 (relative position bias, mean pooling)": hf_real(
            transformers.BeitConfig,
            transformers.BeitForImageClassification,
            use_relative_position_bias=True,
            num_labels=1000,
        ),  # fmt: skip
        "hf:DINOv2-S/14 with registers": hf_real(
            transformers.Dinov2WithRegistersConfig,
            transformers.Dinov2WithRegistersForImageClassification,
            hidden_size=384,
            num_hidden_layers=12,
            num_attention_heads=6,
            image_size=224,
            num_labels=1000,
        ),  # fmt: skip
        "hf:CLIP ViT-B/16": zero_shot_real("clip", **vit_b16),
        "hf:SigLIP B/16": zero_shot_real("siglip", **vit_b16),
    }


REAL = _real_models()


@pytest.mark.parametrize("name", list(REAL))
def test_family_decomposed_forward_is_exact_real_size(name: str) -> None:
    model = REAL[name]()
    adapter = adapt(model)
    x = torch.randn(2, 3, *adapter.img_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = adapter.model_logits(x)
    out = trace(model, x).logits
    diff = (out - ref).abs().max().item()
    print(
        f"\n[family exactness, real size] {name}: max |trace - model| = {diff:.3e} (logit std {ref.std():.2f})"
    )
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    assert ref.std() > 0.1  # logits spread out: the tolerance is a real test


# -- the lens at the last block ------------------------------------------------------------------------
@pytest.mark.parametrize("name", CLASS_TOKEN_HEADS)
def test_last_block_class_token_lens_is_the_head(name: str) -> None:
    model = FAMILY_VARIANTS[name]()
    adapter = adapt(model)
    x = images(6)
    tr = trace(model, x, record=["resid_post"])
    cls = tr.cache["resid_post", -1][:, adapter.class_token_index]
    torch.testing.assert_close(adapter.project(cls), tr.logits, atol=ATOL, rtol=0)
    scores = BlockwiseIdentifiability(model).attribute(x)  # target None: the model's own prediction
    assert (scores[:, -1, adapter.class_token_index] == 1).all()
    assert adapter.reads_class_token


@pytest.mark.parametrize("name", ["eva02_avg", "beit_avg", "hf_beit_mean", "vit_rope_reg_gap"])
def test_mean_pooled_lens_of_the_mean_token_is_the_head(name: str) -> None:
    # Mean pooling comes before fc_norm / the pooler layernorm (the final norm is identity):
    # the lens of the mean of the patch states is the model's prediction.
    model = FAMILY_VARIANTS[name]()
    adapter = adapt(model)
    x = images(3)
    tr = trace(model, x, record=["resid_post"])
    mean = tr.cache["resid_post", -1][:, adapter.num_prefix_tokens :].mean(1)
    torch.testing.assert_close(adapter.project(mean), tr.logits, atol=ATOL, rtol=0)
    assert adapter.pooling == "avg" and not adapter.reads_class_token


@pytest.mark.parametrize("registers", [0, 4])
def test_dinov2_lens_is_the_head_on_the_token_in_both_halves(registers: int) -> None:
    model = small_dinov2(registers=registers)
    adapter = adapt(model)
    d = adapter.embed_dim
    clf = model.classifier
    ln = model.dinov2.layernorm if registers == 0 else model.dinov2_with_registers.layernorm
    s = torch.randn(2, 5, d)
    # lens(x) = classifier([LN x, LN x]): the token in both halves of the head's input
    torch.testing.assert_close(adapter.project(s), clf(torch.cat([ln(s), ln(s)], -1)), atol=ATOL, rtol=0)
    torch.testing.assert_close(adapter.class_embedding, clf.weight[:, :d] + clf.weight[:, d:])
    torch.testing.assert_close(
        adapter.project(s, apply_norm=False, include_bias=False),
        s @ adapter.class_embedding.T,
        atol=ATOL,
        rtol=0,
    )
    # the model's logits: W_c LN(cls) + W_p mean_j LN(patch_j) + b, registers excluded from the mean
    x = images(3)
    tr = trace(model, x, record=["resid_post"])
    last = ln(tr.cache["resid_post", -1])
    p = 1 + registers
    assert adapter.prefix_tokens == ("cls",) + ("reg",) * registers
    manual = last[:, 0] @ clf.weight[:, :d].T + last[:, p:].mean(1) @ clf.weight[:, d:].T + clf.bias
    torch.testing.assert_close(tr.logits, manual, atol=ATOL, rtol=0)
    # when class token and patch mean agree, the lens equals the head exactly (uniform sequence)
    uniform = tr.cache["resid_post", -1][:, :1].expand(-1, adapter.num_tokens, -1)
    torch.testing.assert_close(adapter.project(uniform[:, 0]), adapter.classify(uniform), atol=ATOL, rtol=0)


def test_siglip_lens_is_the_pooling_head_on_a_uniform_sequence() -> None:
    model = FAMILY_VARIANTS["siglip_zero_shot"]()
    adapter = adapt(model)
    assert adapter.prefix_tokens == () and adapter.pooling == "map" and not adapter.has_class_token
    s = torch.randn(3, 5, adapter.embed_dim)
    lens = adapter.project(s)
    for t in range(5):  # the attention-pooling head over 9 copies of token t equals the lens of t
        seq = s[:, t : t + 1].expand(-1, 9, -1)
        torch.testing.assert_close(lens[:, t], adapter.classify(seq), atol=ATOL, rtol=0)
    assert (adapter.class_bias == model.model.logit_bias).all()
    torch.testing.assert_close(
        adapter.project(s) - adapter.project(s, include_bias=False), adapter.class_bias.expand(3, 5, -1)
    )


def test_clip_class_embedding_is_text_matrix_through_visual_projection() -> None:
    model = FAMILY_VARIANTS["clip_zero_shot"]()
    adapter = adapt(model)
    t_n = F.normalize(model.class_embeddings, dim=-1)
    e = model.model.logit_scale.exp() * t_n @ model.model.visual_projection.weight
    torch.testing.assert_close(adapter.class_embedding, e)
    assert adapter.class_bias is None and adapter.head.weight.shape == (7, adapter.embed_dim)
    s = torch.randn(4, adapter.embed_dim)
    torch.testing.assert_close(adapter.project(s, apply_norm=False), s @ e.T, atol=ATOL, rtol=0)
    # the lens: post_layernorm, visual projection, cosine with the class texts, times the logit scale
    img = model.model.visual_projection(model.model.vision_model.post_layernorm(s))
    manual = model.model.logit_scale.exp() * F.normalize(img, dim=-1) @ t_n.T
    torch.testing.assert_close(adapter.project(s), manual, atol=ATOL, rtol=0)


# -- dropped tokens keep their own positions ----------------------------------------------------------
@pytest.mark.parametrize(
    "kw",
    [
        dict(mlp_ratio=4 * 2 / 3, swiglu_mlp=True, use_rot_pos_emb=True, ref_feat_shape=(4, 4)),
        dict(
            attn_type="rope",
            init_values=0.3,
            global_pool="token",
            use_abs_pos_emb=False,
            use_rot_pos_emb=True,
            rope_grid_indexing="xy",
            rope_temperature=10.0,
            rope_type="mixed",
        ),  # fmt: skip
        dict(
            init_values=0.3, class_token=False, num_reg_tokens=1, use_rot_pos_emb=True, use_abs_pos_emb=False
        ),
    ],
    ids=["eva02_rope_cat", "rope_mixed", "rope_registers_gap"],
)
def test_eva_keep_tokens_matches_the_models_own_patch_dropout(kw: dict) -> None:
    # Eva drops patches itself (patch_drop_rate, training only) and gathers the rotary
    # embedding of the kept patches: the reference for trace(keep_tokens=...).
    model = small_eva(patch_drop_rate=0.5, **kw)
    x = images(3)
    adapter = adapt(model)
    p = adapter.num_patches
    model.patch_drop.train()  # only the patch dropout; every other dropout is 0 anyway
    try:
        torch.manual_seed(123)
        with torch.no_grad():
            ref = model(x)
        torch.manual_seed(123)  # the same draw as timm's patch_dropout_forward
        keep = torch.argsort(torch.randn(3, p), dim=-1)[:, : max(1, int(p * 0.5))]
    finally:
        model.patch_drop.eval()
    out = trace(model, x, keep_tokens=keep).logits
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    full = trace(model, x).logits
    assert (out - full).abs().max() > 1e-3  # dropping tokens does change the prediction


def _beit_bias_reference(table: torch.Tensor, grid: tuple[int, int], index: torch.Tensor) -> torch.Tensor:
    """BEiT's relative position bias between the kept tokens, from its definition (not the model's
    index buffer): patch pairs read the table at their (dy, dx) offset, the class token has three
    entries of its own (class->patch, patch->class, class->class)."""
    h, w = grid
    num = (2 * h - 1) * (2 * w - 1)
    n, t = index.shape
    out = torch.empty(n, table.shape[1], t, t)
    for e in range(n):
        for i, a in enumerate(index[e].tolist()):
            for j, b in enumerate(index[e].tolist()):
                if a == 0 and b == 0:
                    k = num + 2
                elif a == 0:
                    k = num
                elif b == 0:
                    k = num + 1
                else:
                    (ya, xa), (yb, xb) = divmod(a - 1, w), divmod(b - 1, w)
                    k = (ya - yb + h - 1) * (2 * w - 1) + (xa - xb + w - 1)
                out[e, :, i, j] = table[k]
    return out


def _keep(n: int, p: int, k: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    return torch.stack([torch.randperm(p, generator=g)[:k] for _ in range(n)])


@pytest.mark.parametrize("name", ["beit_avg", "hf_beit_mean", "beit_token_shared", "hf_beit_cls_shared"])
def test_beit_relative_bias_of_kept_tokens_follows_their_positions(name: str) -> None:
    model = FAMILY_VARIANTS[name]()
    adapter = adapt(model)
    keep = _keep(2, adapter.num_patches, 7)
    tr = trace(model, images(2), keep_tokens=keep)
    index = tr.token_index
    assert index.shape == (2, 8) and (index[:, 0] == 0).all()
    if isinstance(adapter, TimmBeitAdapter):
        tables = [model.rel_pos_bias.relative_position_bias_table] if model.rel_pos_bias is not None else []
        own = [blk.attn.relative_position_bias_table for blk in model.blocks]
    else:
        shared = model.beit.shared_position_bias
        tables = [shared.relative_position_bias_table] if shared is not None else []
        own = [layer.relative_position_bias for layer in model.beit.layers]
        own = [None if m is None else m.relative_position_bias_table for m in own]
    for b in range(adapter.num_blocks):
        parts = [*tables, *([own[b]] if own[b] is not None else [])]
        expected = sum(_beit_bias_reference(t, adapter.grid_size, index) for t in parts)
        torch.testing.assert_close(adapter.block(b).attn_bias(index), expected, atol=1e-6, rtol=0)


def test_beit_keep_tokens_matches_the_models_blocks_on_the_kept_sequence() -> None:
    # Shared relative position bias: the model's own blocks take the bias as an argument, so they
    # run on the kept sequence with the bias of the kept positions (from the definition above).
    model = FAMILY_VARIANTS["beit_token_shared"]()
    adapter = adapt(model)
    x = images(2)
    keep = _keep(2, adapter.num_patches, 9)
    index = torch.cat([torch.zeros(2, 1, dtype=torch.long), keep.sort(1).values + 1], 1)
    with torch.no_grad():
        h = adapter.embed(x).gather(1, index[..., None].expand(-1, -1, adapter.embed_dim))
        bias = _beit_bias_reference(model.rel_pos_bias.relative_position_bias_table, adapter.grid_size, index)
        for blk in model.blocks:
            h = blk(h, shared_rel_pos_bias=bias)
        ref = model.forward_head(model.norm(h))
    torch.testing.assert_close(trace(model, x, keep_tokens=keep).logits, ref, atol=ATOL, rtol=0)


# -- unsupported variants say why -------------------------------------------------------------------
def _gated(model: torch.nn.Module) -> torch.nn.Module:
    """A sigmoid gate on the attention output (Sapiens2-style), which reads the block input."""
    attn = model.blocks[1].attn
    attn.gate = torch.nn.Linear(model.embed_dim, attn.num_heads * attn.head_dim)
    return model


@pytest.mark.parametrize(
    "factory, match",
    [
        (lambda: small_eva(global_pool="map"), "attention"),
        (lambda: small_eva(global_pool="avgmax"), "linear lens"),
        (lambda: small_eva(num_classes=0), "linear classifier head"),
        (lambda: _gated(small_eva(attn_type="rope", use_rot_pos_emb=True)), "gated attention"),
        (lambda: small_beit(num_classes=0), "linear classifier head"),
        (lambda: small_dinov2(num_labels=0), "linear classifier"),
        (lambda: small_clip("clip"), "ZeroShotClassifier"),
        (lambda: small_clip("siglip"), "ZeroShotClassifier"),
    ],
)
def test_unsupported_family_variants_raise_saying_why(factory, match: str) -> None:
    model = factory()
    with pytest.raises(UnsupportedModelError, match=match) as err:
        adapt(model)
    assert type(model).__name__ in str(err.value)


def test_family_structure() -> None:
    a = adapt(FAMILY_VARIANTS["vit_rope_reg_gap"]())
    assert a.prefix_tokens == ("reg",) and a.pooling == "avg" and a.grid_size == (4, 4)
    assert (a.num_blocks, a.num_heads, a.head_dim, a.embed_dim, a.num_classes) == (3, 4, 8, 32, 7)
    assert adapt(FAMILY_VARIANTS["hf_dinov2_registers"]()).num_tokens == 1 + 4 + 16
    hf = adapt(
        small_hf_beit(id2label={i: f"c{i}" for i in range(7)}, label2id={f"c{i}": i for i in range(7)})
    )
    assert hf.class_names == [f"c{i}" for i in range(7)] and hf.pooling == "avg"
    clip = adapt(FAMILY_VARIANTS["clip_zero_shot"]())
    assert clip.class_names == [f"class {i}" for i in range(7)] and clip.prefix_tokens == ("cls",)
    assert adapt(spread(small_beit(global_pool="token"))).reads_class_token


def test_lrp_missing_rules_name_the_parts_without_a_rule() -> None:
    from conftest import HF_VARIANTS, TIMM_VARIANTS

    for build in [*TIMM_VARIANTS.values(), *HF_VARIANTS.values()]:
        assert adapt(build()).lrp_missing_rules() == []
    # rotary embeddings, relative position biases, gated MLPs and the DINOv2 / CLIP heads have rules
    rules = {name: adapt(build()).lrp_missing_rules() for name, build in FAMILY_VARIANTS.items()}
    assert all(not missing for name, missing in rules.items() if name != "siglip_zero_shot")
    assert rules["siglip_zero_shot"] == [
        "the zero-shot head's attention-pooling head (attention over all tokens, then an MLP)"
    ]
    gqa = small_eva(attn_type="rope", num_kv_heads=2, qkv_fused=False, use_rot_pos_emb=True, global_pool="token",
                    use_abs_pos_emb=False)  # fmt: skip
    assert ["grouped-query attention" in m for m in adapt(gqa).lrp_missing_rules()] == [True]


def _head_input(adapter, normed: torch.Tensor) -> torch.Tensor:
    """What the head reads (class token, patch mean or both), after post_pool_norm, by adapter.pooling."""
    p = adapter.num_prefix_tokens
    parts = {"token": ["cls"], "avg": ["mean"], "cls+avg": ["cls", "mean"]}[adapter.pooling]
    read = [normed[:, adapter.class_token_index] if r == "cls" else normed[:, p:].mean(1) for r in parts]
    return torch.cat([adapter.post_pool_norm(v) for v in read], -1)


@pytest.mark.parametrize("name", sorted(FAMILY_VARIANTS))
def test_head_path_reproduces_the_logits(name: str) -> None:
    # the chain of linear maps and constant factors that LRP walks back is the model's own head
    from captum_clsemb.adapters.base import ConstantFactor

    model = FAMILY_VARIANTS[name]()
    adapter = adapt(model)
    if name == "siglip_zero_shot":
        assert adapter.head_path is None and adapter.head_structure
        return
    x = images(3)
    tr = trace(model, x, record=["resid_post"])
    h = _head_input(adapter, adapter.pre_pool_norm(tr.cache["resid_post", -1]))
    kinds = []
    for step in adapter.head_path:
        kinds.append(isinstance(step, ConstantFactor))
        if not kinds[-1]:
            assert step.weight.shape[1] == h.shape[-1]
        h = step(h)
    torch.testing.assert_close(h, tr.logits, atol=ATOL, rtol=0)
    assert kinds == ([False, True, False, True] if name == "clip_zero_shot" else [False])


def test_messages_say_what_the_head_reads() -> None:
    siglip = adapt(FAMILY_VARIANTS["siglip_zero_shot"]())
    assert siglip.model_name == "ZeroShotClassifier over SiglipModel"
    with pytest.raises(
        InputValidationError,
        match="ZeroShotClassifier over SiglipModel has no class token: its head reads an attention-pooled "
        "summary of all tokens \\(attention-pooling head\\)",
    ):
        _ = siglip.class_token_index
    gap = adapt(FAMILY_VARIANTS["vit_rope_reg_gap"]())
    with pytest.raises(
        InputValidationError, match="Eva has no class token: its head reads the mean of the patch"
    ):
        _ = gap.class_token_index
    dinov2 = adapt(FAMILY_VARIANTS["hf_dinov2_registers"]())
    assert dinov2.class_token_index == 0
    assert dinov2.head_reads == "the class token concatenated with the mean of the patch tokens"

"""Traced forward: recordings against hooks, interventions, token dropping, model left untouched."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import HF_VARIANTS, TIMM_VARIANTS, images, model_logits, small_hf, small_timm

from captum_clsemb import InputValidationError
from captum_clsemb.adapters import adapt
from captum_clsemb.trace import RECORDABLE, run_block, trace
from captum_clsemb.trace import forward as forward_module


def test_records_every_kind_with_shapes() -> None:
    model = small_timm()
    tr = trace(model, images(2), record="all")
    assert set(tr.cache.keys()) == {f"blocks.{b}.{k}" for b in range(3) for k in RECORDABLE}
    n, t, d, h = 2, 17, 32, 4
    assert tr.cache["resid_post", 0].shape == (n, t, d)
    assert tr.cache["attn_probs", 1].shape == (n, h, t, t)
    assert tr.cache["attn_keys", 2].shape == (n, t, d)
    assert tr.cache["mlp_keys", 2].shape == (n, t, 64)
    assert tr.cache.stack("resid_pre").shape == (n, 3, t, d)


def test_records_only_what_is_asked() -> None:
    tr = trace(small_timm(), images(2), record=["attn_probs"])
    assert tr.cache.keys() == [f"blocks.{b}.attn_probs" for b in range(3)]
    with pytest.raises(KeyError, match="was not recorded"):
        tr.cache["resid_post", 0]
    assert len(trace(small_timm(), images(2)).cache) == 0


def test_residual_decomposition_is_consistent() -> None:
    for model in (TIMM_VARIANTS["gap_respost"](), TIMM_VARIANTS["layer_scale"](), HF_VARIANTS["hf_vit"]()):
        c = trace(model, images(2), record="all").cache
        for b in range(3):
            torch.testing.assert_close(c["resid_pre", b] + c["attn_out", b], c["resid_mid", b])
            torch.testing.assert_close(c["resid_mid", b] + c["mlp_out", b], c["resid_post", b])
            if b:
                torch.testing.assert_close(c["resid_pre", b], c["resid_post", b - 1])


def test_timm_recordings_equal_hooks_on_unfused_model() -> None:
    # Independent computation: timm's own non-fused attention and module hooks.
    model = TIMM_VARIANTS["layer_scale"]()
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for b, blk in enumerate(model.blocks):
        blk.attn.fused_attn = False
        handles.append(
            blk.attn.attn_drop.register_forward_hook(lambda m, i, o, b=b: seen.__setitem__(f"p{b}", o))
        )
        handles.append(
            blk.attn.proj.register_forward_hook(lambda m, i, o, b=b: seen.__setitem__(f"z{b}", i[0]))
        )
        handles.append(blk.mlp.act.register_forward_hook(lambda m, i, o, b=b: seen.__setitem__(f"k{b}", o)))
        handles.append(blk.ls1.register_forward_hook(lambda m, i, o, b=b: seen.__setitem__(f"a{b}", o)))
        handles.append(blk.ls2.register_forward_hook(lambda m, i, o, b=b: seen.__setitem__(f"m{b}", o)))
        handles.append(blk.register_forward_hook(lambda m, i, o, b=b: seen.__setitem__(f"r{b}", o)))
    x = images(2)
    model_logits(model, x)
    for h in handles:
        h.remove()
    c = trace(model, x, record="all").cache
    for b in range(3):
        for key, kind in (("p", "attn_probs"), ("z", "attn_keys"), ("k", "mlp_keys"), ("a", "attn_out"),
                          ("m", "mlp_out"), ("r", "resid_post")):  # fmt: skip
            torch.testing.assert_close(c[kind, b], seen[f"{key}{b}"], atol=1e-6, rtol=1e-5)


def test_hf_recordings_equal_output_attentions_and_hidden_states() -> None:
    model = small_hf("vit", attn_implementation="eager")
    x = images(2)
    with torch.no_grad():
        out = model(pixel_values=x, output_attentions=True, output_hidden_states=True)
    c = trace(model, x, record=["attn_probs", "resid_post"]).cache
    for b in range(3):
        torch.testing.assert_close(c["attn_probs", b], out.attentions[b], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(c["resid_post", b], out.hidden_states[b + 1], atol=1e-6, rtol=1e-5)


def test_self_only_edit() -> None:
    model = TIMM_VARIANTS["registers"]()  # 5 prefix tokens
    x = images(2)
    clean = trace(model, x, record=["attn_probs"]).cache
    tr = trace(model, x, record=["attn_probs"], attention_edit="self_only")
    p = 5
    for b in range(3):
        probs = tr.cache["attn_probs", b]
        torch.testing.assert_close(probs.sum(-1), torch.ones_like(probs.sum(-1)))
        t = probs.shape[-1]
        eye = torch.eye(t)[p:].expand(2, 4, -1, -1)
        torch.testing.assert_close(probs[:, :, p:], eye)
    # prefix rows are those of the edited model's own attention: not a one-hot row
    assert not torch.allclose(tr.logits, trace(model, x).logits)
    assert clean["attn_probs", 0][:, :, p:].max() < 1


def test_no_cls_edit_and_block_selection() -> None:
    model = small_timm()
    x = images(2)
    clean = trace(model, x, record=["attn_probs"]).cache
    tr = trace(model, x, record=["attn_probs"], attention_edit="no_cls", edit_blocks=[1])
    torch.testing.assert_close(
        tr.cache["attn_probs", 0], clean["attn_probs", 0]
    )  # before the edit: unchanged
    edited = tr.cache["attn_probs", 1]
    assert (edited[:, :, 1:, 0] == 0).all()
    # authors' convention: no renormalisation, rows sum to 1 - former class-token weight
    pre = trace(model, x, record=["attn_probs"], attention_edit=lambda b, p: p, edit_blocks=[1]).cache
    torch.testing.assert_close(edited[:, :, 1:].sum(-1), 1 - pre["attn_probs", 1][:, :, 1:, 0])
    with pytest.raises(InputValidationError, match="no class token"):
        trace(TIMM_VARIANTS["gap_fc_norm"](), x, attention_edit="no_cls")


def test_custom_edit_identity_keeps_logits_and_bad_edit_is_reported() -> None:
    model = small_timm()
    x = images(2)
    torch.testing.assert_close(trace(model, x, attention_edit=lambda b, p: p.clone()).logits, model_logits(model, x),
                               atol=1e-5, rtol=0)  # fmt: skip
    with pytest.raises(InputValidationError, match="must return a tensor of shape"):
        trace(model, x, attention_edit=lambda b, p: p[..., :3])
    with pytest.raises(InputValidationError, match="unknown attention_edit"):
        trace(model, x, attention_edit="nothing")


@pytest.mark.parametrize("variant", ["cls_token", "gap_fc_norm", "distilled", "registers"])
def test_dropping_tokens_equals_running_the_model_on_kept_tokens(variant: str) -> None:
    model = TIMM_VARIANTS[variant]()
    adapter = adapt(model)
    x = images(2)
    keep = torch.tensor([[0, 3, 5, 6, 15], [1, 2, 3, 4, 9]])
    tr = trace(model, x, keep_tokens=keep, record=["resid_post"])
    p = adapter.num_prefix_tokens
    assert tr.cache["resid_post", 0].shape[1] == p + 5
    torch.testing.assert_close(tr.token_index[:, p:] - p, keep)
    # by hand: timm's own modules on the kept sequence
    with torch.no_grad():
        for i in range(2):
            seq = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x[i : i + 1]))))
            seq = torch.cat([seq[:, :p], seq[:, p + keep[i]]], 1)
            for blk in model.blocks:
                seq = blk(seq)
            ref = model.forward_head(model.norm(seq))
            torch.testing.assert_close(tr.logits[i : i + 1], ref, atol=1e-5, rtol=0)


def test_keep_tokens_bool_mask_and_errors() -> None:
    model = small_timm()
    x = images(2)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, [1, 2]] = True
    mask[1, [7, 9]] = True
    a = trace(model, x, keep_tokens=mask).logits
    b = trace(model, x, keep_tokens=torch.tensor([[1, 2], [7, 9]])).logits
    torch.testing.assert_close(a, b)
    mask[1, 10] = True
    with pytest.raises(InputValidationError, match="same number"):
        trace(model, x, keep_tokens=mask)
    with pytest.raises(InputValidationError, match="patch indices in 0..15"):
        trace(model, x, keep_tokens=torch.tensor([[0, 16], [1, 2]]))
    with pytest.raises(InputValidationError, match="N = 2"):
        trace(model, x, keep_tokens=torch.tensor([[0, 1], [1, 2], [3, 4]]))


def _snapshot(model: torch.nn.Module) -> dict:
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "training": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "hooks": [
            (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
            for m in model.modules()
        ],
        "fused": [getattr(m, "fused_attn", None) for m in model.modules()],
        "attn_impl": getattr(getattr(model, "config", None), "_attn_implementation", None),
        "grads": [p.grad for p in model.parameters()],
    }


def _assert_same(a: dict, b: dict) -> None:
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        assert torch.equal(a["state"][k], b["state"][k]), k
    for key in ("training", "requires_grad", "hooks", "fused", "attn_impl"):
        assert a[key] == b[key], key
    assert all(g is None for g in b["grads"])


@pytest.mark.parametrize("build", [lambda: small_timm(), lambda: small_hf("deit_teacher")])
def test_model_left_exactly_as_it_was_also_after_an_error(build) -> None:
    model = build()
    model.train()  # a model in training mode, with some frozen parameters
    for p in list(model.parameters())[:3]:
        p.requires_grad_(False)
    before = _snapshot(model)
    trace(model, images(2), record="all", grad=True)
    _assert_same(before, _snapshot(model))

    def failing_edit(block: int, probs: torch.Tensor) -> torch.Tensor:
        if block == 1:
            assert not model.training  # dropout is off during the pass
            raise RuntimeError("boom")
        return probs

    with pytest.raises(RuntimeError, match="boom"):
        trace(model, images(2), attention_edit=failing_edit)
    _assert_same(before, _snapshot(model))


def test_bad_inputs_raise_clear_errors() -> None:
    model = small_timm()
    with pytest.raises(InputValidationError, match="wrong image size 64x64.*expects 32x32"):
        trace(model, torch.randn(1, 3, 64, 64))
    with pytest.raises(InputValidationError, match="floating point"):
        trace(model, torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(InputValidationError, match="unsqueeze"):
        trace(model, torch.randn(3, 32, 32))
    with pytest.raises(InputValidationError, match="channels"):
        trace(model, torch.randn(1, 1, 32, 32))
    with pytest.raises(InputValidationError, match="float64"):
        trace(model, torch.randn(1, 3, 32, 32, dtype=torch.float64))
    with pytest.raises(InputValidationError, match="cannot record"):
        trace(model, images(1), record=["nope"])


# -- fused attention where nothing reads or edits the probabilities ---------------------------------
def count_fused_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = forward_module.F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(forward_module.F, "scaled_dot_product_attention", counting)
    return calls


ALL_VARIANTS = {**TIMM_VARIANTS, **HF_VARIANTS}


@pytest.mark.parametrize("variant", list(ALL_VARIANTS))
def test_fused_attention_equals_the_explicit_path(variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model = ALL_VARIANTS[variant]()
    x = images(2)
    expected = model_logits(model, x)
    calls = count_fused_calls(monkeypatch)
    fused = trace(model, x, record=["resid_post", "mlp_keys"])
    assert len(calls) == 3  # every block fused
    explicit = trace(model, x, record=["resid_post", "mlp_keys", "attn_probs"])
    assert len(calls) == 3  # none: the probabilities are recorded
    torch.testing.assert_close(fused.logits, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(explicit.logits, expected, atol=1e-5, rtol=0)
    for b in range(3):
        for kind in ("resid_post", "mlp_keys"):
            torch.testing.assert_close(fused.cache[kind, b], explicit.cache[kind, b], atol=1e-5, rtol=1e-5)
    trace(model, x, attention_edit=lambda b, p: p.clone(), edit_blocks=[1])
    assert len(calls) == 5  # the edited block is explicit, the other two fused
    if adapt(model).pooling == "token":
        keep = torch.tensor([[0, 3, 5, 6, 15], [1, 2, 3, 4, 9]])
        torch.testing.assert_close(
            trace(model, x, keep_tokens=keep).logits,
            trace(model, x, keep_tokens=keep, record=["attn_probs"]).logits,
            atol=1e-5,
            rtol=0,
        )


def with_rope_and_bias(model: torch.nn.Module, scale_before_matmul: bool | None = None, seed: int = 0):
    """The model's adapter with a rotary embedding and a relative position bias added to every block
    (random tables indexed by the model-order token index), as the families that use them do."""
    adapter = adapt(model)
    block = adapter.block
    g = torch.Generator().manual_seed(seed)
    t, heads, hd = adapter.num_tokens, adapter.num_heads, adapter.head_dim
    table = torch.randn(heads, t, t, generator=g)
    angles = torch.randn(t, hd // 2, generator=g) * 3

    def rope(q: torch.Tensor, k: torch.Tensor, token_index: torch.Tensor | None):
        idx = torch.arange(q.shape[2]).expand(q.shape[0], -1) if token_index is None else token_index
        cos, sin = angles[idx].cos()[:, None], angles[idx].sin()[:, None]  # (N, 1, T', hd/2)

        def rot(u: torch.Tensor) -> torch.Tensor:
            u1, u2 = u[..., ::2], u[..., 1::2]
            return torch.stack([u1 * cos - u2 * sin, u1 * sin + u2 * cos], -1).flatten(-2)

        return rot(q), rot(k)

    def attn_bias(token_index: torch.Tensor | None) -> torch.Tensor:
        if token_index is None:
            return table  # (H, T, T), broadcast over examples
        return table[:, token_index[:, :, None], token_index[:, None, :]].transpose(0, 1)  # (N, H, T', T')

    def parts(b: int):
        p = dataclasses.replace(block(b), rope=rope, attn_bias=attn_bias)
        if scale_before_matmul is not None:
            p = dataclasses.replace(p, scale_before_matmul=scale_before_matmul)
        return p

    adapter.block = parts
    return adapter


@pytest.mark.parametrize("scale_first", [True, False])
@pytest.mark.parametrize("variant", ["cls_token", "registers", "hf_vit"])
def test_fused_path_applies_rope_and_attention_bias(
    variant: str, scale_first: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = ALL_VARIANTS[variant]()
    adapter = with_rope_and_bias(model, scale_first)
    x = images(2)
    calls = count_fused_calls(monkeypatch)
    fused = trace(adapter, x, record=["resid_post"])
    assert len(calls) == 3
    explicit = trace(adapter, x, record=["resid_post", "attn_probs"])
    torch.testing.assert_close(fused.logits, explicit.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        fused.cache["resid_post", 2], explicit.cache["resid_post", 2], atol=1e-5, rtol=1e-5
    )
    # rope and bias change the result, so a fused path that ignored either would fail above
    assert not torch.allclose(fused.logits, model_logits(model, x), atol=1e-3)
    keep = torch.tensor([[0, 3, 5, 6, 15], [1, 2, 3, 4, 9]])  # dropped tokens keep their positions
    torch.testing.assert_close(
        trace(adapter, x, keep_tokens=keep).logits,
        trace(adapter, x, keep_tokens=keep, record=["attn_probs"]).logits,
        atol=1e-5,
        rtol=0,
    )
    assert not torch.allclose(trace(adapter, x, keep_tokens=keep).logits, fused.logits, atol=1e-3)


@pytest.mark.parametrize("with_extras", [False, True], ids=["plain", "rope_bias"])
def test_query_prefix_computes_the_first_rows(with_extras: bool) -> None:
    model = small_timm(reg_tokens=2)
    adapter = with_rope_and_bias(model) if with_extras else adapt(model)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, adapter.num_tokens, adapter.embed_dim, generator=g)
    parts = adapter.block(1)
    with torch.no_grad():
        for kinds in (frozenset(), frozenset({"attn_probs", "mlp_out"})):
            full, full_acts = run_block(parts, x, 1, kinds)
            part, part_acts = run_block(parts, x, 1, kinds, query_prefix=3)
            assert part.shape == (2, 3, adapter.embed_dim)
            torch.testing.assert_close(part, full[:, :3], atol=1e-6, rtol=1e-6)
            for kind in kinds:
                ref = full_acts[kind][:, :, :3] if kind == "attn_probs" else full_acts[kind][:, :3]
                torch.testing.assert_close(part_acts[kind], ref, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("scale_first", [True, False])
@pytest.mark.parametrize("with_extras", [False, True], ids=["plain", "rope_bias"])
def test_prob_rows_equal_the_explicit_probabilities(
    with_extras: bool, scale_first: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the first rows of the explicit (N, H, T, T) probabilities, also when the attention runs fused
    model = small_timm(reg_tokens=2)
    adapter = with_rope_and_bias(model, scale_first) if with_extras else adapt(model)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, adapter.num_tokens, adapter.embed_dim, generator=g)
    parts = adapter.block(1)
    calls = count_fused_calls(monkeypatch)
    with torch.no_grad():
        full, acts = run_block(parts, x, 1, frozenset({"attn_probs"}))
        assert not calls
        fused, fused_acts = run_block(parts, x, 1, frozenset(), prob_rows=3)
        assert len(calls) == 1
        _, prefix_acts = run_block(parts, x, 1, frozenset(), query_prefix=3, prob_rows=2)
        _, explicit_acts = run_block(parts, x, 1, frozenset({"attn_probs"}), prob_rows=3)
    torch.testing.assert_close(fused, full, atol=1e-6, rtol=1e-6)
    for rows, got in ((3, fused_acts), (2, prefix_acts), (3, explicit_acts)):
        assert got["attn_prob_rows"].shape == (2, adapter.num_heads, rows, adapter.num_tokens)
        torch.testing.assert_close(
            got["attn_prob_rows"], acts["attn_probs"][:, :, :rows], atol=1e-6, rtol=1e-6
        )
    assert "attn_probs" not in fused_acts


def test_record_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    model = small_timm()
    x = images(2)
    full = trace(model, x, record=["attn_probs", "resid_post"]).cache
    seen: dict[int, set[str]] = {}
    calls = count_fused_calls(monkeypatch)
    tr = trace(
        model,
        x,
        record=["attn_probs", "resid_post"],
        record_blocks=[0, -1],
        on_block=lambda b, acts: seen.__setitem__(b, set(acts)),
    )
    assert len(calls) == 1  # block 1 records nothing: fused
    assert sorted(tr.cache.keys()) == sorted(
        f"blocks.{b}.{k}" for b in (0, 2) for k in ("attn_probs", "resid_post")
    )
    assert seen == {0: {"attn_probs", "resid_post"}, 1: set(), 2: {"attn_probs", "resid_post"}}
    for key in tr.cache.keys():
        torch.testing.assert_close(tr.cache[key], full[key])
    torch.testing.assert_close(tr.logits, trace(model, x).logits, atol=1e-6, rtol=0)
    for bad in ([3], [-4], [True], [0.5]):
        with pytest.raises(InputValidationError, match="record_blocks"):
            trace(model, x, record=["resid_post"], record_blocks=bad)


@pytest.mark.parametrize("variant", ["cls_token", "distilled", "registers", "gap_fc_norm", "hf_deit_teacher"])
def test_last_block_only_for_the_tokens_the_classifier_reads(
    variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = ALL_VARIANTS[variant]()
    x = images(2)
    prefixes: list[int | None] = []
    real = forward_module.run_block

    def spy(*args, **kwargs):
        prefixes.append(kwargs.get("query_prefix"))
        return real(*args, **kwargs)

    monkeypatch.setattr(forward_module, "run_block", spy)
    logits = trace(model, x).logits
    expected = {"cls_token": 1, "distilled": 2, "registers": 1, "gap_fc_norm": None, "hf_deit_teacher": 2}[
        variant
    ]
    assert prefixes == [None, None, expected]
    torch.testing.assert_close(logits, model_logits(model, x), atol=1e-5, rtol=0)
    prefixes.clear()
    trace(model, x, record=["resid_post"], record_blocks=[0])
    assert prefixes == [None, None, expected]
    prefixes.clear()
    trace(model, x, record=["resid_post"])  # the last block is recorded: all of it
    assert prefixes == [None, None, None]

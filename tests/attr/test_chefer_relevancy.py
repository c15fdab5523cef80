"""CheferRelevancy: each LRP rule against closed forms, the map against an independent per-example
Chefer-style computation (autograd relprop as in layers_ours.py), batching, timm/HF twins, errors."""

from __future__ import annotations

import dataclasses

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import images, model_logits, small_hf, small_timm
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import ResPostBlock
from torch import nn

from captum_clsemb import InputValidationError
from captum_clsemb.attr.chefer_relevancy import (
    CheferRelevancy,
    lrp_add_conserving,
    lrp_clone,
    lrp_elementwise_z,
    lrp_linear_alpha1_beta0,
    lrp_matmul_z,
    lrp_select_z,
    safe_divide,
)
from captum_clsemb.convert import timm_to_hf
from captum_clsemb.errors import UnsupportedModelError

TINY = dict(img_size=16, patch_size=8, embed_dim=8, depth=3, num_heads=2, num_classes=3)
TINY_HF = dict(image_size=16, patch_size=8, hidden_size=8, num_hidden_layers=3, num_attention_heads=2,
               intermediate_size=16, num_labels=3)  # fmt: skip


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random values for every parameter (init leaves biases 0, LayerNorm 1), float64, eval."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model.double().eval()


def tiny_timm(**kw) -> nn.Module:
    return randomize(small_timm(**{**TINY, **kw}))


def tiny_hf(kind: str = "vit", **kw) -> nn.Module:
    return randomize(small_hf(kind, **{**TINY_HF, **kw}))


def x16(n: int = 3, seed: int = 1) -> torch.Tensor:
    return images(n, size=16, seed=seed).double()


# -- (a) the rules -----------------------------------------------------------------------------------
def test_safe_divide_closed_form() -> None:
    a = torch.tensor([1.0, 2.0, -3.0, 4.0], dtype=torch.float64)
    b = torch.tensor([2.0, -0.5, 0.0, 1e-12], dtype=torch.float64)
    expected = torch.tensor([1 / (2 + 1e-9), 2 / (-0.5 + 1e-9), 0.0, 4 / (1e-12 + 1e-9)], dtype=torch.float64)
    torch.testing.assert_close(safe_divide(a, b), expected, rtol=1e-12, atol=0)


def test_linear_alpha1_beta0_closed_form_and_conservation() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    w = torch.randn(4, 5, generator=g, dtype=torch.float64)
    r = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)  # relevance of either sign
    out = lrp_linear_alpha1_beta0(x, w, r)
    expected = torch.zeros_like(x)
    for n in range(2):
        for t in range(3):
            for j in range(4):
                contrib = [float(x[n, t, i] * w[j, i]) for i in range(5)]
                zplus = sum(c for c in contrib if c > 0)
                for i in range(5):
                    if contrib[i] > 0:
                        expected[n, t, i] += contrib[i] * r[n, t, j] / (zplus + 1e-9)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    # The shared denominator conserves relevance per output (bias excluded).
    torch.testing.assert_close(out.sum(-1), r.sum(-1), rtol=1e-7, atol=1e-9)
    # Only inputs with a positive contribution get relevance: R has the sign pattern of sum_j [.] R_j.
    neg_w = -w.abs()
    pos_x = x.abs()
    assert lrp_linear_alpha1_beta0(pos_x, neg_w, r).abs().max() == 0  # no positive contribution anywhere


def test_matmul_z_halves_each_operand() -> None:
    g = torch.Generator().manual_seed(1)
    a = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64)
    b = torch.randn(2, 3, 5, 6, generator=g, dtype=torch.float64)
    r = torch.randn(2, 3, 4, 6, generator=g, dtype=torch.float64)
    ra, rb = lrp_matmul_z(a, b, r)
    # Bilinear, no bias: the z-rule gives each operand the full total; halving gives half each.
    torch.testing.assert_close(ra.sum((-1, -2)), r.sum((-1, -2)) / 2, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(rb.sum((-1, -2)), r.sum((-1, -2)) / 2, rtol=1e-7, atol=1e-9)
    # Entry-wise closed form: R_a[i, k] = sum_j a_ik b_kj R_ij / Z_ij / 2.
    z = a @ b
    i, k, j = 2, 3, 1
    manual_a = (
        sum(a[1, 2, i, k] * b[1, 2, k, jj] * r[1, 2, i, jj] / (z[1, 2, i, jj] + 1e-9) for jj in range(6)) / 2
    )
    manual_b = (
        sum(a[1, 2, ii, k] * b[1, 2, k, j] * r[1, 2, ii, j] / (z[1, 2, ii, j] + 1e-9) for ii in range(4)) / 2
    )
    torch.testing.assert_close(ra[1, 2, i, k], manual_a, rtol=1e-10, atol=0)
    torch.testing.assert_close(rb[1, 2, k, j], manual_b, rtol=1e-10, atol=0)
    ra_full, _ = lrp_matmul_z(a, b, r, halve=False)
    torch.testing.assert_close(ra_full, 2 * ra)


def test_add_conserving_closed_form_and_per_example() -> None:
    # Example 0: a = [2, -1], b = [-1, 3], R = [1, 1]: z-rule r_a = [2, -0.5], r_b = [-1, 1.5]
    # (sums 1.5 and 0.5); factors |1.5|/2 * 2 = 1.5 and 0.5: already conservative, unchanged.
    # Example 1: a = [1, 1], b = [1, -3], R = [1, 2]: r_a = [0.5, -1], r_b = [0.5, 3] (sums -0.5, 3.5),
    # total 3: R_a = r_a * (0.5/4 * 3) / -0.5, R_b = r_b * (3.5/4 * 3) / 3.5.
    a = torch.tensor([[2.0, -1.0], [1.0, 1.0]], dtype=torch.float64)
    b = torch.tensor([[-1.0, 3.0], [1.0, -3.0]], dtype=torch.float64)
    r = torch.tensor([[1.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
    ra, rb = lrp_add_conserving(a, b, r)
    exp_a = torch.tensor([[2.0, -0.5], [0.5 * -0.75, -1.0 * -0.75]], dtype=torch.float64)
    exp_b = torch.tensor([[-1.0, 1.5], [0.5 * 0.75, 3.0 * 0.75]], dtype=torch.float64)
    torch.testing.assert_close(ra, exp_a, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(rb, exp_b, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(ra.sum(1) + rb.sum(1), r.sum(1), rtol=1e-8, atol=1e-8)
    # Random 3-D operands: total kept per example.
    g = torch.Generator().manual_seed(2)
    a, b, r = (torch.randn(3, 4, 5, generator=g, dtype=torch.float64) for _ in range(3))
    ra, rb = lrp_add_conserving(a, b, r)
    torch.testing.assert_close((ra + rb).sum((1, 2)), r.sum((1, 2)), rtol=1e-7, atol=1e-9)


def test_select_and_elementwise_rules() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 3, generator=g, dtype=torch.float64)
    r = torch.randn(2, 3, generator=g, dtype=torch.float64)
    out = lrp_select_z(x, 1, r)
    torch.testing.assert_close(out[:, 1], r * x[:, 1] / (x[:, 1] + 1e-9), rtol=1e-12, atol=0)
    assert out[:, [0, 2, 3]].abs().max() == 0
    scale = torch.tensor([0.5, 0.0, -2.0], dtype=torch.float64)
    r3 = torch.randn(2, 4, 3, generator=g, dtype=torch.float64)
    out = lrp_elementwise_z(x, scale, r3)
    torch.testing.assert_close(out[..., [0, 2]], r3[..., [0, 2]], rtol=1e-7, atol=1e-9)
    assert out[..., 1].abs().max() == 0  # zero output: no relevance


# -- (b) independent reference: per example, autograd relprop as in layers_ours.py --------------------
def ref_safe_div(a, b):
    den = b.clamp(min=1e-9) + b.clamp(max=1e-9)
    den = den + den.eq(0).type(den.type()) * 1e-9
    return a / den * b.ne(0).type(b.type())


def ref_simple(fn, xs, R):
    """RelPropSimple: Z = fn(*X); S = R / Z; C = dZ/dX^T S; R_X = X * C."""
    xs = [x.detach().clone().requires_grad_(True) for x in xs]
    with torch.enable_grad():
        Z = fn(*xs)
        C = torch.autograd.grad(Z, xs, ref_safe_div(R, Z))
    return [x.detach() * c for x, c in zip(xs, C)]


def ref_linear(x, W, R):
    """layers_ours.Linear.relprop with alpha=1 (beta=0)."""
    px = x.clamp(min=0).detach().requires_grad_(True)
    nx = x.clamp(max=0).detach().requires_grad_(True)
    pw, nw = W.clamp(min=0), W.clamp(max=0)
    with torch.enable_grad():
        Z1, Z2 = F.linear(px, pw), F.linear(nx, nw)
        S = ref_safe_div(R, Z1 + Z2)
        C1 = px * torch.autograd.grad(Z1, px, S)[0]
        C2 = nx * torch.autograd.grad(Z2, nx, S)[0]
    return (C1 + C2).detach()


def ref_add(a, b, R):
    """layers_ours.Add.relprop (batch size 1: whole-tensor sums)."""
    ra, rb = ref_simple(lambda u, v: u + v, [a, b], R)
    sa, sb = ra.sum(), rb.sum()
    fa = ref_safe_div(sa.abs(), sa.abs() + sb.abs()) * R.sum()
    fb = ref_safe_div(sb.abs(), sa.abs() + sb.abs()) * R.sum()
    return ra * ref_safe_div(fa, ra.sum()), rb * ref_safe_div(fb, rb.sum())


def ref_clone(x, rs, rule):
    """Branch point: "exact" sums; "chefer" is layers_ours.Clone.relprop (Z = [X, X], S_i = R_i / Z_i,
    R = X * dZ/dX^T S by autograd)."""
    if rule == "exact":
        return rs[0] + rs[1]
    X = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        Z = [X for _ in rs]
        C = torch.autograd.grad(Z, X, [ref_safe_div(r, X) for r in rs])[0]
    return X.detach() * C


def mul_by(gamma):
    return lambda f: f * gamma


def model_structure(model):
    """Per-family pieces for the reference, read from the model's own modules."""
    W = lambda lin: lin.weight.detach()  # noqa: E731
    if hasattr(model, "blocks"):  # timm
        blocks = []
        for blk in model.blocks:
            post = isinstance(blk, ResPostBlock)
            a = blk.attn
            d = a.num_heads * a.head_dim
            gam1 = getattr(getattr(blk, "ls1", None), "gamma", None)
            gam2 = getattr(getattr(blk, "ls2", None), "gamma", None)
            blocks.append(dict(
                post=post, norm1=blk.norm1, norm2=blk.norm2, heads=a.num_heads, scale=a.scale,
                qkv=lambda u, a=a: a.qkv(u).split(a.num_heads * a.head_dim, -1),
                qkv_w=[W(a.qkv)[:d], W(a.qkv)[d:2 * d], W(a.qkv)[2 * d:]], qkv_single=W(a.qkv),
                q_norm=a.q_norm, k_norm=a.k_norm, proj=a.proj, g1=gam1, g2=gam2,
                fc1=blk.mlp.fc1, act=blk.mlp.act, fc2=blk.mlp.fc2,
            ))  # fmt: skip
        distilled = isinstance(model, VisionTransformerDistilled)
        return dict(
            embed=lambda x: model.norm_pre(model._pos_embed(model.patch_embed(x))),
            blocks=blocks, norm=model.norm, head=model.head,
            head_dist=model.head_dist if distilled else None, prefix=model.num_prefix_tokens,
            dist_index=1 if distilled else None,
        )  # fmt: skip
    backbone = model.vit if hasattr(model, "vit") else model.deit
    blocks = []
    for layer in backbone.layers:
        at, heads = layer.attention, model.config.num_attention_heads
        blocks.append(dict(
            post=False, norm1=layer.layernorm_before, norm2=layer.layernorm_after, heads=heads,
            scale=(model.config.hidden_size // heads) ** -0.5,
            qkv=lambda u, at=at: (at.q_proj(u), at.k_proj(u), at.v_proj(u)),
            qkv_w=[W(at.q_proj), W(at.k_proj), W(at.v_proj)], qkv_single=None,
            q_norm=nn.Identity(), k_norm=nn.Identity(), proj=at.o_proj, g1=None, g2=None,
            fc1=layer.mlp.fc1, act=layer.mlp.activation_fn, fc2=layer.mlp.fc2,
        ))  # fmt: skip
    teacher = hasattr(model, "cls_classifier")
    prefix = 2 if hasattr(model, "deit") else 1
    return dict(
        embed=backbone.embeddings, blocks=blocks, norm=backbone.layernorm,
        head=model.cls_classifier if teacher else model.classifier,
        head_dist=model.distillation_classifier if teacher else None, prefix=prefix,
        dist_index=1 if teacher else None,
    )  # fmt: skip


def reference(model, x, target, start_block, clone="exact"):
    """Per example: explicit forward, backward of the logit, Chefer relprop, rollout. Returns
    (maps (N, P), list of R_A per example, list of dA per example, logits). ``clone`` is the
    branch-point rule (see ref_clone)."""
    st = model_structure(model)
    maps, rel_all, grad_all, logit_all = [], [], [], []
    for i in range(x.shape[0]):
        xi = x[i : i + 1]
        with torch.enable_grad():
            h = st["embed"](xi)
            saved, attns = [], []
            for blk in st["blocks"]:
                T, H = h.shape[1], blk["heads"]
                u1 = h if blk["post"] else blk["norm1"](h)
                q, k, v = (t.view(1, T, H, -1).transpose(1, 2) for t in blk["qkv"](u1))
                q, k = blk["q_norm"](q), blk["k_norm"](k)
                A = torch.softmax(torch.einsum("bhid,bhjd->bhij", q, k) * blk["scale"], -1)
                o = torch.einsum("bhij,bhjd->bhid", A, v).transpose(1, 2).reshape(1, T, -1)
                pr = blk["proj"](o)
                a_out = blk["norm1"](pr) if blk["post"] else (pr * blk["g1"] if blk["g1"] is not None else pr)
                mid = h + a_out
                u2 = mid if blk["post"] else blk["norm2"](mid)
                keys = blk["act"](blk["fc1"](u2))
                f2 = blk["fc2"](keys)
                m_out = blk["norm2"](f2) if blk["post"] else (f2 * blk["g2"] if blk["g2"] is not None else f2)
                out = mid + m_out
                saved.append(dict(h=h, u1=u1, q=q, k=k, v=v, A=A, o=o, pr=pr, a_out=a_out, mid=mid, u2=u2,
                                  keys=keys, f2=f2, m_out=m_out))  # fmt: skip
                attns.append(A)
                h = out
            hn = st["norm"](h)
            yc = st["head"](hn[:, 0])
            if st["head_dist"] is not None:
                yd = st["head_dist"](hn[:, st["dist_index"]])
                logits = (yc + yd) / 2
            else:
                logits = yc
            t = int(logits.argmax()) if target is None else int(target[i])
            grads = [g_.detach() for g_ in torch.autograd.grad(logits[0, t], attns)]
        logit_all.append(logits.detach())
        one_hot = torch.zeros_like(logits)
        one_hot[0, t] = 1
        # relprop: head(s) -> pool -> norm -> blocks
        hn = hn.detach()
        if st["head_dist"] is None:
            r = ref_linear(hn[:, 0], st["head"].weight.detach(), one_hot)
            R = ref_simple(lambda s: s.index_select(1, torch.tensor([0])).squeeze(1), [hn], r)[0]
        else:
            ra, rb = ref_add(yc.detach() / 2, yd.detach() / 2, one_hot)
            r1 = ref_linear(hn[:, 0], st["head"].weight.detach(), ra)
            r2 = ref_linear(hn[:, 1], st["head_dist"].weight.detach(), rb)
            R = ref_simple(lambda s: s.index_select(1, torch.tensor([0])).squeeze(1), [hn], r1)[0]
            R = R + ref_simple(lambda s: s.index_select(1, torch.tensor([1])).squeeze(1), [hn], r2)[0]
        rel = [None] * len(st["blocks"])
        for b in reversed(range(len(st["blocks"]))):
            blk, s = st["blocks"][b], {k_: v_.detach() for k_, v_ in saved[b].items()}
            T, H = s["h"].shape[1], blk["heads"]
            r_mid, r_m = ref_add(s["mid"], s["m_out"], R)
            if blk["g2"] is not None:
                r_m = ref_simple(mul_by(blk["g2"].detach()), [s["f2"]], r_m)[0]
            r_keys = ref_linear(s["keys"], blk["fc2"].weight.detach(), r_m)
            r_u2 = ref_linear(s["u2"], blk["fc1"].weight.detach(), r_keys)
            R_mid = ref_clone(s["mid"], [r_mid, r_u2], clone)
            r_x, r_a = ref_add(s["h"], s["a_out"], R_mid)
            if blk["g1"] is not None:
                r_a = ref_simple(mul_by(blk["g1"].detach()), [s["pr"]], r_a)[0]
            r_o = ref_linear(s["o"], blk["proj"].weight.detach(), r_a)
            r_o = r_o.view(1, T, H, -1).transpose(1, 2)
            cam1, cam_v = ref_simple(
                lambda a_, v_: torch.einsum("bhij,bhjd->bhid", a_, v_), [s["A"], s["v"]], r_o
            )
            cam1, cam_v = cam1 / 2, cam_v / 2
            rel[b] = cam1
            cam_q, cam_k = ref_simple(
                lambda q_, k_: torch.einsum("bhid,bhjd->bhij", q_, k_), [s["q"], s["k"]], cam1
            )
            cam_q, cam_k = cam_q / 2, cam_k / 2
            flat = [c.transpose(1, 2).reshape(1, T, -1) for c in (cam_q, cam_k, cam_v)]
            if blk["qkv_single"] is not None:  # one Linear as in ViT_LRP
                r_u1 = ref_linear(s["u1"], blk["qkv_single"], torch.cat(flat, -1))
            else:  # three Linears (HF): each output's denominator is its own
                r_u1 = sum(ref_linear(s["u1"], w_, f_) for w_, f_ in zip(blk["qkv_w"], flat))
            R = ref_clone(s["h"], [r_x, r_u1], clone)
        cams = [(g_[0] * r_[0]).clamp(min=0).mean(0) for g_, r_ in zip(grads, rel)]
        eye = torch.eye(cams[0].shape[-1], dtype=cams[0].dtype)
        joint = cams[start_block] + eye
        for c in cams[start_block + 1 :]:
            joint = (c + eye) @ joint
        maps.append(joint[0, st["prefix"] :])
        rel_all.append(torch.cat(rel, 0))
        grad_all.append(torch.cat(grads, 0))
    return torch.stack(maps), rel_all, grad_all, torch.cat(logit_all)


MODELS = {
    "timm_cls": lambda: tiny_timm(),
    "timm_layer_scale": lambda: tiny_timm(init_values=0.3),
    "timm_no_qkv_bias": lambda: tiny_timm(qkv_bias=False),
    "timm_registers": lambda: tiny_timm(reg_tokens=2),
    "timm_qk_norm": lambda: tiny_timm(qk_norm=True),
    "timm_post_norm": lambda: tiny_timm(block_fn=ResPostBlock),
    "timm_distilled": lambda: tiny_timm(cls=VisionTransformerDistilled),
    "hf_vit": lambda: tiny_hf("vit"),
    "hf_deit": lambda: tiny_hf("deit"),
    "hf_deit_teacher": lambda: tiny_hf("deit_teacher"),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_map_matches_independent_reference(name: str) -> None:
    model = MODELS[name]()
    x = x16(3)
    target = torch.tensor([0, 2, 1])
    ref_maps, ref_rel, ref_grad, ref_logits = reference(model, x, target, start_block=1)
    torch.testing.assert_close(ref_logits, model_logits(model, x))  # the reference forward is the model
    cr = CheferRelevancy(model)
    out = cr.attribute(x, target=target)
    assert out.shape == (3, 1, 2, 2)
    torch.testing.assert_close(out.flatten(1), ref_maps, rtol=1e-8, atol=1e-10)
    rel, grad = cr.attention_relevance(x, target=target)
    torch.testing.assert_close(rel, torch.stack(ref_rel), rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(grad, torch.stack(ref_grad), rtol=1e-8, atol=1e-10)
    # start_block=0 uses every block; target=None is the predicted class.
    ref0, *_ = reference(model, x, None, start_block=0)
    torch.testing.assert_close(cr.attribute(x, start_block=0).flatten(1), ref0, rtol=1e-8, atol=1e-10)
    assert not torch.allclose(ref0, ref_maps)  # block 0 matters, so the option is really tested


# -- (c) batching -----------------------------------------------------------------------------------
def test_batch_equals_single_calls_and_chunks() -> None:
    model = tiny_timm(init_values=0.3)
    cr = CheferRelevancy(model)
    x = x16(4, seed=5)
    target = [2, 0, 1, 2]
    batch = cr.attribute(x, target=target)
    singles = torch.cat([cr.attribute(x[i : i + 1], target=target[i]) for i in range(4)])
    torch.testing.assert_close(batch, singles, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(
        cr.attribute(x, target=target, internal_batch_size=3), batch, rtol=1e-10, atol=1e-12
    )
    pred = model_logits(model, x).argmax(-1)
    torch.testing.assert_close(cr.attribute(x), cr.attribute(x, target=pred))


def test_interpolate_to_is_bilinear_upsampling() -> None:
    cr = CheferRelevancy(tiny_timm())
    x = x16(2)
    grid = cr.attribute(x, target=1)
    up = cr.attribute(x, target=1, interpolate_to=16)
    assert up.shape == (2, 1, 16, 16)
    torch.testing.assert_close(cr.attribute(x, target=1, interpolate_to=x.shape[-2:]), up)
    torch.testing.assert_close(up, F.interpolate(grid, size=(16, 16), mode="bilinear", align_corners=False))
    # Bilinear with align_corners=False: the top-left 4x4 corner block equals the corner patch value.
    torch.testing.assert_close(up[:, 0, :4, :4], grid[:, 0, :1, :1].expand(-1, 4, 4))


def test_float32_default_model_runs_and_matches_float64() -> None:
    model64 = tiny_timm()
    model32 = tiny_timm().float()
    x = x16(2)
    m64 = CheferRelevancy(model64).attribute(x, target=[0, 1])
    m32 = CheferRelevancy(model32).attribute(x.float(), target=[0, 1])
    assert m32.dtype == torch.float32
    torch.testing.assert_close(m32.double(), m64, rtol=1e-3, atol=1e-5)


# -- (d) timm and HF twins -----------------------------------------------------------------------------
@pytest.mark.parametrize("distilled", [False, True], ids=["vit", "deit_distilled"])
def test_timm_and_hf_twins_agree(distilled: bool) -> None:
    kw = {"cls": VisionTransformerDistilled} if distilled else {}
    timm_model = tiny_timm(**kw)
    hf_model = timm_to_hf(timm_model)
    x = x16(3, seed=7)
    torch.testing.assert_close(model_logits(hf_model, x), model_logits(timm_model, x))
    a = CheferRelevancy(timm_model).attribute(x, target=[0, 1, 2], start_block=0)
    b = CheferRelevancy(hf_model).attribute(x, target=[0, 1, 2], start_block=0)
    torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-10)
    assert a.abs().max() > 0


# -- (e) errors ---------------------------------------------------------------------------------------
def test_errors() -> None:
    with pytest.raises(InputValidationError, match="global average pooling"):
        CheferRelevancy(tiny_timm(global_pool="avg", class_token=False))
    with pytest.raises(InputValidationError, match="global average pooling"):
        CheferRelevancy(tiny_timm(global_pool="avg"))
    cr = CheferRelevancy(tiny_timm())
    x = x16(2)
    with pytest.raises(InputValidationError, match="out of range"):
        cr.attribute(x, target=3)
    with pytest.raises(InputValidationError, match="one target per example"):
        cr.attribute(x, target=[0, 1, 2])
    with pytest.raises(InputValidationError, match="start_block"):
        cr.attribute(x, target=0, start_block=3)
    with pytest.raises(InputValidationError, match="start_block"):
        cr.attribute(x, target=0, start_block=-1)
    with pytest.raises(InputValidationError, match="interpolate_to"):
        cr.attribute(x, target=0, interpolate_to=(16, 0))
    with pytest.raises(InputValidationError, match="internal_batch_size"):
        cr.attribute(x, target=0, internal_batch_size=0)
    with pytest.raises(InputValidationError, match="image size"):
        cr.attribute(images(2, size=32).double(), target=0)
    with pytest.raises(InputValidationError, match="start_block=0"):
        CheferRelevancy(tiny_timm(depth=1)).attribute(x, target=0)


def test_grad_mode_model_state_and_param_grads_untouched() -> None:
    model = tiny_timm()
    model.train()
    cr = CheferRelevancy(model)
    x = x16(2)
    with torch.no_grad():
        inside = cr.attribute(x, target=[1, 2])
    assert torch.is_grad_enabled()
    assert model.training and all(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    model.eval()
    torch.testing.assert_close(inside, cr.attribute(x, target=[1, 2]))  # eval-mode result either way


# -- (f) the authors' branch-point rule, precision, frozen parameters ----------------------------------
def zero_channel(model: nn.Module, channel: int = 0) -> nn.Module:
    """Residual-stream channel ``channel`` exactly 0 in every block: no embedding, attention or MLP
    output writes it (while the layer norms still give it a non-zero value)."""
    with torch.no_grad():
        model.patch_embed.proj.weight[channel] = 0
        model.patch_embed.proj.bias[channel] = 0
        model.cls_token[..., channel] = 0
        model.pos_embed[..., channel] = 0
        for blk in model.blocks:
            for lin in (blk.attn.proj, blk.mlp.fc2):
                lin.weight[channel] = 0
                lin.bias[channel] = 0
    return model


@pytest.mark.parametrize("zeroed", [False, True], ids=["random", "zero_channel"])
def test_clone_rule_chefer_matches_the_authors_clone_relprop(zeroed: bool) -> None:
    model = tiny_timm()
    if zeroed:
        zero_channel(model)
    x, target = x16(3), torch.tensor([2, 0, 1])
    cr = CheferRelevancy(model)
    for start in (0, 1):
        exact = cr.attribute(x, target=target, start_block=start)
        chefer = cr.attribute(x, target=target, start_block=start, clone_rule="chefer")
        ref_exact, *_ = reference(model, x, target, start)
        ref_chefer, rel_chefer, _, _ = reference(model, x, target, start, clone="chefer")
        torch.testing.assert_close(exact.flatten(1), ref_exact, rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(chefer.flatten(1), ref_chefer, rtol=1e-8, atol=1e-10)
        # The option changes exactly the branch points: the difference itself is reproduced.
        diff, ref_diff = (chefer - exact).flatten(1), ref_chefer - ref_exact
        assert diff.abs().max() > 0
        torch.testing.assert_close(diff, ref_diff, rtol=1e-4, atol=1e-13)
    rel, _ = cr.attention_relevance(x, target=target, clone_rule="chefer")
    torch.testing.assert_close(rel, torch.stack(rel_chefer), rtol=1e-8, atol=1e-10)
    if zeroed:
        # Where the residual stream is exactly 0 the authors' rule drops the relevance that the
        # layer norm's branch gives it, which changes the per-example totals: the maps differ.
        assert not torch.allclose(chefer, exact, rtol=1e-2, atol=0)
    else:
        # Elsewhere it only rescales by X / (X + 1e-9): equal to float64 precision near 1e-9.
        torch.testing.assert_close(chefer, exact, rtol=1e-6, atol=0)
    with pytest.raises(InputValidationError, match="clone_rule"):
        cr.attribute(x, target=target, clone_rule="authors")


def test_lrp_clone_closed_form() -> None:
    x = torch.tensor([[2.0, 0.0, -1e-9, 1e-12]], dtype=torch.float64)
    r1 = torch.tensor([[1.0, 3.0, 5.0, 2.0]], dtype=torch.float64)
    r2 = torch.tensor([[0.5, -1.0, 1.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(lrp_clone(x, (r1, r2)), r1 + r2, rtol=0, atol=0)
    # x / (x + 1e-9) per entry; 0 where x == 0; x = -1e-9 divides by 1e-9 (the authors' safe_divide).
    factor = torch.tensor([[2 / (2 + 1e-9), 0.0, -1.0, 1e-12 / (1e-12 + 1e-9)]], dtype=torch.float64)
    torch.testing.assert_close(lrp_clone(x, (r1, r2), "chefer"), (r1 + r2) * factor, rtol=1e-12, atol=0)


def pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.flatten(1).double(), b.flatten(1).double()
    return torch.stack([torch.corrcoef(torch.stack([u, v]))[0, 1] for u, v in zip(a, b)])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_half_precision_models_give_finite_maps_close_to_float32(dtype: torch.dtype) -> None:
    from captum_clsemb import load_demo_images, load_demo_model

    # The bundled model on its 200 images. Measured: median Pearson with the float32 maps 0.998
    # (float16) / 0.993 (bfloat16), most relevant patch the same for 89% / 81% of the images.
    model = load_demo_model()
    x, y, _ = load_demo_images()
    ref = CheferRelevancy(model).attribute(x, target=y)
    out = CheferRelevancy(model.to(dtype)).attribute(x.to(dtype), target=y)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert pearson(out, ref).median() >= 0.98
    assert (out.flatten(1).argmax(1) == ref.flatten(1).argmax(1)).double().mean() >= 0.7
    # A random-init ViT (nearly uniform attention, so maps with little contrast): measured median
    # Pearson 0.83 (float16) / 0.78 (bfloat16); the LRP rules divide by sums of activations that
    # cancel, so the 2^-11 / 2^-8 rounding of the activations is amplified.
    torch.manual_seed(0)
    small = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, num_classes=10).eval()
    xs = torch.randn(16, 3, 64, 64)
    ref = CheferRelevancy(small).attribute(xs, target=torch.arange(16) % 10)
    out = CheferRelevancy(small.to(dtype)).attribute(xs.to(dtype), target=torch.arange(16) % 10)
    assert torch.isfinite(out).all()
    assert pearson(out, ref).median() >= 0.6


def test_frozen_parameters() -> None:
    model = tiny_timm(init_values=0.3)
    x, target = x16(2), [1, 2]
    expected = CheferRelevancy(model).attribute(x, target=target)
    for p in model.parameters():
        p.requires_grad_(False)
    cr = CheferRelevancy(model)
    torch.testing.assert_close(cr.attribute(x, target=target), expected, rtol=0, atol=0)
    rel, grad = cr.attention_relevance(x, target=target)
    assert grad.abs().max() > 0
    assert all(not p.requires_grad and p.grad is None for p in model.parameters())


def test_models_without_rules_are_refused() -> None:
    # Parts with a rule run (an identity "rotary embedding" is a linear map whose z-rule passes the
    # relevance, so the map is the plain one); a gated MLP that does not expose its gate has none and
    # is refused once, at construction.
    from captum_clsemb.adapters import adapt

    model = tiny_timm()
    x = x16(2)
    plain = CheferRelevancy(model).attribute(x, target=0)
    adapter = adapt(model)
    block = adapter.block

    def rope(q, k, token_index):
        return q, k

    adapter.block = lambda b: dataclasses.replace(block(b), rope=rope)
    torch.testing.assert_close(CheferRelevancy(adapter).attribute(x, target=0), plain, rtol=1e-6, atol=0)
    adapter.block = lambda b: dataclasses.replace(block(b), mlp_in=lambda u: u)
    with pytest.raises(UnsupportedModelError, match="not a gate times a linear signal branch"):
        CheferRelevancy(adapter)

"""CheferRelevancy on the ViT families beyond the plain ViT: EVA-02 / RoPE ViTs (timm Eva), BEiT (timm,
Hugging Face), DINOv2 classifiers and CLIP zero-shot.

Each family's maps and attention relevances are checked against an independent float64 reference,
one example at a time, written from the rule definitions (not from the adapters): the model's own
modules are run explicitly, relevance goes back with the authors' rules (RelPropSimple by autograd,
the alpha1-beta0 Linear, the conserving Add) plus the rules for the new parts:

- rotary position embedding: the z-rule of each channel pair's 2x2 rotation, in closed form;
- relative position bias: a constant term of the scores, relevance passes to q k^T;
- gated MLP: the gate is a constant multiplier, all relevance to the signal branch;
- heads: CLIP's projection and class matrix alpha1-beta0 (normalisation and logit scale pass),
  DINOv2's classifier alpha1-beta0 over [class token, patch mean], the mean by the z-rule;
- the rollout seed: the tokens the head reads (class token 1, each patch 1/P), each reader
  weighted by its share of the head's relevance.

The reference also checks conservation (the relevance of every block input sums to 1).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from conftest import FAMILY_VARIANTS, images, model_logits
from test_chefer_relevancy import ref_add, ref_linear, ref_safe_div, ref_simple
from torch import nn

from captum_clsemb import CheferRelevancy, InputValidationError, UnsupportedModelError
from captum_clsemb.adapters import adapt
from captum_clsemb.attr.chefer_relevancy import lrp_linear_map_z, lrp_mean_z


# -- the new rules in isolation ------------------------------------------------------------------------
def test_mean_z_closed_form_and_conservation() -> None:
    x = torch.tensor([[[1.0, 2.0], [3.0, -2.0], [2.0, 3.0]]], dtype=torch.float64)  # (1, K=3, d=2)
    r = torch.tensor([[0.6, -1.5]], dtype=torch.float64)
    out = lrp_mean_z(x, r)
    mean = x.mean(1)  # [2, 1]
    expected = x / 3 * (r / (mean + 1e-9)).unsqueeze(1)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(out[0, 1, 1], torch.tensor(-2 / 3 * -1.5 / (1 + 1e-9), dtype=torch.float64))
    torch.testing.assert_close(out.sum(1), r, rtol=1e-8, atol=0)  # conserved per channel


def test_linear_map_z_is_the_2x2_z_rule_of_a_rotation_and_conserves() -> None:
    g = torch.Generator().manual_seed(0)
    theta = torch.rand(5, generator=g, dtype=torch.float64) * 6
    c, s = theta.cos(), theta.sin()
    x = torch.randn(5, 2, generator=g, dtype=torch.float64)
    r = torch.randn(5, 2, generator=g, dtype=torch.float64)

    def rotate(u: torch.Tensor) -> torch.Tensor:
        return torch.stack([c * u[:, 0] - s * u[:, 1], s * u[:, 0] + c * u[:, 1]], -1)

    (out,) = lrp_linear_map_z(rotate, (x,), (r,))
    y = rotate(x)
    # z-rule of y = M x, M = [[c, -s], [s, c]]: R_i = sum_j M_ji x_i R_j / y_j
    s0, s1 = r[:, 0] / (y[:, 0] + 1e-9), r[:, 1] / (y[:, 1] + 1e-9)
    expected = torch.stack([x[:, 0] * (c * s0 + s * s1), x[:, 1] * (-s * s0 + c * s1)], -1)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.sum(-1), r.sum(-1), rtol=1e-7, atol=1e-9)
    # two inputs (q and k) at once, each with its own relevance
    out_q, out_k = lrp_linear_map_z(lambda a, b: (rotate(a), 2 * b), (x, x), (r, r))
    torch.testing.assert_close(out_q, expected)
    torch.testing.assert_close(out_k, x * (2 * r / (2 * x + 1e-9)))


# -- the independent reference -------------------------------------------------------------------------
def ref_rope_z(x, emb, half, R):
    """z-rule of the rotary embedding y = x cos + rot(x) sin, written per pair of channels in closed
    form. Pairs are (2i, 2i+1) (timm's interleaved ``rot``) or (i, i + D/2) (``half``); each pair's map
    is M = [[cos_a, -sin_a], [sin_b, cos_b]] (a, b its two channels)."""
    sin, cos = emb.chunk(2, -1)
    y = x * cos + _rot(x, half) * sin
    S = ref_safe_div(R, y)
    D = x.shape[-1]
    a, b = (
        (torch.arange(0, D, 2), torch.arange(1, D, 2))
        if not half
        else (torch.arange(D // 2), torch.arange(D // 2, D))
    )
    out = torch.empty_like(x)
    ca, sa, cb, sb = (t.expand_as(x)[..., i] for t, i in ((cos, a), (sin, a), (cos, b), (sin, b)))
    out[..., a] = x[..., a] * (ca * S[..., a] + sb * S[..., b])
    out[..., b] = x[..., b] * (-sa * S[..., a] + cb * S[..., b])
    return out


def _rot(x, half):
    from timm.layers.pos_embed_sincos import rope_rotate_half, rot

    return rope_rotate_half(x) if half else rot(x)


def _split3(t, d):
    return (None, None, None) if t is None else (t[:d], t[d : 2 * d], t[2 * d :])


def eva_structure(m):
    """timm Eva: explicit pieces from the model's own modules."""
    from timm.layers import GluMlp, SwiGLU
    from timm.layers.pos_embed_sincos import apply_rot_embed_cat
    from timm.models.eva import EvaBlockPostNorm

    side = m.patch_embed.img_size
    _, rot_emb = m._pos_embed(m.patch_embed(torch.zeros(1, 3, *side, dtype=m.head.weight.dtype)))
    blocks = []
    for i, blk in enumerate(m.blocks):
        a = blk.attn
        d = a.num_heads * a.head_dim
        if a.qkv is not None:
            W = _split3(a.qkv.weight, d)
            B = (
                (a.q_bias, a.k_bias, a.v_bias)
                if getattr(a, "q_bias", None) is not None
                else _split3(a.qkv.bias, d)
            )
        else:
            W = (a.q_proj.weight, a.k_proj.weight, a.v_proj.weight)
            B = (a.q_proj.bias, a.k_proj.bias, a.v_proj.bias)
        emb = None if rot_emb is None else (rot_emb[i] if getattr(m, "rope_mixed", False) else rot_emb)
        half, npt = bool(getattr(a, "rotate_half", False)), a.num_prefix_tokens
        rope = None
        if emb is not None:
            rope = dict(
                fwd=lambda t, emb=emb, half=half, npt=npt: torch.cat(
                    [t[:, :, :npt], apply_rot_embed_cat(t[:, :, npt:], emb, half=half)], 2
                ),
                relprop=lambda t, R, emb=emb, half=half, npt=npt: torch.cat(
                    [t[:, :, :npt] * ref_safe_div(R[:, :, :npt], t[:, :, :npt]),
                     ref_rope_z(t[:, :, npt:], emb, half, R[:, :, npt:])], 2
                ),
            )  # fmt: skip
        mlp = blk.mlp
        if isinstance(mlp, SwiGLU):
            ff = dict(gated=True, w_sig=mlp.fc1_x.weight, b_sig=mlp.fc1_x.bias,
                      gate=lambda u, mlp=mlp: mlp.act(mlp.fc1_g(u)))  # fmt: skip
        elif isinstance(mlp, GluMlp):
            h = mlp.fc1.out_features // 2
            sig, gat = (slice(0, h), slice(h, None)) if mlp.gate_last else (slice(h, None), slice(0, h))
            ff = dict(gated=True, w_sig=mlp.fc1.weight[sig], b_sig=mlp.fc1.bias[sig],
                      gate=lambda u, mlp=mlp, gat=gat: mlp.act(F.linear(u, mlp.fc1.weight[gat], mlp.fc1.bias[gat])))  # fmt: skip
        else:
            ff = dict(gated=False, fc1=mlp.fc1, act=mlp.act)
        post = isinstance(blk, EvaBlockPostNorm)
        blocks.append(dict(
            post=post, norm1=blk.norm1, norm2=blk.norm2, W=W, B=B, heads=a.num_heads, scale=a.scale,
            q_norm=a.q_norm, k_norm=a.k_norm, rope=rope, bias=None, attn_norm=a.norm, proj=a.proj,
            g1=None if post else blk.gamma_1, g2=None if post else blk.gamma_2, mid_norm=mlp.norm, fc2=mlp.fc2, **ff,
        ))  # fmt: skip
    return dict(
        embed=lambda x: m.norm_pre(m._pos_embed(m.patch_embed(x))[0]), blocks=blocks, final_norm=m.norm,
        readers=("cls",) if m.global_pool == "token" else ("patch_mean",), post_pool=m.fc_norm,
        steps=[("linear", m.head.weight, m.head.bias)], prefix=m.num_prefix_tokens,
    )  # fmt: skip


def beit_structure(m):
    """timm Beit."""
    from timm.layers import SwiGLU

    shared = m.rel_pos_bias() if m.rel_pos_bias is not None else None
    blocks = []
    for blk in m.blocks:
        a = blk.attn
        d = a.qkv.out_features // 3
        B = (a.q_bias, a.k_bias, a.v_bias) if a.q_bias is not None else _split3(a.qkv.bias, d)
        bias = a._get_rel_pos_bias() if a.relative_position_bias_table is not None else None
        if shared is not None:
            bias = shared.unsqueeze(0) if bias is None else bias + shared
        mlp = blk.mlp
        if isinstance(mlp, SwiGLU):
            ff = dict(gated=True, w_sig=mlp.fc1_x.weight, b_sig=mlp.fc1_x.bias,
                      gate=lambda u, mlp=mlp: mlp.act(mlp.fc1_g(u)))  # fmt: skip
        else:
            ff = dict(gated=False, fc1=mlp.fc1, act=mlp.act)
        blocks.append(dict(
            post=False, norm1=blk.norm1, norm2=blk.norm2, W=_split3(a.qkv.weight, d), B=B, heads=a.num_heads,
            scale=a.scale, q_norm=nn.Identity(), k_norm=nn.Identity(), rope=None, bias=bias,
            attn_norm=nn.Identity(), proj=a.proj, g1=blk.gamma_1, g2=blk.gamma_2, mid_norm=mlp.norm,
            fc2=mlp.fc2, **ff,
        ))  # fmt: skip

    def embed(x):
        t = m.patch_embed(x)
        t = torch.cat((m.cls_token.expand(t.shape[0], -1, -1), t), 1)
        return t if m.pos_embed is None else t + m.pos_embed

    return dict(
        embed=embed, blocks=blocks, final_norm=m.norm, post_pool=m.fc_norm, prefix=1,
        readers=("cls",) if m.global_pool == "token" else ("patch_mean",),
        steps=[("linear", m.head.weight, m.head.bias)],
    )  # fmt: skip


def _hf_block(norm1, norm2, att, heads, scale, proj, g1, g2, ff, bias=None):
    return dict(
        post=False, norm1=norm1, norm2=norm2, heads=heads, scale=scale, q_norm=nn.Identity(),
        k_norm=nn.Identity(), rope=None, bias=bias, attn_norm=nn.Identity(), proj=proj, g1=g1, g2=g2,
        W=(att.q_proj.weight, att.k_proj.weight, att.v_proj.weight),
        B=(att.q_proj.bias, att.k_proj.bias, att.v_proj.bias), mid_norm=nn.Identity(), **ff,
    )  # fmt: skip


def hf_beit_structure(m):
    cfg, bb = m.config, m.beit
    window = (cfg.image_size // cfg.patch_size,) * 2
    T = window[0] * window[1] + 1
    blocks = []
    for layer in bb.encoder.layer if hasattr(bb, "encoder") else bb.layers:
        bias = None
        if bb.shared_position_bias is not None:
            bias = bb.shared_position_bias(window, interpolate_pos_encoding=False, dim_size=T)
        if layer.relative_position_bias is not None:
            own = layer.relative_position_bias(window, False, dim_size=T)
            bias = own if bias is None else own + bias
        g1 = layer.lambda_1 if isinstance(layer.lambda_1, torch.Tensor) else None
        g2 = layer.lambda_2 if isinstance(layer.lambda_2, torch.Tensor) else None
        att = layer.attention
        blocks.append(_hf_block(layer.layernorm_before, layer.layernorm_after, att, cfg.num_attention_heads,
                                att.scaling, att.o_proj, g1, g2,
                                dict(gated=False, fc1=layer.mlp.fc1, act=layer.mlp.activation_fn, fc2=layer.mlp.fc2),
                                bias))  # fmt: skip
    mean = bb.pooler.layernorm is not None
    return dict(
        embed=bb.embeddings, blocks=blocks, final_norm=bb.layernorm, prefix=1,
        readers=("patch_mean",) if mean else ("cls",), post_pool=bb.pooler.layernorm if mean else nn.Identity(),
        steps=[("linear", m.classifier.weight, m.classifier.bias)],
    )  # fmt: skip


def dinov2_structure(m):
    cfg = m.config
    bb = m.dinov2 if hasattr(m, "dinov2") else m.dinov2_with_registers
    blocks = []
    for layer in bb.encoder.layer:
        att, mlp = layer.attention, layer.mlp
        if hasattr(mlp, "gate_proj"):
            ff = dict(gated=True, w_sig=mlp.up_proj.weight, b_sig=mlp.up_proj.bias, fc2=mlp.down_proj,
                      gate=lambda u, mlp=mlp: mlp.act_fn(mlp.gate_proj(u)))  # fmt: skip
        else:
            ff = dict(gated=False, fc1=mlp.fc1, act=mlp.activation_fn, fc2=mlp.fc2)
        blocks.append(_hf_block(layer.norm1, layer.norm2, att, cfg.num_attention_heads, att.scaling, att.o_proj,
                                layer.layer_scale1.lambda1, layer.layer_scale2.lambda1, ff))  # fmt: skip
    return dict(
        embed=bb.embeddings, blocks=blocks, final_norm=bb.layernorm, post_pool=nn.Identity(),
        prefix=1 + int(getattr(cfg, "num_register_tokens", 0) or 0), readers=("cls", "patch_mean"),
        steps=[("linear", m.classifier.weight, m.classifier.bias)],
    )  # fmt: skip


def clip_structure(clf):
    vm = clf.model.vision_model
    blocks = []
    for layer in vm.encoder.layers:
        att = layer.self_attn
        blocks.append(_hf_block(layer.layer_norm1, layer.layer_norm2, att, att.num_heads, att.scale, att.out_proj,
                                None, None,
                                dict(gated=False, fc1=layer.mlp.fc1, act=layer.mlp.activation_fn, fc2=layer.mlp.fc2)))  # fmt: skip
    text = clf.class_embeddings / clf.class_embeddings.norm(dim=-1, keepdim=True)
    scale = clf.model.logit_scale.exp()
    return dict(
        embed=lambda x: vm.pre_layrnorm(vm.embeddings(x)), blocks=blocks, final_norm=vm.post_layernorm,
        post_pool=nn.Identity(), prefix=1, readers=("cls",),
        steps=[("linear", clf.model.visual_projection.weight, None),
               ("factor", lambda v: v / v.norm(dim=-1, keepdim=True)),
               ("linear", text, None), ("factor", lambda v: v * scale)],
    )  # fmt: skip


def structure(model):
    name = type(model).__name__
    if name == "Eva":
        return eva_structure(model)
    if name == "Beit":
        return beit_structure(model)
    if name == "BeitForImageClassification":
        return hf_beit_structure(model)
    if name.startswith("Dinov2"):
        return dinov2_structure(model)
    return clip_structure(model)


def _heads(t, H):
    return t.view(1, t.shape[1], H, -1).transpose(1, 2)


def reference(model, x, target, start_block):
    """Per example: explicit forward, backward of the logit to every A, relprop, rollout from the seed.
    Returns (maps (N, P), R_A per example, dA per example, logits, max conservation error)."""
    st = structure(model)
    p = st["prefix"]
    maps, rel_all, grad_all, logit_all, cons = [], [], [], [], 0.0
    for i in range(x.shape[0]):
        with torch.enable_grad():
            h = st["embed"](x[i : i + 1])
            saved, attns = [], []
            for blk in st["blocks"]:
                H = blk["heads"]
                u1 = h if blk["post"] else blk["norm1"](h)
                q0, k0, v = (_heads(F.linear(u1, w, b), H) for w, b in zip(blk["W"], blk["B"]))
                q0, k0 = blk["q_norm"](q0), blk["k_norm"](k0)
                q, k = (blk["rope"]["fwd"](q0), blk["rope"]["fwd"](k0)) if blk["rope"] else (q0, k0)
                S = torch.einsum("bhid,bhjd->bhij", q, k) * blk["scale"]
                if blk["bias"] is not None:
                    S = S + blk["bias"]
                A = torch.softmax(S, -1)
                o = torch.einsum("bhij,bhjd->bhid", A, v).transpose(1, 2).reshape(1, h.shape[1], -1)
                on = blk["attn_norm"](o)
                pr = blk["proj"](on)
                a_out = blk["norm1"](pr) if blk["post"] else (pr * blk["g1"] if blk["g1"] is not None else pr)
                mid = h + a_out
                u2 = mid if blk["post"] else blk["norm2"](mid)
                if blk["gated"]:
                    sig = F.linear(u2, blk["w_sig"], blk["b_sig"])
                    keys = blk["gate"](u2) * sig
                else:
                    sig, keys = None, blk["act"](blk["fc1"](u2))
                kn = blk["mid_norm"](keys)
                f2 = blk["fc2"](kn)
                m_out = blk["norm2"](f2) if blk["post"] else (f2 * blk["g2"] if blk["g2"] is not None else f2)
                saved.append(dict(h=h, u1=u1, q0=q0, k0=k0, q=q, k=k, v=v, A=A, on=on, pr=pr, a_out=a_out,
                                  mid=mid, u2=u2, kn=kn, f2=f2, m_out=m_out))  # fmt: skip
                attns.append(A)
                h = mid + m_out
            hn = st["final_norm"](h)
            pooled = [st["post_pool"](hn[:, 0] if r == "cls" else hn[:, p:].mean(1)) for r in st["readers"]]
            z = torch.cat(pooled, -1)
            inputs = []
            for kind, *step in st["steps"]:
                inputs.append(z)
                z = F.linear(z, step[0], step[1]) if kind == "linear" else step[0](z)
            logits = z
            t = int(logits.argmax()) if target is None else int(target[i])
            grads = [g_.detach() for g_ in torch.autograd.grad(logits[0, t], attns)]
        logit_all.append(logits.detach())
        # -- head: linears alpha1-beta0, factors pass; readers by the z-rule (select / mean)
        r = torch.zeros_like(logits.detach())
        r[0, t] = 1
        for (kind, *step), inp in zip(reversed(st["steps"]), reversed(inputs)):
            if kind == "linear":
                r = ref_linear(inp.detach(), step[0].detach(), r)
        hn = hn.detach()
        d, T = hn.shape[-1], hn.shape[1]
        R = torch.zeros_like(hn)
        seed = torch.zeros(T, dtype=hn.dtype)
        for j, reader in enumerate(st["readers"]):
            rj = r[:, j * d : (j + 1) * d]
            share = rj.sum() / r.sum() if len(st["readers"]) > 1 else 1.0  # the shares sum to 1
            if reader == "cls":
                R = R + ref_simple(lambda s: s[:, 0], [hn], rj)[0]
                seed[0] = share
            else:
                R = R + ref_simple(lambda s: s[:, p:].mean(1), [hn], rj)[0]
                seed[p:] = share / (T - p)
        cons = max(cons, abs(float(R.detach().sum()) - 1))
        rel = [None] * len(st["blocks"])
        for b in reversed(range(len(st["blocks"]))):
            blk, s = st["blocks"][b], {k_: v_.detach() for k_, v_ in saved[b].items()}
            H = blk["heads"]
            r_mid, r_m = ref_add(s["mid"], s["m_out"], R)
            if blk["g2"] is not None:
                g2 = blk["g2"].detach()
                r_m = ref_simple(lambda f, g=g2: f * g, [s["f2"]], r_m)[0]
            r_keys = ref_linear(s["kn"], blk["fc2"].weight.detach(), r_m)  # mid norm: passes
            if blk["gated"]:  # keys = gate * signal, the gate a constant: R_signal = R_keys
                r_u2 = ref_linear(s["u2"], blk["w_sig"].detach(), r_keys)
            else:
                r_u2 = ref_linear(s["u2"], blk["fc1"].weight.detach(), r_keys)
            r_x, r_a = ref_add(s["h"], s["a_out"], r_mid + r_u2)
            if blk["g1"] is not None:
                g1 = blk["g1"].detach()
                r_a = ref_simple(lambda f, g=g1: f * g, [s["pr"]], r_a)[0]
            r_o = _heads(ref_linear(s["on"], blk["proj"].weight.detach(), r_a), H)  # inner norm passes
            cam1, cam_v = ref_simple(
                lambda a_, v_: torch.einsum("bhij,bhjd->bhid", a_, v_), [s["A"], s["v"]], r_o
            )
            cam1, cam_v = cam1 / 2, cam_v / 2
            rel[b] = cam1
            # softmax, scale and the bias pass: all of R_A to q k^T
            cam_q, cam_k = ref_simple(
                lambda q_, k_: torch.einsum("bhid,bhjd->bhij", q_, k_), [s["q"], s["k"]], cam1
            )
            cam_q, cam_k = cam_q / 2, cam_k / 2
            if blk["rope"] is not None:
                cam_q = blk["rope"]["relprop"](s["q0"], cam_q)
                cam_k = blk["rope"]["relprop"](s["k0"], cam_k)
            flat = [c.transpose(1, 2).reshape(1, T, -1) for c in (cam_q, cam_k, cam_v)]
            r_u1 = sum(ref_linear(s["u1"], w_.detach(), f_) for w_, f_ in zip(blk["W"], flat))
            R = r_x + r_u1
            cons = max(cons, abs(float(R.detach().sum()) - 1))
        cams = [(g_[0] * r_[0]).clamp(min=0).mean(0) for g_, r_ in zip(grads, rel)]
        eye = torch.eye(T, dtype=hn.dtype)
        joint = cams[start_block] + eye
        for c in cams[start_block + 1 :]:
            joint = (c + eye) @ joint
        maps.append((seed @ joint)[p:])
        rel_all.append(torch.cat(rel, 0))
        grad_all.append(torch.cat(grads, 0))
    return torch.stack(maps), rel_all, grad_all, torch.cat(logit_all), cons


# every family variant with a rule set: None = the head's own readout, "patch_mean" for mean pooling
CASES = {
    "eva02_token_scale_mlp": None,  # RoPE, SwiGLU (with a norm before fc2), separate q/k/v
    "vit_rope_token": None,  # RoPE (AttentionRope), layer scale
    "vit_rope_mixed": None,  # per-block, per-head RoPE frequencies
    "vit_rope_dinov3_registers": None,  # rotate-half RoPE, qk-norm, registers
    "eva02_avg": "patch_mean",
    "eva_post_norm_glu": "patch_mean",  # post-norm blocks, GluMlp
    "vit_rope_reg_gap": "patch_mean",  # no class token
    "beit_token_shared": None,  # shared relative position bias
    "beit_avg": "patch_mean",  # per-block relative position bias, layer scale
    "beit_swiglu": "patch_mean",
    "hf_beit_cls_shared": None,
    "hf_beit_mean": "patch_mean",
    "hf_dinov2": None,  # [class token, patch mean]
    "hf_dinov2_swiglu": None,
    "hf_dinov2_registers": None,
    "clip_zero_shot": None,  # projection, L2 normalisation, class matrix, logit scale
}


@pytest.mark.parametrize("name", list(CASES))
def test_map_matches_independent_float64_reference(name: str) -> None:
    model = FAMILY_VARIANTS[name]().double()
    x = images(3).double()
    target = torch.tensor([0, 6, 3])
    ref_maps, ref_rel, ref_grad, ref_logits, cons = reference(model, x, target, start_block=1)
    torch.testing.assert_close(
        ref_logits, model_logits(model, x), rtol=1e-10, atol=1e-10
    )  # the reference is the model
    assert cons < 1e-6  # every block input's relevance sums to 1: the rules conserve
    cr = CheferRelevancy(model, readout=CASES[name])
    out = cr.attribute(x, target=target)
    assert out.shape == (3, 1, 4, 4)
    rel, grad = cr.attention_relevance(x, target=target)
    torch.testing.assert_close(out.flatten(1), ref_maps, rtol=1e-8, atol=1e-12)
    # mean-pooled maps carry the identity's constant 1/P: their variation is checked on its own
    centred = out.flatten(1) - out.flatten(1).mean(1, keepdim=True)
    torch.testing.assert_close(centred, ref_maps - ref_maps.mean(1, keepdim=True), rtol=1e-7, atol=1e-14)
    torch.testing.assert_close(rel, torch.stack(ref_rel), rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(grad, torch.stack(ref_grad), rtol=1e-8, atol=1e-12)
    ref0, *_ = reference(model, x, None, start_block=0)
    out0 = cr.attribute(x, start_block=0)
    torch.testing.assert_close(out0.flatten(1), ref0, rtol=1e-8, atol=1e-12)
    diff = max((out.flatten(1) - ref_maps).abs().max().item(), (out0.flatten(1) - ref0).abs().max().item())
    print(f"\n[CheferRelevancy vs float64 reference] {name}: max |map - ref| = {diff:.2e} "
          f"(map scale {ref_maps.abs().max():.2e}), conservation error {cons:.1e}")  # fmt: skip
    assert ref_maps.flatten(1).std(1).min() > 0 and not torch.allclose(ref0, ref_maps)


def test_float32_models_run_and_match_float64() -> None:
    for name in ("vit_rope_dinov3_registers", "hf_dinov2_swiglu", "clip_zero_shot", "beit_avg"):
        m32 = FAMILY_VARIANTS[name]()
        readout = CASES[name]
        x = images(2)
        a = CheferRelevancy(m32, readout=readout).attribute(x, target=[1, 2])
        b = CheferRelevancy(FAMILY_VARIANTS[name]().double(), readout=readout).attribute(
            x.double(), target=[1, 2]
        )
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), b, rtol=1e-3, atol=1e-3 * b.abs().max().item())


def test_batch_equals_single_calls() -> None:
    for name in ("vit_rope_mixed", "hf_dinov2_registers", "eva02_avg"):
        model = FAMILY_VARIANTS[name]().double()
        cr = CheferRelevancy(model, readout=CASES[name])
        x = images(3, seed=4).double()
        batch = cr.attribute(x, target=[2, 0, 1])
        singles = torch.cat([cr.attribute(x[i : i + 1], target=t) for i, t in enumerate([2, 0, 1])])
        torch.testing.assert_close(batch, singles, rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(cr.attribute(x, target=[2, 0, 1], internal_batch_size=2), batch)


# -- structure the rules rely on -----------------------------------------------------------------------
@pytest.mark.parametrize("name", ["eva02_avg", "eva_post_norm_glu", "beit_swiglu", "hf_dinov2_swiglu"])
def test_gated_mlps_are_gate_times_signal(name: str) -> None:
    adapter = adapt(FAMILY_VARIANTS[name]())
    u = torch.randn(2, 5, adapter.embed_dim)
    for b in range(adapter.num_blocks):
        parts = adapter.block(b)
        assert parts.mlp_in is not None and parts.mlp_gate is not None
        torch.testing.assert_close(parts.mlp_in(u), parts.mlp_gate(u) * parts.fc1(u), rtol=1e-6, atol=1e-6)


# -- refusals ------------------------------------------------------------------------------------------
def test_refusals_say_what_the_head_reads() -> None:
    siglip = FAMILY_VARIANTS["siglip_zero_shot"]()
    reads_map = "its head reads an attention-pooled summary of all tokens \\(attention-pooling head\\)"
    with pytest.raises(
        InputValidationError, match=f"ZeroShotClassifier over SiglipModel has no class token: {reads_map}"
    ):
        CheferRelevancy(siglip)
    with pytest.raises(InputValidationError, match=f"has no class token: {reads_map}"):
        _ = adapt(siglip).class_token_index
    with pytest.raises(InputValidationError, match="reads an attention-pooled summary.*not defined"):
        CheferRelevancy(siglip, readout="patch_mean")
    assert "attention-pooling head" in adapt(siglip).lrp_missing_rules()[0]
    dinov2 = FAMILY_VARIANTS["hf_dinov2"]()
    with pytest.raises(
        InputValidationError,
        match="head of Dinov2ForImageClassification reads the class token concatenated with the mean of the "
        "patch tokens; use the default readout=None",
    ):
        CheferRelevancy(dinov2, readout="patch_mean")
    assert adapt(dinov2).lrp_missing_rules() == []
    for name in ("eva02_avg", "hf_beit_mean"):
        with pytest.raises(
            InputValidationError,
            match="has a class token, but its head reads the mean of the patch tokens \\(global average pooling\\), "
            "not the class token.*readout='patch_mean'",
        ):
            CheferRelevancy(FAMILY_VARIANTS[name]())
    with pytest.raises(
        InputValidationError, match="has no class token: its head reads the mean.*readout='patch_mean'"
    ):
        CheferRelevancy(FAMILY_VARIANTS["vit_rope_reg_gap"]())
    with pytest.raises(InputValidationError, match="readout must be None"):
        CheferRelevancy(dinov2, readout="cls")


def test_missing_rules_refused_once_at_construction() -> None:
    # A gated MLP that does not expose its gate, and attention with shared k/v heads: no rule.
    adapter = adapt(FAMILY_VARIANTS["vit_rope_token"]())
    block = adapter.block
    adapter.block = lambda b: dataclasses.replace(block(b), mlp_in=lambda u: u, mlp_gate=None)
    assert adapter.lrp_missing_rules() == [
        "an MLP whose key coefficients are not a gate times a linear signal branch"
    ]
    with pytest.raises(UnsupportedModelError, match="no LRP rule for parts of Eva: an MLP whose key"):
        CheferRelevancy(adapter)
    adapter.block = lambda b: dataclasses.replace(block(b), qkv_weight=None)
    with pytest.raises(UnsupportedModelError, match="grouped-query attention"):
        CheferRelevancy(adapter)
    adapter.block = block
    assert adapter.lrp_missing_rules() == []
    CheferRelevancy(adapter)

"""RawAttention, AttentionRollout and CheferGradientRollout against direct per-sample computations.

The references read attention from the unmodified models' own attention modules (timm with
fused attention off and hooks; Hugging Face eager attention with output_attentions) and
compute products with explicit loops over samples and blocks.
"""

from __future__ import annotations

import pytest
import torch
from conftest import TIMM_VARIANTS, images, small_hf, small_timm

from captum_clsemb import InputValidationError
from captum_clsemb.attr.attention_rollout import AttentionRollout
from captum_clsemb.attr.chefer_gradient_rollout import CheferGradientRollout
from captum_clsemb.attr.raw_attention import RawAttention
from captum_clsemb.convert import timm_to_hf


def timm_attentions(model, x: torch.Tensor, grad: bool = False) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits and per-block attention (N, H, T, T) from timm's own non-fused attention (hooks)."""
    seen: list[torch.Tensor] = []
    handles = []
    for blk in model.blocks:
        blk.attn.fused_attn = False
        handles.append(blk.attn.attn_drop.register_forward_hook(lambda m, i, o: seen.append(o)))
    with torch.set_grad_enabled(grad):
        logits = model(x)
    for h in handles:
        h.remove()
    return logits, seen


def hf_attentions(model, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        return list(model(pixel_values=x, output_attentions=True).attentions)


def direct_rollout(attns: list[torch.Tensor], fusion: str, ratio: float, start: int) -> torch.Tensor:
    """Explicit loops: per sample, per block; R = A_hat_B ... A_hat_start; returns (N, T) class row."""
    n, _, t, _ = attns[0].shape
    out = []
    for i in range(n):
        joint = None
        for b in range(start, len(attns)):
            a = attns[b][i]
            fused = {"mean": a.mean(0), "max": a.max(0).values, "min": a.min(0).values}[fusion].clone()
            k = int(t * t * ratio)
            if k:
                flat = fused.flatten()
                order = [j for j in flat.argsort().tolist() if j != 0]  # protect class->class (index 0)
                for j in order[:k]:
                    flat[j] = 0.0
                fused = flat.view(t, t)
            a_hat = 0.5 * fused + 0.5 * torch.eye(t)
            for r in range(t):
                a_hat[r] = a_hat[r] / a_hat[r].sum()
            joint = a_hat if joint is None else a_hat @ joint
        out.append(joint[0])
    return torch.stack(out)


def test_raw_attention_equals_hooked_attention() -> None:
    model = small_timm()
    x = images(3)
    _, attns = timm_attentions(small_timm(), x)
    for block in (-1, 0):
        ours = RawAttention(model).attribute(x, block=block)
        assert ours.shape == (3, 1, 4, 4)
        ref = attns[block][:, :, 0, 1:].mean(1).reshape(3, 1, 4, 4)
        torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-5)
    hf = small_hf("vit", attn_implementation="eager")
    ref = hf_attentions(hf, x)[-1][:, :, 0, 1:].mean(1).reshape(3, 1, 4, 4)
    torch.testing.assert_close(RawAttention(hf).attribute(x), ref, atol=1e-6, rtol=1e-5)


def test_raw_attention_skips_register_tokens() -> None:
    model = TIMM_VARIANTS["registers"]()  # 1 class + 4 register tokens
    x = images(2)
    _, attns = timm_attentions(TIMM_VARIANTS["registers"](), x)
    ref = attns[-1][:, :, 0, 5:].mean(1).reshape(2, 1, 4, 4)
    torch.testing.assert_close(RawAttention(model).attribute(x), ref, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    "fusion,ratio,start",
    [("mean", 0.0, 0), ("max", 0.0, 1), ("min", 0.0, 0), ("max", 0.9, 0), ("mean", 0.5, 1)],
)
def test_rollout_equals_direct_product(fusion: str, ratio: float, start: int) -> None:
    model = small_timm()
    x = images(3)
    _, attns = timm_attentions(small_timm(), x)
    ours = AttentionRollout(model).attribute(x, head_fusion=fusion, discard_ratio=ratio, start_block=start)
    ref = direct_rollout(attns, fusion, ratio, start)[:, 1:].reshape(3, 1, 4, 4)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-5)


def test_rollout_hf_and_batching() -> None:
    hf = small_hf("vit", attn_implementation="eager")
    x = images(4)
    ro = AttentionRollout(hf)
    ours = ro.attribute(x, head_fusion="max", discard_ratio=0.3)
    ref = direct_rollout(hf_attentions(hf, x), "max", 0.3, 0)[:, 1:].reshape(4, 1, 4, 4)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-5)
    singles = torch.cat([ro.attribute(x[i : i + 1], head_fusion="max", discard_ratio=0.3) for i in range(4)])
    torch.testing.assert_close(ours, singles, atol=1e-6, rtol=1e-5)
    chunked = ro.attribute(x, head_fusion="max", discard_ratio=0.3, internal_batch_size=3)
    torch.testing.assert_close(ours, chunked, atol=1e-6, rtol=1e-5)
    # Rows of every A_hat sum to 1, so the full class row of R sums to 1: image share is < 1.
    assert (ours.sum((1, 2, 3)) < 1).all() and (ours >= 0).all()


def direct_chefer(model, x: torch.Tensor, target: list[int]) -> torch.Tensor:
    """Per sample: one forward + backward of the target logit, explicit loops over blocks."""
    out = []
    for i in range(x.shape[0]):
        logits, attns = timm_attentions(model, x[i : i + 1], grad=True)
        for a in attns:
            a.retain_grad()
        logits[0, target[i]].backward()
        t = attns[0].shape[-1]
        r = torch.eye(t)
        for a in attns:
            cam = (a.grad[0] * a[0]).clamp(min=0).mean(0)
            r = r + cam @ r
        out.append(r[0, 1:].detach())
        model.zero_grad()
    return torch.stack(out)


def test_chefer_equals_direct_per_sample_computation() -> None:
    model = small_timm()
    x = images(4)
    target = [3, 0, 6, 3]
    ours = CheferGradientRollout(model).attribute(x, target=target)
    assert ours.shape == (4, 1, 4, 4)
    ref = direct_chefer(small_timm(), x, target).reshape(4, 1, 4, 4)
    assert ref.abs().max() > 1e-4  # R starts at I (zero image entries): gradients contributed
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-5)
    chunked = CheferGradientRollout(model).attribute(x, target=target, internal_batch_size=3)
    torch.testing.assert_close(ours, chunked, atol=1e-6, rtol=1e-5)


def test_chefer_prediction_twins_and_frozen_model() -> None:
    timm_model = small_timm()
    x = images(3)
    with torch.no_grad():
        pred = timm_model(x).argmax(-1)
    ours = CheferGradientRollout(timm_model).attribute(x)
    torch.testing.assert_close(ours, CheferGradientRollout(timm_model).attribute(x, target=pred))
    hf_model = timm_to_hf(timm_model).eval()
    torch.testing.assert_close(
        CheferGradientRollout(hf_model).attribute(x, target=pred), ours, atol=1e-5, rtol=1e-4
    )
    torch.testing.assert_close(AttentionRollout(hf_model).attribute(x), AttentionRollout(timm_model).attribute(x),
                               atol=1e-6, rtol=1e-5)  # fmt: skip
    for p in timm_model.parameters():
        p.requires_grad_(False)
    torch.testing.assert_close(CheferGradientRollout(timm_model).attribute(x, target=pred), ours)
    assert all(p.grad is None and not p.requires_grad for p in timm_model.parameters())


def test_interpolation_and_errors() -> None:
    model = small_timm()
    x = images(2)
    for method in (RawAttention(model), AttentionRollout(model), CheferGradientRollout(model)):
        grid = method.attribute(x)
        up = method.attribute(x, interpolate_to=(32, 32))
        assert up.shape == (2, 1, 32, 32)
        torch.testing.assert_close(up, torch.nn.functional.interpolate(grid, (32, 32), mode="bilinear"))
        with pytest.raises(InputValidationError, match="out of range"):
            method.attribute(x, target=9)
    gap = TIMM_VARIANTS["gap_fc_norm"]()
    for cls in (RawAttention, AttentionRollout, CheferGradientRollout):
        with pytest.raises(InputValidationError, match="no class token"):
            cls(gap).attribute(x)
    with pytest.raises(InputValidationError, match="head_fusion"):
        AttentionRollout(model).attribute(x, head_fusion="sum")
    with pytest.raises(InputValidationError, match="discard_ratio"):
        AttentionRollout(model).attribute(x, discard_ratio=1.0)
    with pytest.raises(InputValidationError, match="start_block"):
        AttentionRollout(model).attribute(x, start_block=3)
    with pytest.raises(InputValidationError, match="block index"):
        RawAttention(model).attribute(x, block=5)


def test_only_the_read_blocks_materialise_attention(monkeypatch: pytest.MonkeyPatch) -> None:
    from captum_clsemb.trace import forward as forward_module

    calls: list[int] = []
    real = forward_module.F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    model = small_timm()  # 3 blocks
    x = images(2)
    _, attns = timm_attentions(model, x)
    monkeypatch.setattr(forward_module.F, "scaled_dot_product_attention", counting)
    # RawAttention of block 1: blocks 0 and 2 fused (block 2 only for the class token).
    raw = RawAttention(model).attribute(x, block=1)
    assert len(calls) == 2
    torch.testing.assert_close(raw.flatten(1), attns[1][:, :, 0, 1:].mean(1), atol=1e-6, rtol=1e-5)
    calls.clear()
    out = AttentionRollout(model).attribute(x, start_block=2)
    assert len(calls) == 2  # blocks 0 and 1 fused, block 2 explicit
    torch.testing.assert_close(
        out.flatten(1), direct_rollout(attns, "mean", 0.0, 2)[:, 1:], atol=1e-6, rtol=1e-5
    )

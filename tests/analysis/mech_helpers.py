"""Independent reference computations for the analysis tests: forward hooks on the
unmodified timm model (its own fused attention), the model's own norm and head."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def randomized(model: nn.Module, seed: int = 0, scale: float = 0.3) -> nn.Module:
    """Give every parameter random values so that no quantity is degenerate (init leaves
    biases at 0, LayerNorm at 1 and logits nearly flat)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model.eval()


def hook_states(model: nn.Module, x: Tensor) -> list[dict[str, Tensor]]:
    """Per block of a timm ViT: block input/output, sub-layer outputs and key coefficients."""
    states = [dict() for _ in model.blocks]
    handles = []
    for b, blk in enumerate(model.blocks):
        s = states[b]
        handles += [
            blk.register_forward_pre_hook(lambda m, a, s=s: s.__setitem__("resid_pre", a[0])),
            blk.register_forward_hook(lambda m, a, o, s=s: s.__setitem__("resid_post", o)),
            blk.ls1.register_forward_hook(lambda m, a, o, s=s: s.__setitem__("attn_out", o)),
            blk.ls2.register_forward_hook(lambda m, a, o, s=s: s.__setitem__("mlp_out", o)),
            blk.mlp.fc2.register_forward_pre_hook(lambda m, a, s=s: s.__setitem__("mlp_keys", a[0])),
            blk.attn.proj.register_forward_pre_hook(lambda m, a, s=s: s.__setitem__("attn_keys", a[0])),
        ]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    for s in states:
        s["resid_mid"] = s["resid_pre"] + s["attn_out"]
    return states


def lens(model: nn.Module, states: Tensor) -> Tensor:
    """Logits of token states through the timm model's own final norm and head (with bias)."""
    with torch.no_grad():
        return model.head(model.fc_norm(model.norm(states)))


def predictions(model: nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad():
        return model(x).argmax(-1)


def make_loader(*tensors: Tensor, batch_size: int = 2) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*tensors), batch_size=batch_size)


def assert_rates_equal(a: object, b: object) -> None:
    """Nested dicts of tensors are equal (NaN == NaN)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (a, b)
        for key in a:
            assert_rates_equal(a[key], b[key])
    elif isinstance(a, Tensor):
        torch.testing.assert_close(a, b, equal_nan=True, check_dtype=False)
    else:
        assert a == b

"""Every attribution class inside Captum's own tools, unchanged, on the bundled model (timm and HF twin).

Each test checks values, not only that a call runs: NoiseTunnel against the mean over the same
noise draws (reproduced by seeding), sensitivity_max and infidelity against their formulas on the
same perturbations, tuple and tensor inputs and every Captum target form against one another,
and the timm model against its Hugging Face twin.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from captum.attr import Attribution, GradientAttribution, NoiseTunnel
from captum.metrics import infidelity, sensitivity_max

from captum_clsemb import load_demo_images, load_demo_model
from captum_clsemb.attr import (
    AttentionRollout,
    BlockwiseIdentifiability,
    CheferGradientRollout,
    CheferRelevancy,
    ClassEmbeddingGradient,
    RawAttention,
)
from captum_clsemb.errors import InputValidationError

EXPLANATIONS = [
    ClassEmbeddingGradient,
    CheferRelevancy,
    CheferGradientRollout,
    AttentionRollout,
    RawAttention,
]
METHODS = [*EXPLANATIONS, BlockwiseIdentifiability]
GRADIENT_METHODS = (ClassEmbeddingGradient, CheferRelevancy, CheferGradientRollout)
IDS = [m.__name__ for m in METHODS]


@functools.cache
def _model(framework: str) -> torch.nn.Module:
    return load_demo_model(framework)


@functools.cache
def _data() -> tuple[torch.Tensor, torch.Tensor]:
    x, y, _ = load_demo_images(max_per_class=1)
    return x[[0, 3]], y[[0, 3]]  # an airplane and a cat


def _logits(framework: str):
    model = _model(framework)
    return model if framework == "timm" else (lambda px: model(pixel_values=px).logits)


@pytest.fixture(params=["timm", "hf"])
def framework(request) -> str:
    return request.param


@pytest.mark.parametrize("method", METHODS, ids=IDS)
def test_base_classes(method) -> None:
    m = method(_model("timm"))
    assert isinstance(m, Attribution)
    assert isinstance(m, GradientAttribution) == (method in GRADIENT_METHODS)
    assert NoiseTunnel(m).is_gradient_method == (method in GRADIENT_METHODS)
    assert not m.has_convergence_delta()


@pytest.mark.parametrize("method", METHODS, ids=IDS)
def test_input_and_target_forms(method, framework) -> None:
    x, y = _data()
    m = method(_model(framework))
    ref = m.attribute(x, target=y)
    out = m.attribute((x,), target=y)
    assert isinstance(out, tuple) and len(out) == 1  # Captum: tuple in, tuple out
    torch.testing.assert_close(out[0], ref, rtol=0, atol=0)
    torch.testing.assert_close(m.attribute(x, target=y, additional_forward_args=None), ref, rtol=0, atol=0)
    # Captum's forms of one target per example all give the same numbers
    forms = [y.tolist(), y[:, None], [(int(c),) for c in y], [[int(c)] for c in y]]
    for form in forms:
        torch.testing.assert_close(m.attribute(x, target=form), ref, rtol=0, atol=0)
    # an int and a 1-tuple mean the same class for every example
    same = m.attribute(x, target=torch.tensor([5, 5]))
    for form in (5, (5,), torch.tensor(5), torch.tensor([5])):
        torch.testing.assert_close(m.attribute(x, target=form), same, rtol=0, atol=0)
    with pytest.raises(InputValidationError, match="images only"):
        m.attribute(x, target=y, additional_forward_args=(x,))
    with pytest.raises(InputValidationError, match="one image tensor"):
        m.attribute((x, x), target=y)


@pytest.mark.parametrize("method", METHODS, ids=IDS)
def test_timm_and_hf_twin_agree(method) -> None:
    x, y = _data()
    if method is CheferRelevancy:
        # LRP's z-rule divides by sums near zero: float32 rounding differences between the two
        # implementations are amplified, so the exact identity is checked in float64.
        a = method(load_demo_model("timm").double()).attribute(x.double(), target=y)
        b = method(load_demo_model("hf").double()).attribute(x.double(), target=y)
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-12)
        return
    a = method(_model("timm")).attribute(x, target=y)
    b = method(_model("hf")).attribute(x, target=y)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(a.abs().max()))


def _noise_tunnel_reference(m, x, y, nt_samples, batch, stdev, seed):
    """The noise draws of NoiseTunnel (partitions of `batch`, then the rest), and the attributions on them."""
    torch.manual_seed(seed)
    parts = [batch] * (nt_samples // batch) + ([nt_samples % batch] if nt_samples % batch else [])
    per_part = []
    for s in parts:
        expanded = x.repeat_interleave(s, dim=0)
        noise = torch.normal(0, torch.tensor(stdev).repeat(expanded.shape))
        a = m.attribute(expanded + noise, target=y.repeat_interleave(s))
        per_part.append(a.reshape(x.shape[0], s, *a.shape[1:]))
    return torch.cat(per_part, 1)  # (N, nt_samples, ...)


@pytest.mark.parametrize("method", METHODS, ids=IDS)
def test_noise_tunnel(method, framework) -> None:
    x, y = _data()
    m = method(_model(framework))
    stdev, seed = 0.2, 11
    draws = _noise_tunnel_reference(m, x, y, nt_samples=3, batch=2, stdev=stdev, seed=seed)
    expected = {
        "smoothgrad": draws.mean(1),
        "smoothgrad_sq": (draws**2).mean(1),
        "vargrad": (draws**2).mean(1) - draws.mean(1) ** 2,
    }
    nt = NoiseTunnel(m)
    for nt_type, want in expected.items():
        torch.manual_seed(seed)
        got = nt.attribute(
            (x,), nt_type=nt_type, nt_samples=3, nt_samples_batch_size=2, stdevs=stdev, target=y
        )
        assert isinstance(got, tuple) and got[0].shape == m.attribute(x, target=y).shape
        assert torch.isfinite(got[0]).all()
        torch.testing.assert_close(got[0], want, rtol=1e-5, atol=1e-6 * float(want.abs().max()) + 1e-12)
    # the noise changes the maps (so the comparison above is not trivial) ...
    assert not torch.allclose(draws[:, 0], draws[:, 1])
    # ... and inside torch.no_grad() everything gives the same numbers
    torch.manual_seed(seed)
    with torch.no_grad():
        got = nt.attribute(
            x, nt_type="smoothgrad", nt_samples=3, nt_samples_batch_size=2, stdevs=stdev, target=y
        )
        plain = m.attribute(x, target=y)
    torch.testing.assert_close(
        got, expected["smoothgrad"], rtol=1e-5, atol=1e-6 * float(got.abs().max()) + 1e-12
    )
    torch.testing.assert_close(plain, m.attribute(x, target=y), rtol=0, atol=0)


def test_noise_tunnel_multi_target_class_embedding_gradient() -> None:
    """K > 1 targets per image (a (N, K) tensor) go through NoiseTunnel as K maps per image."""
    x, y = _data()
    ceg = ClassEmbeddingGradient(_model("timm"))
    targets = torch.stack([y, (y + 1) % 10], 1)  # (N, 2)
    torch.manual_seed(3)
    multi = NoiseTunnel(ceg).attribute(x, nt_samples=2, stdevs=0.2, target=targets)
    assert multi.shape == (2, 2, 1, 8, 8)
    for k in range(2):
        torch.manual_seed(3)
        single = NoiseTunnel(ceg).attribute(x, nt_samples=2, stdevs=0.2, target=targets[:, k])
        torch.testing.assert_close(multi[:, k], single, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", METHODS, ids=IDS)
def test_sensitivity_max(method, framework) -> None:
    x, y = _data()
    m = method(_model(framework))
    n, radius = 3, 0.05
    torch.manual_seed(5)
    got = sensitivity_max(m.attribute, (x,), target=y, perturb_radius=radius, n_perturb_samples=n)
    # the same draws: Captum's default_perturb_func on the inputs repeated n times per example
    torch.manual_seed(5)
    expanded = x.repeat_interleave(n, dim=0)
    perturbed = expanded + torch.FloatTensor(expanded.size()).uniform_(-radius, radius)
    base = m.attribute(x, target=y).flatten(1)
    moved = m.attribute(perturbed, target=y.repeat_interleave(n)).flatten(1).reshape(2, n, -1)
    norm = base.norm(dim=1, keepdim=True)
    want = ((moved - base[:, None]).norm(dim=2) / torch.where(norm == 0, 1.0, norm)).amax(1)
    assert got.shape == (2,) and torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    if method is not BlockwiseIdentifiability:  # ranks may not move under a small perturbation
        assert (got > 0).all()


def _input_shaped(m, x, y) -> torch.Tensor:
    if isinstance(m, BlockwiseIdentifiability):
        return m.patch_map(m.attribute(x, target=y), interpolate_to=x.shape[-2:]).repeat(1, x.shape[1], 1, 1)
    return m.attribute(x, target=y, interpolate_to="input")


@pytest.mark.parametrize("method", METHODS, ids=IDS)
def test_infidelity(method, framework) -> None:
    x, y = _data()
    m = method(_model(framework))
    attr = _input_shaped(m, x, y)
    assert attr.shape == x.shape
    # interpolate_to="input": the patch-grid map upsampled bilinearly, repeated over channels
    if method is BlockwiseIdentifiability:
        grid = m.attribute(x, target=y)[:, -1, 1:].reshape(2, 1, 8, 8)
    else:
        grid = m.attribute(x, target=y)
    up = F.interpolate(grid, size=x.shape[-2:], mode="bilinear", align_corners=False)
    torch.testing.assert_close(attr, up.expand_as(x), rtol=1e-6, atol=1e-7)

    n = 4

    def perturb(inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(0)
        noise = 0.1 * torch.randn(inputs.shape, generator=g)
        return noise, inputs - noise

    forward = _logits(framework)
    got = infidelity(forward, perturb, x, attr, target=y, n_perturb_samples=n)
    noise, perturbed = perturb(x.repeat_interleave(n, dim=0))
    with torch.no_grad():
        clean = forward(x).gather(1, y[:, None]).repeat_interleave(n, 0)[:, 0]
        moved = forward(perturbed).gather(1, y.repeat_interleave(n)[:, None])[:, 0]
    explained = (attr.repeat_interleave(n, 0) * noise).flatten(1).sum(1)
    want = ((explained - (clean - moved)) ** 2).reshape(2, n).mean(1)
    assert got.shape == (2,) and torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)


def test_interpolate_to_input_refuses_several_maps_per_image() -> None:
    x, y = _data()
    ceg = ClassEmbeddingGradient(_model("timm"))
    with pytest.raises(InputValidationError, match="return_per='global'"):
        ceg.attribute(x, target=y, return_per="head", interpolate_to="input")
    with pytest.raises(InputValidationError, match="one target per image"):
        ceg.attribute(x, target=torch.stack([y, y], 1), interpolate_to="input")
    with pytest.raises(InputValidationError, match="interpolate_to"):
        RawAttention(_model("timm")).attribute(x, interpolate_to="inputs")

"""pixel_removal_auc: the perturbed images themselves, tie order, batching, upsampling."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import images, model_logits, small_hf, small_timm

from captum_clsemb import InputValidationError
from captum_clsemb.metrics import pixel_removal_auc

FR = (0.0, 0.1, 0.29, 0.5, 0.9)


class Recorder:
    """A linear classifier that records every batch it sees."""

    def __init__(self, num_classes: int = 5, shape=(3, 10, 10)) -> None:
        g = torch.Generator().manual_seed(0)
        self.w = torch.randn(int(torch.tensor(shape).prod()), num_classes, generator=g)
        self.seen: list[torch.Tensor] = []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.clone())
        return x.flatten(1) @ self.w


def test_all_zero_map_removes_pixels_in_raster_order() -> None:
    # Documented tie order: ties go to the lower flat pixel index (row * W + col) first, in both modes.
    x = images(2, size=10) + 5.0  # no pixel is 0 before removal
    for mode in ("negative", "positive"):
        rec = Recorder()
        pixel_removal_auc(rec, x, torch.zeros(2, 1, 10, 10), mode=mode, fractions=FR, baseline=0.0)
        batch = torch.cat(rec.seen[1:])  # first call: the unperturbed images
        assert batch.shape == (2 * 4, 3, 10, 10)  # every (example, step > 0) pair, example-major
        for i in range(2):
            for j, k in enumerate([10, 29, 50, 90]):  # floor(f * 100)
                img = batch[i * 4 + j].flatten(1)
                assert torch.equal(img[:, :k], torch.zeros(3, k))
                assert torch.equal(img[:, k:], x[i].flatten(1)[:, k:])


def test_removed_pixels_are_the_top_of_the_map() -> None:
    x = images(2, size=10) + 5.0
    attr = torch.randn(2, 1, 10, 10, generator=torch.Generator().manual_seed(4))
    for mode, sign in (("positive", 1), ("negative", -1)):
        rec = Recorder()
        pixel_removal_auc(rec, x, attr, mode=mode, fractions=(0.3,), baseline=-1.0)
        out = rec.seen[-1]
        for i in range(2):
            k = 30
            top = torch.topk(sign * attr[i].flatten(), k).indices
            expected = x[i].flatten(1).clone()
            expected[:, top] = -1.0
            assert torch.equal(out[i].flatten(1), expected)


def test_zero_removal_is_clean_and_batched_equals_unbatched() -> None:
    model, x = small_timm(), images(4)
    attr = torch.randn(4, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    target = torch.tensor([0, 2, 4, 6])
    kw = dict(target=target, fractions=FR, score="probability", return_curve=True)
    auc, c = pixel_removal_auc(model, x, attr, **kw)
    clean = model_logits(model, x).softmax(-1).gather(1, target[:, None])[:, 0]
    torch.testing.assert_close(c[:, 0], clean)
    for chunk in (1, 3, 7):
        auc_b, c_b = pixel_removal_auc(model, x, attr, max_examples_per_batch=chunk, **kw)
        torch.testing.assert_close(c_b, c, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(auc_b, auc, atol=1e-4, rtol=1e-5)
    singles = torch.cat([pixel_removal_auc(model, x[i : i + 1], attr[i : i + 1], **{**kw, "target": [int(target[i])]})[1]
                         for i in range(4)])  # fmt: skip
    torch.testing.assert_close(singles, c, atol=1e-6, rtol=1e-5)
    fr = torch.tensor(FR, dtype=torch.float64)
    torch.testing.assert_close(auc, (torch.trapezoid(c.double(), x=fr, dim=1) * 100).float())


def test_constant_map_identical_curves_and_patch_grid_upsampling() -> None:
    model, x = small_timm(), images(3)
    kw = dict(target=[1, 2, 3], fractions=FR, score="logit", return_curve=True)
    const = torch.full((3, 1, 32, 32), 2.0)
    assert torch.equal(pixel_removal_auc(model, x, const, mode="negative", **kw)[1],
                       pixel_removal_auc(model, x, const, mode="positive", **kw)[1])  # fmt: skip
    grid = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(7))
    up = F.interpolate(grid, size=(32, 32), mode="bilinear", align_corners=False)
    for mode in ("negative", "positive"):
        torch.testing.assert_close(pixel_removal_auc(model, x, grid, mode=mode, **kw)[1],
                                   pixel_removal_auc(model, x, up, mode=mode, **kw)[1])  # fmt: skip
    # multi-channel maps are summed over channels
    attr3 = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(pixel_removal_auc(model, x, attr3, **kw)[1],
                               pixel_removal_auc(model, x, attr3.sum(1, keepdim=True), **kw)[1])  # fmt: skip


def test_per_channel_baseline_and_hf_outputs() -> None:
    x = images(1, size=10) + 5.0
    rec = Recorder()
    base = torch.tensor([-1.0, -2.0, -3.0]).view(1, 3, 1, 1)
    pixel_removal_auc(rec, x, torch.zeros(1, 1, 10, 10), fractions=(0.5,), baseline=base)
    out = rec.seen[-1][0].flatten(1)
    assert torch.equal(out[:, :50], base.view(3, 1).expand(3, 50))
    # an HF model passed directly: its .logits output is unwrapped
    hf, xi = small_hf("vit"), images(2)
    attr = torch.randn(2, 1, 4, 4)
    direct = pixel_removal_auc(hf, xi, attr, target=[0, 1], score="logit", return_curve=True)[1]
    wrapped = pixel_removal_auc(lambda v: hf(pixel_values=v).logits, xi, attr, target=[0, 1], score="logit",
                                return_curve=True)[1]  # fmt: skip
    torch.testing.assert_close(direct, wrapped)


def test_input_errors() -> None:
    model, x = small_timm(), images(2)
    with pytest.raises(InputValidationError, match="attributions"):
        pixel_removal_auc(model, x, torch.randn(2, 16))
    with pytest.raises(InputValidationError, match="baseline"):
        pixel_removal_auc(model, x, torch.randn(2, 1, 4, 4), baseline=torch.zeros(5))
    with pytest.raises(InputValidationError, match="logits"):
        pixel_removal_auc(lambda v: v.sum(), x, torch.randn(2, 1, 4, 4))

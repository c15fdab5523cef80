"""Segmentation masks: ImageNet-S and single-channel PNGs written to tmp_path, geometry against
torchvision transforms, area coverage against exact overlaps, and the Fig. 3a comparison
against direct computations and scipy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import images, small_timm
from mech_helpers import make_loader, randomized
from PIL import Image
from scipy import stats as st
from timm.data import create_transform

from captum_clsemb import BlockwiseIdentifiability, InputValidationError
from captum_clsemb.analysis import (
    class_context_comparison,
    class_context_identifiability,
    find_masks,
    input_region,
    mask_coverage,
    mask_token_labels,
    patch_labels_from_mask,
    read_mask,
    transform_geometry,
)
from captum_clsemb.stats import bootstrap_ratio_ci


def write_imagenet_s(path, ids: np.ndarray) -> None:
    """ImageNet-S encoding: id = R + 256 * G, B = 0."""
    rgb = np.stack([ids % 256, ids // 256, np.zeros_like(ids)], -1).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb, mode="RGB").save(path)


def overlap_matrix(n_in: int, n_out: int, start: float = 0.0, length: float | None = None) -> np.ndarray:
    """(n_out, n_in) exact share of each output cell covered by each input pixel."""
    length = n_in if length is None else length
    edges = start + np.arange(n_out + 1) * length / n_out
    lo, hi = edges[:-1, None], edges[1:, None]
    px = np.arange(n_in)[None, :]
    return np.clip(np.minimum(hi, px + 1) - np.maximum(lo, px), 0, None) / (hi - lo)


def test_read_imagenet_s_and_single_channel_masks(tmp_path) -> None:
    ids = np.zeros((6, 7), dtype=np.int64)
    ids[1:3, 2:5] = 300  # R = 44, G = 1
    ids[4, :] = 1000  # ignore
    ids[5, 6] = 919
    write_imagenet_s(tmp_path / "a.png", ids)
    np.testing.assert_array_equal(read_mask(tmp_path / "a.png"), ids)
    binary = (ids == 300).astype(np.uint8) * 255
    Image.fromarray(binary, mode="L").save(tmp_path / "b.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "b.png"), binary)
    pal = Image.fromarray((ids == 300).astype(np.uint8) * 3, mode="P")
    pal.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255])
    pal.save(tmp_path / "c.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "c.png"), (ids == 300) * 3)
    Image.fromarray(ids.astype(np.uint16)).save(tmp_path / "d.png")  # 16-bit single channel
    np.testing.assert_array_equal(read_mask(tmp_path / "d.png"), ids)
    Image.new("LA", (3, 3)).save(tmp_path / "e.png")
    with pytest.raises(InputValidationError, match="mode 'LA'"):
        read_mask(tmp_path / "e.png")
    (tmp_path / "f.png").write_text("not a png")
    with pytest.raises(InputValidationError, match="cannot read mask"):
        read_mask(tmp_path / "f.png")


def test_find_masks_by_stem(tmp_path) -> None:
    masks = tmp_path / "validation-segmentation"
    write_imagenet_s(masks / "n01" / "ILSVRC2012_val_00000001.png", np.ones((4, 4), dtype=np.int64))
    write_imagenet_s(masks / "n02" / "ILSVRC2012_val_00000002.png", np.ones((4, 4), dtype=np.int64))
    images_ = [tmp_path / "img" / "n01" / "ILSVRC2012_val_00000001.JPEG", "x/ILSVRC2012_val_00000003.JPEG",
               "ILSVRC2012_val_00000002.jpg"]  # fmt: skip
    found = find_masks(masks, images_)
    assert found == [
        masks / "n01" / "ILSVRC2012_val_00000001.png",
        None,
        masks / "n02" / "ILSVRC2012_val_00000002.png",
    ]
    write_imagenet_s(masks / "dup" / "ILSVRC2012_val_00000002.png", np.ones((4, 4), dtype=np.int64))
    with pytest.raises(InputValidationError, match="several masks"):
        find_masks(masks, images_)
    with pytest.raises(InputValidationError, match="not found"):
        find_masks(tmp_path / "nowhere", images_)


def test_input_region_closed_forms() -> None:
    # 80 x 64 (H x W): shorter side 64 -> 32, so 40 x 32; centre crop 32 -> top 4 of 40
    assert input_region((80, 64), resize=32, crop=32) == (8.0, 0.0, 64.0, 64.0)
    assert input_region((80, 64), resize=(32, 32)) == (0.0, 0.0, 80.0, 64.0)  # squash: everything
    assert input_region((80, 64)) == (0.0, 0.0, 80.0, 64.0)
    # timm's 224 eval transform on a 375 x 500 ImageNet image: 248 x 330, crop at (12, 53)
    top, left, h, w = input_region((375, 500), resize=248, crop=224)
    assert (top, left, h, w) == pytest.approx(
        (12 * 375 / 248, 53 * 500 / 330, 224 * 375 / 248, 224 * 500 / 330)
    )
    geo = transform_geometry(create_transform(input_size=(3, 224, 224), crop_pct=0.9))
    assert geo == {"resize": 248, "crop": (224, 224)}
    with pytest.raises(InputValidationError, match="larger than"):
        input_region((10, 10), resize=8, crop=9)
    with pytest.raises(InputValidationError, match="geometry"):
        transform_geometry(lambda img: img)


def test_mask_coverage_is_exact_area() -> None:
    m = np.zeros((64, 64), dtype=bool)
    m[10:30, 5:41] = True
    cov = mask_coverage(m, 8)
    np.testing.assert_allclose(cov, m.reshape(8, 8, 8, 8).mean(axis=(1, 3)).ravel(), atol=1e-6)
    # 60 x 60 onto 8 x 8: cells of 7.5 pixels, fractional pixels at the borders
    rng = np.random.default_rng(0)
    m = rng.random((60, 60)) < 0.3
    r = overlap_matrix(60, 8)
    np.testing.assert_allclose(mask_coverage(m, (8, 8)), (r @ m.astype(float) @ r.T).ravel(), atol=1e-5)
    # class ids: only class 7 counts; ignored pixels leave the denominator
    ids = np.zeros((4, 4), dtype=np.int64)
    ids[0, 0], ids[0, 1], ids[1, 0] = 7, 1000, 3
    cov = mask_coverage(ids, 2, class_id=7)
    assert cov[0] == pytest.approx(1 / 3) and cov[1:].tolist() == [0, 0, 0]
    assert mask_coverage(ids, 2)[0] == pytest.approx(2 / 3)  # any labelled id: 7 and 3
    ids[2:, 2:] = 1000
    assert mask_coverage(ids, 2)[3] == 0.0  # a fully ignored cell
    # a region: only the crop is seen
    m = np.zeros((80, 64), dtype=bool)
    m[8:40, :32] = True
    np.testing.assert_allclose(mask_coverage(m, 2, region=(8.0, 0.0, 64.0, 64.0)), [1, 0, 0, 0])
    with pytest.raises(InputValidationError, match="smaller than"):
        mask_coverage(np.zeros((3, 3), dtype=bool), 4)


def test_labels_follow_the_image_transform(tmp_path) -> None:
    # an object drawn into an image and into its mask: after timm's transform the image's
    # per-patch brightness is the object's coverage of that patch (up to interpolation blur)
    h, w = 150, 100
    ids = np.zeros((h, w), dtype=np.int64)
    ids[30:95, 20:70] = 42
    ids[100:140, 60:95] = 42
    write_imagenet_s(tmp_path / "m.png", ids)
    transform = create_transform(
        input_size=(3, 64, 64), crop_pct=0.875, interpolation="bilinear", mean=(0, 0, 0), std=(1, 1, 1)
    )  # Resize(73) + CenterCrop(64); brightness stays in [0, 1]
    img = Image.fromarray(np.repeat(((ids == 42) * 255).astype(np.uint8)[..., None], 3, -1))
    x = transform(img)[0]
    seen = x.reshape(8, 8, 8, 8).mean(dim=(1, 3)).flatten().numpy()
    geo = transform_geometry(transform)
    cov = mask_coverage(read_mask(tmp_path / "m.png"), 8, class_id=42, region=input_region((h, w), **geo))
    assert np.abs(cov - seen).max() < 0.08 and cov.max() == 1.0 and cov.min() == 0.0
    labels = mask_token_labels([tmp_path / "m.png"], 8, class_ids=[42], **geo)
    assert labels.shape == (1, 64) and labels.dtype == torch.bool
    assert torch.equal(labels[0], torch.from_numpy(cov) >= 0.5 - 1e-6)
    # the same rule as patch_labels_from_mask on an aligned pixel mask
    m = torch.from_numpy(ids[:64, :64] == 42)
    assert torch.equal(mask_token_labels([m.numpy()], 8)[0], patch_labels_from_mask(m, 8, 0.5)[0])
    with pytest.raises(InputValidationError, match="no mask"):
        mask_token_labels([None], 8)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return randomized(small_timm(num_classes=5), seed=11, scale=0.25)


def token_labels(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    labels = torch.rand(n, 16, generator=g) < 0.4
    labels[:, 0], labels[:, 1] = True, False  # every image has both kinds
    return labels


def test_class_context_comparison_equals_direct(model) -> None:
    x, target = images(10, seed=5), torch.arange(10) % 5
    labels = token_labels(10)
    res = class_context_comparison(model, x, target=target, masks=labels, n_resamples=300, seed=2)
    ref = class_context_identifiability(model, x, target=target, masks=labels)
    torch.testing.assert_close(torch.from_numpy(res.mean["class"]), ref["class"]["mean"])
    torch.testing.assert_close(torch.from_numpy(res.mean["context"]), ref["context"]["mean"])
    np.testing.assert_allclose(res.difference, res.mean["class"] - res.mean["context"])
    scores = BlockwiseIdentifiability(model).attribute(x, target=target)[:, :, 1:].double()  # (N, B, P)
    tokens = scores.permute(0, 2, 1)  # (N, P, B)
    cls_tok, ctx_tok = tokens[labels].numpy(), tokens[~labels].numpy()
    direct = st.permutation_test(
        (cls_tok, ctx_tok),
        lambda a, b, axis: a.mean(axis) - b.mean(axis),
        vectorized=True,
        n_resamples=300,
        alternative="greater",
        axis=0,
        rng=2,
    )
    np.testing.assert_array_equal(res.test.p_value, direct.pvalue)
    assert res.test.details["unit"] == "tokens" and res.num_tokens == {
        "class": int(labels.sum()),
        "context": int((~labels).sum()),
    }
    # bootstrap intervals over images of the pooled means
    sums = (scores * labels[:, None, :]).sum(-1).numpy()
    counts = np.repeat(labels.sum(1, keepdim=True).double().numpy(), 3, 1)
    ci = bootstrap_ratio_ci(sums, counts, n_resamples=300, seed=2)
    np.testing.assert_allclose(res.ci["class"].low, ci.low)
    # per image, paired
    per = class_context_comparison(
        model, x, target=target, masks=labels, unit="images", n_resamples=300, seed=2
    )
    c = (scores * labels[:, None, :]).sum(-1) / labels.sum(1, keepdim=True)
    k = (scores * ~labels[:, None, :]).sum(-1) / (~labels).sum(1, keepdim=True)
    direct = st.permutation_test(
        (c.numpy(), k.numpy()),
        lambda a, b, axis: (a - b).mean(axis),
        permutation_type="samples",
        vectorized=True,
        n_resamples=300,
        alternative="greater",
        axis=0,
        rng=2,
    )
    np.testing.assert_array_equal(per.test.p_value, direct.pvalue)
    assert per.num_images_with_both == 10
    d = res.to_dict()
    assert d["test"]["test"] == "permutation_test" and len(d["mean_identifiability"]["class"]) == 3
    # streamed (images, labels, masks) batches give the same result
    streamed = class_context_comparison(
        model, make_loader(x, target, labels, batch_size=4), n_resamples=300, seed=2
    )
    np.testing.assert_array_equal(streamed.test.p_value, res.test.p_value)


def test_class_context_comparison_from_mask_files(model, tmp_path) -> None:
    # masks written as ImageNet-S PNGs at a larger size than the 32 x 32 input (squash geometry)
    x, target = images(4, seed=6), torch.tensor([0, 1, 2, 3])
    paths = []
    for i in range(4):
        ids = np.zeros((64, 64), dtype=np.int64)
        ids[: 16 * (i + 1), :32] = 500 + i
        paths.append(tmp_path / f"img{i}.png")
        write_imagenet_s(paths[-1], ids)
    found = find_masks(tmp_path, [f"data/img{i}.jpg" for i in range(4)])
    labels = mask_token_labels(found, (4, 4), class_ids=[500, 501, 502, 503], resize=(32, 32))
    expected = torch.zeros(4, 4, 4, dtype=torch.bool)
    for i in range(4):
        expected[i, : i + 1, :2] = True
    assert torch.equal(labels, expected.flatten(1))
    res = class_context_comparison(model, x, target=target, masks=labels, n_resamples=100)
    assert res.num_tokens == {"class": 20, "context": 44} and res.num_images_with_both == 4
    with pytest.raises(InputValidationError, match="no class-labelled token"):
        class_context_comparison(model, x, target=target, masks=torch.zeros(4, 16, dtype=torch.bool))

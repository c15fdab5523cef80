"""ClassEmbeddingGradient against full-graph autograd, block by block, and its batching/target forms."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import HF_VARIANTS, TIMM_VARIANTS, images, model_logits, small_hf, small_timm

from captum_clsemb import InputValidationError
from captum_clsemb.adapters import adapt
from captum_clsemb.attr.class_embedding_gradient import ClassEmbeddingGradient
from captum_clsemb.convert import timm_to_hf
from captum_clsemb.trace import trace


def reference_head_maps(model, x: torch.Tensor, target: torch.Tensor, source: str = "resid") -> torch.Tensor:
    """Independent: full-graph traced forward, one torch.autograd.grad of each l_b w.r.t. A_b.

    l_b = cross-entropy (one log-softmax) of lens(class-token state of block b), summed over
    the batch (examples are independent); for source="authors", torch's CrossEntropyLoss of the
    softmax of the attention output's projection (the authors' double softmax). Returns
    (N, blocks, heads, P) = -dl_b/dA_b[h, cls, img].
    """
    adapter = adapt(model)
    kind = "resid_post" if source == "resid" else "attn_out"
    tr = trace(model, x, grad=True, record=["attn_probs", kind])
    cls, p = adapter.class_token_index, adapter.num_prefix_tokens
    out = []
    for b in range(adapter.num_blocks):
        logits = adapter.project(tr.cache[kind, b][:, cls])
        if source == "authors":
            logits = torch.softmax(logits, dim=-1)
        loss = F.cross_entropy(logits, target, reduction="sum")
        (g,) = torch.autograd.grad(loss, tr.cache["attn_probs", b], retain_graph=True)
        out.append(-g[:, :, cls, p:])
    return torch.stack(out, 1)


CASES = {
    "timm": lambda: small_timm(),
    "timm_layer_scale": TIMM_VARIANTS["layer_scale"],
    "timm_registers": TIMM_VARIANTS["registers"],
    "timm_distilled": TIMM_VARIANTS["distilled"],
    "hf_vit": HF_VARIANTS["hf_vit"],
    "hf_deit_teacher": HF_VARIANTS["hf_deit_teacher"],
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("source", ["resid", "attn", "authors"])
def test_one_pass_equals_blockwise_autograd(name: str, source: str) -> None:
    model = CASES[name]()
    x = images(3)
    target = torch.tensor([1, 5, 2])
    ours = ClassEmbeddingGradient(model).attribute(x, target=target, return_per="head", source=source)
    adapter = adapt(model)
    ref = reference_head_maps(model, x, target, source).reshape(3, 3, 4, *adapter.grid_size)
    assert ours.shape == (3, 3, 4, 4, 4)
    assert ref.abs().max() > 1e-3  # a non-trivial comparison
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)


def test_authors_source_equals_their_per_image_double_softmax_loss() -> None:
    """source="authors" against the authors' loop: per image and block, torch.nn.CrossEntropyLoss of
    softmax(head(norm(attention output at the class token))), its gradient w.r.t. the stored attention."""
    model = small_timm(init_values=0.3)  # layer scale: the authors project ls1(attn(norm1(x)))
    x = images(3, seed=5)
    target = torch.tensor([4, 0, 6])
    ours = ClassEmbeddingGradient(model).attribute(x, target=target, return_per="head", source="authors")
    ce = torch.nn.CrossEntropyLoss()
    for i in range(3):
        tr = trace(model, x[i : i + 1], grad=True, record=["attn_probs", "attn_out"])
        for b in range(len(model.blocks)):
            attn_cls = model.head(model.norm(tr.cache["attn_out", b][:, 0]))  # (1, C), bias included
            loss = ce(torch.softmax(attn_cls, dim=-1), target[i : i + 1])
            (g,) = torch.autograd.grad(loss, tr.cache["attn_probs", b])
            ref = -g[0, :, 0, 1:].reshape(4, 4, 4)
            assert ref.abs().max() > 1e-5
            torch.testing.assert_close(ours[i, b], ref, atol=1e-7, rtol=1e-5)
    # not the single-softmax loss of source="attn": a different map, not just a rescaling
    attn = ClassEmbeddingGradient(model).attribute(x, target=target, return_per="head", source="attn")
    a, o = attn.flatten(), ours.flatten()
    assert torch.corrcoef(torch.stack([a, o]))[0, 1] < 0.999


def test_sums_over_heads_and_blocks() -> None:
    model = small_timm()
    x = images(2)
    ceg = ClassEmbeddingGradient(model)
    per_head = ceg.attribute(x, target=[0, 3], return_per="head")
    per_block = ceg.attribute(x, target=[0, 3], return_per="block")
    glob = ceg.attribute(x, target=[0, 3])
    assert per_block.shape == (2, 3, 4, 4) and glob.shape == (2, 1, 4, 4)
    torch.testing.assert_close(per_head.sum(2), per_block, atol=1e-6, rtol=0)
    torch.testing.assert_close(per_block.sum(1, keepdim=True), glob, atol=1e-6, rtol=0)


def test_block_and_head_selection() -> None:
    model = small_timm()
    x = images(2)
    ceg = ClassEmbeddingGradient(model)
    full = ceg.attribute(x, target=1, return_per="head")
    sel = ceg.attribute(x, target=1, return_per="head", blocks=[2, 0], heads=[-1, 1])
    torch.testing.assert_close(sel, full[:, [2, 0]][:, :, [3, 1]], atol=1e-7, rtol=0)
    glob = ceg.attribute(x, target=1, blocks=1, heads=[0, 2])
    torch.testing.assert_close(glob, full[:, 1:2, [0, 2]].sum(2), atol=1e-6, rtol=0)


def test_batch_equals_single_calls_and_internal_batching() -> None:
    model = small_hf("vit")
    x = images(4)
    target = [6, 0, 3, 3]
    ceg = ClassEmbeddingGradient(model)
    batch = ceg.attribute(x, target=target, return_per="head")
    singles = torch.cat([ceg.attribute(x[i : i + 1], target=target[i], return_per="head") for i in range(4)])
    torch.testing.assert_close(batch, singles, atol=1e-6, rtol=1e-5)
    chunked = ceg.attribute(x, target=target, return_per="head", internal_batch_size=3)
    torch.testing.assert_close(batch, chunked, atol=1e-6, rtol=1e-5)


def test_default_target_is_prediction() -> None:
    model = small_timm()
    x = images(3)
    pred = model_logits(model, x).argmax(-1)
    ceg = ClassEmbeddingGradient(model)
    torch.testing.assert_close(
        ceg.attribute(x, return_per="head"), ceg.attribute(x, target=pred, return_per="head")
    )


def test_timm_and_hf_twins_agree() -> None:
    timm_model = small_timm()
    hf_model = timm_to_hf(timm_model).eval()
    x = images(2)
    target = torch.tensor([4, 1])
    for source in ("resid", "attn"):
        a = ClassEmbeddingGradient(timm_model).attribute(x, target=target, return_per="head", source=source)
        b = ClassEmbeddingGradient(hf_model).attribute(x, target=target, return_per="head", source=source)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_multi_target_equals_separate_calls() -> None:
    model = small_timm()
    x = images(3)
    targets = torch.tensor([[0, 1], [2, 2], [6, 5]])
    ceg = ClassEmbeddingGradient(model)
    for return_per, tail in (("global", (1,)), ("block", (3,)), ("head", (3, 4))):
        multi = ceg.attribute(x, target=targets, return_per=return_per)
        assert multi.shape == (3, 2, *tail, 4, 4)
        for k in range(2):
            single = ceg.attribute(x, target=targets[:, k], return_per=return_per)
            torch.testing.assert_close(multi[:, k], single, atol=1e-6, rtol=1e-5)
    as_lists = ceg.attribute(x, target=targets.tolist(), return_per="head")
    torch.testing.assert_close(as_lists, ceg.attribute(x, target=targets, return_per="head"))
    # one column (Captum's (N, 1) tensor or list of 1-tuples) is one target per example, no K dim
    one = ceg.attribute(x, target=torch.tensor([3, 0, 6]))
    assert one.shape == (3, 1, 4, 4)
    for same in ([[3], [0], [6]], [(3,), (0,), (6,)], torch.tensor([[3], [0], [6]])):
        torch.testing.assert_close(ceg.attribute(x, target=same), one)


def test_interpolation() -> None:
    model = small_timm()
    x = images(2)
    ceg = ClassEmbeddingGradient(model)
    grid = ceg.attribute(x, target=2, return_per="head")
    up = ceg.attribute(x, target=2, return_per="head", interpolate_to=(32, 24))
    assert up.shape == (2, 3, 4, 32, 24)
    expected = F.interpolate(grid.reshape(2, 12, 4, 4), size=(32, 24), mode="bilinear").reshape(
        2, 3, 4, 32, 24
    )
    torch.testing.assert_close(up, expected)
    assert ceg.attribute(x, target=[[1, 2], [3, 4]], interpolate_to=x.shape[-2:]).shape == (2, 2, 1, 32, 32)


def test_model_left_untouched() -> None:
    model = small_timm()
    model.train()
    ClassEmbeddingGradient(model).attribute(images(2), target=1)
    assert model.training and all(m.training for m in model.modules())
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    with torch.no_grad():  # works inside no_grad too
        assert ClassEmbeddingGradient(model).attribute(images(1)).abs().sum() > 0


def test_errors() -> None:
    x = images(2)
    with pytest.raises(InputValidationError, match="no class token"):
        ClassEmbeddingGradient(TIMM_VARIANTS["gap_fc_norm"]()).attribute(x, target=0)
    ceg = ClassEmbeddingGradient(small_timm())
    with pytest.raises(InputValidationError, match="out of range"):
        ceg.attribute(x, target=7)
    with pytest.raises(InputValidationError, match="out of range"):
        ceg.attribute(x, target=torch.tensor([[0, 7], [1, 1]]))
    with pytest.raises(InputValidationError, match="2 examples"):
        ceg.attribute(x, target=[1, 2, 3])
    with pytest.raises(InputValidationError, match="N = 2"):
        ceg.attribute(x, target=torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(InputValidationError, match="same non-zero number"):
        ceg.attribute(x, target=[[1, 2], [3]])
    with pytest.raises(InputValidationError, match="integer"):
        ceg.attribute(x, target=torch.zeros(2, 2))
    with pytest.raises(InputValidationError, match="return_per"):
        ceg.attribute(x, return_per="token")
    with pytest.raises(InputValidationError, match="source"):
        ceg.attribute(x, source="mlp")
    with pytest.raises(InputValidationError, match="blocks index 3"):
        ceg.attribute(x, blocks=[0, 3])
    with pytest.raises(InputValidationError, match="repeated"):
        ceg.attribute(x, heads=[1, -3])
    with pytest.raises(InputValidationError, match="interpolate_to"):
        ceg.attribute(x, interpolate_to=(32,))
    with pytest.raises(InputValidationError, match="interpolate_to"):
        ceg.attribute(x, interpolate_to=0)
    # a single int means a square size
    torch.testing.assert_close(ceg.attribute(x, interpolate_to=32), ceg.attribute(x, interpolate_to=(32, 32)))
    with pytest.raises(InputValidationError, match="internal_batch_size"):
        ceg.attribute(x, internal_batch_size=0)
    with pytest.raises(InputValidationError, match="image size"):
        ceg.attribute(images(2, size=16))

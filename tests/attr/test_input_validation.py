"""Bad input gets one clear package error in every attribution class, never a silent number.

NaN/inf images (naming the examples), empty batches, bad ``internal_batch_size``, inputs on
another device, gradient methods under ``no_grad`` / ``inference_mode``, and which forward
hooks fire during ``attribute`` (the decomposed forward runs, not ``model.forward``).
"""

from __future__ import annotations

import pytest
import torch
from captum.attr import NoiseTunnel
from conftest import images, small_hf, small_timm

from captum_clsemb.analysis import ValueVectorProjector
from captum_clsemb.attr import (
    AttentionRollout,
    BlockwiseIdentifiability,
    CheferGradientRollout,
    CheferRelevancy,
    ClassEmbeddingGradient,
    RawAttention,
)
from captum_clsemb.errors import InputValidationError, NonFiniteInputError

METHODS = [
    ClassEmbeddingGradient,
    CheferRelevancy,
    CheferGradientRollout,
    AttentionRollout,
    RawAttention,
    BlockwiseIdentifiability,
]
GRADIENT_METHODS = [ClassEmbeddingGradient, CheferRelevancy, CheferGradientRollout]
IDS = [m.__name__ for m in METHODS]


def _with_non_finite() -> torch.Tensor:
    x = images(5)
    x[1, 0, 3, 4] = float("nan")
    x[3, 2, 0, 0] = float("inf")
    x[4, 1, 5, 5] = -float("inf")
    return x


@pytest.mark.parametrize("method", METHODS, ids=IDS)
def test_non_finite_inputs_name_the_examples(method) -> None:
    m = method(small_timm())
    x = _with_non_finite()
    for kwargs in ({}, {"internal_batch_size": 2}):  # indices count over the whole batch
        with pytest.raises(NonFiniteInputError, match=r"3 of 5 examples, at indices \[1, 3, 4\]") as info:
            m.attribute(x, target=0, **kwargs)
        assert info.value.indices == [1, 3, 4]
        assert isinstance(info.value, InputValidationError)
    # the finite examples alone are fine
    assert torch.isfinite(m.attribute(x[[0, 2]], target=0)).all()


def test_finite_inputs_whose_sum_overflows_are_accepted() -> None:
    """The finite check sums first; an overflowing sum of finite values falls back to the exact check."""
    from captum_clsemb._utils import check_finite

    check_finite(torch.full((2, 3, 4, 4), 3e38))  # sum is inf, every value finite: no error
    x = torch.full((2, 3, 4, 4), 3e38)
    x[1, 0, 0, 0] = float("inf")
    with pytest.raises(NonFiniteInputError, match=r"1 of 2 examples, at indices \[1\]"):
        check_finite(x)


def test_non_finite_in_chefer_attention_relevance_and_value_vectors() -> None:
    model = small_timm()
    x = _with_non_finite()
    with pytest.raises(NonFiniteInputError, match=r"\[1, 3, 4\]"):
        CheferRelevancy(model).attention_relevance(x, target=0)
    vvp = ValueVectorProjector(model)
    with pytest.raises(NonFiniteInputError, match=r"\[1, 3, 4\]"):
        vvp.attribute(x, target=0)
    with pytest.raises(NonFiniteInputError, match=r"\[1, 3, 4\]"):
        vvp.key_value_agreement_rate(x, target=0)
    with pytest.raises(NonFiniteInputError, match=r"\[1, 3, 4\]"):
        vvp.compositionality(x)


@pytest.mark.parametrize("method", METHODS, ids=IDS)
def test_empty_batch(method) -> None:
    with pytest.raises(InputValidationError, match="no images"):
        method(small_timm()).attribute(images(0), target=[])


@pytest.mark.parametrize("method", METHODS, ids=IDS)
@pytest.mark.parametrize("size", [0, -1, 1.5, True, "2"])
def test_bad_internal_batch_size(method, size) -> None:
    with pytest.raises(InputValidationError, match="internal_batch_size must be a positive int"):
        method(small_timm()).attribute(images(2), target=0, internal_batch_size=size)


@pytest.mark.parametrize("size", [0, -2, 2.0])
def test_bad_batch_sizes_elsewhere(size) -> None:
    model = small_timm()
    with pytest.raises(InputValidationError, match="internal_batch_size must be a positive int"):
        CheferRelevancy(model).attention_relevance(images(2), internal_batch_size=size)
    with pytest.raises(InputValidationError, match="internal_batch_size must be a positive int"):
        ValueVectorProjector(model).attribute(images(2), internal_batch_size=size)
    with pytest.raises(InputValidationError, match="internal_batch_size must be a positive int"):
        ValueVectorProjector(model).compositionality(images(2), internal_batch_size=size)


@pytest.mark.parametrize("method", METHODS, ids=IDS)
def test_inputs_on_another_device(method) -> None:
    x = torch.empty(2, 3, 32, 32, device="meta")
    with pytest.raises(InputValidationError, match=r"on device meta but the model is on cpu.*x\.to\('cpu'\)"):
        method(small_timm()).attribute(x, target=0)


@pytest.mark.parametrize("method", GRADIENT_METHODS, ids=[m.__name__ for m in GRADIENT_METHODS])
def test_gradient_methods_under_no_grad_and_inference_mode(method) -> None:
    m = method(small_timm())
    x = images(3)
    ref = m.attribute(x, target=[0, 4, 6])
    assert ref.abs().sum() > 0
    with torch.no_grad():
        torch.testing.assert_close(m.attribute(x, target=[0, 4, 6]), ref, rtol=0, atol=0)
        torch.manual_seed(0)
        smooth = NoiseTunnel(m).attribute(x, nt_samples=2, stdevs=0.1, target=[0, 4, 6])
    assert smooth.shape == ref.shape and torch.isfinite(smooth).all()
    with torch.inference_mode(), pytest.raises(InputValidationError, match=r"torch\.no_grad\(\)"):
        m.attribute(x, target=0)
    with torch.inference_mode():
        x_inf = x.clone()  # an inference tensor, used outside inference mode: copied, fine
    torch.testing.assert_close(m.attribute(x_inf, target=[0, 4, 6]), ref, rtol=0, atol=0)


@pytest.mark.parametrize("method", [AttentionRollout, RawAttention, BlockwiseIdentifiability])
def test_gradient_free_methods_under_inference_mode(method) -> None:
    m = method(small_timm())
    x = images(2)
    ref = m.attribute(x, target=1)
    with torch.inference_mode():
        torch.testing.assert_close(m.attribute(x, target=1), ref, rtol=0, atol=0)


def _fired(model: torch.nn.Module, run) -> set[str]:
    fired: set[str] = set()
    handles = [
        mod.register_forward_hook(lambda mod, args, out, name=name: fired.add(name))
        for name, mod in model.named_modules()
    ]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return fired


@pytest.mark.parametrize("method", METHODS, ids=IDS)
def test_which_forward_hooks_fire(method) -> None:
    """Documented: block-, attention- and MLP-module hooks do not fire; hooks on the modules the
    decomposed forward calls (patch embedding, norms, linear layers) do."""
    x = images(2)
    timm_model = small_timm()
    fired = _fired(timm_model, lambda: method(timm_model).attribute(x, target=1))
    assert not fired & {"", "blocks", "blocks.0", "blocks.2", "blocks.0.attn", "blocks.1.mlp"}
    assert {
        "patch_embed",
        "blocks.0.norm1",
        "blocks.0.attn.qkv",
        "blocks.0.mlp.fc1",
        "blocks.1.norm2",
    } <= fired
    hf_model = small_hf()
    fired = _fired(hf_model, lambda: method(hf_model).attribute(x, target=1))
    assert not fired & {"", "vit", "vit.layers.0", "vit.layers.0.attention", "vit.layers.0.mlp"}
    assert {"vit.embeddings", "vit.layers.0.layernorm_before", "vit.layers.0.mlp.fc1"} <= fired
    # the model's own forward fires the block hooks (so the difference above is the decomposition)
    fired = _fired(timm_model, lambda: timm_model(x))
    assert {"", "blocks.0", "blocks.0.attn"} <= fired

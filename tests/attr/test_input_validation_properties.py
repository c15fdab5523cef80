"""Property-based input validation: any input gives the correct result or one of the package's errors.

Random shapes, dtypes, wrappers, non-finite values, targets in every Captum form and bad ones,
batch sizes, ``interpolate_to`` and ``additional_forward_args``. An independent oracle says
whether a call is valid; valid calls must return what the canonical call returns (a float32
image tensor, a LongTensor target, no chunking), invalid ones must raise
:class:`InputValidationError` / :class:`UnsupportedModelError` (with the exact offending
example indices when only non-finite values are wrong), never any other exception.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from conftest import small_timm
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from captum_clsemb.attr import (
    AttentionRollout,
    BlockwiseIdentifiability,
    CheferGradientRollout,
    CheferRelevancy,
    ClassEmbeddingGradient,
    RawAttention,
)
from captum_clsemb.errors import InputValidationError, NonFiniteInputError, UnsupportedModelError
from captum_clsemb.metrics import pixel_removal_auc, token_removal_auc

MODEL = small_timm()  # 32x32 images, 8x8 patches (4x4 grid), 7 classes, 3 blocks
C = 7
PACKAGE_ERRORS = (InputValidationError, UnsupportedModelError)
METHODS = {
    cls.__name__: cls(MODEL)
    for cls in (
        ClassEmbeddingGradient,
        CheferRelevancy,
        CheferGradientRollout,
        AttentionRollout,
        RawAttention,
        BlockwiseIdentifiability,
    )
}
SETTINGS = settings(
    max_examples=250, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)


@dataclass
class Images:
    value: object  # what is passed as inputs
    canonical: torch.Tensor | None  # the valid float32 (N, 3, 32, 32) tensor, if the form is valid
    as_tuple: bool
    bad: list[int]  # examples holding NaN/inf
    n: int


@st.composite
def image_inputs(draw) -> Images:
    n = draw(st.sampled_from([0, 1, 2, 2, 3, 3]))
    kind = draw(st.sampled_from(["ok"] * 24 + ["channels", "size", "3d", "5d"]))
    shape = {
        "ok": (n, 3, 32, 32),
        "channels": (n, draw(st.sampled_from([1, 4])), 32, 32),
        "size": (n, 3, draw(st.sampled_from([16, 24, 40])), 32),
        "3d": (3, 32, 32),
        "5d": (n, 1, 3, 32, 32),
    }[kind]
    dtype = draw(
        st.sampled_from([torch.float32] * 24 + [torch.float64, torch.float16, torch.int64, torch.bool])
    )
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    x = torch.randn(shape, generator=g).to(dtype)
    bad: list[int] = []
    if x.is_floating_point() and x.dim() >= 2 and x.shape[0] > 0 and draw(st.integers(0, 4)) == 0:
        bad = sorted(draw(st.sets(st.integers(0, x.shape[0] - 1), min_size=1)))
        for i in bad:
            pos = tuple(draw(st.integers(0, s - 1)) for s in x.shape[1:])
            x[(i, *pos)] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    wrap = draw(st.sampled_from(["tensor"] * 18 + ["tuple1"] * 6 + ["tuple2", "list", "numpy"]))
    value = {
        "tensor": x,
        "tuple1": (x,),
        "tuple2": (x, x),
        "list": [x],
        "numpy": x.numpy(),
    }[wrap]
    ok = kind == "ok" and dtype == torch.float32 and n >= 1 and wrap in ("tensor", "tuple1")
    return Images(value, x if ok else None, wrap == "tuple1", bad, n)


@dataclass
class Target:
    value: object
    canonical: torch.Tensor | None | str  # LongTensor (N,) or (N, K); None = prediction; "bad"
    multi: bool = False


def _classes(values: list[int]) -> bool:
    return all(0 <= v < C for v in values)


@st.composite
def targets(draw, n: int) -> Target:
    valid_class = st.integers(0, C - 1)
    cls = st.one_of(*[valid_class] * 6, st.integers(-2, 9), st.sampled_from([2**70, -(2**70)]))
    forms = [
        "none",
        "int",
        "list",
        "tensor1d",
        "tensor_n1",
        "list_1tuples",
        "list_1lists",
        "tensor0d",
        "tuple1",
    ]
    kind = draw(
        st.sampled_from(
            forms * 6
            + ["multi_tensor", "multi_list"] * 2
            + ["tuple2", "ragged", "bool", "float", "float_tensor", "bool_tensor", "str", "numpy", "mixed"]
        )
    )
    if kind == "none":
        return Target(None, None)
    if kind in ("int", "tuple1"):
        c = draw(cls)
        value = c if kind == "int" else (c,)
        return Target(value, torch.full((n,), c) if 0 <= c < C else "bad")
    length = draw(st.sampled_from([n] * 16 + [n + 1, max(n - 1, 0)]))
    small = st.one_of(*[valid_class] * 6, st.integers(-1, C))
    if kind in ("list", "list_1tuples", "list_1lists", "tensor1d", "tensor_n1"):
        values = draw(st.lists(cls if kind == "list" else small, min_size=length, max_size=length))
        forms = {
            "list": lambda: values,
            "list_1tuples": lambda: [(v,) for v in values],
            "list_1lists": lambda: [[v] for v in values],
            "tensor1d": lambda: torch.tensor(values, dtype=torch.long),
            "tensor_n1": lambda: torch.tensor(values, dtype=torch.int32).reshape(-1, 1),
        }
        value = forms[kind]()
        tensor_like = kind.startswith("tensor")
        if tensor_like and length == 1:  # a one-element tensor: the same class for every example
            return Target(value, torch.full((n,), values[0]) if _classes(values) else "bad")
        ok = length == n and _classes(values)
        return Target(value, torch.tensor(values, dtype=torch.long) if ok else "bad")
    if kind == "tensor0d":
        c = draw(small)
        return Target(torch.tensor(c), torch.full((n,), c) if 0 <= c < C else "bad")
    if kind in ("multi_tensor", "multi_list"):
        k = draw(st.integers(2, 3))
        rows = [draw(st.lists(small, min_size=k, max_size=k)) for _ in range(length)]
        value = torch.tensor(rows, dtype=torch.long).reshape(length, k) if kind == "multi_tensor" else rows
        ok = length == n and _classes([v for r in rows for v in r])
        return Target(value, torch.tensor(rows, dtype=torch.long).reshape(length, k) if ok else "bad", True)
    bad = {
        "tuple2": (1, 2),
        "ragged": [[1, 2], [3]][: max(length, 1)] + [[1]],
        "bool": True,
        "float": 1.0,
        "float_tensor": torch.zeros(n),
        "bool_tensor": torch.zeros(n, dtype=torch.bool),
        "str": "3",
        "numpy": np.zeros(n, dtype=np.int64),
        "mixed": [1, (2,)],
    }[kind]
    return Target(bad, "bad")


def _interp_size(value: object) -> tuple[int, int] | str | None:
    """The (H, W) an interpolate_to value means, "input", None, or "bad"."""
    if value is None or value == "input":
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value) if value > 0 else "bad"
    if (
        isinstance(value, (tuple, torch.Size))
        and len(value) == 2
        and all(isinstance(v, int) and v > 0 for v in value)
    ):
        return tuple(value)
    return "bad"


@given(data=st.data())
@SETTINGS
def test_attribution_classes_give_correct_result_or_package_error(data) -> None:
    name = data.draw(st.sampled_from(sorted(METHODS)), label="method")
    method = METHODS[name]
    images = data.draw(image_inputs(), label="inputs")
    target = data.draw(targets(images.n), label="target")
    ibs = data.draw(
        st.sampled_from([None] * 12 + [1, 2] * 3 + [0, -1, 1.5, True]), label="internal_batch_size"
    )
    afa = data.draw(st.sampled_from([None] * 18 + [(), torch.zeros(1)]), label="additional_forward_args")
    kwargs: dict = {"target": target.value, "internal_batch_size": ibs, "additional_forward_args": afa}
    interp = None
    if name != "BlockwiseIdentifiability":
        interp = data.draw(
            st.sampled_from(
                [None] * 8 + [8, (16, 24), torch.Size([32, 32]), "input"] * 2 + [0, (8,), "bad", (4.0, 4)]
            ),
            label="interpolate_to",
        )
        kwargs["interpolate_to"] = interp
    size = _interp_size(interp)
    ibs_ok = ibs is None or (type(ibs) is int and ibs > 0)
    target_ok = target.canonical is None or isinstance(target.canonical, torch.Tensor)
    multi_ok = not target.multi or (name == "ClassEmbeddingGradient" and size != "input")
    valid_options = ibs_ok and afa is None and size != "bad" and target_ok and multi_ok
    valid = images.canonical is not None and valid_options

    try:
        out = method.attribute(images.value, **kwargs)
    except PACKAGE_ERRORS as e:
        assert not (valid and not images.bad), f"valid call raised {e!r}"
        if valid:  # only the non-finite values are wrong: the error names exactly those examples
            assert isinstance(e, NonFiniteInputError) and e.indices == images.bad
        event("non-finite only: indices named" if valid else "invalid: package error")
        return
    assert valid and not images.bad, f"invalid call returned a result: {name} {kwargs}"
    event("valid: result checked")
    assert isinstance(out, tuple) == images.as_tuple
    out = out[0] if images.as_tuple else out
    x, tgt = images.canonical, target.canonical
    if size == "input":
        ref = method.attribute(x, target=tgt, interpolate_to=(32, 32)).expand(-1, 3, -1, -1)
    elif size is None:
        ref = method.attribute(x, target=tgt)
    else:
        ref = method.attribute(x, target=tgt, interpolate_to=size)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max()) + 1e-12)


@given(data=st.data())
@SETTINGS
def test_removal_metrics_give_correct_result_or_package_error(data) -> None:
    images = data.draw(image_inputs(), label="inputs")
    n = images.n
    metric = data.draw(st.sampled_from(["tokens", "pixels"]), label="metric")
    shape = data.draw(
        st.sampled_from(
            [(n, 16), (n, 1, 4, 4), (n, 1, 32, 32), (n, 3, 32, 32)] * 2 + [(n, 2, 4, 4), (n + 1, 16), (n, 15)]
        ),
        label="attribution shape",
    )
    dtype = data.draw(
        st.sampled_from([torch.float32] * 4 + [torch.float64, torch.int64, torch.bool]), label="dtype"
    )
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    attr = torch.randn(shape, generator=g).to(dtype)
    attr_finite = True
    if dtype.is_floating_point and attr.numel() and data.draw(st.integers(0, 4)) == 0:
        attr.view(-1)[0] = math.nan
        attr_finite = False
    target = data.draw(targets(n), label="target")
    fractions = (0.0, 0.5)
    if metric == "tokens":
        good_shape = shape in ((n, 16), (n, 1, 4, 4))
        call = lambda a, t, xx: token_removal_auc(MODEL, xx, a, target=t, fractions=fractions)  # noqa: E731
    else:
        good_shape = shape in ((n, 1, 4, 4), (n, 1, 32, 32), (n, 3, 32, 32))
        call = lambda a, t, xx: pixel_removal_auc(MODEL, xx, a, target=t, fractions=fractions)  # noqa: E731
    valid = (
        images.canonical is not None
        and good_shape
        and dtype != torch.bool
        and attr_finite
        and not target.multi
        and not isinstance(target.canonical, str)
    )
    try:
        out = call(attr, target.value, images.value)
    except PACKAGE_ERRORS as e:
        assert not (valid and not images.bad), f"valid call raised {e!r}"
        if valid:
            assert isinstance(e, NonFiniteInputError) and e.indices == images.bad
        event("non-finite only: indices named" if valid else "invalid: package error")
        return
    event("valid: result checked")
    assert valid and not images.bad, (
        f"invalid call returned a result: {metric} {shape} {dtype} {target.value!r}"
    )
    ref = call(attr.float(), target.canonical, images.canonical)
    assert out.shape == (n,) and torch.isfinite(out).all()
    torch.testing.assert_close(out, ref)


def test_oracle_sees_both_outcomes() -> None:
    """Sanity check of the strategies: both valid and invalid calls are drawn."""
    seen = {"ok": 0, "error": 0}

    @given(images=image_inputs())
    @settings(max_examples=60, deadline=None, derandomize=True)
    def count(images: Images) -> None:
        seen["ok" if images.canonical is not None else "error"] += 1

    count()
    assert seen["ok"] > 10 and seen["error"] > 10


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__, "-q"])

"""compare_explanations: results equal the metrics called directly; tables, CSV and plot."""

from __future__ import annotations

import csv
import warnings

import pytest
import torch
from conftest import FAMILY_VARIANTS, TIMM_VARIANTS, images, small_timm, small_zero_shot

from captum_clsemb import ClassEmbeddingGradient, InputValidationError
from captum_clsemb.adapters import adapt
from captum_clsemb.metrics import (
    LinearProbeRanking,
    RandomRanking,
    compare_explanations,
    default_methods,
    pixel_removal_auc,
    plot_curves,
    to_csv,
    to_markdown,
    token_removal_auc,
)
from captum_clsemb.trace import trace

FR = (0.0, 0.2, 0.5, 0.8)


def norm_of_patch(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A deterministic toy explanation: L2 norm of each 8x8 patch."""
    return x.unfold(2, 8, 8).unfold(3, 8, 8).pow(2).sum(dim=(1, 4, 5)).sqrt()[:, None]


def test_compare_equals_direct_metrics_and_streams_batches(tmp_path) -> None:
    model = small_timm()
    x, y = images(9, seed=2), torch.arange(9) % 7
    probe = LinearProbeRanking(model).fit(images(14, seed=9), torch.arange(14) % 7)
    methods = {"patch_norm": norm_of_patch, "probe": probe, "random": RandomRanking(model, seed=1)}
    res = compare_explanations(model, x, y, methods=methods, fractions=FR, batch_size=4, score="probability")
    assert res.methods == ["patch_norm", "probe", "random"] and res.num_images == 9
    # independent: the metrics on the whole set at once, with the same explanations
    explanations = {
        "patch_norm": norm_of_patch(x, y),
        "probe": probe.attribute(x, target=y),
        "random": RandomRanking(model, seed=1).attribute(x),
    }
    for name, attr in explanations.items():
        for mode in ("negative", "positive"):
            auc, curves = token_removal_auc(model, x, attr, target=y, labels=y, mode=mode, fractions=FR,
                                            score="probability", return_curve=True)  # fmt: skip
            torch.testing.assert_close(res.curves[name][mode], curves)
            assert res.auc(name, mode) == pytest.approx(auc.mean().item(), rel=1e-5)
            assert res.auc_sem(name, mode) == pytest.approx((auc.std() / 3).item(), rel=1e-4)
    clean = trace(model, x).logits.softmax(-1)[torch.arange(9), y]
    assert res.clean_score == pytest.approx(clean.mean().item(), rel=1e-5)
    # the same set given as an iterable of (images, labels) batches
    batches = [(x[:5], y[:5]), (x[5:], y[5:])]
    methods["random"] = RandomRanking(model, seed=1)
    res2 = compare_explanations(model, batches, methods=methods, fractions=FR, score="probability")
    for name in methods:
        torch.testing.assert_close(res2.curves[name]["negative"], res.curves[name]["negative"])

    md = to_markdown(res)
    table = [line for line in md.splitlines() if line.startswith("| patch_norm")]
    assert len(table) == 1 and f"{res.auc('patch_norm', 'negative'):.2f}" in table[0]
    path = to_csv(res, tmp_path / "r.csv")
    rows = list(csv.DictReader(path.open()))
    assert [(r["method"], r["mode"]) for r in rows][:2] == [
        ("patch_norm", "negative"),
        ("patch_norm", "positive"),
    ]
    for r in rows:
        curve = res.mean_curve(r["method"], r["mode"])
        assert float(r["score@0.5"]) == pytest.approx(curve[2].item(), rel=1e-6)
        # authors_auc without num_patches: P = S + 1 (their curve of P - 1 points)
        assert float(r["auc_authors"]) == pytest.approx((curve.sum() / (curve.max() * 5)).item(), rel=1e-5)
    fig = plot_curves(res)
    assert len(fig.axes) == 2 and len(fig.axes[0].lines) == 3


def test_pixel_protocol_and_predicted_target() -> None:
    model = small_timm()
    x, y = images(5, seed=3), torch.arange(5)
    res = compare_explanations(model, x, y, methods={"patch_norm": norm_of_patch}, fractions=FR, batch_size=2,
                               protocol="pixels", explain_target="predicted", baseline=-1.0)  # fmt: skip
    pred = trace(model, x).logits.argmax(-1)
    _, curves = pixel_removal_auc(model, x, norm_of_patch(x, pred), target=pred, labels=y, fractions=FR,
                                  baseline=-1.0, return_curve=True)  # fmt: skip
    torch.testing.assert_close(res.curves["patch_norm"]["negative"], curves)
    assert res.clean_score == pytest.approx((pred == y).float().mean().item())


def test_default_methods_and_errors() -> None:
    model = small_timm()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        methods = default_methods(model, probe_data=(images(14, seed=9), torch.arange(14) % 7))
    assert list(methods)[-2:] == ["LinearProbe", "Random"]
    for name in (
        "ClassEmbeddingGradient",
        "CheferRelevancy",
        "CheferGradientRollout",
        "AttentionRollout",
        "RawAttention",
    ):
        if name in methods:
            assert methods[name].attribute(images(2), target=[0, 1]).shape == (2, 1, 4, 4)
    with pytest.warns(UserWarning, match="linear-probe"):
        default_methods(model)
    with pytest.raises(InputValidationError, match="labels"):
        compare_explanations(model, images(2), methods={"r": RandomRanking(model)})
    with pytest.raises(InputValidationError, match="protocol"):
        compare_explanations(
            model, images(2), torch.arange(2), methods={"r": RandomRanking(model)}, protocol="x"
        )


# -- models whose head does not read (or has no) class token ---------------------------------------
NO_CLASS_TOKEN = {
    "gap_fc_norm": ("mean of the patch tokens", lambda: TIMM_VARIANTS["gap_fc_norm"]()),
    "siglip_zero_shot": ("attention-pool", lambda: small_zero_shot("siglip")),
}
CLASS_TOKEN_METHODS = [
    "ClassEmbeddingGradient",
    "CheferRelevancy",
    "CheferGradientRollout",
    "AttentionRollout",
    "RawAttention",
]


@pytest.mark.parametrize("variant", list(NO_CLASS_TOKEN))
def test_models_without_class_token_leave_out_the_class_token_methods(variant: str) -> None:
    # Before: the default methods kept ClassEmbeddingGradient & co., and compare_explanations
    # raised on the first batch, so no comparison could be run at all on these models.
    reads, build = NO_CLASS_TOKEN[variant]
    model = build()
    assert not adapt(model).has_class_token
    x, y = images(4, seed=2), torch.tensor([0, 3, 5, 6])
    probe = (images(14, seed=9), torch.arange(14) % 7)
    with pytest.warns(UserWarning, match="left out: they explain the class token"):
        methods = default_methods(model, probe_data=probe)
    assert list(methods) == ["LinearProbe", "Random"]
    assert len(methods.notes) == 1
    note = methods.notes[0]
    assert all(name in note for name in CLASS_TOKEN_METHODS) and reads in note
    assert type(adapt(model).model).__name__ in note
    # the class-token methods themselves say what the head reads
    with pytest.raises(InputValidationError, match=f"has no class token: its head reads.*{reads}"):
        ClassEmbeddingGradient(model).attribute(x, target=y)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = compare_explanations(model, x, y, probe_data=probe, fractions=FR)
    assert res.methods == ["LinearProbe", "Random"] and res.notes == methods.notes
    md = to_markdown(res)
    assert f"- {note}" in md and md.index("Notes:") < md.index("| Method |")
    # the others ran and equal the metric called directly with their attributions
    probe_ranking = LinearProbeRanking(model).fit(*probe)
    for mode in ("negative", "positive"):
        _, ref = token_removal_auc(model, x, probe_ranking.attribute(x, target=y), target=y, labels=y, mode=mode,
                                   fractions=FR, return_curve=True)  # fmt: skip
        torch.testing.assert_close(res.curves["LinearProbe"][mode], ref)
        _, ref = token_removal_auc(model, x, RandomRanking(model, seed=0).attribute(x), target=y, labels=y,
                                   mode=mode, fractions=FR, return_curve=True)  # fmt: skip
        torch.testing.assert_close(res.curves["Random"][mode], ref)


def test_class_token_not_read_by_the_head_is_noted() -> None:
    # EVA-02 style: the class token is kept but the head averages the patches
    model = FAMILY_VARIANTS["eva02_avg"]()
    adapter = adapt(model)
    assert adapter.has_class_token and not adapter.reads_class_token
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        methods = default_methods(model)
    assert (
        "ClassEmbeddingGradient" in methods and "CheferRelevancy" not in methods
    )  # its head does not read the class token
    notes = methods.notes
    assert any(
        "not the class token" in n and "mean of the patch tokens" in n and "ClassEmbeddingGradient" in n
        and "CheferRelevancy" not in n for n in notes
    )  # fmt: skip
    assert any("CheferRelevancy" in n and "left out" in n for n in notes)
    assert any("linear-probe" in n for n in notes)
    # a class-token model whose head reads the class token: nothing to note
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plain = default_methods(small_timm(), probe_data=(images(14, seed=9), torch.arange(14) % 7))
    assert plain.notes == [] and list(plain)[:5] == CLASS_TOKEN_METHODS
    res = compare_explanations(
        small_timm(), images(2), torch.tensor([0, 1]), methods=plain, fractions=FR, score="probability"
    )
    assert res.notes == [] and "Notes:" not in to_markdown(res)

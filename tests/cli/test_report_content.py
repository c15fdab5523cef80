"""What `clsemb report` shows: snake_case JSON, a test object per paper claim, intervals and tests equal to
independent scipy computations on per-image values, every figure as PNG and SVG with a caption, no Markdown,
no outside resources, one progress bar per phase, and an empty group said instead of a crash."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import BUNDLED_REPORT, BUNDLED_REPORT_ARGS
from PIL import Image
from scipy import stats

from captum_clsemb.analysis import ValueVectorProjector, random_init_copy
from captum_clsemb.attr import BlockwiseIdentifiability
from captum_clsemb.cli.main import main
from captum_clsemb.cli.report import REPORT_FILES, SECTION_FILES
from captum_clsemb.demo import DEMO_IMAGES_DIR, load_demo_images, load_demo_model
from captum_clsemb.metrics.auc import trapezoid_auc

# the shared bundled report (tests/conftest.py): the first 41 bundled files, 20 airplanes, 20 automobiles
# and a bird, in batches of 8, 6 of them in the perturbation comparison
pytestmark = pytest.mark.xdist_group(BUNDLED_REPORT)
N = int(BUNDLED_REPORT_ARGS[BUNDLED_REPORT_ARGS.index("--max-images") + 1])
BATCH = int(BUNDLED_REPORT_ARGS[BUNDLED_REPORT_ARGS.index("--batch-size") + 1])
RESAMPLES = 2000
SNAKE = re.compile(r"^[a-z][a-z0-9_]*$")
CLAIMS = {
    "identifiability_above_random_init",
    "identifiability_above_chance",
    "images_with_identifiable_token_above_random_init",
    "class_value_agreement_above_random_init_attn",
    "class_value_agreement_above_random_init_mlp",
    "key_value_agreement_correct_above_misclassified",
    "self_only_attention_erases_identifiability",
    "perturbation_auc_negative_better_than_random",
    "perturbation_auc_positive_better_than_random",
    "perturbation_auc_negative_better_than_linearprobe",
    "perturbation_auc_positive_better_than_linearprobe",
}


@pytest.fixture(scope="module")
def report(bundled_report: dict) -> dict:
    return bundled_report


@pytest.fixture(scope="module")
def per_image() -> dict:
    """Per-image values of the same images, computed without the report's code."""
    x, y, paths = load_demo_images()
    x, y = x[:N], y[:N]
    model = load_demo_model("timm")
    bi = BlockwiseIdentifiability(model)
    scores = bi.attribute(x, target=y).double()[:, :, 1:]  # image tokens
    rnd = BlockwiseIdentifiability(random_init_copy(model, seed=0)).attribute(x, target=y).double()[:, :, 1:]
    with torch.no_grad():
        pred = model(x).argmax(-1)
    vvp = ValueVectorProjector(model)
    agree = vvp.attribute(x, target=y, layer="mlp", k=5, k_classes=1)  # (N, blocks, tokens), every token
    return {
        "rate": (100 * (scores == 1).double().mean(-1)).numpy(),
        "mean": scores.mean(-1).numpy(),
        "random_mean": rnd.mean(-1).numpy(),
        "correct": (pred == y).numpy(),
        "kva_mlp_all": (100 * agree.double().mean(-1)).numpy(),
        "paths": [str(p) for p in paths[:N]],
    }


def walk_keys(obj: object, path: str = "") -> list[str]:
    if isinstance(obj, dict):
        return [f"{path}/{k}" for k in obj] + [p for k, v in obj.items() for p in walk_keys(v, f"{path}/{k}")]
    if isinstance(obj, list):
        return [p for i, v in enumerate(obj) for p in walk_keys(v, f"{path}[{i}]")]
    return []


def test_json_keys_are_snake_case_identifiers(report: dict) -> None:
    bad = [p for p in walk_keys(report["json"]) if not SNAKE.match(p.rsplit("/", 1)[-1])]
    assert not bad, bad[:10]
    assert set(report["json"]["sections"]) == {
        "class_identifiability_across_blocks",
        "explanations",
        "mechanisms",
        "perturbation_comparison",
    }


def test_every_paper_claim_has_a_test_object(report: dict) -> None:
    claims = {c["claim_id"]: c for c in report["json"]["claims"]}
    assert CLAIMS <= set(claims)
    for c in claims.values():
        t = c["test"]
        assert {"test", "statistic", "p_value", "effect_size", "n"} <= set(t), c["claim_id"]
        assert t["test"] in ("wilcoxon_signed_rank", "mann_whitney_u", "permutation_test")
        ps = t["p_value"] if isinstance(t["p_value"], list) else [t["p_value"]]
        assert all(0 <= p <= 1 for p in ps), c["claim_id"]
        assert c["holds"] in (True, False) and c["verdict"] and c["paper"]
    # and each one is a row of the claims table, with its verdict
    table = report["html"].split('id="claims"')[1].split("</section>")[0]
    assert table.count("<tr>") == len(claims) + 1
    assert table.count(">holds<") + table.count(">does not hold<") == len(claims)


def test_intervals_and_tests_equal_independent_scipy(report: dict, per_image: dict) -> None:
    sec = report["json"]["sections"]["class_identifiability_across_blocks"]
    model = sec["models"][0]
    assert model["num_images"] == N and sec["token_map_images"][0] == per_image["paths"][0]

    def boot(values: np.ndarray) -> tuple:
        ci = stats.bootstrap((values,), np.mean, n_resamples=RESAMPLES, rng=0, method="percentile", axis=0)
        return ci.confidence_interval.low, ci.confidence_interval.high

    rate = model["identifiability_rate_last_block_percent"]
    assert rate["estimate"] == pytest.approx(per_image["rate"][:, -1].mean())
    assert (rate["ci_low"], rate["ci_high"]) == pytest.approx(boot(per_image["rate"][:, -1]), abs=1e-9)
    assert rate["n"] == N and rate["n_resamples"] == RESAMPLES and rate["confidence_level"] == 0.95
    acc = model["top1_accuracy_percent"]
    assert (acc["ci_low"], acc["ci_high"]) == pytest.approx(boot(100.0 * per_image["correct"]), abs=1e-9)
    per_block = model["mean_identifiability_per_block"]["image_tokens"]
    low, high = boot(per_image["mean"])
    assert per_block["ci_low"] == pytest.approx(low.tolist(), abs=1e-9)
    assert per_block["ci_high"] == pytest.approx(high.tolist(), abs=1e-9)

    # trained > random init per block: one-sided Wilcoxon paired by image, BH across blocks
    t = model["tests"]["trained_vs_random_init_image_tokens"]
    ref = stats.wilcoxon(per_image["mean"], per_image["random_mean"], alternative="greater", axis=0)
    assert t["test"] == "wilcoxon_signed_rank" and t["alternative"] == "greater"
    assert t["statistic"] == pytest.approx(ref.statistic.tolist())
    assert t["p_value"] == pytest.approx(ref.pvalue.tolist(), rel=1e-9)
    assert t["p_value_adjusted"] == pytest.approx(
        stats.false_discovery_control(ref.pvalue).tolist(), rel=1e-9
    )
    # rate > chance (10% for 10 classes): one-sample Wilcoxon of the per-image rates
    t = model["tests"]["identifiability_rate_vs_chance"]
    ref = stats.wilcoxon(per_image["rate"] - 10.0, alternative="greater", axis=0)
    assert t["p_value"] == pytest.approx(ref.pvalue.tolist(), rel=1e-9)

    # key-value agreement, correct > misclassified: Mann-Whitney U per block on per-image shares
    kva = report["json"]["sections"]["mechanisms"]["key_value_agreement"]
    assert kva["k_classes"] == 1 and kva["k_keys"] == 5  # top-1 of 10 classes: the paper's 5 of 1000 share
    t = kva["mlp"]["tests_correct_vs_misclassified"]["all"]
    ok = per_image["correct"]
    ref = stats.mannwhitneyu(
        per_image["kva_mlp_all"][ok], per_image["kva_mlp_all"][~ok], alternative="greater"
    )
    assert t["statistic"] == pytest.approx(ref.statistic.tolist())
    assert t["p_value"] == pytest.approx(ref.pvalue.tolist(), rel=1e-9)
    assert t["n_x"] == ok.sum() and t["n_y"] == (~ok).sum()
    assert kva["mlp"]["rate_percent"]["all"] == pytest.approx(per_image["kva_mlp_all"].mean(0).tolist())


def test_every_curve_and_table_number_carries_an_interval(report: dict) -> None:
    secs = report["json"]["sections"]

    def check(ci: dict, length: int | None = None) -> None:
        est, low, high = (np.asarray(ci[k], dtype=float) for k in ("estimate", "ci_low", "ci_high"))
        assert est.shape == low.shape == high.shape and (length is None or est.shape == (length,))
        assert (low <= est + 1e-12).all() and (est <= high + 1e-12).all()

    m = secs["class_identifiability_across_blocks"]["models"][0]
    nb = m["num_blocks"]
    for group in ("image_tokens", "class_token"):
        check(m["mean_identifiability_per_block"][group], nb)
        check(m["random_init"]["mean_identifiability_per_block"][group], nb)
    check(m["identifiability_rate_per_block_percent"], nb)
    mech = secs["mechanisms"]
    for layer in ("attn", "mlp"):
        check(mech["class_value_agreement"][layer]["mean_per_block"], nb)
        for group in ("image", "cls", "all"):
            check(mech["key_value_agreement"][layer]["rate_percent_ci"][group], nb)
            check(mech["key_value_agreement"][layer]["chance_rate_percent_ci"][group], nb)
        for group in ("image", "cls"):
            check(mech["class_similarity_change_rate_percent_ci"][layer][group], nb)
    for cat in ("attn", "mlp", "residual", "composite"):
        check(mech["residual_match_percent_ci"]["all"][cat], nb)
    check(mech["attention_edits"]["self_only"]["rate_percent_ci"], nb)
    pert = secs["perturbation_comparison"]
    fractions = np.asarray(pert["fractions"])
    for method in pert["methods"]:
        for mode in ("negative", "positive"):
            check(method["mean_curve_ci"][mode], len(fractions))
            auc = method["auc_trapezoid"][mode]
            check(auc)
            # the mean of per-image trapezoid AUCs is the AUC of the mean curve (the AUC is linear)
            curve = torch.tensor(method["mean_curve"][mode], dtype=torch.float64)
            assert auc["estimate"] == pytest.approx(
                float(trapezoid_auc(curve, fractions)), abs=1e-4
            )  # float32
    # in the HTML, every table cell with a rate also shows its interval
    assert re.search(r"\d+\.\d% \[\d+\.\d, \d+\.\d\]", report["html"])


def test_figures_png_and_svg_with_captions_and_no_markdown_or_urls(report: dict) -> None:
    out, html = report["out"], report["html"]
    figures = re.findall(r'<figure id="figure_([a-z_]+)">(.*?)</figure>', html, flags=re.S)
    assert len(figures) == 3 + 2 + 5 + 1  # identifiability, explanations, mechanisms, perturbation
    registered = set(REPORT_FILES) | {f for files in SECTION_FILES.values() for f in files}
    for name, body in figures:
        for ext in ("png", "svg"):
            assert (out / f"{name}.{ext}").is_file() and f"{name}.{ext}" in registered
        assert (out / f"{name}.svg").read_text().lstrip().startswith("<?xml")
        caption = re.search(r"<figcaption>(.*?)</figcaption>", body, flags=re.S).group(1)
        assert len(caption) > 250, name  # what is plotted, how to read it, what the paper found
        assert "paper" in caption.lower(), name
        assert re.search(r"<h3>[A-Z]", body), name  # a heading, not a file name
    # every heatmap says how it is normalised
    assert "normalised on its own" in html and "one fixed scale for all panels" in html
    # no Markdown, no outside resource, a table of contents whose links all land
    assert html.count("|---") == 0 and "**" not in html
    assert not re.search(r"^\s*\|[^\n]*\|[^\n]*\|\s*$", html, flags=re.M)  # no pipe-table row
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", html)
    assert not re.search(r"@import|url\(\s*['\"]?https?:", html)
    for anchor in re.findall(r'href="#([^"]+)"', html):
        assert f'id="{anchor}"' in html, anchor
    # one number format: the accuracy of the model's description is a percentage too
    assert "test top-1 77.0%" in html and "0.7705" not in html
    # the bundled images are named as such, not by the folder they were installed to
    assert f"{N} of the bundled CIFAR-10 test images" in html and str(DEMO_IMAGES_DIR) not in html
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == sorted(
        {"report.html", "report.json"} | {f"{n}.{e}" for n, _ in figures for e in ("png", "svg")}
    )


def test_one_progress_bar_per_phase_with_a_total(report: dict) -> None:
    # the shared report runs with its progress bars on; report["bars"] has every bar as it closed
    starts = re.findall(r"([a-z][a-z ()]*):\s+0%\|[^|]*\| 0/(\d+)", report["stderr"])
    names = ["identifiability", "explanations", "mechanisms", "perturbation"]
    assert [name for name, _ in starts] == names  # shown once each, with a total
    closed = report["bars"]
    assert [c[0] for c in closed] == names
    for name, total, done in closed:
        assert total > 0 and done == total, name
    # mechanisms: 8 passes (key-value agreement and its chance level for 2 layers, class building,
    # residual match, 2 attention edits) over the batches of the images, in one bar
    assert dict((c[0], c[1]) for c in closed)["mechanisms"] == 8 * -(-N // BATCH)


def test_an_empty_group_is_said_not_a_crash(tmp_path: Path) -> None:
    # unlabelled images: the targets are the predictions, no image is "misclassified"
    images = tmp_path / "imgs"
    images.mkdir()
    for f in sorted((DEMO_IMAGES_DIR / "cat").iterdir())[:6]:
        shutil.copy(f, images / f.name)
    Image.open(images / "0000.jpg").save(images / "extra.png")
    out = tmp_path / "o"
    args = ["report", "--no-progress", "--images", str(images), "--sections", "identifiability,mechanisms"]
    assert main([*args, "--out", str(out)]) == 0
    data = json.loads((out / "report.json").read_text())
    t = data["sections"]["mechanisms"]["key_value_agreement"]["mlp"]["tests_correct_vs_misclassified"]["all"]
    assert t["statistic"] is None and t["p_value"] is None and "no labelled images" in t["note"]
    claim = next(
        c for c in data["claims"] if c["claim_id"] == "key_value_agreement_correct_above_misclassified"
    )
    assert claim["holds"] is None and "no labelled images" in claim["verdict"]
    html = (out / "report.html").read_text()
    assert "not testable" in html and "no labelled images" in html
    assert "the predicted class (the images have no labels)" in html

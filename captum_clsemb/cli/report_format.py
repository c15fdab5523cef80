"""The report's building blocks (figures, tables, claims) and its one number format.

Every number in ``report.html`` goes through the functions here, so that a kind of number
always looks the same: shares, rates and accuracies as percentages with one decimal and a
``%`` sign; scores in [0, 1] (identifiability, cosine similarity) with three decimals;
perturbation AUCs (trapezoid x 100) with one decimal; p-values with two significant digits.
A 95% confidence interval follows its estimate in brackets: ``75.5% [69.5, 81.0]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from matplotlib.figure import Figure

#: resampling settings of every interval and permutation test in the report
N_RESAMPLES = 2000
SEED = 0
CONFIDENCE = 0.95
ALPHA = 0.05
STATS_SETTINGS = {"n_resamples": N_RESAMPLES, "seed": SEED, "confidence_level": CONFIDENCE}

_DIGITS = {"percent": 1, "score": 3, "auc": 1, "count": 0}


def _finite(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def number(value: Any, kind: str = "percent") -> str:
    """One number in the report's format for its kind (``percent``, ``score``, ``auc``, ``count``)."""
    v = _finite(value)
    if v is None:
        return "n/a"
    text = f"{v:.{_DIGITS[kind]}f}"
    return text + "%" if kind == "percent" else text


def interval(ci: Any, kind: str = "percent", index: int | None = None) -> str:
    """``estimate [low, high]`` of a :class:`~captum_clsemb.stats.ConfidenceInterval` or its dict.

    ``index`` picks one block of a per-block interval.
    """
    if ci is None:
        return "n/a"
    if isinstance(ci, dict):
        est, low, high = ci.get("estimate"), ci.get("ci_low"), ci.get("ci_high")
    else:
        est, low, high = ci.estimate, ci.low, ci.high
    if index is not None:
        est, low, high = (None if v is None else list(_as_list(v))[index] for v in (est, low, high))
    head = number(est, kind)
    lo, hi = _finite(low), _finite(high)
    if lo is None or hi is None:
        return f"{head} [no interval]"
    d = _DIGITS[kind]
    return f"{head} [{lo:.{d}f}, {hi:.{d}f}]"


def _as_list(v: Any) -> list:
    if hasattr(v, "tolist"):
        v = v.tolist()
    return v if isinstance(v, list) else [v]


def p_value(p: Any) -> str:
    """A p-value with two significant digits; ``< 0.0001`` below that."""
    v = _finite(p)
    if v is None:
        return "n/a"
    if v < 1e-4:
        return "< 0.0001"
    return f"{v:.2g}" if v < 0.01 else f"{v:.2f}"


TEST_NAMES = {
    "wilcoxon_signed_rank": ("Wilcoxon signed-rank", "W"),
    "mann_whitney_u": ("Mann-Whitney U", "U"),
    "permutation_test": ("permutation test", "Δ mean"),
}


def test_summary(test: dict | None, index: int | None = None) -> str:
    """``Wilcoxon signed-rank, W = 812, p = 0.0003 (BH), r = 0.61, n = 200`` from ``TestResult.to_dict()``."""
    if not test:
        return "no test"
    if test.get("statistic") is None and test.get("p_value") is None:
        return (
            f"{TEST_NAMES.get(test.get('test'), (test.get('test'), ''))[0]}: {test.get('note', 'undefined')}"
        )

    def pick(key: str) -> Any:
        v = test.get(key)
        if index is not None and isinstance(v, list):
            return v[index]
        return v

    name, symbol = TEST_NAMES.get(test["test"], (test["test"], "statistic"))
    adjusted = pick("p_value_adjusted")
    p = adjusted if adjusted is not None else pick("p_value")
    stat = _finite(pick("statistic"))
    stat_text = "n/a" if stat is None else (f"{stat:.3f}" if abs(stat) < 10 else f"{stat:.0f}")
    p_text = p_value(p)
    p_text = f"p {p_text}" if p_text.startswith("<") else f"p = {p_text}"
    parts = [f"{name}, {symbol} = {stat_text}", p_text + (" (BH)" if adjusted is not None else "")]
    effect = _finite(pick("effect_size"))
    if effect is not None:
        parts.append(f"{_EFFECT.get(test.get('effect_size_name'), 'effect')} = {effect:.2f}")
    n = pick("n")
    if n is not None:
        parts.append(f"n = {n}")
    return ", ".join(parts)


_EFFECT = {"rank_biserial": "r", "cohens_d": "d"}


def undefined_test(test: str, reason: str, n: int, **details: Any) -> dict:
    """The JSON object of a test that cannot be computed (e.g. an empty group), with the reason."""
    return {
        "test": test,
        "statistic": None,
        "p_value": None,
        "effect_size": None,
        "n": n,
        "note": reason,
        **details,
    }


def significant_blocks(test: dict | None, alpha: float = ALPHA) -> list[int]:
    """Blocks (numbered from 1) where a per-block test rejects (BH-adjusted p-values when present)."""
    if not test:
        return []
    p = test.get("p_value_adjusted") or test.get("p_value")
    if not isinstance(p, list):
        p = [p]
    return [i + 1 for i, v in enumerate(p) if v is not None and v <= alpha]


def block_list(blocks: list[int], total: int) -> str:
    """``all 6 blocks``, ``blocks 3-6``, ``blocks 1, 4, 5`` or ``no block``."""
    if not blocks:
        return "no block"
    if len(blocks) == total:
        return f"all {total} blocks" if total > 1 else "the block"
    if blocks == list(range(blocks[0], blocks[-1] + 1)) and len(blocks) > 2:
        return f"blocks {blocks[0]}-{blocks[-1]}"
    return ("block " if len(blocks) == 1 else "blocks ") + ", ".join(str(b) for b in blocks)


@dataclass
class ReportFigure:
    """A figure with a heading and a caption: what is plotted, how to read it, what the paper found."""

    name: str
    figure: Figure
    title: str
    caption: str


@dataclass
class ReportTable:
    """An HTML table: column headings, rows of formatted cells, and a note under it."""

    title: str
    columns: list[str]
    rows: list[list[str]]
    note: str = ""
    collapsed: bool = False


@dataclass
class Claim:
    """One of the paper's claims, its test on this run, and whether it holds here."""

    key: str
    claim: str
    paper: str
    measured: str
    test: dict | None
    holds: bool | None
    verdict: str
    section: str = ""
    model: str = ""

    def to_dict(self) -> dict:
        return {
            "claim_id": self.key,
            "claim": self.claim,
            "paper": self.paper,
            "measured": self.measured,
            "holds": self.holds,
            "verdict": self.verdict,
            "section": self.section,
            "model": self.model,
            "test": self.test,
        }


@dataclass
class SectionParts:
    """What a section shows besides its numbers: paragraphs, tables, figures and claims."""

    paragraphs: list[str] = field(default_factory=list)
    tables: list[ReportTable] = field(default_factory=list)
    figures: list[ReportFigure] = field(default_factory=list)
    claims: list[Claim] = field(default_factory=list)


#: the fewest images (pairs, units) a test is run on; with fewer the test object says why it is undefined
MIN_SAMPLES = 2


def run_test(test: str, n: int, compute: Any) -> dict:
    """``compute().to_dict()``, or an undefined test object when there are fewer than two samples."""
    if n < MIN_SAMPLES:
        return undefined_test(test, f"undefined: needs at least {MIN_SAMPLES} images, got {n}", n)
    return compute().to_dict()


def block_p(test: dict | None, index: int | None = None) -> float | None:
    """The (BH-adjusted, when present) p-value of a test object, of one block for per-block tests."""
    if not test:
        return None
    p = test.get("p_value_adjusted")
    if p is None:
        p = test.get("p_value")
    if isinstance(p, list):
        return None if index is None else p[index]
    return p


def p_cell(test: dict | None, index: int | None = None) -> str:
    """A table cell: the p-value, with a star when significant; ``n/a`` for an undefined test."""
    p = block_p(test, index)
    if p is None:
        return "n/a"
    return p_value(p) + ("*" if p <= ALPHA else "")

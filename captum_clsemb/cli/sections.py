"""Report sections beyond identifiability: explanations, mechanisms, and the perturbation comparison.

Every number that the report shows comes with a 95% percentile bootstrap interval over images
(over classes for class-level numbers) and every paper claim with its test. Per-image values
are computed on all images in file order (the distributed runs split whole passes or gather
per-image rows), so that intervals and tests equal a single-process run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch import Tensor

from captum_clsemb.cli.report import ReportContext, SectionResult, _norm_stats, targets_description
from captum_clsemb.cli.report import snake_case as snake
from captum_clsemb.cli.report_format import (
    ALPHA,
    MIN_SAMPLES,
    STATS_SETTINGS,
    Claim,
    ReportTable,
    block_list,
    block_p,
    interval,
    number,
    p_cell,
    run_test,
    significant_blocks,
    test_summary,
    undefined_test,
)
from captum_clsemb.errors import InputValidationError, UnsupportedModelError
from captum_clsemb.stats import bootstrap_ci, mann_whitney_u, perturbation_auc_tests, wilcoxon_signed_rank
from captum_clsemb.stream import gather_objects, world

LAYERS = ("attn", "mlp")
BASELINE_KEYS = {"Random": "vs_random", "LinearProbe": "vs_linear_probe"}
LAYER_NAMES = {"attn": "attention", "mlp": "MLP"}


def jsonable(value: object) -> object:
    """Tensors, numpy arrays and nested containers -> plain Python (lists, floats) for report.json."""
    if isinstance(value, Tensor):
        return value.item() if value.dim() == 0 else value.tolist()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def _ci(values: object) -> dict:
    """The 95% percentile bootstrap interval of a mean over the units of axis 0, as a dict."""
    v = values.detach().cpu().numpy() if isinstance(values, Tensor) else np.asarray(values, dtype=np.float64)
    return bootstrap_ci(v, **STATS_SETTINGS).to_dict()


def _band(ci: dict) -> tuple[list, list]:
    return ci["ci_low"], ci["ci_high"]


def labelled_batches(
    ctx: ReportContext, shard: bool = True, flags: list[Tensor] | None = None, shift: bool = False
) -> Iterator[tuple[Tensor, Tensor]]:
    """(images, targets) with the predicted class where a label is unknown; ``shard=False``: all images.

    ``flags`` collects, per image, whether it has a label. ``shift`` replaces each target by
    another class drawn per image from its file index (a fixed, seed-free hash), for the
    chance level of class-specific measures.
    """
    c = ctx.adapter.num_classes
    for x, labels, _, index in ctx.batches("mechanisms", shard=shard):
        x, labels = x.to(ctx.device), labels.to(ctx.device)
        known = labels >= 0
        if not known.all():
            with torch.no_grad():
                pred = ctx.adapter.model_logits(x).argmax(-1)
            labels = torch.where(known, labels, pred)
        if flags is not None:
            flags.append(known.cpu())
        if shift and c > 1:
            j = torch.as_tensor(index, dtype=torch.int64)
            offset = 1 + ((j * 2654435761 + 12345) % 4294967296) % (c - 1)  # Knuth's multiplicative hash
            labels = (labels + offset.to(labels.device)) % c
        yield x, labels


def explanations_section(ctx: ReportContext) -> SectionResult:
    """ClassEmbeddingGradient per block and head, and global maps next to the baselines (paper Sec. 7)."""
    from captum_clsemb.attr import (
        AttentionRollout,
        CheferGradientRollout,
        CheferRelevancy,
        ClassEmbeddingGradient,
        RawAttention,
    )
    from captum_clsemb.viz.explanations import plot_block_head_grid, plot_method_grid

    title, key = "Explanations", "explanations"
    if ctx.sample_images is None or not ctx.adapter.has_class_token:
        return SectionResult(
            title, key=key, text="Skipped: needs a class-token model and at least one image."
        )
    if world()[0] != 0:  # the sample images are the same on every rank; rank 0 writes the report
        return SectionResult(title, key=key)
    x, t = ctx.sample_images.to(ctx.device), ctx.sample_labels.to(ctx.device)
    mean, std = _norm_stats(ctx.loaded)
    n = min(4, x.shape[0])
    methods, left_out = {}, {}
    for cls in (
        ClassEmbeddingGradient,
        CheferRelevancy,
        CheferGradientRollout,
        AttentionRollout,
        RawAttention,
    ):
        try:  # a method that is not defined for this family says why; the others still run
            methods[cls.__name__] = cls(ctx.adapter)
        except (InputValidationError, UnsupportedModelError) as e:
            left_out[cls.__name__] = str(e)
    if "ClassEmbeddingGradient" not in methods:
        reasons = "; ".join(f"{m}: {r}" for m, r in left_out.items())
        return SectionResult(title, key=key, text=f"Skipped: {reasons}")
    ceg = methods["ClassEmbeddingGradient"]
    with ctx.phase("explanations", 1 + len(methods)) as bar:
        per_head = ceg.attribute(x[:1], target=t[:1], return_per="head")[0]  # (blocks, heads, h, w)
        bar.update()
        maps = {}
        for name, method in methods.items():
            try:
                maps[name] = method.attribute(x[:n], target=t[:n]).detach().cpu()
            except (InputValidationError, UnsupportedModelError) as e:
                left_out[name] = str(e)
            bar.update()
    nb, nh = per_head.shape[:2]
    target_name = ctx.class_name(int(t[0]))
    figures = {
        "explanation_block_head_grid": plot_block_head_grid(
            per_head.cpu(),
            x[0].cpu(),
            blocks=range(1, nb + 1),
            mean=mean,
            std=std,
            title=f"ClassEmbeddingGradient per block and head: {target_name}",
        ),  # fmt: skip
        "global_maps": plot_method_grid(
            maps, x[:n].cpu(), [ctx.class_name(int(v)) for v in t[:n]], mean, std
        ),
    }
    norm = (
        "Each panel is normalised on its own by Captum's visualisation: divided by the value at which the sorted "
        "absolute values reach 98% of their sum (outlier_perc = 2) and clipped to [-1, 1], so colours compare "
        "tokens within a panel, not between panels."
    )
    captions = {
        "explanation_block_head_grid": (
            "ClassEmbeddingGradient per block and head (Fig. 5a)",
            f"For the first sample image ({ctx.sample_paths[0].name}, target {target_name}), one panel per block "
            f"(rows, 1-{nb}) and attention head (columns, 0-{nh - 1}): the negated gradient of the cross-entropy of "
            "the class token's block state, read in class embedding space, with respect to the class token's "
            "attention to each image token, over the grayscale image. Green: more attention to that token would "
            "raise the target class in the class token; red: it would lower it; white: no effect. "
            + norm
            + " The "
            "paper (Fig. 5a) shows such block- and head-specific maps, focused on the object in the later blocks.",
        ),
        "global_maps": (
            "Global maps: ClassEmbeddingGradient and the baselines",
            f"Rows: the first {n} sample images (title: target class); columns: the image, then the global "
            "relevance of each method over the grayscale image. ClassEmbeddingGradient sums its block and head "
            "maps (Sec. 7); the baselines are Chefer et al.'s relevancy (CVPR 2021) and gradient rollout (ICCV "
            "2021), attention rollout and the last block's raw attention. Green: evidence for the target "
            "class (red: against, where a method is signed). " + norm + " The paper finds its global maps "
            "similar to Chefer et al.'s, as the perturbation test below measures.",
        ),
    }
    text = (
        "Which image tokens would raise the target class in the class token, per block and head, and as one "
        "global map per method. Explanations are computed for the sample images of the identifiability section; "
        f"targets: {_sample_targets(ctx, n)}."
    )
    numbers = {"images": [str(p) for p in ctx.sample_paths[:n]], "methods_left_out": left_out}
    res = SectionResult(title, numbers, figures, key=key)
    res.paragraphs = [text] + [f"{m} is left out for this model: {r}" for m, r in left_out.items()]
    res.captions = captions
    return res


def _sample_targets(ctx: ReportContext, n: int) -> str:
    assert ctx.sample_labelled is not None
    return targets_description(int(ctx.sample_labelled[:n].sum()), n)


def _run_tasks(tasks: dict[str, Callable[[], object]]) -> dict[str, object]:
    """Run independent tasks, split round-robin over the ``torch.distributed`` ranks; every rank gets all results.

    Each task sees all images, so its result equals the single-process one exactly.
    """
    rank, size = world()
    mine = {name: fn() for i, (name, fn) in enumerate(tasks.items()) if i % size == rank}
    results: dict[str, object] = {}
    for part in gather_objects(mine):
        results.update(part)
    return {name: results[name] for name in tasks}


def key_value_k_classes(num_classes: int) -> int:
    r"""Classes per value vector for the key-value agreement: the paper's share, 5 of 1000 classes.

    ``max(1, round(|C| / 200))``: 5 for ImageNet's 1000 classes (the paper's top-5), 1 for 10
    classes. A fixed top-5 of 10 classes would count half of all classes as "promoted" and
    make agreement nearly certain.
    """
    return max(1, round(num_classes / 200))


def _per_image_changes(ctx: ReportContext) -> dict[str, np.ndarray]:
    """Per image and block, the share of tokens whose target logit the sub-layer raises (Fig. 3b)."""
    from captum_clsemb.analysis import class_similarity_change

    a, p = ctx.adapter, ctx.adapter.num_prefix_tokens
    out: dict[str, list] = {f"{layer}/{g}": [] for layer in LAYERS for g in ("image", "cls")}
    for x, t in labelled_batches(ctx, shard=False):
        ch = class_similarity_change(a, x, target=t)
        for layer in LAYERS:
            c = ch[layer].double()
            out[f"{layer}/image"].append((100 * c[:, :, p:].mean(-1)).cpu().numpy())
            if a.has_class_token:
                out[f"{layer}/cls"].append((100 * c[:, :, a.class_token_index]).cpu().numpy())
    return {k: np.concatenate(v) for k, v in out.items() if v}


def _per_image_match(ctx: ReportContext) -> dict[str, np.ndarray]:
    """Per image and block, the share of tokens in each residual-match category (Fig. 3c)."""
    from captum_clsemb.analysis import RESIDUAL_MATCH_CATEGORIES, residual_match

    a, p = ctx.adapter, ctx.adapter.num_prefix_tokens
    groups: dict[str, object] = {"all": slice(None), "image": slice(p, None)}
    if a.has_class_token:
        groups["cls"] = slice(a.class_token_index, a.class_token_index + 1)
    out: dict[str, list] = {f"{g}/{c}": [] for g in groups for c in RESIDUAL_MATCH_CATEGORIES}
    for x, _ in labelled_batches(ctx, shard=False):
        cat = residual_match(a, x)
        for g, pos in groups.items():
            sel = cat[:, :, pos]  # type: ignore[index]
            for i, c in enumerate(RESIDUAL_MATCH_CATEGORIES):
                out[f"{g}/{c}"].append((100 * (sel == i).double().mean(-1)).cpu().numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def _per_image_edit(ctx: ReportContext, edit: str) -> dict[str, np.ndarray]:
    """Per image and block, the identifiability rate of image tokens without and with an attention edit."""
    from captum_clsemb.attr import BlockwiseIdentifiability

    bi, p = BlockwiseIdentifiability(ctx.adapter), ctx.adapter.num_prefix_tokens
    clean, edited = [], []
    for x, t in labelled_batches(ctx, shard=False):
        for store, kw in ((clean, {}), (edited, {"attention_edit": edit})):
            s = bi.attribute(x, target=t, **kw)[:, :, p:].double()
            store.append((100 * (s == 1).double().mean(-1)).cpu().numpy())
    return {"clean": np.concatenate(clean), "edited": np.concatenate(edited)}


def _group_mean(values: np.ndarray, select: np.ndarray) -> np.ndarray:
    """Mean over the selected images per block; NaN for an empty group."""
    if not select.any():
        return np.full(values.shape[1], np.nan)
    return values[select].mean(0)


def _kva(ctx: ReportContext, vvp: object, layer: str, k: int, kc: int, shift: bool) -> dict:
    flags: list[Tensor] = []
    out = vvp.key_value_agreement_rate(  # type: ignore[attr-defined]
        labelled_batches(ctx, shard=False, flags=flags, shift=shift), layer=layer, k=k, k_classes=kc,
        return_per_image=True,
    )  # fmt: skip
    out["labelled"] = torch.cat(flags)
    return out


def mechanisms_section(ctx: ReportContext) -> SectionResult:
    """Value vectors, key-value memories, class building and attention edits (paper Sec. 5-6)."""
    from captum_clsemb.analysis import RESIDUAL_MATCH_CATEGORIES, ValueVectorProjector
    from captum_clsemb.viz.mechanisms import (
        plot_class_similarity_change,
        plot_class_value_agreement,
        plot_key_value_agreement,
        plot_residual_match,
    )
    from captum_clsemb.viz.models import plot_model_curves

    a = ctx.adapter
    nb, nc = a.num_blocks, a.num_classes
    vvp = ValueVectorProjector(a)
    rnd = vvp.random_baseline(seed=0)
    cva = {layer: vvp.class_value_agreement(layer).double().cpu().numpy() for layer in LAYERS}  # (B, C)
    cva_rnd = {layer: rnd.class_value_agreement(layer).double().cpu().numpy() for layer in LAYERS}
    memories = {layer: vvp.value_vectors(0, layer).shape[0] for layer in LAYERS}
    k = 5
    kc = key_value_k_classes(nc)
    # the rates are ratios of counts inside the analysis functions: instead of sharding images, each
    # rank runs whole passes over all images (round-robin), so the numbers equal a single-process run
    edit_names = ("self_only", "no_cls") if a.has_class_token else ("self_only",)
    tasks: dict[str, Callable[[], object]] = {
        **{f"kva/{layer}": (lambda layer=layer: _kva(ctx, vvp, layer, min(k, memories[layer]), kc, False))
           for layer in LAYERS},
        **{f"kva_chance/{layer}": (lambda layer=layer: _kva(ctx, vvp, layer, min(k, memories[layer]), kc, True))
           for layer in LAYERS},
        "change": lambda: _per_image_changes(ctx),
        "match": lambda: _per_image_match(ctx),
        **{f"edit/{e}": (lambda e=e: _per_image_edit(ctx, e)) for e in edit_names},
    }  # fmt: skip
    rank, size = world()
    mine = len([i for i in range(len(tasks)) if i % size == rank])
    with ctx.phase("mechanisms", mine * ctx.num_batches(shard=False)):
        done = _run_tasks(tasks)

    # Fig. 4a: class-value agreement, paired by class against the random-init copy
    cva_tests = {
        layer: wilcoxon_signed_rank(cva[layer].T, cva_rnd[layer].T, alternative="greater") for layer in LAYERS
    }
    for layer in LAYERS:
        cva_tests[layer].details["unit"] = "classes, paired"
    cva_numbers = {
        layer: {
            "mean_per_block": _ci(cva[layer].T),
            "random_init_mean_per_block": _ci(cva_rnd[layer].T),
            "test_trained_vs_random_init": cva_tests[layer].to_dict(),
        }
        for layer in LAYERS
    }

    # Fig. 4b: key-value agreement, its chance level and correct vs misclassified images
    groups = ["all", "image"] + (["cls"] if a.has_class_token else [])
    kva_numbers: dict = {}
    kva_rates, kva_ci, kva_base = {}, {}, {}
    for layer in LAYERS:
        r, ch = done[f"kva/{layer}"], done[f"kva_chance/{layer}"]
        per, base = r["per_image"], ch["per_image"]
        labelled = r["labelled"].numpy()
        correct = r["correct"].numpy() & labelled
        wrong = ~r["correct"].numpy() & labelled
        tests = {}
        for g in groups:
            x = per[g].numpy()
            if correct.sum() and wrong.sum():
                t = mann_whitney_u(x[correct], x[wrong], alternative="greater").to_dict()
                t["unit"] = "images"
            else:
                why = (
                    "no labelled images"
                    if not labelled.any()
                    else "no misclassified image"
                    if not wrong.any()
                    else "no correctly classified image"
                )
                t = undefined_test(
                    "mann_whitney_u", f"undefined: {why}", int(labelled.sum()),
                    n_x=int(correct.sum()), n_y=int(wrong.sum()),
                )  # fmt: skip
            t["quantity"] = (
                f"key-value agreement of {g} tokens (% per image), correct vs misclassified images"
            )
            tests[g] = t
        kva_rates[layer] = {g: r[g].numpy() for g in ("image", "cls") if g in r}
        kva_ci[layer] = {g: _ci(per[g]) for g in groups}
        kva_base[layer] = {g: base[g].numpy().mean(0) for g in ("image", "cls") if g in base}
        kva_numbers[layer] = {
            "rate_percent": {g: r[g].numpy() for g in groups},
            "rate_percent_ci": kva_ci[layer],
            # per-image shares averaged over the group's images (every image has as many tokens)
            "rate_correct_percent": {g: _group_mean(per[g].numpy(), correct) for g in groups},
            "rate_misclassified_percent": {g: _group_mean(per[g].numpy(), wrong) for g in groups},
            "chance_rate_percent_ci": {g: _ci(base[g]) for g in groups},
            "num_images": int(r["num_images"]),
            "num_correct": int(correct.sum()),
            "num_misclassified": int(wrong.sum()),
            "num_unlabelled": int((~labelled).sum()),
            "tests_correct_vs_misclassified": tests,
        }

    # Fig. 3b: class similarity change, against 50%
    change = done["change"]
    change_rates = {layer: {g: change[f"{layer}/{g}"].mean(0) for g in ("cls", "image") if f"{layer}/{g}" in change}
                    for layer in LAYERS}  # fmt: skip
    change_ci = {layer: {g: _ci(change[f"{layer}/{g}"]) for g in change_rates[layer]} for layer in LAYERS}
    change_tests = {}
    for layer in LAYERS:
        for g in change_rates[layer]:
            v = change[f"{layer}/{g}"]
            t = run_test(
                "wilcoxon_signed_rank",
                len(v),
                lambda v=v: wilcoxon_signed_rank(v - 50.0, alternative="greater"),
            )
            t["quantity"] = f"class similarity change rate of {g} tokens (% per image) minus 50%"
            change_tests[f"{layer}_{g}_above_chance"] = t

    # Fig. 3c: residual match
    match = done["match"]
    match_rates = {}
    match_ci = {}
    for key, v in match.items():
        g, c = key.split("/")
        match_rates.setdefault(g, {})[c] = v.mean(0)
        match_ci.setdefault(g, {})[c] = _ci(v)

    # Sec. 5: attention edits, paired by image
    edits = {}
    for e in edit_names:
        d = done[f"edit/{e}"]
        alt = "greater" if e == "self_only" else "two-sided"
        t = run_test("wilcoxon_signed_rank", len(d["clean"]),
                     lambda d=d, alt=alt: wilcoxon_signed_rank(d["clean"], d["edited"], alternative=alt))  # fmt: skip
        t["quantity"] = "identifiability rate of image tokens (% per image), unedited minus edited"
        edits[e] = {
            "rate_percent_ci": _ci(d["edited"]),
            "unedited_rate_percent_ci": _ci(d["clean"]),
            "test_unedited_vs_edited": t,
        }

    numbers = {
        "targets": ctx.targets,
        "class_value_agreement": cva_numbers,
        "key_value_agreement": {
            "k_keys": k,
            "k_classes": kc,
            "num_classes": nc,
            "chance": "agreement with another class drawn per image (same keys and value vectors)",
            **kva_numbers,
        },
        "class_similarity_change_rate_percent": {
            layer: {g: change_rates[layer][g] for g in change_rates[layer]} for layer in LAYERS
        },
        "class_similarity_change_rate_percent_ci": change_ci,
        "class_similarity_change_tests": change_tests,
        "residual_match_percent": match_rates,
        "residual_match_percent_ci": match_ci,
        "attention_edits": edits,
        "self_only_last_block_rate_percent": {
            "clean": float(done["edit/self_only"]["clean"][:, -1].mean()),
            "edited": float(done["edit/self_only"]["edited"][:, -1].mean()),
        },
    }
    res = SectionResult(
        "Mechanisms: value vectors and key-value memories", jsonable(numbers), key="mechanisms"
    )
    res.paragraphs = _mechanism_paragraphs(ctx, k, kc, memories)
    res.tables = _mechanism_tables(numbers, nb, edit_names)
    res.claims = _mechanism_claims(numbers, nb, edit_names)
    if world()[0] != 0:
        return res
    star = f"p < {ALPHA:g}, BH"
    res.figures = {
        "class_value_agreement": plot_class_value_agreement(
            {layer: cva[layer] for layer in LAYERS},
            {layer: cva_rnd[layer] for layer in LAYERS},
            tests=cva_tests,
        ),  # fmt: skip
        "key_value_agreement": plot_key_value_agreement(
            kva_rates,
            groups=("image", "cls"),
            ci={layer: {g: _band(c) for g, c in kva_ci[layer].items()} for layer in LAYERS},
            baseline=kva_base,
            baseline_label="another class (chance)",
        ),  # fmt: skip
        "class_similarity_change": plot_class_similarity_change(
            change_rates, ci={layer: {g: _band(c) for g, c in change_ci[layer].items()} for layer in LAYERS}
        ),
        "residual_match": plot_residual_match(
            match_rates["all"], ci={c: _band(v) for c, v in match_ci["all"].items()}
        ),
    }
    labels = {
        "self_only": "image tokens attend only to themselves",
        "no_cls": "no attention to the class token",
    }
    blocks = np.arange(1, nb + 1)
    curves = {"unedited": {"image": done["edit/self_only"]["clean"].mean(0)}}
    bands = {"unedited": {"image": _band(_ci(done["edit/self_only"]["clean"]))}}
    for e in edit_names:
        curves[labels[e]] = {"image": done[f"edit/{e}"]["edited"].mean(0)}
        bands[labels[e]] = {"image": _band(edits[e]["rate_percent_ci"])}
    res.figures["attention_edits"] = plot_model_curves(
        curves, depth=blocks, ci=bands, ylabel="identifiability rate of image tokens (%)",
        chance=100.0 / nc, title="Attention edits (Sec. 5)",
    )  # fmt: skip
    res.captions = _mechanism_captions(numbers, ctx, nb, k, kc, star, RESIDUAL_MATCH_CATEGORIES)
    return res


def _mechanism_paragraphs(ctx: ReportContext, k: int, kc: int, memories: dict) -> list[str]:
    nc = ctx.adapter.num_classes
    return [
        "How attention and MLP sub-layers build the class representation (paper Sec. 5-6). Each sub-layer is read "
        "as key-value memories: its output is a sum of value vectors (columns of the output projection), each "
        "weighted by a key coefficient that depends on the token; projecting a value vector on the class embedding "
        f"shows which classes it promotes. Targets: {ctx.targets}.",
        f"Key-value agreement: a token agrees when one of its {k} most activated keys (of {memories['attn']} "
        f"attention and {memories['mlp']} MLP memories per block) has a value vector whose top-{kc} classes "
        f"include the target. The paper uses the top 5 of 1000 classes (0.5%); with |C| = {nc} classes this "
        f"report keeps that share, top-max(1, round(|C|/200)) = top-{kc}, because a top-5 of 10 classes would "
        "count half of all classes as promoted and make agreement nearly certain. Its chance level, drawn in the "
        "figure, is the agreement with another class drawn per image, with the same keys and value vectors.",
    ]


def _block_rows(values: list[tuple[str, dict, str]], nb: int) -> list[list[str]]:
    rows = []
    for b in range(nb):
        rows.append([str(b + 1)] + [interval(ci, kind, b) if ci else "n/a" for _, ci, kind in values])
    return rows


def _mechanism_tables(numbers: dict, nb: int, edit_names: tuple[str, ...]) -> list[ReportTable]:
    cva, kva = numbers["class_value_agreement"], numbers["key_value_agreement"]
    tables = []
    rows = []
    for b in range(nb):
        row = [str(b + 1)]
        for layer in LAYERS:
            c = cva[layer]
            t = c["test_trained_vs_random_init"]
            row += [interval(c["mean_per_block"], "score", b), interval(c["random_init_mean_per_block"], "score", b),
                    p_cell(t, b)]  # fmt: skip
        rows.append(row)
    tables.append(
        ReportTable(
            "Class-value agreement per block (Fig. 4a), mean over classes",
            ["block", "attention", "random init", "p", "MLP", "random init", "p"],
            rows,
            "Per class, the highest cosine similarity between its class embedding and any value vector of the "
            "sub-layer; 95% bootstrap intervals over the classes; p: one-sided Wilcoxon signed-rank test paired by "
            "class (trained > random init), BH-adjusted across blocks. Paper: significantly higher than random init "
            "in deeper blocks; MLP peaks (about 0.2-0.42) above attention (about 0.14-0.22).",
        )
    )
    rows = []
    for b in range(nb):
        row = [str(b + 1)]
        for layer in LAYERS:
            d = kva[layer]
            t = d["tests_correct_vs_misclassified"]["all"]
            row += [interval(d["rate_percent_ci"]["all"], "percent", b),
                    interval(d["chance_rate_percent_ci"]["all"], "percent", b),
                    number(d["rate_correct_percent"]["all"][b]), number(d["rate_misclassified_percent"]["all"][b]),
                    p_cell(t, b)]  # fmt: skip
        rows.append(row)
    d0 = kva["attn"]
    tables.append(
        ReportTable(
            f"Key-value agreement per block (Fig. 4b), all tokens, top-{kva['k_classes']} of {kva['num_classes']} "
            "classes",
            [
                "block",
                "attention",
                "chance",
                "correct",
                "misclassified",
                "p",
                "MLP",
                "chance",
                "correct",
                "misclassified",
                "p",
            ],  # fmt: skip
            rows,
            f"Rates over {d0['num_images']} images ({d0['num_correct']} correctly classified, "
            f"{d0['num_misclassified']} misclassified, {d0['num_unlabelled']} unlabelled); 95% bootstrap intervals "
            "over images; chance: agreement with another class drawn per image; p: one-sided Mann-Whitney U test, "
            "correct > misclassified images, BH-adjusted across blocks ('n/a' when a group is empty). Paper "
            "(ViT-B/32): last block attention about 40-78%, MLP about 35-52%; correct images significantly higher "
            "in the penultimate MLP blocks.",
        )
    )
    ch = numbers["class_similarity_change_rate_percent_ci"]
    cols, vals = ["block"], []
    for layer in LAYERS:
        for g in ("image", "cls"):
            if g in ch[layer]:
                cols.append(f"{LAYER_NAMES[layer]}, {'image tokens' if g == 'image' else 'class token'}")
                vals.append((cols[-1], ch[layer][g], "percent"))
    tables.append(
        ReportTable(
            "Class similarity change rate per block (Fig. 3b)",
            cols,
            _block_rows(vals, nb),
            "Share of tokens whose target-class logit the sub-layer output raises above its input's; 95% bootstrap "
            "intervals over images; chance 50%. Paper: attention above chance in some blocks (more for the class "
            "token); MLP peaking in the penultimate blocks, otherwise below chance.",
            collapsed=True,
        )
    )
    edits = numbers["attention_edits"]
    rows = []
    names = {
        "self_only": "image tokens attend only to themselves",
        "no_cls": "no attention to the class token",
    }
    paper = {"self_only": "60.73% -> 0.12%", "no_cls": "60.73% -> 60.71%"}
    for e in edit_names:
        d = edits[e]
        rows.append([names[e], interval(d["unedited_rate_percent_ci"], "percent", nb - 1),
                     interval(d["rate_percent_ci"], "percent", nb - 1), paper[e],
                     test_summary(d["test_unedited_vs_edited"], nb - 1)])  # fmt: skip
    tables.append(
        ReportTable(
            "Attention edits (Sec. 5): last-block identifiability rate",
            ["edit", "unedited", "edited", "paper (ViT-B/32)", "test (unedited vs edited)"],
            rows,
            "Identifiability rate of image tokens in the last block with every block's attention edited; 95% "
            "bootstrap intervals over images; Wilcoxon signed-rank test paired by image (self-only: one-sided, "
            "unedited > edited; no class token: two-sided, the paper finds no change).",
        )
    )
    return tables


def _mechanism_claims(numbers: dict, nb: int, edit_names: tuple[str, ...]) -> list[Claim]:
    out = []
    cva = numbers["class_value_agreement"]
    deep = list(range(nb // 2 + 1, nb + 1))
    for layer in LAYERS:
        t = cva[layer]["test_trained_vs_random_init"]
        sig = significant_blocks(t)
        out.append(
            Claim(
                f"class_value_agreement_above_random_init_{layer}",
                f"{LAYER_NAMES[layer]} value vectors agree more with the class embeddings than in the random-init model, "
                "in deeper blocks (Fig. 4a).",
                "Significantly higher than random init in deeper blocks, for attention and MLP.",
                f"last block {interval(cva[layer]['mean_per_block'], 'score', nb - 1)} vs "
                f"{interval(cva[layer]['random_init_mean_per_block'], 'score', nb - 1)} random init",
                t,
                any(b in sig for b in deep),
                f"significant at {block_list(sig, nb)} (deeper blocks: {block_list(deep, nb)}); "
                f"{test_summary(t, nb - 1)} at the last block",
                "mechanisms",
            )
        )
    kva = numbers["key_value_agreement"]["mlp"]
    t = kva["tests_correct_vs_misclassified"]["all"]
    pen = max(1, nb - 1)
    p = block_p(t, pen - 1)
    if p is None:
        holds, verdict = None, f"Mann-Whitney U: {t.get('note', 'undefined')}"
    else:
        holds, verdict = p <= ALPHA, f"{test_summary(t, pen - 1)} at block {pen}"
    out.append(
        Claim(
            "key_value_agreement_correct_above_misclassified",
            "In the penultimate MLP block, correctly classified images have higher key-value agreement than "
            "misclassified ones (Sec. 6).",
            "Significantly higher for correct images in the penultimate MLP layers (all variants but GAP).",
            f"block {pen}: {number(kva['rate_correct_percent']['all'][pen - 1])} correct vs "
            f"{number(kva['rate_misclassified_percent']['all'][pen - 1])} misclassified "
            f"({kva['num_correct']} and {kva['num_misclassified']} images)",
            t,
            holds,
            verdict,
            "mechanisms",
        )
    )
    tests = numbers["class_similarity_change_tests"]
    t = tests.get("attn_image_above_chance")
    if t is not None:
        sig = significant_blocks(t)
        cls_sig = significant_blocks(tests.get("attn_cls_above_chance"))
        out.append(
            Claim(
                "attention_class_similarity_change_above_chance",
                "Attention raises the target class in more than half of the image tokens in at least some blocks "
                "(Fig. 3b).",
                "Attention above chance (50%) during at least some processing stages, more so for the class token.",
                f"highest block rate {number(max(numbers['class_similarity_change_rate_percent']['attn']['image']))}",
                t,
                None if block_p(t, 0) is None else bool(sig),
                f"image tokens significant at {block_list(sig, nb)}; class token at {block_list(cls_sig, nb)}",
                "mechanisms",
            )
        )
    edits = numbers["attention_edits"]
    d = edits["self_only"]
    t = d["test_unedited_vs_edited"]
    p = block_p(t, nb - 1)
    out.append(
        Claim(
            "self_only_attention_erases_identifiability",
            "Image tokens that attend only to themselves lose their class identifiability (Sec. 5).",
            "Last-block identifiability rate 60.73% -> 0.12%.",
            f"{interval(d['unedited_rate_percent_ci'], 'percent', nb - 1)} -> {interval(d['rate_percent_ci'], 'percent', nb - 1)}",
            t,
            None if p is None else p <= ALPHA,
            f"{test_summary(t, nb - 1)} at the last block",
            "mechanisms",
        )
    )
    if "no_cls" in edits:
        d = edits["no_cls"]
        t = d["test_unedited_vs_edited"]
        p = block_p(t, nb - 1)
        out.append(
            Claim(
                "no_cls_attention_keeps_identifiability",
                "Removing the image tokens' attention to the class token leaves their identifiability unchanged (Sec. 5).",
                "Last-block identifiability rate 60.73% -> 60.71%.",
                f"{interval(d['unedited_rate_percent_ci'], 'percent', nb - 1)} -> {interval(d['rate_percent_ci'], 'percent', nb - 1)}",
                t,
                None if p is None else p > ALPHA,
                f"{test_summary(t, nb - 1)} at the last block (two-sided; holds when no significant change)",
                "mechanisms",
            )
        )
    return out


def _mechanism_captions(
    numbers: dict, ctx: ReportContext, nb: int, k: int, kc: int, star: str, categories: tuple
) -> dict[str, tuple[str, str]]:
    n = numbers["key_value_agreement"]["attn"]["num_images"]
    return {
        "class_value_agreement": (
            "Fig. 4a: class-value agreement",
            f"Per block (x axis) and sub-layer (panels), box plots over the {ctx.adapter.num_classes} classes of "
            "each class's highest cosine similarity with any value vector (box: quartiles, line: median, whiskers: "
            f"1.5 IQR), coloured for the trained model, gray for the random-init copy. A star marks blocks where the "
            f"trained model is significantly higher (one-sided Wilcoxon signed-rank test paired by class, {star}). "
            "The paper finds the trained model significantly higher in deeper blocks, with MLP peaks (about "
            "0.2-0.42) above attention (about 0.14-0.22).",
        ),
        "key_value_agreement": (
            "Fig. 4b: key-value agreement",
            f"Share of tokens (circles: image tokens, squares: class token) whose {k} most activated keys include a "
            f"value vector with the target among its top-{kc} classes, per block, for attention (orange) and MLP "
            f"(blue), over {n} images, with 95% bootstrap bands. Dash-dotted lines: the chance level, the same "
            "measure against another class drawn per image; the distance above it is what the memories add. The "
            "paper (top-5 of 1000 classes, ViT-B/32) finds attention higher than MLP in early blocks, MLP peaking in "
            "the penultimate and attention in the last blocks (last block about 40-78% and 35-52%).",
        ),
        "class_similarity_change": (
            "Fig. 3b: class similarity change",
            "Share of tokens whose target-class logit (read through the class embedding) the sub-layer output "
            "raises above that of its input, per block, for attention (orange) and MLP (blue); solid: class token, "
            "dashed: image tokens; bands: 95% bootstrap intervals over images. The dotted black line at 50% is "
            "chance (as likely up as down). The paper finds attention above chance in some blocks, more for the "
            "class token, and MLP below chance except for a peak in the penultimate blocks.",
        ),
        "residual_match": (
            "Fig. 3c: residual-stream top-1 match",
            "For every token (class and image tokens) and block, the top-1 class of the block output compared with "
            "the top-1 class of the attention output (attn), else of the MLP output (mlp), else of the incoming "
            "residual stream (residual); composite: none of them, the stream built a new prediction. Each token "
            "falls in one category, so bars reach 100%; error bars: 95% bootstrap intervals of each category's share "
            "over images, drawn at the segment's upper edge. The paper finds mostly composite predictions in early "
            "blocks and more direct matches later, attention peaking in the last block and MLP in the penultimate.",
        ),
        "attention_edits": (
            "Attention edits (Sec. 5)",
            "Identifiability rate of image tokens per block without an edit and with every block's attention edited "
            "(image tokens attending only to themselves; image tokens not attending to the class token), with 95% "
            "bootstrap bands over images; dotted black: chance 100/|C|. The paper finds self-only attention erasing "
            "identifiability (60.73% -> 0.12% in the last block) and the class token's removal changing nothing "
            "(60.71%).",
        ),
    }


def comparison_section(ctx: ReportContext, num_images: int = 40) -> SectionResult:
    """Token-removal perturbation AUC of ClassEmbeddingGradient against the baselines (paper Sec. 7-8)."""
    from captum_clsemb.metrics import compare_explanations, default_methods
    from captum_clsemb.metrics.auc import authors_auc, trapezoid_auc
    from captum_clsemb.viz.perturbation import plot_perturbation_curves

    title, key = "Perturbation comparison (token removal AUC)", "perturbation_comparison"
    rank, size = world()
    n_all = ctx.num_images
    n_eval_planned = min(num_images, n_all // 2)
    chunks_here = -(-len(range(n_eval_planned)[rank::size]) // ctx.batch_size) if n_eval_planned else 0
    with ctx.phase("perturbation", ctx.num_batches(shard=False) + 1 + max(1, chunks_here)) as bar:
        # every rank reads all images (in file order), so the seeded split is the single-process one
        xs, ys = [], []
        for x, y in labelled_batches(ctx, shard=False):
            xs.append(x)
            ys.append(y)
        if sum(x.shape[0] for x in xs) < 2:
            return SectionResult(title, key=key, text="Skipped: needs at least two images.")
        x, y = torch.cat(xs), torch.cat(ys)
        # probes are fitted on images other than the evaluated ones
        n_eval = min(num_images, x.shape[0] // 2)
        order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))
        ev, pr = order[:n_eval], order[n_eval:]
        methods = default_methods(ctx.adapter, probe_data=(x[pr], y[pr]))
        bar.update()
        res = _compare_sharded(ctx, compare_explanations, methods, x[ev], y[ev], bar)
    aucs = {m: {mode: trapezoid_auc(res.curves[m][mode], res.fractions).double().cpu().numpy()
                for mode in ("negative", "positive")} for m in res.methods}  # fmt: skip
    auc_ci = {m: {mode: _ci(aucs[m][mode]) for mode in aucs[m]} for m in res.methods}
    curve_ci = {
        m: {mode: _ci(res.curves[m][mode].double()) for mode in ("negative", "positive")} for m in res.methods
    }
    tests = {}
    if "ClassEmbeddingGradient" in aucs and n_eval >= MIN_SAMPLES:
        tests = {
            mode: {b: t.to_dict() for b, t in per.items()}
            for mode, per in perturbation_auc_tests(aucs, "ClassEmbeddingGradient").items()
        }
    methods_json = []
    for m in res.methods:
        methods_json.append({
            "method": m,
            "auc_trapezoid": {mode: auc_ci[m][mode] for mode in ("negative", "positive")},
            "auc_authors": {mode: float(authors_auc(res.mean_curve(m, mode))) for mode in ("negative", "positive")},
            "mean_curve": {mode: res.mean_curve(m, mode).tolist() for mode in ("negative", "positive")},
            "mean_curve_ci": curve_ci[m],
            "ms_per_image": 1000 * res.seconds[m] / max(1, res.num_images),
        })  # fmt: skip
    clean = float(res.clean_score)
    numbers = {
        "num_images": n_eval,
        "num_probe_images": len(pr),
        "clean_accuracy": clean,
        "clean_accuracy_percent_ci": _ci(100.0 * res.curves[res.methods[0]]["negative"][:, 0].double())
        if res.score == "accuracy"
        else None,
        "fractions": res.fractions.tolist(),
        "methods": methods_json,
        # one-sided, paired per image: {mode: {"vs_random": test, "vs_linear_probe": test}}
        "tests_class_embedding_gradient_vs_baselines": {
            mode: {BASELINE_KEYS.get(b, snake(b)): t for b, t in per.items()} for mode, per in tests.items()
        },
        "targets": ctx.targets,
    }
    out = SectionResult(title, jsonable(numbers), key=key)
    out.paragraphs = [
        f"Token-removal test on {n_eval} images (linear probes fitted on the other {len(pr)}): image tokens are "
        "dropped after the position embedding, least important first (negative test: accuracy should stay high, "
        "higher AUC is better) or most important first (positive test: lower is better), and top-1 accuracy is "
        "recorded at 0-90% removed. AUC: trapezoid over the removed fractions x 100 (maximum 90; Chefer et al.'s "
        f"convention), the mean of per-image AUCs with its 95% bootstrap interval. Targets: {ctx.targets}.",
        "The small number of images makes the intervals wide; --compare-images sets it.",
    ]
    rows = []
    for m in res.methods:
        row = [m, interval(auc_ci[m]["negative"], "auc"), interval(auc_ci[m]["positive"], "auc"),
               f"{float(authors_auc(res.mean_curve(m, 'negative'))):.3f}",
               f"{float(authors_auc(res.mean_curve(m, 'positive'))):.3f}",
               f"{1000 * res.seconds[m] / max(1, res.num_images):.1f}"]  # fmt: skip
        rows.append(row)
    out.tables.append(
        ReportTable(
            f"Perturbation AUC per method ({n_eval} images)",
            [
                "method",
                "negative AUC (higher better)",
                "positive AUC (lower better)",
                "negative, authors' sum",
                "positive, authors' sum",
                "ms per image",
            ],  # fmt: skip
            rows,
            f"Clean accuracy {interval(numbers['clean_accuracy_percent_ci'])}. Authors' sum: sum(curve) / (max(curve) "
            "x (points + 1)) of the mean curve, Vilas et al.'s normalised sum, without an interval (it has no "
            "per-image meaning). Paper, ViT-B/32 (authors' sum): negative 0.8363 ours, 0.8454 Chefer, 0.7385 linear "
            "probe, 0.7159 random; positive 0.4128, 0.3929, 0.6832, 0.7159.",
        )
    )
    test_rows = []
    for mode in ("negative", "positive"):
        for base, t in tests.get(mode, {}).items():
            test_rows.append([f"{mode}: ClassEmbeddingGradient vs {base}", test_summary(t)])
    if test_rows:
        out.tables.append(
            ReportTable(
                "Is ClassEmbeddingGradient's removal order better? (paired per image)",
                ["comparison", "one-sided Wilcoxon signed-rank test"],
                test_rows,
                "Per-image AUCs of the two orders on the same images; negative test: greater is better, positive "
                "test: less is better; n: images whose two AUCs differ (ties drop out of the signed-rank test).",
            )
        )
    out.claims = _comparison_claims(tests, auc_ci)
    if rank == 0:
        out.figures["perturbation_curves"] = plot_perturbation_curves(
            res, ci={m: {mode: _band(c) for mode, c in curve_ci[m].items()} for m in res.methods},
            aucs={m: {mode: _Interval(auc_ci[m][mode]) for mode in auc_ci[m]} for m in res.methods},
        )  # fmt: skip
        out.captions["perturbation_curves"] = (
            "Perturbation curves (Sec. 7-8)",
            f"Top-1 accuracy of the model (y axis) as image tokens are removed (x axis, % of tokens), mean over "
            f"{n_eval} images per method, with 95% bootstrap bands over images; left: least important removed "
            "first (a good ranking keeps accuracy high), right: most important first (a good ranking makes it drop "
            "fast). The legend gives each method's mean AUC [95% CI]. The paper (ViT-B/32) keeps and even improves "
            "accuracy with up to 60% of the least important tokens removed, finds ClassEmbeddingGradient close to "
            "Chefer et al., and significantly better than a random order and than the linear-probe order.",
        )
    return out


class _Interval:
    """An interval dict with attribute access, for the plot legend."""

    def __init__(self, d: dict) -> None:
        self.estimate, self.low, self.high = d["estimate"], d["ci_low"], d["ci_high"]


def _comparison_claims(tests: dict, auc_ci: dict) -> list[Claim]:
    out = []
    paper = {
        ("Random", "negative"): ("Sec. 7", "negative 0.8363 vs 0.7159 (authors' sum)"),
        ("Random", "positive"): ("Sec. 7", "positive 0.4128 vs 0.7159 (authors' sum)"),
        ("LinearProbe", "negative"): ("Sec. 8", "negative 0.8363 vs 0.7385 (authors' sum)"),
        ("LinearProbe", "positive"): ("Sec. 8", "positive 0.4128 vs 0.6832 (authors' sum)"),
    }
    names = {"Random": "a random removal order", "LinearProbe": "the linear-probe order"}
    for base in ("Random", "LinearProbe"):
        for mode in ("negative", "positive"):
            t = tests.get(mode, {}).get(base)
            if t is None:
                continue
            sec, found = paper[(base, mode)]
            better = "higher" if mode == "negative" else "lower"
            out.append(
                Claim(
                    f"perturbation_auc_{mode}_better_than_{base.lower()}",
                    f"ClassEmbeddingGradient's {mode} perturbation AUC is {better} (better) than with {names[base]} "
                    f"({sec}).",
                    f"Significantly better; {found}.",
                    f"{interval(auc_ci['ClassEmbeddingGradient'][mode], 'auc')} vs {interval(auc_ci[base][mode], 'auc')}",
                    t,
                    None if t["p_value"] is None else t["p_value"] < ALPHA,
                    test_summary(t),
                    "perturbation_comparison",
                )
            )
    return out


def _compare_sharded(ctx: ReportContext, compare: Callable, methods: dict, x: Tensor, y: Tensor, bar=None):
    """``compare_explanations`` on a contiguous share of the images per rank, in chunks of one batch
    (each advances the progress bar), combined in image order."""
    from captum_clsemb.metrics.compare import ComparisonResults

    rank, size = world()
    bounds = [len(c) for c in torch.arange(x.shape[0]).tensor_split(size)]
    start = sum(bounds[:rank])
    stop = start + bounds[rank]
    mine = []
    for s in range(start, stop, ctx.batch_size):
        e = min(stop, s + ctx.batch_size)
        if "Random" in methods:  # the n-th evaluated image gets the random order of example n
            methods["Random"].offset = s
        mine.append(compare(ctx.adapter, x[s:e], y[s:e], methods=methods, batch_size=ctx.batch_size))
        if bar is not None:
            bar.update()
    parts = [p for part in gather_objects(mine) for p in part]
    if len(parts) == 1:
        return parts[0]
    first, count = parts[0], sum(p.num_images for p in parts)
    return ComparisonResults(
        methods=first.methods,
        fractions=first.fractions,
        curves={
            m: {mode: torch.cat([p.curves[m][mode] for p in parts]) for mode in first.curves[m]}
            for m in first.methods
        },  # fmt: skip
        clean_score=sum(p.clean_score * p.num_images for p in parts) / count,
        seconds={m: sum(p.seconds[m] for p in parts) for m in first.methods},
        num_images=count,
        score=first.score,
        protocol=first.protocol,
        explain_target=first.explain_target,
        notes=first.notes,
    )

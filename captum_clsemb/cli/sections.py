"""Report sections beyond identifiability: explanations, mechanisms, and the perturbation comparison."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from captum_clsemb.cli.report import ReportContext, SectionResult
from captum_clsemb.stream import gather_objects, world


def jsonable(value: object) -> object:
    """Tensors and nested containers -> plain Python (lists, floats) for report.json."""
    if isinstance(value, Tensor):
        return value.item() if value.dim() == 0 else value.tolist()
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def labelled_batches(ctx: ReportContext, shard: bool = True) -> Iterator[tuple[Tensor, Tensor]]:
    """(images, targets) with the predicted class where a label is unknown; ``shard=False``: all images."""
    for x, labels, _, _ in ctx.batches("mechanisms", shard=shard):
        x, labels = x.to(ctx.device), labels.to(ctx.device)
        if (labels < 0).any():
            with torch.no_grad():
                pred = ctx.adapter.model_logits(x).argmax(-1)
            labels = torch.where(labels >= 0, labels, pred)
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
    from captum_clsemb.cli.report import _norm_stats
    from captum_clsemb.viz.explanations import plot_block_head_grid, plot_method_grid

    if ctx.sample_images is None or not ctx.adapter.has_class_token:
        return SectionResult(
            "Explanations", text="Skipped: needs a class-token model and at least one image."
        )
    if world()[0] != 0:  # the sample images are the same on every rank; rank 0 writes the report
        return SectionResult("Explanations")
    x, t = ctx.sample_images.to(ctx.device), ctx.sample_labels.to(ctx.device)
    mean, std = _norm_stats(ctx.loaded)
    ceg = ClassEmbeddingGradient(ctx.adapter)
    per_head = ceg.attribute(x[:1], target=t[:1], return_per="head")[0]  # (blocks, heads, h, w)
    figures = {
        "explanation_block_head_grid": plot_block_head_grid(
            per_head.cpu(),
            x[0].cpu(),
            blocks=range(1, per_head.shape[0] + 1),  # numbered from 1, like the other figures
            mean=mean,
            std=std,
            title=f"ClassEmbeddingGradient per block and head: {ctx.class_name(int(t[0]))}",
        )  # fmt: skip
    }
    methods = {
        "ClassEmbeddingGradient": ceg,
        "CheferRelevancy": CheferRelevancy(ctx.adapter),
        "CheferGradientRollout": CheferGradientRollout(ctx.adapter),
        "AttentionRollout": AttentionRollout(ctx.adapter),
        "RawAttention": RawAttention(ctx.adapter),
    }
    n = min(4, x.shape[0])
    maps = {name: method.attribute(x[:n], target=t[:n]).detach().cpu() for name, method in methods.items()}
    figures["global_maps"] = plot_method_grid(
        maps, x[:n].cpu(), [ctx.class_name(int(v)) for v in t[:n]], mean, std
    )
    text = (
        "ClassEmbeddingGradient: negated gradient of the cross-entropy of the class token's block-b state (through "
        "final norm and head) w.r.t. the class token's attention to each image token, per block and head; the "
        "global map sums blocks and heads. Baselines: Chefer et al. relevancy (CVPR'21) and gradient rollout "
        f"(ICCV'21), attention rollout and raw attention. Targets: {_sample_targets(ctx, n)}."
    )
    return SectionResult("Explanations", {"images": [str(p) for p in ctx.sample_paths[:n]]}, figures, text)


def _sample_targets(ctx: ReportContext, n: int) -> str:
    assert ctx.sample_labelled is not None
    from captum_clsemb.cli.report import targets_description

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


def mechanisms_section(ctx: ReportContext) -> SectionResult:
    """Value vectors, key-value memories, class building and attention perturbations (paper Sec. 5-6)."""
    from captum_clsemb.analysis import (
        ValueVectorProjector,
        attention_edit_effect,
        class_similarity_change_rate,
        residual_match_rate,
    )
    from captum_clsemb.viz.mechanisms import (
        plot_class_similarity_change,
        plot_class_value_agreement,
        plot_key_value_agreement,
        plot_residual_match,
    )

    vvp = ValueVectorProjector(ctx.adapter)
    rnd = vvp.random_baseline(seed=0)
    layers = ("attn", "mlp")
    cva = {layer: vvp.class_value_agreement(layer) for layer in layers}
    cva_rnd = {layer: rnd.class_value_agreement(layer) for layer in layers}
    # the rates are ratios of counts inside the analysis functions: instead of sharding images, each
    # rank runs whole passes over all images (round-robin), so the numbers equal a single-process run
    edit_names = ("self_only", "no_cls")
    tasks: dict[str, Callable[[], object]] = {
        **{f"kva/{layer}": (lambda layer=layer: vvp.key_value_agreement_rate(
            labelled_batches(ctx, shard=False), layer=layer, k=5)) for layer in layers},
        "change": lambda: class_similarity_change_rate(ctx.adapter, labelled_batches(ctx, shard=False)),
        "match": lambda: residual_match_rate(ctx.adapter, labelled_batches(ctx, shard=False)),
        **{f"edit/{e}": (lambda e=e: attention_edit_effect(
            ctx.adapter, labelled_batches(ctx, shard=False), attention_edit=e)) for e in edit_names},
    }  # fmt: skip
    done = _run_tasks(tasks)
    kva = {layer: done[f"kva/{layer}"] for layer in layers}
    change, match = done["change"], done["match"]
    edits = {e: done[f"edit/{e}"] for e in edit_names}
    numbers = {
        "class_value_agreement_mean_per_block": {k: v.mean(1) for k, v in cva.items()},
        "class_value_agreement_random_init_mean_per_block": {k: v.mean(1) for k, v in cva_rnd.items()},
        "key_value_agreement_rate_percent": kva,
        "class_similarity_change_rate_percent": change,
        "residual_match_percent": match,
        "attention_edits_identifiability": edits,
        "self_only_last_block_rate_percent": {
            "clean": edits["self_only"]["clean"]["rate"]["image"][-1],
            "edited": edits["self_only"]["edited"]["rate"]["image"][-1],
        },
    }
    figures = {
        "class_value_agreement": plot_class_value_agreement(cva, cva_rnd),
        "key_value_agreement": plot_key_value_agreement(kva),
        "class_similarity_change": plot_class_similarity_change(change),
        "residual_match": plot_residual_match(match),
    }
    so = numbers["self_only_last_block_rate_percent"]
    text = (
        f"self_only attention (image tokens attend only to themselves) changes the last-block identifiability rate "
        f"from {float(so['clean']):.2f}% to {float(so['edited']):.2f}%. Class-value agreement is compared with a "
        "randomly initialised copy; key-value agreement uses the 5 most activated keys and the top-5 classes of "
        f"their value vectors (the paper's definition). Targets: {ctx.targets}."
    )
    return SectionResult("Mechanisms: value vectors and key-value memories", jsonable(numbers), figures, text)


def comparison_section(ctx: ReportContext, num_images: int = 40) -> SectionResult:
    """Token-removal perturbation AUC of ClassEmbeddingGradient against the baselines (paper Sec. 7-8)."""
    from captum_clsemb.metrics import compare_explanations, default_methods, plot_curves, to_markdown

    title = "Perturbation comparison (token removal AUC)"
    # every rank reads all images (in file order), so the seeded split is the single-process one
    xs, ys = [], []
    for x, y in labelled_batches(ctx, shard=False):
        xs.append(x)
        ys.append(y)
    if sum(x.shape[0] for x in xs) < 2:
        return SectionResult(title, text="Skipped: needs at least two images.")
    x, y = torch.cat(xs), torch.cat(ys)
    # probes are fitted on images other than the evaluated ones
    n_eval = min(num_images, x.shape[0] // 2)
    order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))
    ev, pr = order[:n_eval], order[n_eval:]
    methods = default_methods(ctx.adapter, probe_data=(x[pr], y[pr]))
    res = _compare_sharded(ctx, compare_explanations, methods, x[ev], y[ev])
    table = to_markdown(res)
    return SectionResult(
        title,
        {
            "num_images": n_eval,
            "clean_accuracy": res.clean_score,
            "auc_trapezoid": {
                m: {mode: res.auc(m, mode) for mode in ("negative", "positive")} for m in res.methods
            },
            "mean_curves": {
                m: {mode: res.mean_curve(m, mode).tolist() for mode in ("negative", "positive")}
                for m in res.methods
            },
            "seconds_per_method": res.seconds,
            "table_markdown": table,
        },
        {"perturbation_curves": plot_curves(res)} if world()[0] == 0 else {},
        f"Token-removal test on {n_eval} images (probes fitted on the other {len(pr)}): tokens dropped after the "
        "position embedding from least (negative, higher is better) or most (positive, lower is better) "
        "important; AUC = trapezoid over removal fractions 0-0.9 x 100 (Chefer et al.'s convention). "
        f"Targets: {ctx.targets}.\n" + table,
    )


def _compare_sharded(ctx: ReportContext, compare: Callable, methods: dict, x: Tensor, y: Tensor):
    """``compare_explanations`` on a contiguous share of the images per rank, combined in image order."""
    from captum_clsemb.metrics.compare import ComparisonResults

    rank, size = world()
    bounds = [len(c) for c in torch.arange(x.shape[0]).tensor_split(size)]
    start = sum(bounds[:rank])
    stop = start + bounds[rank]
    if "Random" in methods:  # the n-th evaluated image gets the random order of example n
        methods["Random"].offset = start
    part = None
    if stop > start:
        part = compare(ctx.adapter, x[start:stop], y[start:stop], methods=methods, batch_size=ctx.batch_size)
    parts = [p for p in gather_objects(part) if p is not None]
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
    )

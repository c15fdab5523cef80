#!/usr/bin/env python3
r"""Cost of identifiability and ClassEmbeddingGradient on the newer ViT families, as ratios to a plain forward.

    OMP_NUM_THREADS=1 python benchmarks/bench_families.py
    python benchmarks/bench_families.py --batch 2 --repeats 3 --models clip_b16
    python benchmarks/bench_families.py --docs   # also writes its section of docs/benchmarks.md

Models (random weights, no downloads, CPU, eval mode):

- ``eva02_base``: timm ``eva02_base_patch14_224`` with a 1000-class head (RoPE, SwiGLU with
  its inner layernorm, average pooling; 257 tokens);
- ``clip_b16``: a CLIP ViT-B/16 vision tower (224 px, 197 tokens, 512-d projection) as a
  :class:`~captum_clsemb.zero_shot.ZeroShotClassifier` over 1000 random class text
  embeddings (the text tower is not run).

Timed calls, each the median over ``--repeats`` runs after one warm-up, interleaved round-robin
so that machine load hits all alike:

- ``plain forward``: the model's own forward under ``torch.no_grad()``;
- ``identifiability``: :class:`BlockwiseIdentifiability` for all blocks and tokens with a given
  target (target <= 1.25x a plain forward);
- ``ClassEmbeddingGradient``: the global map over all blocks and heads (target <= 1.4x).
  EVA-02 pools by averaging; the map explains its class token, which the head does not read
  (the cost is what is measured here).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

TARGETS = {"identifiability": 1.25, "ClassEmbeddingGradient": 1.4}
DOCS_PAGE = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
# the section this script owns in DOCS_PAGE (run_benchmarks.py keeps it when it rewrites the page)
BEGIN, END = "<!-- families:begin -->", "<!-- families:end -->"
DESCRIPTIONS = {
    "eva02_base": "timm `eva02_base_patch14_224` (RoPE, SwiGLU, average pooling; 257 tokens), 1000 classes",
    "clip_b16": "CLIP ViT-B/16 vision tower as a `ZeroShotClassifier` over 1000 class embeddings (197 tokens)",
}


def to_markdown(rows: list[tuple], args: argparse.Namespace, plain: dict[str, float]) -> str:
    """The page section: per model, its plain forward and one row per computation."""
    cpu = platform.processor() or platform.machine()
    lines = [
        BEGIN,
        "## Newer ViT families",
        "",
        f"Written by `python benchmarks/bench_families.py --docs` (torch {torch.__version__}, {cpu}, "
        f"{torch.get_num_threads()} thread(s), batch {args.batch}, random weights, eval mode). Times are "
        f"medians of {args.repeats} runs taken round-robin after one warm-up (wall clock); ratios are to "
        "the median plain forward (`model(x)` under `torch.no_grad()`) of the same model.",
        "",
        "| Model | Computation | Seconds | × plain forward (target) |",
        "|---|---|---|---|",
    ]
    for name, k, sec, ratio, _ in rows:
        if k == next(iter(TARGETS)):
            lines.append(f"| {DESCRIPTIONS[name]} | plain forward | {plain[name]:.3f} | 1.00 |")
        status = "" if ratio <= TARGETS[k] else ", missed"
        lines.append(f"| {DESCRIPTIONS[name]} | {k} | {sec:.3f} | {ratio:.2f} (≤ {TARGETS[k]}{status}) |")
    lines += ["", END, ""]
    return "\n".join(lines)


def write_section(section: str) -> None:
    """Replace this script's section of DOCS_PAGE, or append it."""
    page = DOCS_PAGE.read_text()
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END) + "\n?", re.S)
    if pattern.search(page):
        page = pattern.sub(lambda _: section, page)
    else:
        page = page.rstrip("\n") + "\n\n" + section
    DOCS_PAGE.write_text(page)


def build(name: str, batch: int) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    if name == "eva02_base":
        import timm

        model = timm.create_model("eva02_base_patch14_224", pretrained=False, num_classes=1000)
    elif name == "clip_b16":
        import transformers

        from captum_clsemb.zero_shot import ZeroShotClassifier

        vision = dict(image_size=224, patch_size=16, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                      intermediate_size=3072)  # fmt: skip
        text = dict(vocab_size=64, hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                    max_position_embeddings=16)  # fmt: skip
        clip = transformers.CLIPModel(
            transformers.CLIPConfig(vision_config=vision, text_config=text, projection_dim=512)
        )
        model = ZeroShotClassifier(clip, torch.randn(1000, 512, generator=torch.Generator().manual_seed(1)))
    else:
        raise SystemExit(f"unknown model {name!r}; choose eva02_base or clip_b16")
    model.eval()
    x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    y = torch.randint(0, 1000, (batch,), generator=torch.Generator().manual_seed(3))
    return model, x, y


def runners(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, Callable[[], object]]:
    from captum_clsemb.adapters import adapt
    from captum_clsemb.attr import BlockwiseIdentifiability, ClassEmbeddingGradient

    adapter = adapt(model)
    bi, ceg = BlockwiseIdentifiability(adapter), ClassEmbeddingGradient(adapter)

    def plain() -> object:
        with torch.no_grad():
            return model(x)

    return {
        "plain forward": plain,
        "identifiability": lambda: bi.attribute(x, target=y),
        "ClassEmbeddingGradient": lambda: ceg.attribute(x, target=y),
    }


def time_interleaved(calls: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    for fn in calls.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(repeats):
        for k, fn in calls.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["eva02_base", "clip_b16"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--docs", action="store_true", help="write the section of docs/benchmarks.md")
    args = parser.parse_args()
    print(
        f"CPU, {torch.get_num_threads()} thread(s) (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}), "
        f"torch {torch.__version__}, batch {args.batch}, median of {args.repeats} interleaved runs after 1 warm-up"
    )
    rows = []
    plain: dict[str, float] = {}  # each model's median plain forward, seconds
    for name in args.models:
        model, x, y = build(name, args.batch)
        times = time_interleaved(runners(model, x, y), args.repeats)
        med = {k: statistics.median(v) for k, v in times.items()}
        plain[name] = med["plain forward"]
        for k, v in times.items():
            print(
                f"  {name:<11s} {k:<24s} median {med[k]:7.3f} s  runs {', '.join(f'{t:.3f}' for t in v)}",
                flush=True,
            )
        # per-repeat ratios (each against the plain forward of the same round), then their median
        for k in TARGETS:
            per_round = [t / p for t, p in zip(times[k], times["plain forward"])]
            rows.append((name, k, med[k], med[k] / med["plain forward"], statistics.median(per_round)))
    print()
    print(
        f"{'model':<11s} {'what':<24s} {'median s':>9s} {'x forward':>10s} {'median of per-round x':>22s} {'target':>7s}"
    )
    for name, k, sec, ratio, per_round in rows:
        ok = "ok" if ratio <= TARGETS[k] else "ABOVE"
        print(
            f"{name:<11s} {k:<24s} {sec:9.3f} {ratio:10.2f} {per_round:22.2f} {'<= ' + str(TARGETS[k]):>7s} {ok}"
        )
    if args.docs:
        write_section(to_markdown(rows, args, plain))
        print(f"written to {DOCS_PAGE}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Speed and memory of every analysis as ratios to a plain forward, measured in one run.

    python benchmarks/run_benchmarks.py            # prints the table, writes docs/benchmarks.md

Models: timm ``vit_base_patch16_224`` and ``vit_base_patch32_224`` with random weights, CPU,
batch 8, eval mode. Every timed call is repeated ``--repeats`` times, interleaved
round-robin with the others so that machine load affects all alike; the median is reported.
Peak memory is the largest resident-set growth seen by a sampling thread during the call.

Targets (issue "Performance benchmarks"): traced forward with identifiability for all blocks
and tokens <= 1.25x a plain forward; ClassEmbeddingGradient global map <= 1.4x; token-removal
AUC with 10 steps <= 0.7x ten plain forwards. ``--streaming`` also shows that dataset-level
identifiability keeps memory flat from 200 to 2,000 images.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import timm
import torch

from captum_clsemb.attr import BlockwiseIdentifiability, CheferRelevancy, ClassEmbeddingGradient
from captum_clsemb.metrics import token_removal_auc
from captum_clsemb.stream import dataset_identifiability

DOCS_TABLE = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


class PeakRSS:
    """Peak resident set size (MiB) over a block, sampled every 5 ms.

    After warm-up the allocator keeps freed memory, so growth during a call understates
    its needs; the process peak is reported instead (same model and inputs for all rows).
    """

    def __enter__(self) -> PeakRSS:
        self.proc = psutil.Process()
        self.base = self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def mib(self) -> float:
        """Peak resident set of the whole process during the block (MiB)."""
        return self.peak / 2**20


def bench_model(name: str, batch: int, repeats: int) -> list[dict]:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    x = torch.randn(batch, 3, 224, 224)
    y = torch.randint(0, 1000, (batch,))
    bi, ceg, chefer = BlockwiseIdentifiability(model), ClassEmbeddingGradient(model), CheferRelevancy(model)
    with torch.no_grad():
        attr = ceg.attribute(x, target=y)

    def plain() -> None:
        with torch.no_grad():
            model(x)

    def fwd_bwd() -> None:
        model.zero_grad(set_to_none=True)
        model(x).gather(1, y[:, None]).sum().backward()
        model.zero_grad(set_to_none=True)

    calls: dict[str, Callable[[], object]] = {
        "plain forward": plain,
        "forward + backward": fwd_bwd,
        "identifiability (all blocks, tokens)": lambda: bi.attribute(x, target=y),
        "ClassEmbeddingGradient (global map)": lambda: ceg.attribute(x, target=y),
        "CheferRelevancy": lambda: chefer.attribute(x, target=y),
        "token-removal AUC (10 steps)": lambda: token_removal_auc(model, x, attr, target=y),
    }
    times: dict[str, list[float]] = {k: [] for k in calls}
    mem: dict[str, float] = {}
    for fn in calls.values():  # warm-up
        fn()
    for _ in range(repeats):
        for k, fn in calls.items():
            with PeakRSS() as peak:
                t0 = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t0)
            mem[k] = max(mem.get(k, 0.0), peak.mib)
    med = {k: statistics.median(v) for k, v in times.items()}
    # ten plain forwards of the full sequence: 10x the median plain forward of this run
    med["ten plain forwards"] = 10 * med["plain forward"]
    mem["ten plain forwards"] = mem["plain forward"]
    rows = []
    for k in [*calls, "ten plain forwards"]:
        ref = med["ten plain forwards"] if k == "token-removal AUC (10 steps)" else med["plain forward"]
        rows.append({
            "model": name, "what": k, "seconds": med[k], "x_forward": med[k] / med["plain forward"],
            "x_fwd_bwd": med[k] / med["forward + backward"], "x_reference": med[k] / ref,
            "reference": "10 plain forwards" if k == "token-removal AUC (10 steps)" else "plain forward",
            "peak_mib": mem[k],
        })  # fmt: skip
    return rows


TARGETS = {
    "identifiability (all blocks, tokens)": 1.25,
    "ClassEmbeddingGradient (global map)": 1.4,
    "token-removal AUC (10 steps)": 0.7,
}


def streaming(counts: tuple[int, ...] = (200, 2000), batch: int = 50) -> list[dict]:
    from captum_clsemb.demo import load_demo_model

    model = load_demo_model()
    rows = []
    for n in counts:

        def batches(n: int = n):
            g = torch.Generator().manual_seed(0)
            for start in range(0, n, batch):
                m = min(batch, n - start)
                yield torch.randn(m, 3, 32, 32, generator=g), torch.randint(0, 10, (m,), generator=g)

        base = psutil.Process().memory_info().rss
        with PeakRSS() as peak:
            t0 = time.perf_counter()
            res = dataset_identifiability(model, batches())
            dt = time.perf_counter() - t0
        growth = (peak.peak - base) / 2**20
        rows.append({"images": n, "seconds": dt, "peak_mib": growth, "num_images": res["num_images"]})
    return rows


def to_markdown(rows: list[dict], stream_rows: list[dict] | None) -> str:
    lines = [
        "# Benchmarks",
        "",
        "Regenerate with `python benchmarks/run_benchmarks.py --streaming` (this page is written by it).",
        "",
        f"Measured with `python benchmarks/run_benchmarks.py` (torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, batch 8, random weights, CPU). Ratios are medians of interleaved "
        "repeats in one run; peak memory is the process's peak resident set during the call.",
        "",
        "| Model | Computation | Seconds | × plain forward | × forward+backward | × reference (target) | Peak MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        target = TARGETS.get(r["what"])
        ref = f"{r['x_reference']:.2f} vs {r['reference']}" + (f" (≤ {target})" if target else "")
        lines.append(f"| {r['model']} | {r['what']} | {r['seconds']:.2f} | {r['x_forward']:.2f} | "
                     f"{r['x_fwd_bwd']:.2f} | {ref} | {r['peak_mib']:.0f} |")  # fmt: skip
    if stream_rows:
        lines += ["", "Streaming dataset-level identifiability (bundled CIFAR-10 model, batches of 50):", "",
                  "| Images | Seconds | Peak RSS growth MiB |", "|---|---|---|"]  # fmt: skip
        lines += [f"| {r['images']} | {r['seconds']:.1f} | {r['peak_mib']:.0f} |" for r in stream_rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="vit_base_patch16_224,vit_base_patch32_224")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--streaming", action="store_true", help="also run the 200 vs 2,000 image memory check")
    p.add_argument("--no-docs", action="store_true", help="do not write docs/benchmarks.md")
    args = p.parse_args()
    rows = []
    for name in args.models.split(","):
        rows += bench_model(name.strip(), args.batch_size, args.repeats)
        print(to_markdown(rows, None), flush=True)
    stream_rows = streaming() if args.streaming else None
    md = to_markdown(rows, stream_rows)
    print(md)
    missed = [r for r in rows if r["what"] in TARGETS and r["x_reference"] > TARGETS[r["what"]]]
    for r in missed:
        print(f"TARGET MISSED: {r['model']} {r['what']}: {r['x_reference']:.2f} > {TARGETS[r['what']]}")
    if not args.no_docs:
        DOCS_TABLE.write_text(md)
        print(f"written to {DOCS_TABLE}")


if __name__ == "__main__":
    main()

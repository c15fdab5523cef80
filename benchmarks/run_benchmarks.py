#!/usr/bin/env python3
"""Speed and memory of the analyses as ratios to a plain forward, measured in one run; writes docs/benchmarks.md.

    python benchmarks/run_benchmarks.py --streaming                      # the page as published
    python benchmarks/run_benchmarks.py --baseline-ref main --streaming  # plus before/after columns

Sections (random weights, eval mode, no downloads):

- ViT-B/16 and ViT-B/32 (timm ``vit_base_patch16_224``, ``vit_base_patch32_224``), batch 8:
  plain forward, forward+backward, identifiability (all blocks and tokens),
  ``ClassEmbeddingGradient`` (global map), ``CheferRelevancy``, token-removal AUC (10 steps).
- ViT-B/16 at batch 1: ``AttentionRollout`` and ``RawAttention``.
- ViT-L/16 at 384 px (``vit_large_patch16_384``, 577 tokens, 24 blocks), batch 4: identifiability,
  ``ClassEmbeddingGradient`` and ``CheferRelevancy`` with their peak memory.
- ``--streaming``: dataset-level identifiability keeps memory flat from 200 to 2,000 images.

Timing: every timed call is repeated ``--repeats`` times, round-robin with all the other calls of
its section (so that machine load affects all alike), after one warm-up call each; the median is
reported, and ratios are taken to the median plain forward of the same section. On CUDA the
timings are synchronised.

Memory: the peak of live tensor memory during one extra (untimed) call, above what was allocated
when the call started (so the model's weights and the inputs are not counted): on CPU from the
PyTorch profiler's allocation events (every tensor allocation and free of the call, replayed in
order), on CUDA ``torch.cuda.max_memory_allocated``. The process's resident set is not used: the
allocator keeps freed pages, so it mostly reflects earlier calls.

``--baseline-ref REF`` also times the package as it is at the git revision REF (extracted with
``git archive`` into a temporary folder and imported under another name, never installed), on
the same model and inputs, interleaved with the current code: each row then shows the ratio
before and after. ``--device cuda`` runs the same sections on the GPU; without a GPU the page
says that the GPU table was not run.
"""

from __future__ import annotations

import argparse
import gc
import io
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import types
from collections.abc import Callable
from pathlib import Path

import psutil
import timm
import torch

import captum_clsemb
from captum_clsemb.attr import (
    AttentionRollout,
    BlockwiseIdentifiability,
    CheferRelevancy,
    ClassEmbeddingGradient,
    RawAttention,
)
from captum_clsemb.metrics import token_removal_auc
from captum_clsemb.stream import dataset_identifiability

REPO = Path(__file__).resolve().parents[1]
DOCS_PAGE = REPO / "docs" / "benchmarks.md"
# benchmarks/bench_families.py writes its section between these lines; a rewrite of the page keeps it
FAMILIES_SECTION = re.compile(r"<!-- families:begin -->.*?<!-- families:end -->\n?", re.S)

# Targets: time ratio to the reference of the row; memory ratio to the plain forward's peak.
TIME_TARGETS = {
    "identifiability (all blocks, tokens)": 1.25,
    "ClassEmbeddingGradient (global map)": 1.4,
    "CheferRelevancy": 4.0,
    "token-removal AUC (10 steps)": 0.7,
    "AttentionRollout": 1.1,
    "RawAttention": 1.1,
}
MEMORY_TARGETS = {"identifiability (all blocks, tokens)": 1.2}


# -- the package before: imported under another name from a git revision ----------------------------
def load_baseline(ref: str) -> types.ModuleType:
    """``captum_clsemb`` as it is at git revision ``ref``, imported as ``captum_clsemb_baseline``."""
    try:
        tar = subprocess.run(
            ["git", "-C", str(REPO), "archive", "--format=tar", ref, "captum_clsemb"],
            check=True,
            capture_output=True,
        ).stdout
    except subprocess.CalledProcessError as err:
        sys.exit(
            f"run_benchmarks: error: cannot read captum_clsemb at {ref!r}: {err.stderr.decode().strip()}"
        )
    tmp = Path(tempfile.mkdtemp(prefix="clsemb-baseline-"))
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        archive.extractall(tmp, filter="data")
    pkg = tmp / "captum_clsemb_baseline"
    (tmp / "captum_clsemb").rename(pkg)
    for path in pkg.rglob("*.py"):
        path.write_text(re.sub(r"\bcaptum_clsemb\b", "captum_clsemb_baseline", path.read_text()))
    sys.path.insert(0, str(tmp))
    import importlib

    module = importlib.import_module("captum_clsemb_baseline")
    module._benchmark_tmp = tmp  # removed at exit by main()
    return module


def baseline_calls(base: types.ModuleType | None) -> dict[str, Callable | None]:
    """The baseline's classes and functions by name (None where the revision lacks them)."""
    if base is None:
        return {}
    import importlib

    found: dict[str, Callable | None] = {}
    for name, module in [
        ("BlockwiseIdentifiability", "attr"),
        ("ClassEmbeddingGradient", "attr"),
        ("CheferRelevancy", "attr"),
        ("AttentionRollout", "attr"),
        ("RawAttention", "attr"),
        ("token_removal_auc", "metrics"),
    ]:
        try:
            found[name] = getattr(importlib.import_module(f"{base.__name__}.{module}"), name)
        except (ImportError, AttributeError):
            found[name] = None
    return found


# -- measuring ---------------------------------------------------------------------------------------
class Clock:
    def __init__(self, device: torch.device, kind: str) -> None:
        self.cuda = device.type == "cuda"
        # process CPU time says nothing about GPU work: CUDA timings are always wall clock
        self.now = time.process_time if kind == "cpu" and not self.cuda else time.perf_counter

    def __call__(self, fn: Callable[[], object]) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        t0 = self.now()
        fn()
        if self.cuda:
            torch.cuda.synchronize()
        return self.now() - t0


def peak_memory_mib(fn: Callable[[], object], device: torch.device) -> float:
    """Peak live tensor memory (MiB) during one call of ``fn``, above the memory live at its start."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated(device) - start) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # Every allocation (+bytes) and free (-bytes) of CPU tensors during the call, in order.
    try:
        raw = prof.profiler.kineto_results.events()
    except AttributeError:  # a torch without this record: no number rather than a wrong one
        return float("nan")
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in raw
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak / 2**20


def _addmm_inplace_flops(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of ``addmm_`` (PyTorch's counter knows only the out-of-place ``addmm``)."""
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


def matrix_flops(fn: Callable[[], object]) -> int:
    """The matrix-product FLOPs of one call (matmuls, linears, attention, convolutions), counted by
    ``torch.utils.flop_counter.FlopCounterMode``: the floor a compute-bound run cannot go below."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False, custom_mapping={torch.ops.aten.addmm_: _addmm_inplace_flops}) as fc:
        fn()
    return fc.get_total_flops()


def run_section(
    calls: dict[str, Callable[[], object]],
    baseline: dict[str, Callable[[], object]],
    repeats: int,
    clock: Clock,
    device: torch.device,
    memory: bool,
) -> dict[str, dict[str, float]]:
    """Median seconds (and peak MiB) of every call, the current and baseline ones interleaved."""
    jobs = [(k, False, fn) for k, fn in calls.items()] + [(k, True, fn) for k, fn in baseline.items()]
    usable = []
    for key, is_base, fn in jobs:  # warm-up; a baseline call that fails is left out
        try:
            fn()
            usable.append((key, is_base, fn))
        except Exception as err:  # noqa: BLE001 - an older revision may lack an option
            if not is_base:
                raise
            print(f"  baseline {key}: not measured ({type(err).__name__}: {str(err)[:120]})", flush=True)
    times: dict[tuple[str, bool], list[float]] = {(k, b): [] for k, b, _ in usable}
    for r in range(repeats):
        for key, is_base, fn in usable:
            times[key, is_base].append(clock(fn))
        print(f"  repeat {r + 1}/{repeats} done", flush=True)
    out: dict[str, dict[str, float]] = {}
    for (key, is_base), ts in times.items():
        row = out.setdefault(key, {})
        row["base_seconds" if is_base else "seconds"] = statistics.median(ts)
    if memory:
        for key, is_base, fn in usable:
            out[key]["base_peak_mib" if is_base else "peak_mib"] = peak_memory_mib(fn, device)
    for key, is_base, fn in usable:
        if not is_base:
            out[key]["flops"] = matrix_flops(fn)
    return out


# -- sections ----------------------------------------------------------------------------------------
def make_model(name: str, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False).eval().to(device)


def inputs(model: torch.nn.Module, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    h, w = model.patch_embed.img_size
    x = torch.randn(batch, 3, h, w, generator=g).to(device)
    y = torch.randint(0, model.num_classes, (batch,), generator=g).to(device)
    return x, y


def plain_calls(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, backward: bool
) -> dict[str, Callable]:
    def plain() -> None:
        with torch.no_grad():
            model(x)

    def fwd_bwd() -> None:
        model.zero_grad(set_to_none=True)
        model(x).gather(1, y[:, None]).sum().backward()
        model.zero_grad(set_to_none=True)

    return {"plain forward": plain, **({"forward + backward": fwd_bwd} if backward else {})}


def method_calls(pkg: dict[str, Callable | None], model, x, y, attr, names: list[str]) -> dict[str, Callable]:
    """The named computations built from a package's classes (the current one or the baseline)."""
    out: dict[str, Callable] = {}
    for what in names:
        try:
            if what == "identifiability (all blocks, tokens)":
                bi = pkg["BlockwiseIdentifiability"](model)
                out[what] = lambda bi=bi: bi.attribute(x, target=y)
            elif what == "ClassEmbeddingGradient (global map)":
                ceg = pkg["ClassEmbeddingGradient"](model)
                out[what] = lambda ceg=ceg: ceg.attribute(x, target=y)
            elif what == "CheferRelevancy":
                cr = pkg["CheferRelevancy"](model)
                out[what] = lambda cr=cr: cr.attribute(x, target=y)
            elif what == "token-removal AUC (10 steps)":
                fn = pkg["token_removal_auc"]
                out[what] = lambda fn=fn: fn(model, x, attr, target=y)
            elif what == "AttentionRollout":
                ar = pkg["AttentionRollout"](model)
                out[what] = lambda ar=ar: ar.attribute(x)
            elif what == "RawAttention":
                ra = pkg["RawAttention"](model)
                out[what] = lambda ra=ra: ra.attribute(x)
        except TypeError:  # the baseline lacks it (None)
            continue
    return out


CURRENT = {
    "BlockwiseIdentifiability": BlockwiseIdentifiability,
    "ClassEmbeddingGradient": ClassEmbeddingGradient,
    "CheferRelevancy": CheferRelevancy,
    "AttentionRollout": AttentionRollout,
    "RawAttention": RawAttention,
    "token_removal_auc": token_removal_auc,
}


def section(
    title: str,
    name: str,
    batch: int,
    names: list[str],
    args: argparse.Namespace,
    base: dict[str, Callable | None],
    device: torch.device,
    clock: Clock,
    backward: bool = False,
) -> dict:
    print(f"{title}: {name}, batch {batch}", flush=True)
    model = make_model(name, device)
    x, y = inputs(model, batch, device)
    attr = None
    if "token-removal AUC (10 steps)" in names:
        with torch.no_grad():
            attr = ClassEmbeddingGradient(model).attribute(x, target=y)
    calls = {**plain_calls(model, x, y, backward), **method_calls(CURRENT, model, x, y, attr, names)}
    base_calls = method_calls(base, model, x, y, attr, names) if base else {}
    rows = run_section(calls, base_calls, args.repeats, clock, device, memory=not args.no_memory)
    plain = rows["plain forward"]
    if "token-removal AUC (10 steps)" in names:
        rows["ten plain forwards"] = {
            "seconds": 10 * plain["seconds"],
            "peak_mib": plain.get("peak_mib", 0.0),
            "flops": 10 * plain["flops"],
        }
    for what, row in rows.items():
        tenfold = what == "token-removal AUC (10 steps)"
        ref = rows["ten plain forwards" if tenfold else "plain forward"]["seconds"]
        row["reference"] = "10 plain forwards" if tenfold else "plain forward"
        row["x_forward"] = row["seconds"] / plain["seconds"]
        row["x_reference"] = row["seconds"] / ref
        row["x_flops"] = row["flops"] / plain["flops"]
        if "forward + backward" in rows:
            row["x_fwd_bwd"] = row["seconds"] / rows["forward + backward"]["seconds"]
        if "base_seconds" in row:
            row["base_x_reference"] = row["base_seconds"] / ref
        if "peak_mib" in row and plain.get("peak_mib"):
            row["x_peak"] = row["peak_mib"] / plain["peak_mib"]
            if "base_peak_mib" in row:
                row["base_x_peak"] = row["base_peak_mib"] / plain["peak_mib"]
    del model, x, y, attr, calls, base_calls
    gc.collect()
    return {"title": title, "model": name, "batch": batch, "rows": rows}


class PeakRSS:
    """Peak resident set size over a block, sampled every 5 ms (for the streaming check)."""

    def __enter__(self) -> PeakRSS:
        self.proc = psutil.Process()
        self.peak = self.proc.memory_info().rss
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
        rows.append(
            {
                "images": n,
                "seconds": dt,
                "peak_mib": (peak.peak - base) / 2**20,
                "num_images": res["num_images"],
            }
        )
    return rows


# -- the page ----------------------------------------------------------------------------------------
def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def fmt_target(what: str, value: float | None, targets: dict[str, float]) -> str:
    if value is None:
        return ""
    target = targets.get(what)
    if target is None:
        return f"{value:.2f}"
    return f"{value:.2f} (≤ {target}{'' if value <= target else ', missed'})"


def section_table(sec: dict, baseline_ref: str | None, memory: bool) -> list[str]:
    rows = sec["rows"]
    fwd_bwd = any("x_fwd_bwd" in r for r in rows.values())
    head = ["Computation", "Seconds", "× plain forward"]
    if fwd_bwd:
        head.append("× forward+backward")
    head.append("× reference (target)")
    head.append("matrix FLOPs × plain forward")
    if baseline_ref:
        head += [f"× reference before ({baseline_ref})", "time after / before"]
    if memory:
        head += ["Peak MiB", "× plain forward's peak (target)"]
        if baseline_ref:
            head.append("Peak MiB before")
    lines = [f"**{sec['model']}**, batch {sec['batch']}:", "", "| " + " | ".join(head) + " |",
             "|" + "---|" * len(head)]  # fmt: skip
    for what, r in rows.items():
        cells = [what, f"{r['seconds']:.3f}", f"{r['x_forward']:.2f}"]
        if fwd_bwd:
            cells.append(f"{r['x_fwd_bwd']:.2f}")
        ref = fmt_target(what, r["x_reference"], TIME_TARGETS)
        cells.append(ref if r["reference"] == "plain forward" else f"{ref} vs {r['reference']}")
        cells.append(f"{r['x_flops']:.2f}")
        if baseline_ref:
            before = r.get("base_x_reference")
            cells += [
                "" if before is None else f"{before:.2f}",
                "" if before is None else f"{r['seconds'] / r['base_seconds']:.2f}",
            ]
        if memory:
            cells += [
                f"{r['peak_mib']:.0f}" if "peak_mib" in r else "",
                fmt_target(what, r.get("x_peak"), MEMORY_TARGETS) if what != "ten plain forwards" else "",
            ]
            if baseline_ref:
                cells.append(f"{r['base_peak_mib']:.0f}" if "base_peak_mib" in r else "")
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def to_markdown(
    results: dict[str, list[dict]],
    stream_rows: list[dict] | None,
    args: argparse.Namespace,
    gpu_note: str | None,
) -> str:
    memory = not args.no_memory
    threads = torch.get_num_threads()
    lines = [
        "# Benchmarks",
        "",
        "This page is written by `benchmarks/run_benchmarks.py`; regenerate it with",
        "",
        "```",
        "python benchmarks/run_benchmarks.py --streaming",
        "```",
        "",
        "(`--baseline-ref REV` adds the same rows for the package at git revision `REV`, timed in the",
        "same run, interleaved with the current code.)",
        "",
        f"Measured with captum-clsemb {captum_clsemb.__version__}, torch {torch.__version__}, "
        f"on {cpu_name()} with {threads} thread{'s' if threads != 1 else ''}; random weights, eval mode. "
        f"Times are medians of {args.repeats} repeats taken round-robin with the other rows of the same "
        f"table ({'process CPU time; GPU: wall clock' if args.clock == 'cpu' else 'wall clock'}), ratios are to the "
        "median plain forward (`model(x)` under `torch.no_grad()`, PyTorch's fused attention) of the "
        "same table.",
        "",
    ]
    if memory:
        lines += [
            "Peak MiB is the peak of live tensor memory during one more call, above what was "
            "allocated when the call started (model weights and inputs are not counted): on CPU "
            "replayed from the PyTorch profiler's record of every tensor allocation and free, on "
            "CUDA `torch.cuda.max_memory_allocated`.",
            "",
        ]
    for device, sections in results.items():
        lines += [f"## {'CPU' if device == 'cpu' else 'GPU (' + torch.cuda.get_device_name() + ')'}", ""]
        for sec in sections:
            lines += [f"### {sec['title']}", ""]
            lines += section_table(sec, args.baseline_ref, memory)
    if gpu_note:
        lines += ["## GPU", "", gpu_note, ""]
    lines += [
        "## Notes",
        "",
        "- `forward + backward` is `model(x)` with the autograd graph and `backward()` of the target "
        "logits into the parameters; its peak memory includes the parameter gradients.",
        "- *Matrix FLOPs* counts the FLOPs of every matrix product of one call (linears, matmuls, "
        "attention, the patch convolution) with `torch.utils.flop_counter.FlopCounterMode`, as a "
        "multiple of the plain forward's. Matrix products are most of a ViT's time on CPU, so a "
        "row's time ratio cannot go much below its FLOP ratio.",
        "- `CheferRelevancy` is one forward, one backward of the target logits to every attention "
        "matrix and the LRP sweep. Each linear layer's alpha1-beta0 rule takes three products of "
        "the layer's size (the shared denominator, with the forward's own product reused, and the "
        "positive and negative parts of the relevance), so its matrix products come to about "
        "1 + 1 + 3 forwards, less the parts that the map does not read (block 0, the first "
        "explained block's q/k/v projection, the last block's unread tokens): the FLOP column. "
        "That is above the 4x target, which therefore cannot be met on a compute-bound CPU without "
        "changing the rule's arithmetic; the rest is element-wise work on (N, heads, T, T) and "
        "(N, T, 4d) tensors, which weighs more where memory bandwidth is scarce. It keeps every "
        "block's attention matrix and its gradient until the sweep reaches that block, hence its "
        "peak memory.",
        "- Identifiability, token removal and the blocks that attention rollout does not read run "
        "PyTorch's fused attention, so they never hold an (N, heads, T, T) matrix.",
        "",
    ]
    if stream_rows:
        lines += ["## Streaming", "",
                  "Dataset-level identifiability (bundled CIFAR-10 model, batches of 50); memory is the "
                  "growth of the process's peak resident set over its size before the run:", "",
                  "| Images | Seconds | Peak RSS growth MiB |", "|---|---|---|"]  # fmt: skip
        lines += [f"| {r['images']} | {r['seconds']:.1f} | {r['peak_mib']:.0f} |" for r in stream_rows]
        lines.append("")
    return "\n".join(lines)


def summary(results: dict[str, list[dict]], baseline_ref: str | None) -> list[str]:
    """One line per row: ratio (before -> after) and target."""
    out = []
    for device, sections in results.items():
        for sec in sections:
            for what, r in sec["rows"].items():
                line = f"{device} {sec['model']} b{sec['batch']} | {what}: {r['x_reference']:.2f}x {r['reference']}"
                if baseline_ref and "base_x_reference" in r:
                    line += f" (before {r['base_x_reference']:.2f}x)"
                if "x_peak" in r:
                    line += f" | peak {r['peak_mib']:.0f} MiB = {r['x_peak']:.2f}x plain's"
                    if "base_peak_mib" in r:
                        line += f" (before {r['base_peak_mib']:.0f} MiB)"
                target = TIME_TARGETS.get(what)
                if target is not None and r["x_reference"] > target:
                    line += f"  TARGET MISSED (≤ {target})"
                mtarget = MEMORY_TARGETS.get(what)
                if mtarget is not None and r.get("x_peak", 0) > mtarget:
                    line += f"  MEMORY TARGET MISSED (≤ {mtarget})"
                out.append(line)
    return out


def run_device(device: torch.device, args: argparse.Namespace, base: dict) -> list[dict]:
    clock = Clock(device, args.clock)
    main_rows = [
        "identifiability (all blocks, tokens)",
        "ClassEmbeddingGradient (global map)",
        "CheferRelevancy",
        "token-removal AUC (10 steps)",
    ]
    sections = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        sections.append(section("Explanations at batch size " + str(args.batch_size), name, args.batch_size,
                                main_rows, args, base, device, clock, backward=True))  # fmt: skip
    if not args.skip_rollout:
        sections.append(section("Attention maps at batch size 1", "vit_base_patch16_224", 1,
                                ["AttentionRollout", "RawAttention"], args, base, device, clock))  # fmt: skip
    if not args.skip_large:
        sections.append(section("ViT-L/16 at 384 px: time and memory", "vit_large_patch16_384", args.large_batch_size,
                                main_rows[:3], args, base, device, clock))  # fmt: skip
    return sections


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="vit_base_patch16_224,vit_base_patch32_224")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--large-batch-size", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", choices=["cpu", "cuda", "both"], default="cpu",
                   help="cpu (default), cuda, or both; without a GPU the page says the GPU table was not run")  # fmt: skip
    p.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: torch's default)"
    )
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="wall clock (default), or process CPU time (steadier on a shared machine; CPU only)")  # fmt: skip
    p.add_argument("--baseline-ref", default=None, help="also time the package at this git revision")
    p.add_argument("--skip-large", action="store_true", help="leave out the ViT-L/16-384 section")
    p.add_argument("--skip-rollout", action="store_true", help="leave out the batch-1 attention-map section")
    p.add_argument("--no-memory", action="store_true", help="do not measure peak memory")
    p.add_argument("--streaming", action="store_true", help="also run the 200 vs 2,000 image memory check")
    p.add_argument("--no-docs", action="store_true", help="do not write docs/benchmarks.md")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    base_module = load_baseline(args.baseline_ref) if args.baseline_ref else None
    base = baseline_calls(base_module)
    devices = ["cpu", "cuda"] if args.device == "both" else [args.device]
    gpu_note = None
    if "cuda" in devices and not torch.cuda.is_available():
        devices.remove("cuda")
        if not devices:
            sys.exit(
                "run_benchmarks: error: --device cuda but torch.cuda.is_available() is False; use --device cpu"
            )
    if "cuda" not in devices:
        gpu_note = (
            "The GPU table was not run: the page was generated on a machine without a GPU. "
            "`python benchmarks/run_benchmarks.py --device both` adds it where CUDA is available "
            "(synchronised timings, `torch.cuda.max_memory_allocated`)."
        )
    results: dict[str, list[dict]] = {}
    try:
        for dev in devices:
            results[dev] = run_device(torch.device(dev), args, base)
            print("\n".join(summary(results, args.baseline_ref)), flush=True)
    finally:
        if base_module is not None:
            shutil.rmtree(base_module._benchmark_tmp, ignore_errors=True)
    stream_rows = streaming() if args.streaming else None
    md = to_markdown(results, stream_rows, args, gpu_note)
    print(md)
    print("\n".join(summary(results, args.baseline_ref)))
    if not args.no_docs:
        kept = FAMILIES_SECTION.search(DOCS_PAGE.read_text()) if DOCS_PAGE.exists() else None
        DOCS_PAGE.write_text(md if kept is None else md.rstrip("\n") + "\n\n" + kept.group(0))
        print(f"written to {DOCS_PAGE.relative_to(REPO)}")


if __name__ == "__main__":
    main()

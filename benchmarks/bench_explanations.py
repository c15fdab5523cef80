r"""Cost of the explanation methods relative to a plain forward and a forward+backward pass.

Times, on CPU with random weights (no downloads), for one batch:

- ``forward``: the model's own forward under ``torch.no_grad()``;
- ``forward+backward``: forward, then ``backward()`` of the summed logits (parameter grads);
- ``trace (no grad)``: the decomposed forward recording attention probabilities;
- ``ClassEmbeddingGradient``: global map over all blocks and heads (one forward, one small backward);
- ``CEG naive per-block``: full-graph traced forward, then one ``torch.autograd.grad`` per block
  of each block's loss with respect to that block's attention (what a direct implementation does);
- ``RawAttention``, ``AttentionRollout``, ``CheferGradientRollout``.

Each is reported as the median over ``--repeats`` runs after ``--warmup`` runs, and as
ratios to ``forward`` and to ``forward+backward``. With ``--memory`` (default) each method is
also run once in a fresh process, reporting the growth of the peak resident set size over the
process's size after building the model and inputs (Linux ``/proc/self/clear_refs`` and
``VmHWM``; elsewhere ``resource.getrusage``).

Usage::

    OMP_NUM_THREADS=2 python benchmarks/bench_explanations.py
    python benchmarks/bench_explanations.py --model vit_tiny_patch16_224 --batch 2 --repeats 1 --no-memory
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

METHODS = [
    "forward",
    "forward+backward",
    "trace (no grad)",
    "ClassEmbeddingGradient",
    "CEG naive per-block",
    "RawAttention",
    "AttentionRollout",
    "CheferGradientRollout",
]


def build(
    model_name: str, batch: int, threads: int | None
) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    import timm

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = timm.create_model(model_name, pretrained=False).eval()
    h, w = model.patch_embed.img_size
    x = torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(1))
    target = torch.randint(0, model.num_classes, (batch,), generator=torch.Generator().manual_seed(2))
    return model, x, target


def make_runners(
    model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor
) -> dict[str, Callable[[], object]]:
    from captum_clsemb.adapters import adapt
    from captum_clsemb.attr.attention_rollout import AttentionRollout
    from captum_clsemb.attr.chefer_gradient_rollout import CheferGradientRollout
    from captum_clsemb.attr.class_embedding_gradient import ClassEmbeddingGradient
    from captum_clsemb.attr.raw_attention import RawAttention
    from captum_clsemb.trace import trace

    adapter = adapt(model)
    ceg = ClassEmbeddingGradient(adapter)
    raw, rollout, chefer = RawAttention(adapter), AttentionRollout(adapter), CheferGradientRollout(adapter)

    def forward() -> object:
        with torch.no_grad():
            return model(x)

    def forward_backward() -> None:
        model(x).sum().backward()
        model.zero_grad(set_to_none=True)

    def naive() -> torch.Tensor:
        tr = trace(adapter, x, grad=True, record=["attn_probs", "resid_post"])
        cls, p = adapter.class_token_index, adapter.num_prefix_tokens
        total = 0
        for b in range(adapter.num_blocks):
            loss = F.cross_entropy(
                adapter.project(tr.cache["resid_post", b][:, cls]), target, reduction="sum"
            )
            (g,) = torch.autograd.grad(
                loss, tr.cache["attn_probs", b], retain_graph=b < adapter.num_blocks - 1
            )
            total = total - g[:, :, cls, p:].sum(1)
        return total

    return {
        "forward": forward,
        "forward+backward": forward_backward,
        "trace (no grad)": lambda: trace(adapter, x, record=["attn_probs"], store=False),
        "ClassEmbeddingGradient": lambda: ceg.attribute(x, target=target),
        "CEG naive per-block": naive,
        "RawAttention": lambda: raw.attribute(x),
        "AttentionRollout": lambda: rollout.attribute(x),
        "CheferGradientRollout": lambda: chefer.attribute(x, target=target),
    }


def time_all(runners: dict[str, Callable[[], object]], warmup: int, repeats: int) -> dict[str, float]:
    """Median seconds per method; repeats are interleaved (round robin) so drift hits all alike."""
    for fn in runners.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(repeats):
        for name, fn in runners.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    for name, ts in times.items():
        print(f"  timed {name:<24s} {statistics.median(ts):8.3f} s  ({', '.join(f'{t:.3f}' for t in ts)})")
    return {name: statistics.median(ts) for name, ts in times.items()}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _peak_rss_child(args: tuple[str, int, int | None, str], queue: mp.Queue) -> None:
    model_name, batch, threads, method = args
    model, x, target = build(model_name, batch, threads)
    runners = make_runners(model, x, target)
    try:
        # Reset the peak RSS (VmHWM) to the current RSS (Linux >= 4.0), so that the peak of
        # building the model does not hide the method's own peak.
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _status_kib("VmRSS")
        runners[method]()
        peak = _status_kib("VmHWM")
    except OSError:  # no /proc: the process-lifetime peak (may hide the method's peak)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        runners[method]()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    queue.put((peak - before) / 1024.0)  # KiB -> MiB


def peak_memory(model_name: str, batch: int, threads: int | None) -> dict[str, float]:
    ctx = mp.get_context("spawn")
    out = {}
    for method in METHODS:
        queue = ctx.Queue()
        proc = ctx.Process(target=_peak_rss_child, args=((model_name, batch, threads, method), queue))
        proc.start()
        out[method] = queue.get()
        proc.join()
        print(f"  memory {method:<24s} +{out[method]:8.1f} MiB", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: OMP_NUM_THREADS)")
    parser.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()

    model, x, target = build(args.model, args.batch, args.threads)
    print(
        f"{args.model}, batch {args.batch}, CPU, {torch.get_num_threads()} threads "
        f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}), torch {torch.__version__}, "
        f"median of {args.repeats} after {args.warmup} warm-up",
        flush=True,
    )
    times = time_all(make_runners(model, x, target), args.warmup, args.repeats)
    mem = peak_memory(args.model, args.batch, args.threads) if args.memory else {}

    fwd, fb = times["forward"], times["forward+backward"]
    print()
    header = f"{'method':<24s} {'median s':>9s} {'x forward':>10s} {'x fwd+bwd':>10s}"
    print(header + (f" {'peak RSS +MiB':>14s}" if mem else ""))
    print("-" * (len(header) + (15 if mem else 0)))
    for name in METHODS:
        line = f"{name:<24s} {times[name]:9.3f} {times[name] / fwd:10.2f} {times[name] / fb:10.2f}"
        if mem:
            line += f" {mem[name]:14.1f}"
        print(line)
    ratio = times["ClassEmbeddingGradient"] / fwd
    print(
        f"\nClassEmbeddingGradient / forward = {ratio:.2f} (target <= 1.4): {'OK' if ratio <= 1.4 else 'ABOVE TARGET'}"
    )
    print(
        f"naive per-block / ClassEmbeddingGradient = {times['CEG naive per-block'] / times['ClassEmbeddingGradient']:.2f}"
    )


if __name__ == "__main__":
    main()

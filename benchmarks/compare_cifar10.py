r"""Token-removal perturbation tests of the explanation methods on the bundled CIFAR-10 ViT.

Reads ``--num-images`` CIFAR-10 **test** images from ``../shared/data/cifar10-jpg.tar.gz``
(class-balanced: the first images of each class by file name, interleaved across classes),
fits the linear-probe baseline on ``--probe-shots`` **train** images per class (disjoint from
the evaluated images, as the authors' 10-shot probes), preprocesses with the demo config's
mean/std (``captum_clsemb.demo.load_demo_config``), and runs
:func:`captum_clsemb.metrics.compare_explanations` with the default methods
(ClassEmbeddingGradient, CheferRelevancy, CheferGradientRollout, AttentionRollout,
RawAttention, linear probe, random).

Writes to ``--out``: ``results.md`` (Markdown table), ``results.csv`` (AUCs and mean
curves), ``curves.png`` (mean curves), ``curves.pt`` (per-example curves) and ``run.json``
(settings and timings).

Usage::

    OMP_NUM_THREADS=2 python benchmarks/compare_cifar10.py --num-images 1000 --batch-size 50 \
        --out benchmarks/results/compare_cifar10
    python benchmarks/compare_cifar10.py --num-images 20 --out /tmp/compare_cifar10   # smoke test
"""

from __future__ import annotations

import argparse
import io
import json
import math
import tarfile
import time
from pathlib import Path, PurePosixPath

import torch
from PIL import Image

from captum_clsemb.demo import DemoTransform, load_demo_config, load_demo_model
from captum_clsemb.metrics import compare_explanations, default_methods, plot_curves, to_csv, to_markdown

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "cifar10-jpg.tar.gz"


def read_cifar10(
    archive: Path, class_names: list[str], num_test: int, shots: int
) -> tuple[list[tuple[bytes, int]], list[tuple[bytes, int]]]:
    r"""JPEG bytes and labels of the selected test and train images, in one pass over the archive.

    Test: the first ``ceil(num_test / 10)`` files of every class by name, ordered
    (file index, class) so that any prefix is class-balanced, then cut to ``num_test``.
    Train: the first ``shots`` files of every class by name.
    """
    index = {name: i for i, name in enumerate(class_names)}
    per_class = math.ceil(num_test / len(class_names))
    with tarfile.open(archive, "r:gz") as tar:
        members = [m for m in tar.getmembers() if m.isfile() and m.name.endswith(".jpg")]
        by_split: dict[str, dict[str, list[tarfile.TarInfo]]] = {"test": {}, "train": {}}
        for m in members:
            parts = PurePosixPath(m.name).parts
            if len(parts) >= 3 and parts[-3] in by_split and parts[-2] in index:
                by_split[parts[-3]].setdefault(parts[-2], []).append(m)
        chosen: dict[str, list[tuple[int, int, tarfile.TarInfo]]] = {"test": [], "train": []}
        for split, count in (("test", per_class), ("train", shots)):
            for cls, ms in by_split[split].items():
                ms.sort(key=lambda m: PurePosixPath(m.name).name)
                if len(ms) < count:
                    raise SystemExit(f"class {cls!r} has only {len(ms)} {split} images, need {count}")
                chosen[split] += [(j, index[cls], m) for j, m in enumerate(ms[:count])]
        # read in archive order so that the gzip stream only seeks forward
        wanted = sorted((m for split in chosen.values() for _, _, m in split), key=lambda m: m.offset_data)
        data = {m.name: tar.extractfile(m).read() for m in wanted}
    test = sorted(chosen["test"], key=lambda t: (t[0], t[1]))[:num_test]
    train = sorted(chosen["train"], key=lambda t: (t[1], t[0]))
    return [(data[m.name], c) for _, c, m in test], [(data[m.name], c) for _, c, m in train]


def to_tensors(items: list[tuple[bytes, int]], transform: DemoTransform) -> tuple[torch.Tensor, torch.Tensor]:
    xs = []
    for raw, _ in items:
        with Image.open(io.BytesIO(raw)) as img:
            xs.append(transform(img))
    return torch.stack(xs), torch.tensor([c for _, c in items], dtype=torch.long)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-images", type=int, default=1000, help="CIFAR-10 test images to evaluate")
    parser.add_argument("--batch-size", type=int, default=50, help="images per batch")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "compare_cifar10")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="cifar10-jpg.tar.gz")
    parser.add_argument("--probe-shots", type=int, default=10, help="train images per class for the probes")
    parser.add_argument("--score", default="accuracy", choices=["accuracy", "probability", "logit"])
    parser.add_argument("--explain-target", default="label", choices=["label", "predicted"])
    parser.add_argument("--protocol", default="tokens", choices=["tokens", "pixels"])
    parser.add_argument("--seed", type=int, default=0, help="seed of the random ranking")
    parser.add_argument("--framework", default="timm", choices=["timm", "hf"])
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args()
    if not args.data.is_file():
        raise SystemExit(f"{args.data} not found; pass --data path/to/cifar10-jpg.tar.gz")

    t0 = time.perf_counter()
    config = load_demo_config()
    transform = DemoTransform(config["mean"], config["std"], size=int(config["input_size"][-1]))
    test, train = read_cifar10(args.data, config["class_names"], args.num_images, args.probe_shots)
    x, y = to_tensors(test, transform)
    x_probe, y_probe = to_tensors(train, transform)
    model = load_demo_model(args.framework)
    t_load = time.perf_counter() - t0

    t0 = time.perf_counter()
    methods = default_methods(
        model, probe_data=(x_probe, y_probe), seed=args.seed, probe_batch_size=args.batch_size
    )
    t_probe = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = compare_explanations(model, x, y, methods=methods, batch_size=args.batch_size, score=args.score,
                               explain_target=args.explain_target, protocol=args.protocol,
                               progress=args.progress)  # fmt: skip
    t_run = time.perf_counter() - t0

    args.out.mkdir(parents=True, exist_ok=True)
    md = to_markdown(res)
    header = (
        f"# Perturbation tests, bundled CIFAR-10 ViT ({args.framework}; demo test top-1 {config.get('test_top1')}, "
        f"epochs {config.get('epochs_trained')})\n\n"
        f"{res.num_images} CIFAR-10 test images (class-balanced, first by file name); linear probes fitted on "
        f"{args.probe_shots} train images per class; random ranking seed {args.seed}.\n\n"
    )
    (args.out / "results.md").write_text(header + md)
    to_csv(res, args.out / "results.csv")
    plot_curves(res).savefig(args.out / "curves.png", dpi=120)
    torch.save({"fractions": res.fractions, "curves": res.curves, "labels": y}, args.out / "curves.pt")
    run = {
        "num_images": res.num_images, "batch_size": args.batch_size, "score": args.score,
        "explain_target": args.explain_target, "protocol": args.protocol, "probe_shots": args.probe_shots,
        "seed": args.seed, "framework": args.framework, "torch_threads": torch.get_num_threads(),
        "seconds": {"load": t_load, "fit_probes": t_probe, "compare": t_run},
        "attribution_seconds": res.seconds, "clean_score": res.clean_score,
        "demo_model": {k: config.get(k) for k in ("test_top1", "epochs_trained")},
    }  # fmt: skip
    (args.out / "run.json").write_text(json.dumps(run, indent=2))
    print(header + md)
    print(f"load {t_load:.1f}s, probes {t_probe:.1f}s, comparison {t_run:.1f}s; written to {args.out}")


if __name__ == "__main__":
    main()

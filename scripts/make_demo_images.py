#!/usr/bin/env python3
"""Copy a small CIFAR-10 test subset into the package as demo images.

Takes the first ``--per-class`` test images of every class (sorted by file name)
from the JPEG archive and writes them, byte for byte, to
``captum_clsemb/data/demo_images/{class}/NNNN.jpg``.

    python scripts/make_demo_images.py --data ../shared/data/cifar10-jpg.tar.gz
"""

from __future__ import annotations

import argparse
import shutil
import tarfile
from pathlib import Path, PurePosixPath

CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
]  # fmt: skip
REPO_ROOT = Path(__file__).resolve().parents[1]


def select_test_members(tar: tarfile.TarFile, per_class: int) -> dict[str, list[tarfile.TarInfo]]:
    r"""Pick the first test JPEG members of every class, sorted by file name.

    Args:
        tar: Open CIFAR-10 JPEG archive (layout ``cifar10/{split}/{class}/NNNN.jpg``).
        per_class: Number of images to keep per class.

    Returns:
        Mapping from class name to its selected archive members.
    """
    members_by_class: dict[str, list[tarfile.TarInfo]] = {name: [] for name in CLASSES}
    for member in tar.getmembers():
        if not member.isfile() or not member.name.endswith(".jpg"):
            continue
        parts = PurePosixPath(member.name).parts
        if len(parts) < 3 or parts[-3] != "test" or parts[-2] not in members_by_class:
            continue
        members_by_class[parts[-2]].append(member)
    selected = {}
    for class_name, members in members_by_class.items():
        members.sort(key=lambda m: PurePosixPath(m.name).name)
        if len(members) < per_class:
            raise RuntimeError(f"class {class_name!r} has only {len(members)} test images, need {per_class}")
        selected[class_name] = members[:per_class]
    return selected


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data", type=Path, default=REPO_ROOT.parent / "shared" / "data" / "cifar10-jpg.tar.gz"
    )
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "captum_clsemb" / "data" / "demo_images")
    parser.add_argument("--per-class", type=int, default=20)
    args = parser.parse_args()

    if args.out.exists():
        shutil.rmtree(args.out)
    total_files, total_bytes = 0, 0
    with tarfile.open(args.data) as tar:
        for class_name, members in select_test_members(tar, args.per_class).items():
            class_dir = args.out / class_name
            class_dir.mkdir(parents=True, exist_ok=True)
            for member in members:
                jpeg_bytes = tar.extractfile(member).read()
                (class_dir / PurePosixPath(member.name).name).write_bytes(jpeg_bytes)
                total_files += 1
                total_bytes += len(jpeg_bytes)
    print(f"wrote {total_files} images ({total_bytes / 1e6:.2f} MB) to {args.out}")


if __name__ == "__main__":
    main()

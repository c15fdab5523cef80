"""The ``clsemb`` command (also ``python -m captum_clsemb``)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from captum_clsemb.errors import InputValidationError, UnsupportedModelError

IMAGES_HELP = (
    "folder of JPEG/PNG/BMP/WebP/TIFF images; class sub-folders give the labels when every folder is named "
    "after a class of the model (case, '_' and space insensitive) or every folder is a class index; a "
    "labels.csv inside the folder is used; without labels the predicted class is the target. Default: bundled"
)
LABELS_HELP = (
    "CSV of file,label rows (label: class index or name; files relative to --images; a header row is "
    "recognised); images not listed are used unlabelled"
)
OVERWRITE_HELP = (
    "write into a non-empty --out that holds no earlier clsemb output (an earlier clsemb output is "
    "replaced without it); files clsemb did not write are never replaced or deleted"
)


MODEL_HELP = (
    "'demo' (the bundled CIFAR-10 ViT, the default); 'timm:<name>' (timm's pretrained weights, e.g. "
    "timm:vit_base_patch16_224.augreg2_in21k_ft_in1k); 'hf:<org>/<name>' (Hugging Face from_pretrained, e.g. "
    "hf:facebook/dinov2-small-imagenet1k-1-layer, hf:openai/clip-vit-base-patch32 with --classes); or the path "
    "of a local Hugging Face model folder (save_pretrained output)"
)


def add_model_arguments(parser: argparse.ArgumentParser, repeatable: bool = False) -> None:
    """The model options that ``clsemb report`` and ``clsemb compare`` share.

    ``repeatable``: ``--model`` may be given several times (the report compares the models).
    """
    group = parser.add_argument_group("model")
    if repeatable:
        group.add_argument(
            "--model", action="append", help=MODEL_HELP + ". Repeat --model to compare several models (Fig. 2 "
            "over normalised depth, Table 1, each against its random-init copy); the other sections analyse the "
            "first; --checkpoint then does not apply",
        )  # fmt: skip
    else:
        group.add_argument("--model", default="demo", help=MODEL_HELP)
    group.add_argument(
        "--checkpoint",
        metavar="FILE",
        help="local weights (.pth/.pt/.safetensors state dict) for the --model architecture; nothing is downloaded "
        "for timm models",
    )
    group.add_argument(
        "--random-init",
        action="store_true",
        help="random weights of the --model architecture (seeded) instead of pretrained ones: no weights downloaded",
    )
    group.add_argument(
        "--classes",
        metavar="FILE",
        help="CLIP / SigLIP: text file of class names, one per line (the zero-shot classifier's classes)",
    )
    group.add_argument(
        "--templates",
        metavar="FILE",
        help="CLIP / SigLIP: text file of prompt templates, one per line with {} for the class name "
        "(ensembled); default 'a photo of a {}.'",
    )


def model_options(args: argparse.Namespace) -> dict:
    """The model options of parsed arguments, as keyword arguments of ``run_report`` / ``run_compare``."""
    return {
        "checkpoint": args.checkpoint,
        "random_init": args.random_init,
        "classes": args.classes,
        "templates": args.templates,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clsemb", description="Vision Transformers in class embedding space."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser(
        "report", help="HTML/PNG/JSON report of identifiability (and more) for a model and images"
    )
    add_model_arguments(rep, repeatable=True)
    rep.add_argument("--masks", help="folder of segmentation masks (ImageNet-S style PNG, class id = R + 256 G, or "
                                     "single-channel PNG), matched to the images by file stem: adds the class- "
                                     "versus context-token section (paper Fig. 3a)")  # fmt: skip
    rep.add_argument("--images", help=IMAGES_HELP)
    rep.add_argument("--labels", help=LABELS_HELP)
    rep.add_argument("--out", default="clsemb-report", help="output folder (default: clsemb-report)")
    rep.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    rep.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0")
    rep.add_argument("--batch-size", type=int, default=64)
    rep.add_argument(
        "--max-images",
        type=int,
        default=None,
        help="use only the first N image files (unreadable ones among them are skipped)",
    )
    rep.add_argument(
        "--num-workers", type=int, default=0, help="DataLoader worker processes for image decoding"
    )
    rep.add_argument(
        "--sections",
        default="identifiability,explanations,mechanisms,comparison",
        help="comma-separated report sections (identifiability always runs)",
    )
    rep.add_argument(
        "--compare-images",
        type=int,
        default=20,
        help="images for the perturbation-AUC comparison section (0 skips it); probes use the rest",
    )
    rep.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    rep.add_argument("--distributed", action="store_true",
                     help="init torch.distributed from the torchrun environment (gloo on CPU, nccl on CUDA); "
                          "each rank processes a shard, rank 0 writes")  # fmt: skip
    cmp = sub.add_parser(
        "compare", help="perturbation AUC: ClassEmbeddingGradient vs Chefer et al. and baselines"
    )
    add_model_arguments(cmp)
    cmp.add_argument("--images", help=IMAGES_HELP + " (every image needs a label)")
    cmp.add_argument("--labels", help=LABELS_HELP)
    cmp.add_argument(
        "--probe-images", help="labelled images to fit the linear probes (default: half of --images)"
    )
    cmp.add_argument("--probe-labels", help="CSV of file,label for --probe-images")
    cmp.add_argument("--out", default="clsemb-compare", help="output folder (default: clsemb-compare)")
    cmp.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    cmp.add_argument("--num-images", type=int, default=None, help="evaluate at most this many images")
    cmp.add_argument("--batch-size", type=int, default=32)
    cmp.add_argument("--explain-target", default="label", choices=["label", "predicted"])
    cmp.add_argument("--protocol", default="tokens", choices=["tokens", "pixels"],
                     help="tokens: drop tokens after the position embedding (the paper); pixels: Chefer et al.")  # fmt: skip
    cmp.add_argument("--score", default="accuracy", choices=["accuracy", "probability", "logit"])
    cmp.add_argument("--device", default="cpu")
    cmp.add_argument("--no-progress", action="store_true")
    return parser


def _init_distributed(device: str) -> None:
    import os

    import torch
    import torch.distributed as dist

    if "RANK" not in os.environ:
        from captum_clsemb.cli.loading import CLIError

        raise CLIError(
            "--distributed needs the torchrun environment: torchrun --nproc_per_node=K -m captum_clsemb ..."
        )
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend)


def _destroy_distributed() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _one_line(e: BaseException) -> str:
    """The message on one line (a library message may quote a multi-line text)."""
    return " ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # during start-up or after the run, outside the run's own handling
        print("clsemb: interrupted", file=sys.stderr)
        return 130


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="clsemb: %(message)s")
    from captum_clsemb.cli.loading import CLIError
    from captum_clsemb.cli.output import InterruptedAfterWriting

    started_group = False
    try:
        if args.command == "report":
            from captum_clsemb.cli.report import run_report

            if args.distributed:
                _init_distributed(args.device)
                started_group = True
            data = run_report(
                model=args.model, **model_options(args), images=args.images, labels=args.labels, out=args.out,
                device=args.device, batch_size=args.batch_size, max_images=args.max_images,
                progress=not args.no_progress, num_workers=args.num_workers,
                section_names=[n.strip() for n in args.sections.split(",") if n.strip()],
                compare_images=args.compare_images, overwrite=args.overwrite, masks=args.masks,
            )  # fmt: skip
            if not data:  # a non-zero rank of a distributed run
                return 0
            ident = data["sections"].get("class_identifiability_across_blocks", {})
            acc = ident.get("top1_accuracy")
            print(f"report written to {args.out}/report.html (figures *.png and *.svg, numbers report.json)")
            if acc is not None:
                print(f"top-1 accuracy {acc * 100:.2f}%, last-block identifiability rate "
                      f"{ident['identifiability_rate_last_block_percent']:.2f}%")  # fmt: skip
            if data["skipped_files"]:
                print(f"skipped {len(data['skipped_files'])} file(s) (unreadable, non-finite or missing); "
                      "see report.json")  # fmt: skip
        elif args.command == "compare":
            from captum_clsemb.cli.compare import run_compare

            data = run_compare(
                model=args.model, **model_options(args), images=args.images, labels=args.labels,
                probe_images=args.probe_images, probe_labels=args.probe_labels, out=args.out,
                num_images=args.num_images, batch_size=args.batch_size, explain_target=args.explain_target,
                protocol=args.protocol, score=args.score, device=args.device, progress=not args.no_progress,
                overwrite=args.overwrite,
            )  # fmt: skip
            print(data["markdown"])
            print(f"written to {args.out}/ (results.md, results.csv, curves.png, run.json)")
    except (CLIError, InputValidationError, UnsupportedModelError) as e:
        print(f"clsemb: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except InterruptedAfterWriting:
        print("clsemb: interrupted after the finished output was written to --out", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("clsemb: interrupted; --out was left as it was", file=sys.stderr)
        return 130
    finally:
        if started_group:
            _destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())

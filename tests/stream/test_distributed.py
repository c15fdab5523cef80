"""Streaming accumulation and exact multi-process reduction (2 CPU processes under torchrun)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import BUNDLED_REPORT, BUNDLED_REPORT_ARGS, small_timm
from torch.utils.data import DataLoader

from captum_clsemb.attr import BlockwiseIdentifiability
from captum_clsemb.stream import ShardSampler, dataset_identifiability

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from dist_worker import dataset  # noqa: E402


def test_shard_sampler_partitions_without_padding() -> None:
    ds = list(range(23))
    shards = [list(ShardSampler(ds, rank=r, world_size=3)) for r in range(3)]
    assert sorted(i for s in shards for i in s) == ds
    assert [len(ShardSampler(ds, rank=r, world_size=3)) for r in range(3)] == [8, 8, 7]


def test_streaming_equals_whole_batch_computation() -> None:
    model = small_timm()
    ds = dataset()
    x, y = ds.tensors
    streamed = dataset_identifiability(model, DataLoader(ds, batch_size=5))
    bi = BlockwiseIdentifiability(model)
    with torch.no_grad():
        pred = model(x).argmax(-1)
    target = torch.where(y >= 0, y, pred)
    scores = bi.attribute(x, target=target)
    assert streamed["num_images"] == 23
    labelled = y >= 0
    assert streamed["top1_accuracy"] == pytest.approx((pred == y)[labelled].float().mean().item())
    assert streamed["identifiability_rate_last_block_percent"] == pytest.approx(
        bi.identifiability_rate(scores).item()
    )
    assert streamed["images_with_identifiable_token_percent"] == pytest.approx(
        bi.images_with_identifiable_token(scores).item()
    )
    curves = bi.mean_identifiability(scores)
    assert streamed["mean_identifiability_per_block"]["image tokens"] == pytest.approx(
        curves["image"].tolist()
    )
    assert streamed["mean_identifiability_per_block"]["class token"] == pytest.approx(curves["cls"].tolist())


def test_two_processes_reduce_to_the_single_process_numbers(tmp_path: Path) -> None:
    out = tmp_path / "dist.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(HERE / "dist_worker.py"), str(out), str(HERE.parent)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    distributed = json.loads(out.read_text())
    single = dataset_identifiability(small_timm(), DataLoader(dataset(), batch_size=4))
    assert distributed.keys() == single.keys()
    assert distributed["num_images"] == single["num_images"] == 23
    for key in (
        "top1_accuracy",
        "identifiability_rate_last_block_percent",
        "images_with_identifiable_token_percent",
    ):
        assert distributed[key] == pytest.approx(single[key], abs=1e-12)
    for k, v in single["mean_identifiability_per_block"].items():
        assert distributed["mean_identifiability_per_block"][k] == pytest.approx(v, abs=1e-12)
    assert distributed["identifiability_rate_per_block_percent"] == pytest.approx(
        single["identifiability_rate_per_block_percent"], abs=1e-12
    )


def _assert_same_numbers(a: object, b: object, path: str = "") -> None:
    """Equal structure and values; floats within 1e-6; timings are left out."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), (path, sorted(set(a) ^ set(b)))
        for k in set(a) - {"seconds", "ms_per_image"}:  # timings
            _assert_same_numbers(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), path
        for i, (u, v) in enumerate(zip(a, b)):
            _assert_same_numbers(u, v, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert a == pytest.approx(b, abs=1e-6), path
    else:
        assert a == b, path


@pytest.mark.xdist_group(BUNDLED_REPORT)
def test_two_process_report_equals_the_single_process_report(tmp_path: Path, bundled_report: dict) -> None:
    """Every section (identifiability, explanations, mechanisms, comparison) of a 2-process torchrun report."""
    # the single-process run is the report shared with the other report tests (tests/conftest.py):
    # 41 images, uneven shards; batches of 8 do not line up with the shards
    assert BUNDLED_REPORT_ARGS == ["--max-images", "41", "--compare-images", "6", "--batch-size", "8"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "captum_clsemb", "report", *BUNDLED_REPORT_ARGS, "--no-progress", "--distributed",
           "--out", str(tmp_path / "dist")]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    dist = json.loads((tmp_path / "dist" / "report.json").read_text())
    single = bundled_report["json"]
    assert set(single["sections"]) == {
        "class_identifiability_across_blocks",
        "explanations",
        "mechanisms",
        "perturbation_comparison",
    }
    assert single["sections"]["class_identifiability_across_blocks"]["num_images"] == 41
    assert single["sections"]["perturbation_comparison"]["num_images"] == 6
    # the intervals and tests are computed on per-image values gathered from both processes
    assert len(single["claims"]) >= 8 and all(c["test"]["p_value"] is not None for c in single["claims"])
    _assert_same_numbers(dist, single)
    # the per-image figures show the same images
    names = sorted(p.name for p in bundled_report["out"].iterdir())
    assert sorted(p.name for p in (tmp_path / "dist").iterdir()) == names


def _torchrun_report(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "captum_clsemb", "report", "--distributed", "--no-progress", *args]  # fmt: skip
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def test_a_rank_without_images_still_reduces(tmp_path: Path) -> None:
    # one image for two processes: rank 1's shard is empty (before: "ranks accumulated different quantities")
    proc = _torchrun_report(
        "--max-images", "1", "--sections", "identifiability", "--out", str(tmp_path / "o")
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ident = json.loads((tmp_path / "o" / "report.json").read_text())["sections"][
        "class_identifiability_across_blocks"
    ]
    assert ident["num_images"] == 1 and len(ident["token_map_images"]) == 1


def test_every_rank_stops_when_rank_0_cannot_write(tmp_path: Path) -> None:
    out = tmp_path / "o"
    out.mkdir()
    (out / "report.json").write_text("mine\n")
    proc = _torchrun_report("--max-images", "4", "--sections", "identifiability", "--out", str(out))
    assert proc.returncode != 0
    assert "clsemb: error: --out" in proc.stderr and "--overwrite" in proc.stderr
    assert (out / "report.json").read_text() == "mine\n"


def test_empty_accumulator_reports_no_images_instead_of_key_error() -> None:
    from captum_clsemb.adapters import adapt
    from captum_clsemb.errors import InputValidationError
    from captum_clsemb.stream import IdentifiabilityAccumulator

    with pytest.raises(InputValidationError, match="no images"):  # before: KeyError: 'images'
        dataset_identifiability(small_timm(), [])
    acc = IdentifiabilityAccumulator(adapt(small_timm()))
    assert acc.num_images == 0
    with pytest.raises(InputValidationError, match="no images"):
        acc.result()

"""The README's Python blocks run as written, and its commands are the ones the project uses.

The Python blocks of README.md run in order in one namespace, as a reader pasting them into
one interpreter would, except the blocks preceded by ``<!-- readme-test: skip (reason) -->``
(the timm hub example, which downloads weights). Their results are checked against
computations that do not use the package: timm's own modules for the identifiability rate.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SKIP = re.compile(r"<!--\s*readme-test:\s*skip\s*\((?P<reason>[^)]+)\)\s*-->")


@dataclass
class Block:
    info: str  # the fence's info string, e.g. "python"
    code: str
    line: int  # 1-based line of the opening fence
    skip: str | None  # the reason given in a skip marker right before the fence


def readme_blocks(text: str) -> list[Block]:
    """The fenced code blocks of a Markdown text, with the skip marker preceding each."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        opening = re.match(r"^```(\S*)\s*$", lines[i])
        if not opening:
            i += 1
            continue
        start, body = i, []
        i += 1
        while not lines[i].startswith("```"):
            body.append(lines[i])
            i += 1
        previous = next((ln for ln in reversed(lines[:start]) if ln.strip()), "")
        marker = SKIP.search(previous)
        blocks.append(Block(opening.group(1), "\n".join(body) + "\n", start + 1, marker and marker["reason"]))
        i += 1
    return blocks


BLOCKS = readme_blocks(README.read_text())
PYTHON = [b for b in BLOCKS if b.info == "python"]
RUN = [b for b in PYTHON if b.skip is None]


def test_marker_parsing() -> None:
    text = "a\n\n```python\nx = 1\n```\n<!-- readme-test: skip (needs a GPU) -->\n\n```python\ny = 2\n```\n"
    parsed = readme_blocks(text)
    assert [(b.code, b.line, b.skip) for b in parsed] == [("x = 1\n", 3, None), ("y = 2\n", 8, "needs a GPU")]


def test_blocks_needing_the_network_are_marked_and_the_others_run() -> None:
    assert RUN, "the README has no Python block that the tests run"
    for block in PYTHON:
        compile(block.code, f"README.md:{block.line}", "exec")  # every block is valid Python
        needs_hub = "pretrained=True" in block.code or "from_pretrained(" in block.code
        assert needs_hub == (block.skip is not None), (
            f"README.md:{block.line}: blocks that download weights, and only those, carry a skip marker"
        )
    assert [b.skip for b in PYTHON if b.skip] == ["downloads weights from the Hugging Face hub"]


@pytest.fixture(scope="module")
def quick_look() -> tuple[dict, str]:
    matplotlib.use("Agg")  # the snippet draws with Captum's visualization (pyplot)
    import contextlib
    import io

    namespace: dict = {"__name__": "__readme__"}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        for block in RUN:
            exec(compile(block.code, f"README.md:{block.line}", "exec"), namespace)
    import matplotlib.pyplot as plt

    plt.close("all")
    return namespace, out.getvalue()


def _identifiability_rate_with_timm(
    model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor
) -> float:
    """% of last-block image tokens whose top-1 class, read through norm and head, is the label."""
    with torch.no_grad():
        x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
        for block in model.blocks:
            x = block(x)
        logits = model.head(model.norm(x))[:, model.num_prefix_tokens :]  # (N, patches, classes)
        target = logits.gather(-1, labels.view(-1, 1, 1).expand(-1, logits.shape[1], 1))
        identifiable = ~(logits > target).any(-1)  # rank 0: no class scores strictly higher
    return identifiable.float().mean(1).mean().item() * 100


def test_quick_look_results(quick_look) -> None:
    ns, printed = quick_look
    model, images, labels = ns["model"], ns["images"], ns["labels"]
    assert images.shape == (200, 3, 32, 32) and labels.bincount().tolist() == [20] * 10
    assert ns["scores"].shape == (200, 6, 65)  # blocks, class token + 8 x 8 patches
    # the rate, computed with timm's modules directly (1 token of 12,800 = 0.0078 %)
    expected = _identifiability_rate_with_timm(model, images, labels)
    assert ns["rate"].item() == pytest.approx(expected, abs=0.008)
    assert 10 < expected < 100  # the trained model reads the class well above chance (10 %)
    assert f"{ns['rate'].item():.1f}% of last-block image tokens identifiable" in printed
    # per-block means: the class token is token 0
    torch.testing.assert_close(ns["curves"]["cls"], ns["scores"][:, :, 0].mean(0))
    torch.testing.assert_close(ns["curves"]["image"], ns["scores"][:, :, 1:].mean((0, 2)))
    # the global map is the sum of the per-block, per-head maps
    assert ns["per_head"].shape == (200, 6, 4, 8, 8) and ns["global_map"].shape == (200, 1, 8, 8)
    torch.testing.assert_close(ns["global_map"][:, 0], ns["per_head"].sum((1, 2)), atol=1e-5, rtol=1e-4)
    assert ns["up"].shape == (200, 1, 32, 32)
    assert len(ns["ax"].get_images()) == 1  # the heat map was drawn


def _commands(info: str) -> list[str]:
    return [
        ln.split("   #")[0].strip()
        for b in BLOCKS
        if b.info == info
        for ln in b.code.splitlines()
        if ln.strip()
    ]


def test_ci_runs_the_readme_test_command() -> None:
    ci = [ln for ln in (ROOT / ".ci" / "run").read_text().splitlines() if ln.startswith("python3 -m venv")]
    assert len(ci) == 1 and ci[0] in _commands("bash")


def test_report_commands_parse_and_each_writes_its_own_folder() -> None:
    from captum_clsemb.cli.main import build_parser

    parser, outs = build_parser(), []
    for command in _commands("bash"):
        for part in command.split("&&"):
            words = shlex.split(part)
            for prog in ("clsemb", "captum_clsemb"):
                if prog in [Path(w).name for w in words]:
                    args = parser.parse_args(words[[Path(w).name for w in words].index(prog) + 1 :])
                    if args.command == "report":
                        outs.append(args.out)
    # the main job, your model, and the distributed run
    assert len(outs) == 3 and len(set(outs)) == 3, outs
    assert "clsemb-report" in outs

"""`import captum_clsemb` stays light: no torch, timm or transformers at import, well under 3 s."""

from __future__ import annotations

import subprocess
import sys


def test_import_is_light_and_lazy() -> None:
    code = (
        "import sys, time; t = time.perf_counter(); import captum_clsemb; dt = time.perf_counter() - t; "
        "heavy = [m for m in ('torch', 'timm', 'transformers', 'captum', 'matplotlib') if m in sys.modules]; "
        "print(dt, ','.join(heavy))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert float(out[0]) < 3.0
    assert len(out) == 1, f"heavy modules imported eagerly: {out[1:]}"


def test_lazy_public_names_resolve() -> None:
    import captum_clsemb

    for name in captum_clsemb.__all__:
        assert getattr(captum_clsemb, name) is not None
    from captum_clsemb.attr import ClassEmbeddingGradient

    assert captum_clsemb.ClassEmbeddingGradient is ClassEmbeddingGradient

"""Plotting on top of Captum's visualization module.

:func:`to_captum_arrays`, :func:`visualize_image_attr` and :func:`visualize_image_attr_multiple`
(from :mod:`captum_clsemb.viz.captum`) put any of the package's maps into Captum's own
visualisation; the submodules ``identifiability``, ``explanations`` and ``mechanisms`` draw
the paper's figures. Names are imported lazily, so importing one submodule stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "to_captum_arrays": "captum_clsemb.viz.captum",
    "visualize_image_attr": "captum_clsemb.viz.captum",
    "visualize_image_attr_multiple": "captum_clsemb.viz.captum",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'captum_clsemb.viz' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])

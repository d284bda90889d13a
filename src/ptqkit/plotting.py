"""matplotlib, imported on demand: plotting is the optional extra ``ptqkit[plot]``."""

from __future__ import annotations

import importlib.util
from typing import Any

__all__ = ["require_matplotlib", "pyplot"]

MISSING = "plotting needs matplotlib: pip install 'ptqkit[plot]' (or leave out the plot option)"


def require_matplotlib() -> None:
    """Raise ``ValueError`` (one line, with the fix) when matplotlib is not installed."""
    if importlib.util.find_spec("matplotlib") is None:
        raise ValueError(MISSING)


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the non-interactive Agg backend."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt

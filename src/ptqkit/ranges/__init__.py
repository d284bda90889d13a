"""Range setters: tensor statistics -> clipping range.

Every setter has the signature ``fn(x, spec, **options) -> (lo, hi)`` where ``x`` is (C, N)
(one row per channel; C = 1 for per-tensor) and lo, hi are (C,).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..core.spec import QuantSpec
from .aciq import aciq_range
from .lp import lp_range
from .minmax import minmax_range
from .mse import mse_range
from .percentile import percentile_range

__all__ = ["RANGE_METHODS", "RangeFn", "get_range_method"]

RangeFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]

RANGE_METHODS: dict[str, RangeFn] = {
    "minmax": minmax_range,
    "percentile": percentile_range,
    "mse": mse_range,
    "aciq": aciq_range,
    "lp": lp_range,
}


def get_range_method(name: str) -> RangeFn:
    if name not in RANGE_METHODS:
        raise ValueError(f"unknown range method {name!r}; expected one of {sorted(RANGE_METHODS)}")
    return RANGE_METHODS[name]


def compute_range(name: str, x: torch.Tensor, spec: QuantSpec,
                  **options: float) -> tuple[torch.Tensor, torch.Tensor]:
    return get_range_method(name)(x, spec, **options)

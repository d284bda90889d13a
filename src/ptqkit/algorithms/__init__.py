"""Methods. Each module registers its Step in STEPS on import; import them all here."""

from __future__ import annotations

from . import embeddings, range_init  # noqa: F401
from .base import STEPS, Context, Report, Step, register_step

__all__ = ["STEPS", "Context", "Report", "Step", "register_step"]

"""Weight-only quantization of embedding tables (the "embeddings" step).

Transformer encoders start with token / position / segment embedding tables (nn.Embedding). Their
lookups take integer indices, so only the table can be quantized: each row (one token's vector)
gets its own scale and zero-point (row-wise, as in FBGEMM's quantized embedding bags). Off unless
a recipe lists the step, e.g. ``recipe.with_steps(StepSpec("embeddings", {"bits": 8}))``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..core.spec import QuantSpec
from ..nn.prepare import quantize_embeddings
from ..ranges import get_range_method
from .base import Context, Step, register_step

__all__ = ["EmbeddingOptions", "EmbeddingQuant"]


@dataclass(frozen=True)
class EmbeddingOptions:
    """bits: table bits; range: a name in ranges.RANGE_METHODS (per row); include: fnmatch
    patterns on module names of the nn.Embedding modules to quantize."""

    bits: int = 8
    symmetric: bool = False
    range: str = "minmax"
    include: tuple[str, ...] = ("*",)

    def __post_init__(self) -> None:
        QuantSpec(self.bits)
        get_range_method(self.range)
        if isinstance(self.include, str):  # a single pattern from YAML
            object.__setattr__(self, "include", (self.include,))
        object.__setattr__(self, "include", tuple(self.include))


@register_step
class EmbeddingQuant(Step[EmbeddingOptions]):
    name = "embeddings"
    Options = EmbeddingOptions
    effects = frozenset({"quantizes_embeddings"})

    @torch.no_grad()
    def run(self, ctx: Context) -> dict[str, Any]:
        opts: EmbeddingOptions = self.options
        spec = QuantSpec(opts.bits, opts.symmetric, "channel")
        swapped = quantize_embeddings(ctx.qmodel, spec, opts.include)
        fn = get_range_method(opts.range)
        for emb in swapped.values():
            emb.w_quant.set_range(*fn(emb.weight.detach(), emb.w_quant.spec))
        ctx.report.stays_float = [s for s in ctx.report.stays_float
                                  if s.split(" ")[0] not in swapped]
        if swapped:
            ctx.report.notes.append(f"embeddings: {opts.bits}-bit weight-only, per row "
                                    f"({opts.range}): {', '.join(swapped)}")
        return {"layers": list(swapped), "bits": opts.bits, "range": opts.range}

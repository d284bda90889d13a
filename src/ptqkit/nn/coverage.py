"""MAC coverage: the share of a model's multiply-accumulates that run in quantized layers.

Counted in one forward pass (the one ``prepare`` runs to record the layer order):

- a conv / linear layer (quantized or float): ``out.numel() * weight[0].numel()`` MACs, i.e.
  output elements times the products per output (C_in/groups * prod(kernel), or in_features);
  a transposed conv: ``in.numel() * weight[0].numel()``;
- an activation x activation product outside any layer (attention): ``out.numel() * K`` for a
  matmul / bmm of inner size K, ``2 * q.numel() * S`` for scaled-dot-product attention over S keys.

    coverage = sum(MACs of layers whose weights are quantized) / sum(all MACs counted)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .modules import QuantModule

__all__ = ["MacCounter", "Coverage", "coverage"]

_WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_MATMULS = {torch.matmul, torch.bmm, torch.baddbmm, torch.Tensor.matmul, torch.Tensor.__matmul__,
            torch.Tensor.bmm}


class MacCounter(TorchFunctionMode):
    """Context manager: MACs per named conv/linear module and of float activation products."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.macs: dict[str, int] = {}
        self.matmul_macs = 0
        self._depth = 0  # > 0 while inside a counted layer (its ops are not counted again)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> MacCounter:
        for name, mod in self.model.named_modules():
            counted = isinstance(mod, (QuantModule, *_WEIGHTED, *_TRANSPOSED))
            if counted and not _inside_quant(name, self.model):
                self._handles.append(mod.register_forward_pre_hook(self._enter_layer))
                self._handles.append(mod.register_forward_hook(
                    lambda m, a, out, n=name: self._leave_layer(n, m, a, out)))
        super().__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        for h in self._handles:
            h.remove()

    def _enter_layer(self, mod: nn.Module, args: tuple) -> None:
        self._depth += 1

    def _leave_layer(self, name: str, mod: nn.Module, args: tuple, out: object) -> None:
        self._depth -= 1
        weight = getattr(mod, "weight", None)
        if not isinstance(out, torch.Tensor) or not isinstance(weight, torch.Tensor):
            return
        per = int(weight[0].numel())
        ref = args[0] if isinstance(mod, _TRANSPOSED) and args else out
        self.macs[name] = self.macs.get(name, 0) + int(ref.numel()) * per

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        if self._depth == 0 and isinstance(out, torch.Tensor) and len(args) >= 2:
            if func in _MATMULS and not any(isinstance(a, nn.Parameter) for a in args):
                a = args[1] if func is torch.baddbmm else args[0]
                self.matmul_macs += int(out.numel()) * int(a.shape[-1])
            elif func is F.scaled_dot_product_attention:
                self.matmul_macs += 2 * int(args[0].numel()) * int(args[1].shape[-2])
        return out


def _inside_quant(name: str, model: nn.Module) -> bool:
    """True for a module nested in a QuantModule (e.g. the ``inner`` of a custom-forward layer)."""
    parts = name.split(".")
    return any(isinstance(model.get_submodule(".".join(parts[:i])), QuantModule)
               for i in range(1, len(parts)))


@dataclass
class Coverage:
    """Result of :func:`coverage`: ``fraction`` of MACs quantized, ``float_layers`` the layers
    (and activation products) that stay float, biggest first, as (name, MACs, reason)."""

    fraction: float
    quantized_macs: int
    total_macs: int
    float_layers: list[tuple[str, int, str]] = field(default_factory=list)

    def describe(self, top: int = 3) -> str:
        """One line: the coverage and the biggest float layers with why they stayed float."""
        big = ", ".join(f"{n} ({100.0 * m / max(self.total_macs, 1):.1f}% of MACs: {r})"
                        for n, m, r in self.float_layers[:top])
        return f"{100.0 * self.fraction:.1f}% of MACs run quantized" + (f"; biggest float: {big}"
                                                                       if big else "")


def coverage(model: nn.Module, macs: dict[str, int], matmul_macs: int,
             reasons: dict[str, str]) -> Coverage:
    """Coverage of ``model`` from counted ``macs`` (see :class:`MacCounter`); a quantized layer
    counts while its weight quantizer is enabled below 16 bits."""
    quantized, floats = 0, []
    for name, n in macs.items():
        mod = model.get_submodule(name)
        if isinstance(mod, QuantModule) and mod.w_quant.enabled and mod.w_bits < 16:
            quantized += n
        else:
            why = reasons.get(name) or ("left float (16 bits or disabled)" if isinstance(mod, QuantModule)
                                        else f"{type(mod).__name__} is not quantized")
            floats.append((name, n, why))
    if matmul_macs:
        floats.append(("activation x activation matmuls", matmul_macs, "products of two activations "
                       "(attention) stay float"))
    total = quantized + sum(n for _, n, _ in floats)
    floats.sort(key=lambda t: -t[1])
    return Coverage(quantized / total if total else 1.0, quantized, total, floats)

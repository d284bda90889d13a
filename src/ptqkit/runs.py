"""A run directory: what ``ptqkit quantize --out DIR`` writes and ``eval``/``export`` read.

DIR/run.json       format version, model source (zoo name or file.py:factory + weights), bits
DIR/recipe.yaml    the recipe
DIR/report.json    the report
DIR/quantized.pt   state dict of the simulated quantized model
DIR/example.pt     one input sample (to rebuild the layer order)
Directories are written to a temporary sibling and renamed into place, so a failed run never
leaves a half-written output.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from .core.quantizer import Quantizer
from .core.spec import QuantSpec
from .export.int_outputs import install_output_quantizer, output_quantizers
from .nn.modules import quant_layers
from .pipeline import Recipe, layer_bits, rebuild

__all__ = ["RUN_FORMAT", "ModelSource", "save_run", "load_run"]

RUN_FORMAT = 1


@dataclass(frozen=True)
class ModelSource:
    """Where the float model comes from: a zoo name, or ``file.py:factory`` plus a weights file."""

    spec: str
    weights: str | None = None

    def load(self) -> nn.Module:
        from .zoo import ZOO, load_model

        if self.spec in ZOO:
            return load_model(self.spec)
        return _load_factory(self.spec, self.weights)


def _parse_factory(spec: str) -> tuple[str, str, tuple, dict]:
    """'where:name(args)' -> (where, dotted name, args, kwargs); arguments must be literals."""
    import ast

    from .zoo import ZOO

    if ".py:" in spec:  # a file path may itself hold ':' or '.'
        where, _, call = spec.rpartition(".py:")
        where += ".py"
    else:
        where, _, call = spec.partition(":")
    if not where or not call:
        raise ValueError(f"model {spec!r} is neither a zoo name ({', '.join(ZOO)}) nor "
                         "'file.py:factory' / 'package.module:factory'")
    try:
        node = ast.parse(call, mode="eval").body
        if isinstance(node, ast.Call):
            args = tuple(ast.literal_eval(a) for a in node.args)
            kwargs = {k.arg: ast.literal_eval(k.value) for k in node.keywords if k.arg}
            node = node.func
        else:
            args, kwargs = (), {}
        name = ast.unparse(node)
        if not all(part.isidentifier() for part in name.split(".")):
            raise ValueError(name)
    except (SyntaxError, ValueError):
        raise ValueError(f"cannot read the factory {call!r}: expected name or name(literal, key=literal)"
                         ) from None
    return where, name, args, kwargs


def _import_where(where: str) -> object:
    import importlib
    import importlib.util

    if where.endswith(".py"):
        if not Path(where).is_file():
            raise FileNotFoundError(f"model file {where} does not exist")
        mod_spec = importlib.util.spec_from_file_location(Path(where).stem, where)
        module = importlib.util.module_from_spec(mod_spec)  # type: ignore[arg-type]
        mod_spec.loader.exec_module(module)  # type: ignore[union-attr]
        return module
    try:
        return importlib.import_module(where)
    except ImportError as exc:
        raise ValueError(f"cannot import {where!r} ({exc}); is the package installed?") from None


def _load_factory(spec: str, weights: str | None) -> nn.Module:
    where, name, args, kwargs = _parse_factory(spec)
    obj = _import_where(where)
    for part in name.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{where} has no function {name!r}")
        obj = getattr(obj, part)
    model = obj(*args, **kwargs)  # type: ignore[operator]
    if not isinstance(model, nn.Module):
        raise ValueError(f"{spec} returned {type(model).__name__}, expected a torch.nn.Module")
    if weights:
        model.load_state_dict(_read_state_dict(weights))
    return model.eval()


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    if not Path(path).is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict")
    return state


def save_run(out: str | os.PathLike[str], qmodel: nn.Module, source: ModelSource, recipe: Recipe,
             example: torch.Tensor, force: bool = False) -> Path:
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise FileExistsError(f"{out} already exists and is not empty; pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        meta = {"format": RUN_FORMAT, "model": source.spec, "weights": source.weights,
                "bits": {n: list(b) for n, b in layer_bits(qmodel).items()},
                "biased": [n for n, m in quant_layers(qmodel).items() if m.bias is not None],
                "output_bits": {n: m.o_quant.spec.bits for n, m in quant_layers(qmodel).items()
                                if m.o_quant is not None},
                "output_symmetric": [n for n, m in quant_layers(qmodel).items()
                                     if m.o_quant is not None and m.o_quant.spec.symmetric],
                "module_outputs": {n: [q.spec.bits, q.spec.symmetric]
                                   for n, q in output_quantizers(qmodel).items()}}
        (tmp / "run.json").write_text(json.dumps(meta, indent=1) + "\n")
        (tmp / "recipe.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
        report = getattr(qmodel, "report", None)
        (tmp / "report.json").write_text(json.dumps(report.to_dict() if report else {}, indent=1,
                                                    default=str) + "\n")
        torch.save(qmodel.state_dict(), tmp / "quantized.pt")
        torch.save(example[:1].clone(), tmp / "example.pt")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_run(run_dir: str | os.PathLike[str]) -> tuple[nn.Module, nn.Module, dict[str, Any]]:
    """(quantized model, float model, run metadata) from a run directory."""
    run_dir = Path(run_dir)
    meta_path = run_dir / "run.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a ptqkit run directory (no run.json); "
                                "create one with `ptqkit quantize ... --out DIR`")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != RUN_FORMAT:
        raise ValueError(f"{run_dir}: run format {meta.get('format')} is not supported "
                         f"(expected {RUN_FORMAT})")
    recipe = Recipe.from_yaml(run_dir / "recipe.yaml")
    float_model = ModelSource(meta["model"], meta.get("weights")).load()
    example = torch.load(run_dir / "example.pt", weights_only=True)
    qmodel = rebuild(float_model, recipe, {n: tuple(b) for n, b in meta["bits"].items()}, example)
    layers = quant_layers(qmodel)
    for name in meta.get("biased", []):
        layers[name].ensure_bias()
    state = torch.load(run_dir / "quantized.pt", weights_only=True)
    symmetric = set(meta.get("output_symmetric", []))
    for name, bits in meta.get("output_bits", {}).items():  # output quantizers (int_outputs step)
        layers[name].o_quant = Quantizer(QuantSpec(int(bits), symmetric=name in symmetric))
    for path, (bits, sym) in meta.get("module_outputs", {}).items():  # residual adds (int_outputs)
        install_output_quantizer(qmodel, path, Quantizer(QuantSpec(int(bits), symmetric=sym)))
    qmodel.load_state_dict(state)
    return qmodel, float_model, meta

"""A run directory: what ``ptqkit quantize --out DIR`` writes and ``eval``/``export`` read.

DIR/run.json       format version, model source (zoo name, or file.py:factory with absolute paths,
                   or package.module:factory, plus weights), bits, the sha256 of every other file
DIR/recipe.yaml    the recipe
DIR/report.json    the report
DIR/quantized.pt   state dict of the simulated quantized model
DIR/example.pt     one input sample (to rebuild the layer order)

A run is written to a temporary sibling and renamed into place; an existing run is renamed
aside first and deleted last, so a failure at any point leaves the old or the new run whole.
Only a folder that is a ptqkit run (every file in it listed by its run.json) is ever replaced.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
from collections.abc import Iterable
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
from .safe_io import (
    check_location,
    inside,
    protected_folder,
    sha256_file,
    sibling_dir,
    write_failure,
)

__all__ = ["RUN_FORMAT", "RUN_FILES", "ModelSource", "RunStage", "save_run", "load_run", "run_files"]

log = logging.getLogger(__name__)

RUN_FORMAT = 1
RUN_FILES = ("run.json", "recipe.yaml", "report.json", "quantized.pt", "example.pt")


@dataclass(frozen=True)
class ModelSource:
    """Where the float model comes from: a zoo name (with its trained weights, or ``weights``),
    or ``file.py:factory`` / ``package.module:factory`` plus an optional weights file."""

    spec: str
    weights: str | None = None

    @property
    def is_zoo(self) -> bool:
        from .zoo import ZOO

        return self.spec in ZOO

    def files(self) -> list[Path]:
        """The local files this source reads: the model's .py file and the weights."""
        out = [Path(self.weights)] if self.weights else []
        if not self.is_zoo and ".py:" in self.spec:
            out.append(Path(self.spec.rpartition(".py:")[0] + ".py"))
        return out

    def resolved(self) -> ModelSource:
        """The same source with absolute paths, valid from any working directory."""
        spec = self.spec
        if not self.is_zoo and ".py:" in spec:
            where, _, call = spec.rpartition(".py:")
            spec = f"{Path(where + '.py').resolve()}:{call}"
        return ModelSource(spec, str(Path(self.weights).resolve()) if self.weights else None)

    def load(self) -> nn.Module:
        from .zoo import load_model

        if self.is_zoo:
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


def _few(items: list[str], n: int = 3) -> str:
    return ", ".join(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")


# ----------------------------------------------------------------------------- writing
def run_files(run_dir: str | os.PathLike[str]) -> list[str]:
    """The files (relative POSIX paths) that make up the run in ``run_dir``, as its run.json
    lists them (the standard five for runs saved without a list); [] if it has no readable
    run.json."""
    try:
        meta = json.loads((Path(run_dir) / "run.json").read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(meta, dict) or "format" not in meta:
        return []
    files = meta.get("files")
    return sorted({"run.json", *(files if isinstance(files, dict) else RUN_FILES)})


def _foreign_files(folder: Path) -> list[str] | None:
    """Entries of ``folder`` its run does not list (None: ``folder`` is not a run)."""
    listed = set(run_files(folder))
    if not listed:
        return None
    found = []
    for root, dirs, files in os.walk(folder):
        rel = Path(root).relative_to(folder)
        found += [(rel / n).as_posix() for n in files]
        found += [(rel / n).as_posix() for n in dirs if (Path(root) / n).is_symlink()]
    return sorted(f for f in found if f not in listed)


def _check_target(out: Path, force: bool, inputs: Iterable[Path]) -> None:
    """Raise (one line) unless a run may be written to ``out``: see :class:`RunStage`."""
    what = protected_folder(out)
    if what:
        raise ValueError(f"refusing to write a run to {out}: it is {what}; name a new folder for "
                         f"the run, e.g. --out {out.resolve() / 'run'}")
    if out.is_symlink():
        raise ValueError(f"refusing to write a run to {out}: it is a symbolic link; give a new "
                         "folder, or the folder it points to")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file; a run is a folder: choose another path")
    held = [p for p in inputs if p.exists() and inside(p, out)] if out.exists() else []
    if held:
        raise ValueError(f"refusing to replace {out}: it holds {held[0]}, an input of this run; "
                         "choose another --out")
    if out.is_dir() and any(out.iterdir()):
        foreign = _foreign_files(out)
        if foreign is None:
            raise FileExistsError(f"{out} is not empty and is not a ptqkit run (no run.json); "
                                  "--force only replaces runs: choose a new or empty folder")
        if foreign:
            raise FileExistsError(f"{out} holds files that are not part of its run "
                                  f"({_few(foreign)}); --force would delete them: move them "
                                  "out or choose another --out")
        if not force:
            raise FileExistsError(f"{out} holds a ptqkit run already; pass --force to replace it")
    check_location(out, "--out")


class RunStage:
    """A run directory being written: a fresh hidden sibling of ``out`` (mode per the umask).

    Opening it checks ``out`` first, before any work is done. ``out`` must not be the
    file-system root, the home folder, the current directory or a folder above either, nor hold
    one of ``inputs``; an existing non-empty ``out`` must be a ptqkit run (every file in it
    listed by its run.json) and is replaced only with ``force``.
    :meth:`commit` moves the staged run into place: the old run is renamed aside, the new one
    renamed in (the old one is renamed back if that fails), then the old one is deleted.
    Leaving the ``with`` block without a commit deletes the stage and the parent folders it
    created.
    """

    def __init__(self, out: str | os.PathLike[str], force: bool = False,
                 inputs: Iterable[str | os.PathLike[str] | None] = ()) -> None:
        self.out, self.force = Path(out), force
        self.inputs = [Path(p) for p in inputs if p]
        _check_target(self.out, force, self.inputs)
        self._made: list[Path] = []
        self._done = False
        try:
            for parent in reversed(self.out.parents):
                if not parent.exists():
                    os.mkdir(parent, 0o777)
                    self._made.append(parent)
            self.path = sibling_dir(self.out, "new")
        except OSError as exc:
            self._remove_parents()
            raise OSError(f"cannot create the run folder {self.out} ({exc.strerror or exc}); choose "
                          "another --out") from None

    def __enter__(self) -> RunStage:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._done:
            shutil.rmtree(self.path, ignore_errors=True)
            self._remove_parents()

    def _remove_parents(self) -> None:
        for parent in reversed(self._made):
            try:
                parent.rmdir()
            except OSError:
                break

    def commit(self) -> Path:
        """Move the staged run to ``out`` (see the class); returns ``out``."""
        _check_target(self.out, self.force, self.inputs)  # it may have changed in the meantime
        old = self.out.parent / f".{self.out.name}.old-{secrets.token_hex(4)}" \
            if self.out.exists() else None
        if old is not None:
            os.replace(self.out, old)
        try:
            os.replace(self.path, self.out)
        except BaseException:
            if old is not None:
                try:
                    os.replace(old, self.out)
                except OSError:
                    self._done = True  # keep both: neither may be deleted now
                    raise OSError(f"could not move the new run into {self.out}; the previous run "
                                  f"is at {old} and the new one at {self.path}") from None
            raise
        self._done = True
        if old is not None:
            try:
                shutil.rmtree(old)
            except OSError as exc:
                log.warning("replaced %s, but could not delete the previous run at %s (%s); "
                            "delete it by hand", self.out, old, exc)
        return self.out


def _write(stage: RunStage, name: str, write: Any) -> None:
    try:
        write(stage.path / name)
    except Exception as exc:
        err = write_failure(exc, stage.out / name)
        if err is exc:
            raise
        raise err from exc


def save_run(out: str | os.PathLike[str], qmodel: nn.Module, source: ModelSource, recipe: Recipe,
             example: torch.Tensor, force: bool = False, *,
             inputs: Iterable[str | os.PathLike[str] | None] = (),
             stage: RunStage | None = None) -> Path:
    """Write the run of ``qmodel`` to ``out`` and return ``out``.

    ``force``: replace ``out`` if it holds a ptqkit run (no other folder is ever replaced; see
    :class:`RunStage` for the rules, ``inputs`` are files that must not be inside ``out``).
    ``stage``: a :class:`RunStage` opened before quantizing (to check ``out`` before the work and
    to collect files written while quantizing, e.g. a sensitivity table); its files become part
    of the run. Model paths are stored absolute, so the run loads from any working directory.
    """
    if stage is None:
        with RunStage(out, force, [*inputs, *source.files()]) as st:
            return save_run(out, qmodel, source, recipe, example, stage=st)
    source = source.resolved()
    layers = quant_layers(qmodel)
    meta: dict[str, Any] = {
        "format": RUN_FORMAT, "model": source.spec, "weights": source.weights,
        "bits": {n: list(b) for n, b in layer_bits(qmodel).items()},
        "biased": [n for n, m in layers.items() if m.bias is not None],
        "output_bits": {n: m.o_quant.spec.bits for n, m in layers.items() if m.o_quant is not None},
        "output_symmetric": [n for n, m in layers.items()
                             if m.o_quant is not None and m.o_quant.spec.symmetric],
        "module_outputs": {n: [q.spec.bits, q.spec.symmetric]
                           for n, q in output_quantizers(qmodel).items()}}
    report = getattr(qmodel, "report", None)
    _write(stage, "recipe.yaml",
           lambda p: p.write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False)))
    _write(stage, "report.json", lambda p: p.write_text(
        json.dumps(report.to_dict() if report else {}, indent=1, default=str) + "\n"))
    _write(stage, "quantized.pt", lambda p: torch.save(qmodel.state_dict(), p))
    _write(stage, "example.pt", lambda p: torch.save(example[:1].clone(), p))
    meta["files"] = {p.relative_to(stage.path).as_posix(): sha256_file(p)
                     for p in sorted(stage.path.rglob("*")) if p.is_file()}
    _write(stage, "run.json", lambda p: p.write_text(json.dumps(meta, indent=1) + "\n"))
    return stage.commit()


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

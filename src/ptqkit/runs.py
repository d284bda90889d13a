"""A run directory: what ``ptqkit quantize --out DIR`` writes and ``eval``/``export`` read.

DIR/run.json       format version, model source (zoo name, or file.py:factory with absolute paths,
                   or package.module:factory, plus weights), bits, the sha256 of every other
                   file, a digest of all of it and, when the account has a key, its signature
DIR/recipe.yaml    the recipe
DIR/report.json    the report
DIR/quantized.pt   state dict of the simulated quantized model
DIR/example.pt     one input sample (to rebuild the layer order)
(and any mixed-precision table the recipe saved there, listed in run.json)

A run is written to a temporary sibling and renamed into place; an existing run is renamed
aside first and deleted last, so a failure at any point leaves the old or the new run whole.
Only a folder that is a ptqkit run (every file in it listed by its run.json) is ever replaced.

Loading verifies the digest and the hashes, and checks the saved quantizers (finite, positive
scales; zero-points on the grid of the recorded bits). It imports model code named in run.json
only for a run signed by this account (an HMAC with a per-user key, kept in ``$PTQKIT_STATE``,
default ``$XDG_STATE_HOME/ptqkit`` or ``~/.local/state/ptqkit``), when the caller names the model
source itself, or with ``trust_code=True``; zoo models are always rebuilt.
"""

from __future__ import annotations

import hashlib
import hmac
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

from .algorithms.int_outputs import install_output_quantizer, output_quantizers
from .core.quantizer import Quantizer
from .core.spec import QuantSpec
from .nn.modules import quant_layers
from .pipeline import Recipe, layer_bits, rebuild
from .safe_io import (
    check_location,
    inside,
    load_tensors,
    protected_folder,
    sha256_file,
    sibling_dir,
    write_failure,
)

__all__ = ["RUN_FORMAT", "RUN_FILES", "ModelSource", "RunStage", "save_run", "load_run", "read_run",
           "load_example", "run_files", "load_state"]

log = logging.getLogger(__name__)

RUN_FORMAT = 1
RUN_FILES = ("run.json", "recipe.yaml", "report.json", "quantized.pt", "example.pt")
_REQUIRED = ("format", "model", "bits")
_UNSIGNED = ("digest", "signature")  # run.json entries the digest does not cover
_REDO = "quantize again"


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
            model = load_model(self.spec, pretrained=self.weights is None)
            if self.weights:
                load_state(model, _read_state_dict(self.weights), f"weights file {self.weights}",
                           f"the zoo model {self.spec}")
            return model.eval()
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
    if not callable(obj):
        raise TypeError(f"{where}:{name} is a value of type {type(obj).__name__}, not a function or "
                        "class; name the factory that returns the torch.nn.Module")
    model = obj(*args, **kwargs)
    if not isinstance(model, nn.Module):
        raise ValueError(f"{spec} returned {type(model).__name__}, expected a torch.nn.Module")
    if weights:
        load_state(model, _read_state_dict(weights), f"weights file {weights}", f"the model {spec}")
    return model.eval()


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    state = load_tensors(path, "weights file", "save it with torch.save(model.state_dict(), path)")
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"weights file {path} is not a plain state dict (it holds a "
                         f"{type(state).__name__}); save it with torch.save(model.state_dict(), path)")
    return state


def _few(items: list[str], n: int = 3) -> str:
    return ", ".join(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")


def load_state(model: nn.Module, state: dict[str, Any], what: str, into: str) -> None:
    """``model.load_state_dict(state)``; a state that does not fit raises a one-line ValueError
    naming the first missing, unexpected and mis-shaped keys."""
    try:
        model.load_state_dict(state)
    except RuntimeError:
        expected = model.state_dict()
        shape = lambda v: tuple(v.shape) if hasattr(v, "shape") else type(v).__name__  # noqa: E731
        parts = [f"{label} {_few(keys)}" for label, keys in (
            ("missing", [k for k in expected if k not in state]),
            ("unexpected", [k for k in state if k not in expected]),
            ("shape (file vs model)", [f"{k} {shape(state[k])} vs {shape(expected[k])}" for k in state
                                       if k in expected and shape(state[k]) != shape(expected[k])]))
            if keys]
        raise ValueError(f"{what} does not fit {into}: {'; '.join(parts) or 'refused by torch'}; was "
                         "it saved from another model?") from None


# ----------------------------------------------------------------------------- signing
def _key(create: bool) -> bytes | None:
    """This account's run-signing key (32 random bytes, a 0600 file), created on first use."""
    base = os.environ.get("PTQKIT_STATE")
    folder = Path(base) if base else Path(os.environ.get("XDG_STATE_HOME") or
                                          Path.home() / ".local" / "state") / "ptqkit"
    path = folder / "run-signing.key"
    try:
        return path.read_bytes() or None
    except FileNotFoundError:
        if not create:
            return None
    except OSError:
        return None
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(32))
    except FileExistsError:
        pass
    except OSError as exc:
        log.info("runs are left unsigned: cannot create %s (%s)", path, exc)
        return None
    return path.read_bytes() or None


def _digest(meta: dict[str, Any]) -> str:
    body = {k: v for k, v in meta.items() if k not in _UNSIGNED}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _signature(key: bytes, digest: str) -> str:
    return hmac.new(key, digest.encode(), hashlib.sha256).hexdigest()


def _signed_here(meta: dict[str, Any]) -> bool:
    """Whether this account's key signed the run (so this user ran its model code to make it)."""
    key = _key(create=False)
    sig = meta.get("signature")
    return bool(key and isinstance(sig, str) and "digest" in meta
                and hmac.compare_digest(sig, _signature(key, str(meta["digest"]))))


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
    meta["digest"] = _digest(meta)
    key = _key(create=True)
    if key:
        meta["signature"] = _signature(key, meta["digest"])
    _write(stage, "run.json", lambda p: p.write_text(json.dumps(meta, indent=1) + "\n"))
    return stage.commit()


# ----------------------------------------------------------------------------- reading
def read_run(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """run.json of ``run_dir``, verified: the required entries are there, the digest matches and
    every file it lists is present with its sha256. Runs saved without hashes load with a
    warning. Raises a one-line error naming the file otherwise."""
    run_dir = Path(run_dir)
    meta_path = run_dir / "run.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a ptqkit run directory (no run.json); "
                                "create one with `ptqkit quantize ... --out DIR`")
    try:
        meta = json.loads(meta_path.read_text())
    except ValueError as exc:
        raise ValueError(f"{meta_path} is not valid JSON ({exc}); the run is damaged: {_REDO}"
                         ) from None
    if not isinstance(meta, dict):
        raise ValueError(f"{meta_path} does not hold a JSON object; the run is damaged: {_REDO}")
    missing = [k for k in _REQUIRED if k not in meta]
    if missing:
        raise ValueError(f"{meta_path} has no {missing[0]!r} entry: the run is incomplete or was "
                         f"edited; {_REDO}")
    if meta.get("format") != RUN_FORMAT:
        raise ValueError(f"{run_dir}: run format {meta.get('format')} is not supported "
                         f"(expected {RUN_FORMAT})")
    if "digest" not in meta:
        log.warning("%s has no hashes (saved by an older ptqkit): its files cannot be verified",
                    meta_path)
        return meta
    if meta["digest"] != _digest(meta):
        raise ValueError(f"{meta_path} was changed after the run was saved (its digest does not "
                         f"match); {_REDO}")
    files = meta.get("files")
    files = files if isinstance(files, dict) else {}
    for name in RUN_FILES[1:]:
        if name not in files:
            raise ValueError(f"{meta_path} lists no hash for {name}; {_REDO}")
    for rel, sha in files.items():
        path = run_dir / rel
        if Path(rel).is_absolute() or ".." in Path(rel).parts or not path.is_file():
            raise FileNotFoundError(f"{run_dir} is incomplete: {rel} is missing; {_REDO}")
        if sha256_file(path) != sha:
            raise ValueError(f"{path} does not match the sha256 in run.json: it was changed or "
                             f"damaged after the run was saved; {_REDO}")
    return meta


def load_example(run_dir: str | os.PathLike[str]) -> torch.Tensor:
    """The run's example input (1, ...)."""
    x = load_tensors(Path(run_dir) / "example.pt", "run file", _REDO)
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{Path(run_dir) / 'example.pt'} does not hold a tensor; {_REDO}")
    return x


def _source(run_dir: Path, meta: dict[str, Any], source: ModelSource | None,
            trust_code: bool) -> ModelSource:
    if source is not None:
        weights = source.weights or meta.get("weights")
        if weights and not source.weights and not Path(weights).is_file():
            raise FileNotFoundError(f"the run's weights file {weights} does not exist here; pass "
                                    "the model's weights with --weights")
        return ModelSource(source.spec, weights)
    named = ModelSource(str(meta["model"]), meta.get("weights"))
    if named.is_zoo or trust_code or _signed_here(meta):
        return named
    raise ValueError(f"{run_dir} names Python code as its model ({named.spec}) and was not made on "
                     "this account, so ptqkit will not import it: pass the model source yourself "
                     f"(--model {named.spec}, load_run(source=...)) or --trust-run-code "
                     "(trust_code=True) if you trust this run")


def _check_quantizers(qmodel: nn.Module, state: dict[str, Any], where: Path) -> None:
    """Every saved scale finite and > 0; zero-points on the grid of the bits run.json gives."""
    for name, q in qmodel.named_modules():
        if not isinstance(q, Quantizer):
            continue
        scale, zp = state.get(f"{name}.scale"), state.get(f"{name}.zero_point")
        if isinstance(scale, torch.Tensor) and scale.is_floating_point():
            bad = ~torch.isfinite(scale) | (scale <= 0)
            if bool(bad.any()):
                raise ValueError(f"{where}: {name}.scale holds {float(scale[bad][0])} (scales must be "
                                 f"finite and > 0); the run is damaged: {_REDO}")
        initialized = state.get(f"{name}.initialized")
        if isinstance(zp, torch.Tensor) and initialized is not None and bool(initialized):
            z = torch.round(zp.float())
            if not bool(torch.isfinite(z).all()) or bool((z < q.spec.qmin - 1).any()) \
                    or bool((z > q.spec.qmax + 1).any()):
                raise ValueError(f"{where}: {name} has zero-points outside the {q.spec.bits}-bit "
                                 f"grid run.json gives it; run.json and quantized.pt do not belong "
                                 f"together: {_REDO}")


def load_run(run_dir: str | os.PathLike[str], source: ModelSource | None = None,
             trust_code: bool = False) -> tuple[nn.Module, nn.Module, dict[str, Any]]:
    """(quantized model, float model, run metadata) from a run directory, verified (see the
    module docstring).

    Model code (a .py file or a package) named in run.json is imported only if the run was
    signed by this account's key, or with ``trust_code=True``; otherwise pass ``source``, the
    model to rebuild the run on (its weights default to the run's). Zoo models are always
    rebuilt. Anything else raises a one-line ValueError before any code is imported.
    """
    run_dir = Path(run_dir)
    meta = read_run(run_dir)
    src = _source(run_dir, meta, source, trust_code)
    bits = meta["bits"]
    if not isinstance(bits, dict) or not all(isinstance(b, list) and len(b) == 2 for b in bits.values()):
        raise ValueError(f"{run_dir / 'run.json'}: 'bits' must map layer names to [w, a]; {_REDO}")
    recipe = Recipe.from_yaml(run_dir / "recipe.yaml")
    float_model = src.load()
    qmodel = rebuild(float_model, recipe, {n: tuple(b) for n, b in bits.items()}, load_example(run_dir))
    layers = quant_layers(qmodel)
    unknown = [n for n in (*meta.get("biased", []), *meta.get("output_bits", {})) if n not in layers]
    if unknown:
        raise ValueError(f"{run_dir / 'run.json'} names layers the model does not have: "
                         f"{_few(unknown)}; was it saved from a different model?")
    for name in meta.get("biased", []):
        layers[name].ensure_bias()
    state = load_tensors(run_dir / "quantized.pt", "run file", _REDO)
    if not isinstance(state, dict):
        raise ValueError(f"{run_dir / 'quantized.pt'} is not a state dict; {_REDO}")
    symmetric = set(meta.get("output_symmetric", []))
    for name, b in meta.get("output_bits", {}).items():  # output quantizers (int_outputs step)
        layers[name].o_quant = Quantizer(QuantSpec(int(b), symmetric=name in symmetric))
    for path, (b, sym) in meta.get("module_outputs", {}).items():  # residual adds (int_outputs)
        install_output_quantizer(qmodel, path, Quantizer(QuantSpec(int(b), symmetric=sym)))
    _check_quantizers(qmodel, state, run_dir / "quantized.pt")
    load_state(qmodel, state, f"{run_dir / 'quantized.pt'}", f"the model {src.spec} rebuilt with "
               "run.json's bits")
    return qmodel, float_model, meta

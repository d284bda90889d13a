"""Command line: parse -> Recipe -> the same API a Python user calls."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import secrets
import sys
from pathlib import Path
from typing import Any

import torch

from . import bench as bench_mod
from .calib.data import CalibrationData
from .pipeline import PRESETS, Recipe, StepSpec, quantize
from .report import StageLog
from .runs import RUN_FILES, ModelSource, RunStage, load_example, load_run, read_run, run_files, save_run
from .safe_io import check_new_file, inside, load_tensors, replacing_file
from .sweep import add_sweep_parser, with_mixed_precision

__all__ = ["main", "build_parser"]


def _add_recipe_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("recipe (flags override --recipe)")
    g.add_argument("--recipe", help="YAML recipe file, or a named recipe: fast, balanced, best "
                   "or any ptqkit bench method")
    g.add_argument("--pipeline", choices=sorted(PRESETS), help="recipe preset")
    g.add_argument("--w-bits", type=int, help="weight bits (2..8)")
    g.add_argument("--a-bits", type=int, help="activation bits (2..8)")
    g.add_argument("--range", dest="range_",
                   help="range method for weights and activations: aciq, lp, mse, minmax, percentile")
    g.add_argument("--w-range", help="range method for weights")
    g.add_argument("--a-range", help="range method for activations")
    g.add_argument("--no-first-last-8bit", action="store_true",
                   help="quantize the first and last layers at the base bits too")
    g.add_argument("--include", action="append", help="fnmatch pattern of layers to quantize")
    g.add_argument("--exclude", action="append", help="fnmatch pattern of layers to keep float")
    g.add_argument("--override", action="append", metavar="NAME=W,A",
                   help="per-layer bits, e.g. layer1.0.conv1=8,8")
    g.add_argument("--seed", type=int)
    g.add_argument("--bit-allocation", action="store_true",
                   help="Banner's per-channel bit allocation of the weights (mean = --w-bits)")
    g.add_argument("--lapq", action="store_true",
                   help="loss-aware clipping (LAPQ): sets every clipping range itself")
    g.add_argument("--bias-correction", action="store_true",
                   help="Banner's bias correction of the quantized weights (runs last)")
    g.add_argument("--compression", type=float, help="mixed precision: weight compression budget")
    g.add_argument("--max-drop", type=float, help="mixed precision: closed-loop drop budget")
    g.add_argument("--candidates", help="mixed precision: default, relaxed or w8a8,w4a4,...")


def _parse_override(text: str) -> tuple[str, list[int]]:
    name, sep, bits = text.partition("=")
    try:
        w, a = (int(b) for b in bits.split(","))
    except ValueError:
        raise ValueError(f"--override {text!r}: expected NAME=W,A such as conv1=8,8") from None
    if not sep or not name:
        raise ValueError(f"--override {text!r}: expected NAME=W,A such as conv1=8,8")
    return name, [w, a]


# Order the method flags add their steps in: channel bits first (they change the weight grids),
# LAPQ's ranges next, bias correction last (it corrects the final quantized weights).
_STEP_FLAGS = (("bit_allocation", "bit_allocation"), ("lapq", "lapq"),
               ("bias_correction", "bias_correction"))


def _step_flags(args: argparse.Namespace, base: Recipe) -> list[str]:
    """Steps asked for by --bit-allocation / --lapq / --bias-correction; ValueError (one line)
    for combinations that cannot work."""
    wanted = [step for flag, step in _STEP_FLAGS if getattr(args, flag, False)]
    flag = lambda step: "--" + step.replace("_", "-")  # noqa: E731
    if "lapq" in wanted and (args.range_ or args.w_range or args.a_range):
        raise ValueError("--lapq sets the clipping ranges itself; drop --range/--w-range/--a-range")
    if "lapq" in wanted and "bit_allocation" in wanted:
        raise ValueError("--lapq and --bit-allocation cannot be combined: LAPQ searches ranges "
                         "for the layer's bit width, bit allocation changes it per channel")
    present = {s.name for s in base.steps}
    for step in wanted:
        if step in present:
            raise ValueError(f"{flag(step)}: the recipe already runs the {step} step; drop the flag")
    if "bit_allocation" in wanted and "mixed_precision" in present:
        raise ValueError("--bit-allocation cannot follow a mixed-precision pipeline: choose the "
                         "layer bits first, or drop --pipeline")
    return wanted


def recipe_path(value: str) -> Path:
    """The YAML file of ``--recipe``: a path, or the name of a recipe shipped in ptqkit/recipes."""
    path = Path(value)
    if path.exists():
        return path
    if value in bench_mod.METHODS:
        return bench_mod.RECIPES_DIR / f"{value}.yaml"
    raise ValueError(f"--recipe {value}: no such file; give a YAML recipe file or a named recipe "
                     f"({', '.join(sorted(bench_mod.METHODS))})")


def recipe_from_args(args: argparse.Namespace) -> Recipe:
    """Start from the YAML recipe or preset, then apply the flags that were given."""
    base = Recipe.from_yaml(recipe_path(args.recipe)) if args.recipe else Recipe()
    if args.pipeline:
        base = Recipe.preset(args.pipeline, **{k: v for k, v in base.to_dict().items() if k != "steps"})
    d: dict[str, Any] = base.to_dict()
    for flag, key in (("w_bits", "w_bits"), ("a_bits", "a_bits"), ("seed", "seed"),
                      ("w_range", "w_range"), ("a_range", "a_range")):
        if getattr(args, flag) is not None:
            d[key] = getattr(args, flag)
    if args.range_ is not None:
        d["w_range"] = d["a_range"] = args.range_
    if args.no_first_last_8bit:
        d["first_last_8bit"] = False
    if args.include:
        d["include"] = args.include
    if args.exclude:
        d["exclude"] = list(d["exclude"]) + args.exclude
    if args.override:
        d["overrides"] = {**d["overrides"], **dict(_parse_override(o) for o in args.override)}
    steps = _step_flags(args, base)
    if steps:
        d["steps"] = list(d["steps"]) + [{"name": s, "options": {}} for s in steps]
    mp = {k: getattr(args, k) for k in ("compression", "max_drop", "candidates")
          if getattr(args, k, None) is not None}
    return with_mixed_precision(Recipe.from_dict(d), **mp) if mp else Recipe.from_dict(d)


def _calib_size(args: argparse.Namespace) -> int:
    n = 1000 if args.calib_size is None else int(args.calib_size)
    if n < 1:
        raise ValueError(f"--calib-size {n}: the calibration set needs at least 1 sample (default 1000)")
    return n


def _calibration(args: argparse.Namespace, source: ModelSource, recipe: Recipe, n: int
                 ) -> CalibrationData:
    if args.calib and Path(args.calib).is_dir():
        if not args.preprocess:
            raise ValueError(f"--calib {args.calib} is a folder of images: name its preprocessing "
                             "with --preprocess (imagenet)")
        from .calib.images import load_image_folder

        return CalibrationData(load_image_folder(args.calib, args.preprocess, n), limit=n, batch_size=32)
    if args.calib:
        path = Path(args.calib)
        x = load_tensors(path, "calibration file", "save one tensor (N, ...) with torch.save or "
                         "numpy.save")
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{path} must hold one tensor of inputs (N, ...), got {type(x).__name__}")
        return CalibrationData(x.float(), limit=n)
    if source.spec.startswith("fmnist-"):
        from .zoo import fmnist_calibration

        return fmnist_calibration(n, recipe.seed, args.data_dir)
    raise ValueError(f"model {source.spec} needs calibration inputs: pass --calib FILE "
                     "(.pt tensor or .npy array of shape (N, ...))")


def _table_target(table: str, from_cli: bool, args: argparse.Namespace, stage: RunStage,
                  inputs: list[Path], moves: list[tuple[Path, Path]]) -> Path:
    """Where the mixed_precision step writes the table named ``table`` (see _with_tables)."""
    path = Path(table)
    if path.is_absolute() and from_cli and inside(path, stage.out):
        path = path.resolve().relative_to(stage.out.resolve())
    if path.is_absolute():
        if not from_cli:
            raise ValueError(f"recipe step mixed_precision: save_table {table} is an absolute path; "
                             "give a path relative to the run directory, or pass --save-table "
                             f"{table} on the command line")
        check_new_file(path, args.force, "--save-table", keep=inputs)
        tmp = path.parent / f".{path.name}.tmp-{secrets.token_hex(4)}"
        moves.append((tmp, path))
        return tmp
    rel = Path(os.path.normpath(path))
    if rel.parts[:1] in (("..",), (".",)):
        raise ValueError(f"save_table {table} leaves the run directory; give a path inside it, "
                         f"e.g. tables/{path.name}")
    if rel.as_posix() in RUN_FILES:
        raise ValueError(f"save_table {table} is one of the run's own files; choose another name")
    (stage.path / rel).parent.mkdir(parents=True, exist_ok=True)
    return stage.path / rel


def _with_tables(recipe: Recipe, args: argparse.Namespace, stage: RunStage, inputs: list[Path]
                 ) -> tuple[Recipe, list[tuple[Path, Path]]]:
    """The recipe to quantize with, its mixed_precision ``save_table`` paths redirected, and the
    (temporary, final) files to move into place once the run is saved.

    A relative table path (from the recipe or --save-table) is inside the run directory and is
    written with the run. An absolute path is allowed from --save-table only: it must not exist
    unless --force, and is written to a temporary file beside it, moved there after the run.
    """
    if args.save_table is not None:
        recipe = with_mixed_precision(recipe, save_table=args.save_table)
    steps: list[StepSpec] = []
    moves: list[tuple[Path, Path]] = []
    for s in recipe.steps:
        table = s.options.get("save_table") if s.name == "mixed_precision" else None
        if table:
            target = _table_target(str(table), table == args.save_table, args, stage, inputs, moves)
            s = StepSpec(s.name, {**s.options, "save_table": str(target)})
        steps.append(s)
    return dataclasses.replace(recipe, steps=tuple(steps)), moves


def cmd_quantize(args: argparse.Namespace) -> int:
    recipe = recipe_from_args(args)
    n = _calib_size(args)
    source = ModelSource(args.model, args.weights).resolved()
    inputs = [*source.files(), *(Path(p) for p in (args.calib, args.data_dir) if p),
              *([recipe_path(args.recipe)] if args.recipe else [])]
    stages = StageLog()
    with RunStage(args.out, args.force, inputs) as stage:  # the output is checked before the work
        run_recipe, moves = _with_tables(recipe, args, stage, inputs)
        try:
            with stages.stage("load model"):
                model = source.load()
            with stages.stage("calibration data"):
                calib = _calibration(args, source, recipe, n)
            with stages.stage("quantize"), stages.forward("ptqkit.pipeline",
                                                            "ptqkit.algorithms.sensitivity"):
                qmodel = quantize(model, calib, run_recipe)
            report = getattr(qmodel, "report", None)
            if report is not None:
                report.recipe = recipe.to_dict()  # as given, not the redirected table paths
            example = calib.batches[0] if isinstance(calib.batches[0], torch.Tensor) else None
            if example is None:
                raise ValueError("saving a run needs tensor calibration batches")
            with stages.stage("report"):
                _stage_report(stage.path, source, recipe, qmodel, example)
            with stages.stage("save run"):
                out = save_run(args.out, qmodel, source, recipe, example, stage=stage)
            for tmp, target in moves:
                os.replace(tmp, target)
        finally:
            for tmp, _ in moves:
                tmp.unlink(missing_ok=True)
    print(qmodel.report)
    print(f"wrote {out}/ (quantized.pt, report.json, recipe.yaml, run.json"
          + (", report.html)" if (out / REPORT_HTML).is_file() else ")")
          + "".join(f"\nwrote {target}" for _, target in moves))
    return 0


REPORT_HTML = "report.html"  # written into every run by quantize (and listed in its run.json)


def _stage_report(folder: Path, source: ModelSource, recipe: Recipe, qmodel: torch.nn.Module,
                  example: torch.Tensor) -> None:
    """Write the run's report.html into the staged run folder; a failure to render it is a
    warning, never the loss of the run."""
    import yaml

    from .report import layer_facts, run_report

    try:
        text = run_report(source.spec, qmodel.report.to_dict(),  # type: ignore[operator, union-attr]
                          yaml.safe_dump(recipe.to_dict(), sort_keys=False),
                          layer_facts(qmodel, example[:1]))
        (folder / REPORT_HTML).write_text(text, encoding="utf-8")
    except Exception as exc:  # the quantized model matters more than its report
        logging.getLogger(__name__).warning("%s not written: %s", REPORT_HTML, exc)


def cmd_report(args: argparse.Namespace) -> int:
    from .report import run_report_from_dir, sweep_report, write_html

    target, out = Path(args.run_dir), Path(args.out)
    if target.is_file() and target.suffix == ".json":
        rows = _json_rows(target, "the sweep rows")
        peers = _json_rows(Path(args.peers), "--peers") if args.peers else []
        write_html(sweep_report(rows, peers, target.stem), out, args.force, keep=[target])
    else:
        if args.peers:
            raise ValueError("--peers goes with a sweep's JSON rows, not with a run directory")
        if not target.is_dir():
            raise FileNotFoundError(f"{target} is neither a run directory nor a sweep's JSON rows; "
                                    "give the --out folder of ptqkit quantize or a --json of ptqkit sweep")
        text = run_report_from_dir(target)  # verifies the run first
        own = [target / f for f in (*RUN_FILES, *run_files(target))]
        write_html(text, out, args.force, keep=own)
    print(f"wrote {out}")
    return 0


def _json_rows(path: Path, what: str) -> list[dict[str, Any]]:
    import json

    try:
        rows = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{what} {path}: cannot read it as JSON ({exc})") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ValueError(f"{what} {path} does not hold rows (a JSON list of objects)")
    return rows


def _add_report_flag(sub: Any) -> None:
    """``ptqkit sweep --report FILE``: the sweep's HTML report, written after its table."""
    s = sub.choices["sweep"]
    s.add_argument("--report", metavar="FILE", help="write the HTML report of the sweep here "
                   "(curves and the table of points)")
    s.add_argument("--force", action="store_true", help="replace an existing --report file")
    run = s.get_default("func")

    def with_report(args: argparse.Namespace) -> int:
        from .report import StageLog, sweep_report, write_html
        from .safe_io import check_new_file

        if args.report:
            check_new_file(Path(args.report), args.force, "--report",
                           keep=[Path(p) for p in (args.json,) if p])
        stages = StageLog()
        with stages.stage("sweep"), stages.forward("ptqkit.sweep"):
            rc = run(args)
        if args.report:
            rows = getattr(args, "sweep_rows", [])
            write_html(sweep_report(rows, title=args.suite), Path(args.report), args.force,
                       flag="--report")
            print(f"wrote {args.report}")
        return int(rc)
    s.set_defaults(func=with_report)


def _run_source(args: argparse.Namespace) -> ModelSource | None:
    """The model source given with --model/--weights for loading a run, or None."""
    if args.weights and not args.model:
        raise ValueError("--weights goes with --model: name the model to rebuild the run on")
    return ModelSource(args.model, args.weights).resolved() if args.model else None


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluate import evaluate

    source = _run_source(args)
    model = source.spec if source else str(read_run(args.run_dir)["model"])
    if not model.startswith("fmnist-"):
        raise ValueError("eval knows the test split of the fmnist-* zoo models only; "
                         "use ptqkit.evaluate.evaluate() from Python for other models")
    qmodel, float_model, meta = load_run(args.run_dir, source, args.trust_run_code)
    from .zoo import fmnist_test

    x, y = fmnist_test(args.data_dir)
    res = evaluate(qmodel, float_model, x, y)
    print(bench_mod.markdown_table([{"model": meta["model"], **res}],
                                   ("model", "fp32_top1", "top1", "agreement", "kl")))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    cfg = bench_mod.BenchConfig(data_dir=args.data_dir)
    suite = bench_mod.SUITES["fmnist-resnet20"](cfg)
    rows = []
    for w, a in ((8, 8), (4, 4)):
        c = bench_mod.BenchConfig(w_bits=w, a_bits=a, data_dir=args.data_dir)
        rows.append(bench_mod.run_method(suite, args.method, c))
    print(f"\nptqkit demo: fmnist-resnet20, {args.method} ranges, first/last layers 8-bit, "
          "1000 unlabeled calibration images, 10k test images\n")
    print(bench_mod.markdown_table(rows))
    return 0


def _calib_study(args: argparse.Namespace, methods: list[str], cfg: bench_mod.BenchConfig) -> int:
    sizes = [int(s) for s in args.calib_sizes.split(",") if s.strip()]
    rows = bench_mod.calib_size_study(args.suite, methods, sizes, args.seeds, cfg)
    summary = bench_mod.study_summary(rows)
    print(bench_mod.markdown_table(summary, ("method", "calib_size", "seeds", "fp32_top1",
                                             "top1_mean", "top1_std")))
    bench_mod.plot_study(summary, args.plot)
    print(f"wrote {args.plot}")
    if args.json:
        bench_mod.write_json(rows + [{"summary": summary}], args.json)
        print(f"wrote {args.json}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    cfg = bench_mod.BenchConfig(args.w_bits, args.a_bits, not args.no_first_last_8bit,
                                args.calib_size, args.seed, args.data_dir, args.latency_threads,
                                args.allow_low_coverage, args.holdout)
    methods = [m.strip() for m in (args.methods or "").split(",") if m.strip()]
    methods += ["deploy"] if args.deploy else []
    if args.calib_sizes:
        return _calib_study(args, methods, cfg)
    rows = bench_mod.run_bench(args.suite, methods, cfg)
    print(bench_mod.markdown_table(rows))
    if any(m == "deploy" or m.startswith(bench_mod.DEPLOY_PREFIX) for m in methods):
        from .export.deploy_bench import deploy_markdown
        print(deploy_markdown(rows))
    if args.json:
        bench_mod.write_json(rows, args.json)
        print(f"wrote {args.json}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export.onnx import export_onnx
    from .export.packed import save

    targets = {flag: Path(v) for flag, v in (("--onnx", args.onnx), ("--packed", args.packed)) if v}
    if not targets:
        raise ValueError("nothing to export: pass --onnx FILE and/or --packed FILE")
    if len({p.resolve() for p in targets.values()}) < len(targets):
        raise ValueError("--onnx and --packed name the same file; give each its own path")
    run_dir = Path(args.run_dir)
    own = {(run_dir / f).resolve() for f in (*RUN_FILES, *run_files(run_dir))}
    for flag, path in targets.items():
        if path.resolve() in own:
            raise ValueError(f"{flag} {path} is part of the run {run_dir}; choose a path outside it")
        check_new_file(path, args.force, flag)
    qmodel, _, _ = load_run(run_dir, _run_source(args), args.trust_run_code)
    if args.onnx:
        with replacing_file(targets["--onnx"]) as tmp:
            info = export_onnx(qmodel, tmp, load_example(run_dir))
        print(f"wrote {targets['--onnx']}" + "".join(f"\n  note: {n}" for n in info.notes))
    if args.packed:
        with replacing_file(targets["--packed"]) as tmp:
            save(qmodel, tmp)
        print(f"wrote {targets['--packed']}")
    return 0


def _add_run_source_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="rebuild the run on this model (same forms as for quantize) "
                   "instead of importing the code its run.json names")
    p.add_argument("--weights", help="with --model: its state dict (default: the run's weights)")
    p.add_argument("--trust-run-code", action="store_true",
                   help="import the model code run.json names even though this account did not "
                   "make the run (only for runs you trust: it runs that code)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ptqkit", description="Post-training quantization of PyTorch models")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = p.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize a model and write a run directory")
    q.add_argument("model", help="zoo name (fmnist-resnet20, fmnist-mobilenetv2), file.py:factory or "
                   "package.module:factory, optionally with literal arguments: 'pkg.mod:f(1, x=2)'")
    q.add_argument("--weights", help="state dict (.pt/.pth/.safetensors) of the model (zoo models: "
                   "instead of the trained weights)")
    q.add_argument("--calib", help="calibration inputs: .pt tensor or .npy array (N, ...), or a folder "
                   "of images (with --preprocess)")
    q.add_argument("--preprocess", choices=["imagenet"],
                   help="preprocessing of a --calib image folder (imagenet: resize 256, crop 224, "
                        "ImageNet mean/std)")
    q.add_argument("--calib-size", type=int, help="number of calibration samples (default 1000)")
    q.add_argument("--data-dir", help="Fashion-MNIST folder (for zoo models)")
    q.add_argument("--out", required=True, help="output run directory")
    q.add_argument("--force", action="store_true",
                   help="replace --out if it holds a ptqkit run (never any other folder), and an "
                   "existing --save-table file")
    q.add_argument("--save-table", metavar="PATH",
                   help="mixed precision: write the sensitivity table here (relative: inside the run)")
    _add_recipe_flags(q)
    q.set_defaults(func=cmd_quantize)

    e = sub.add_parser("eval", help="evaluate a run directory on the test split")
    e.add_argument("run_dir")
    e.add_argument("--data-dir")
    _add_run_source_flags(e)
    e.set_defaults(func=cmd_eval)

    d = sub.add_parser("demo", help="quantize fmnist-resnet20 at W8A8 and W4A4 and compare with float")
    d.add_argument("--data-dir")
    d.add_argument("--method", default="mse", help="bench method to demonstrate")
    d.set_defaults(func=cmd_demo)

    b = sub.add_parser("bench", help="run a benchmark suite")
    b.add_argument("--suite", required=True, help=f"one of {', '.join(sorted(bench_mod.SUITES))}")
    b.add_argument("--methods", help="comma-separated method names or recipe files (.yaml); "
                   "deploy:<method> adds the --deploy row of that method")
    b.add_argument("--deploy", action="store_true", help="add ONNX Runtime latency/size/parity row")
    b.add_argument("--latency-threads", type=int, default=2,
                   help="ONNX Runtime intra-op threads for the --deploy latencies (default 2)")
    b.add_argument("--w-bits", type=int, default=4)
    b.add_argument("--a-bits", type=int, default=4)
    b.add_argument("--no-first-last-8bit", action="store_true")
    b.add_argument("--allow-low-coverage", action="store_true",
                   help="print rows of models with under 90%% of their MACs quantized")
    b.add_argument("--calib-size", type=int, default=1000)
    b.add_argument("--holdout", type=int, default=0,
                   help="evaluate on N calibration images kept out of calibration (for choosing "
                        "defaults without the evaluation split; imagenet-efficientnet-lite0)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--data-dir")
    b.add_argument("--json", help="write the rows as JSON here")
    b.add_argument("--calib-sizes", help="calibration-size study, e.g. 1,10,100,1000 (with --seeds)")
    b.add_argument("--seeds", type=int, default=5, help="seeds per calibration size in the study")
    b.add_argument("--plot", default="calib_study.png", help="where the study writes its plot")
    b.set_defaults(func=cmd_bench)
    add_sweep_parser(sub)
    _add_report_flag(sub)

    r = sub.add_parser("report", help="self-contained HTML report of a run directory or of a "
                       "sweep's JSON rows")
    r.add_argument("run_dir", help="run directory (ptqkit quantize --out) or sweep rows (.json)")
    r.add_argument("--out", default="report.html", help="HTML file to write (default report.html)")
    r.add_argument("--force", action="store_true", help="replace an existing --out file")
    r.add_argument("--peers", help="with sweep rows: bench rows (JSON) shown as single points")
    r.set_defaults(func=cmd_report)

    x = sub.add_parser("export", help="export a run directory to ONNX (QDQ) and/or a packed checkpoint")
    x.add_argument("run_dir")
    x.add_argument("--onnx", help="output .onnx file")
    x.add_argument("--packed", help="output packed .safetensors checkpoint")
    x.add_argument("--force", action="store_true", help="replace existing output files")
    _add_run_source_flags(x)
    x.set_defaults(func=cmd_export)
    return p


# options whose own validation already explains an empty value ("the candidate set is empty")
_SELF_CHECKED = {"candidates"}


def _refuse_empty_values(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """An option given an empty value (``--range=``) is an error, never a silent default."""
    actions = list(parser._actions)
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            actions += a.choices[args.command]._actions
    for a in actions:
        if a.dest in _SELF_CHECKED:
            continue
        value = getattr(args, a.dest, None)
        if value == "" or (isinstance(value, list) and "" in value):
            name = max(a.option_strings, key=len) if a.option_strings else a.dest
            raise ValueError(f"{name} was given an empty value; give a value or leave it out")


_OUTPUTS = ("out", "json", "plot", "onnx", "packed", "save_table", "report")


def _stamps(args: argparse.Namespace) -> dict[str, tuple[int, int, int] | None]:
    """(inode, size, mtime) of each output path the command names (None: absent)."""
    paths = [str(getattr(args, k)) for k in _OUTPUTS if getattr(args, k, None)]
    out: dict[str, tuple[int, int, int] | None] = {}
    for p in paths:
        try:
            st = os.stat(p)
            out[p] = (st.st_ino, st.st_size, st.st_mtime_ns)
        except OSError:
            out[p] = None
    return out


def _written(args: argparse.Namespace, before: dict[str, Any]) -> str:
    """The outputs the command changed since ``before``, e.g. rows a sweep saved: '' if none."""
    changed = [p for p, stamp in _stamps(args).items() if stamp is not None and stamp != before.get(p)]
    if not changed:
        return ""
    resume = " (run the same command again to resume)" if args.command == "sweep" else ""
    return f"already written: {', '.join(changed)}{resume}"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    before = _stamps(args)
    try:
        _refuse_empty_values(parser, args)
        return int(args.func(args))
    except KeyboardInterrupt:
        print(f"ptqkit: interrupted; {_written(args, before) or 'nothing was written'}", file=sys.stderr)
        return 130
    except Exception as exc:  # one line for the user; --debug shows the traceback
        if args.debug:
            raise
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        written = _written(args, before)
        print(f"ptqkit: error: {msg}" + (f" ({written})" if written else ""), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

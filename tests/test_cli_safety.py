"""What the CLI refuses to delete, overwrite, import or trust, and the messages it gives."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
from tests.test_cli import MODEL_PY, user_model  # noqa: F401  (fixture)
from torch import nn

import ptqkit.cli
from ptqkit import Recipe, quantize
from ptqkit.cli import main
from ptqkit.runs import ModelSource, load_run, save_run

RUN_FILES = {"run.json", "recipe.yaml", "report.json", "quantized.pt", "example.pt"}


@pytest.fixture(autouse=True)
def _own_state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs are signed with a key kept in a folder of this test, never in the real home."""
    monkeypatch.setenv("PTQKIT_STATE", str(tmp_path / "state"))


@pytest.fixture
def no_rmtree_of_protected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """shutil.rmtree raises instead of deleting '/', the home folder or the cwd and its parents."""
    real = shutil.rmtree

    def guarded(path, *args, **kwargs):  # type: ignore[no-untyped-def]
        p = Path(path).resolve()
        cwd = Path.cwd().resolve()
        if p in {Path("/"), Path.home().resolve(), cwd, *cwd.parents}:
            raise AssertionError(f"rmtree({path}) would delete a protected folder")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", guarded)


def _quantize(net: Path, weights: Path, calib: Path, out: Path | str, *extra: str) -> int:
    return main(["quantize", f"{net}:make", "--weights", str(weights), "--calib", str(calib),
                 "--range", "minmax", "--out", str(out), *extra])


def _one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("ptqkit: error:") and "\n" not in err, err
    assert "Traceback" not in err
    return err


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


# ----------------------------------------------------------------- --force deletes only runs
@pytest.mark.parametrize("case", ["cwd", "parent_of_cwd", "home", "root", "holds_inputs",
                                  "not_a_run", "run_with_other_files", "run_holding_an_input"])
def test_force_replaces_only_a_run_directory(case: str, user_model, tmp_path: Path,  # noqa: F811
                                             monkeypatch: pytest.MonkeyPatch, capsys,
                                             no_rmtree_of_protected) -> None:
    net, weights, calib = user_model
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "keep.txt").write_text("mine")
    run = tmp_path / "run"
    assert _quantize(net, weights, calib, run) == 0
    capsys.readouterr()
    out: Path | str = {"cwd": ".", "parent_of_cwd": tmp_path / "a", "home": tmp_path / "home",
                       "root": "/", "holds_inputs": tmp_path, "not_a_run": work,
                       "run_with_other_files": run, "run_holding_an_input": run}[case]
    if case == "run_with_other_files":
        (run / "notes.txt").write_text("mine")
    extra_inputs: list[str] = []
    if case == "run_holding_an_input":
        shutil.copy(calib, run / "calib.pt")
        extra_inputs = ["--calib", str(run / "calib.pt")]
    before = _tree(tmp_path)
    argv = ["quantize", f"{net}:make", "--weights", str(weights), "--calib", str(calib),
            "--range", "minmax", "--out", str(out), "--force", *extra_inputs]
    assert main(argv) == 2
    err = _one_line_error(capsys)
    assert "refus" in err or "not a ptqkit run" in err or "not part of" in err or "input" in err
    assert _tree(tmp_path) == before


def test_force_replaces_a_run(user_model, tmp_path: Path, capsys) -> None:  # noqa: F811
    net, weights, calib = user_model
    run = tmp_path / "run"
    assert _quantize(net, weights, calib, run, "--w-bits", "8") == 0
    assert _quantize(net, weights, calib, run, "--w-bits", "4") == 2
    assert "--force" in _one_line_error(capsys)
    assert _quantize(net, weights, calib, run, "--w-bits", "4", "--force") == 0
    assert Recipe.from_yaml(run / "recipe.yaml").w_bits == 4
    assert {p.name for p in run.iterdir()} == RUN_FILES | {"report.html"}  # quantize adds its report
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_non_run_folder_without_force_is_refused(user_model, tmp_path: Path, capsys) -> None:  # noqa: F811
    net, weights, calib = user_model
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert _quantize(net, weights, calib, out) == 2
    assert "not a ptqkit run" in _one_line_error(capsys)
    assert _tree(out) == {"keep.txt": b"mine"}


# ----------------------------------------------------------------- atomic replacement
def _tiny_run(net: Path, weights: Path, calib: Path, out: Path, seed: int, force: bool) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("tiny_net", net)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    model = module.make()
    model.load_state_dict(torch.load(weights))
    x = torch.load(calib)
    recipe = Recipe(seed=seed, w_range="minmax", a_range="minmax")
    save_run(out, quantize(model, x, recipe), ModelSource(f"{net}:make", str(weights)), recipe,
             x[:1], force=force)


@pytest.mark.parametrize("fn", ["os.replace", "os.rename", "shutil.rmtree", "os.mkdir"])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_force_keeps_the_old_or_the_new_run_whatever_fails(fn: str, k: int, user_model,  # noqa: F811
                                                          tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    net, weights, calib = user_model
    run = tmp_path / "run"
    _tiny_run(net, weights, calib, run, seed=1, force=False)
    module, name = fn.split(".")
    target = {"os": os, "shutil": shutil}[module]
    real = getattr(target, name)
    calls = [0]

    def failing(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls[0] += 1
        if calls[0] == k:
            raise OSError(f"simulated failure of {fn}")
        return real(*args, **kwargs)

    monkeypatch.setattr(target, name, failing)
    try:
        _tiny_run(net, weights, calib, run, seed=2, force=True)
    except OSError:
        pass
    monkeypatch.setattr(target, name, real)
    load_run(run)  # complete: every file there and matching its hash
    assert Recipe.from_yaml(run / "recipe.yaml").seed in (1, 2)
    assert {p.name for p in run.iterdir()} == RUN_FILES
    left = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    # only a previous run that could not be deleted stays behind (with a warning)
    assert all(n.startswith(".run.old-") for n in left) and (not left or fn == "shutil.rmtree")


# ----------------------------------------------------------------- export never overwrites
@pytest.fixture
def run_dir(user_model, tmp_path: Path) -> Path:  # noqa: F811
    net, weights, calib = user_model
    run = tmp_path / "run"
    assert _quantize(net, weights, calib, run) == 0
    return run


def test_export_refuses_an_existing_file_unless_forced(run_dir: Path, tmp_path: Path, capsys) -> None:
    packed = tmp_path / "m.safetensors"
    packed.write_text("mine")
    assert main(["export", str(run_dir), "--packed", str(packed)]) == 2
    assert "--force" in _one_line_error(capsys)
    assert packed.read_text() == "mine"
    assert main(["export", str(run_dir), "--packed", str(packed), "--force"]) == 0
    assert packed.read_bytes() != b"mine"


@pytest.mark.parametrize("name", ["quantized.pt", "run.json", "example.pt"])
def test_export_never_overwrites_the_runs_own_files(name: str, run_dir: Path, capsys) -> None:
    before = _tree(run_dir)
    assert main(["export", str(run_dir), "--packed", str(run_dir / name), "--force"]) == 2
    assert "part of the run" in _one_line_error(capsys)
    assert _tree(run_dir) == before
    load_run(run_dir)


def test_failing_export_leaves_no_half_written_file(run_dir: Path, tmp_path: Path, capsys,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("onnx")
    import onnx

    def broken(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise RuntimeError("simulated checker failure")

    monkeypatch.setattr(onnx.checker, "check_model", broken)
    out = tmp_path / "exports"
    out.mkdir()
    (out / "old.onnx").write_text("mine")
    assert main(["export", str(run_dir), "--onnx", str(out / "new.onnx")]) == 2
    assert main(["export", str(run_dir), "--onnx", str(out / "old.onnx"), "--force"]) == 2
    capsys.readouterr()
    assert _tree(out) == {"old.onnx": b"mine"}


# ----------------------------------------------------------------- mixed precision tables
def _mp_recipe(tmp_path: Path, table: str | None) -> Path:
    recipe = tmp_path / "mp.yaml"
    option = f", save_table: '{table}'" if table else ""
    recipe.write_text(f"steps:\n- name: mixed_precision\n  options: {{compression: 0.2{option}}}\n")
    return recipe


def test_relative_save_table_is_written_inside_the_run(user_model, tmp_path: Path,  # noqa: F811
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    net, weights, calib = user_model
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert _quantize(net, weights, calib, tmp_path / "run", "--recipe", str(_mp_recipe(tmp_path, "t.json")),
                     "--no-first-last-8bit") == 0
    assert (tmp_path / "run" / "t.json").is_file() and list(work.iterdir()) == []
    assert json.loads((tmp_path / "run" / "t.json").read_text())["layers"]
    load_run(tmp_path / "run")


@pytest.mark.parametrize("table", ["ABS", "../escape.json", "quantized.pt"])
def test_recipe_save_table_cannot_write_outside_the_run(table: str, user_model, tmp_path: Path,  # noqa: F811
                                                        capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    net, weights, calib = user_model
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    victim = tmp_path / "victim.json"
    victim.write_text("mine")
    table = str(victim) if table == "ABS" else table
    assert _quantize(net, weights, calib, tmp_path / "run", "--recipe", str(_mp_recipe(tmp_path, table)),
                     "--no-first-last-8bit") == 2
    assert "save_table" in _one_line_error(capsys)
    assert victim.read_text() == "mine"
    assert not (tmp_path / "escape.json").exists() and not (tmp_path / "run").exists()
    assert list((tmp_path / "work").iterdir()) == []


def test_save_table_on_the_command_line_may_be_absolute(user_model, tmp_path: Path,  # noqa: F811
                                                        capsys) -> None:
    net, weights, calib = user_model
    table = tmp_path / "table.json"
    table.write_text("mine")
    argv = ["--recipe", str(_mp_recipe(tmp_path, None)), "--no-first-last-8bit",
            "--save-table", str(table)]
    assert _quantize(net, weights, calib, tmp_path / "run", *argv) == 2
    assert "--force" in _one_line_error(capsys)
    assert table.read_text() == "mine" and not (tmp_path / "run").exists()
    assert _quantize(net, weights, calib, tmp_path / "run", *argv, "--force") == 0
    assert json.loads(table.read_text())["layers"]


# ----------------------------------------------------------------- no code from a run
EVIL_PY = MODEL_PY + "\nopen(__file__ + '.imported', 'w').close()\n"


@pytest.fixture
def foreign_run(user_model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:  # noqa: F811
    """A run whose model file leaves a mark when imported, loaded on 'another account'."""
    net, weights, calib = user_model
    net.write_text(EVIL_PY)
    run = tmp_path / "run"
    assert _quantize(net, weights, calib, run) == 0
    Path(str(net) + ".imported").unlink()
    monkeypatch.setenv("PTQKIT_STATE", str(tmp_path / "other-account"))
    return run


def test_a_foreign_run_never_imports_its_model_code(foreign_run: Path, user_model,  # noqa: F811
                                                    tmp_path: Path, capsys) -> None:
    net, _, _ = user_model
    for argv in (["export", str(foreign_run), "--packed", str(tmp_path / "m.safetensors")],
                 ["eval", str(foreign_run)]):
        assert main(argv) == 2
        _one_line_error(capsys)
        assert not Path(str(net) + ".imported").exists()
    with pytest.raises(ValueError, match="--trust-run-code"):
        load_run(foreign_run)
    assert not Path(str(net) + ".imported").exists()


def test_a_foreign_run_loads_with_the_model_named_or_trusted(foreign_run: Path, user_model,  # noqa: F811
                                                             tmp_path: Path, capsys) -> None:
    net, weights, _ = user_model
    assert main(["export", str(foreign_run), "--packed", str(tmp_path / "a.safetensors"),
                 "--model", f"{net}:make", "--weights", str(weights)]) == 0
    assert main(["export", str(foreign_run), "--packed", str(tmp_path / "b.safetensors"),
                 "--trust-run-code"]) == 0
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


def test_an_edited_model_field_is_refused_before_importing(run_dir: Path, tmp_path: Path,
                                                           capsys) -> None:
    evil = tmp_path / "evil.py"
    evil.write_text(EVIL_PY)
    meta = json.loads((run_dir / "run.json").read_text())
    meta["model"] = f"{evil}:make"
    (run_dir / "run.json").write_text(json.dumps(meta))
    assert main(["export", str(run_dir), "--packed", str(tmp_path / "m.safetensors")]) == 2
    _one_line_error(capsys)
    assert not Path(str(evil) + ".imported").exists()


# ----------------------------------------------------------------- integrity of run dirs
def test_run_json_records_the_sha256_of_the_state(run_dir: Path) -> None:
    meta = json.loads((run_dir / "run.json").read_text())
    digest = hashlib.sha256((run_dir / "quantized.pt").read_bytes()).hexdigest()
    assert meta["files"]["quantized.pt"] == digest


def test_a_changed_state_is_refused(run_dir: Path, tmp_path: Path, capsys) -> None:
    state = torch.load(run_dir / "quantized.pt")
    key = next(k for k in state if k.endswith("w_quant.scale"))
    state[key] = state[key] * 2
    torch.save(state, run_dir / "quantized.pt")
    assert main(["export", str(run_dir), "--packed", str(tmp_path / "m.safetensors")]) == 2
    assert "quantized.pt" in _one_line_error(capsys)


def test_edited_bits_are_refused(run_dir: Path, tmp_path: Path, capsys) -> None:
    meta = json.loads((run_dir / "run.json").read_text())
    meta["bits"]["0"] = [4, 4]
    (run_dir / "run.json").write_text(json.dumps(meta))
    assert main(["export", str(run_dir), "--packed", str(tmp_path / "m.safetensors")]) == 2
    assert "run.json" in _one_line_error(capsys)
    assert not (tmp_path / "m.safetensors").exists()


@pytest.mark.parametrize("bad", [float("nan"), 0.0, -1.0, float("inf")])
def test_a_bad_scale_is_refused(bad: float, user_model, tmp_path: Path, capsys) -> None:  # noqa: F811
    net, weights, calib = user_model
    run = tmp_path / "run"
    _tiny_run(net, weights, calib, run, seed=0, force=False)
    state = torch.load(run / "quantized.pt")
    key = next(k for k in state if k.endswith("a_quant.scale"))
    state[key][0] = bad
    # a run saved with the bad scale in it (hashes and all), not one edited afterwards
    qmodel, _, _ = load_run(run)
    qmodel.load_state_dict(state)
    save_run(run, qmodel, ModelSource(f"{net}:make", str(weights)), Recipe(), torch.load(calib)[:1],
             force=True)
    assert main(["export", str(run), "--packed", str(tmp_path / "m.safetensors")]) == 2
    err = _one_line_error(capsys)
    assert key in err and "scale" in err


def test_bits_that_do_not_fit_the_saved_grid_are_refused(user_model, tmp_path: Path) -> None:  # noqa: F811
    net, weights, calib = user_model
    recipe = tmp_path / "asym.yaml"  # asymmetric 8-bit weights: zero-points off the 2-bit grid
    recipe.write_text("version: 1\nw_symmetric: false\n")
    run_dir = tmp_path / "run"
    assert _quantize(net, weights, calib, run_dir, "--recipe", str(recipe)) == 0
    meta = json.loads((run_dir / "run.json").read_text())
    for key in ("files", "digest", "signature"):  # as saved by a ptqkit without hashes
        meta.pop(key)
    meta["bits"]["4"] = [2, 2]
    (run_dir / "run.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="grid"):
        load_run(run_dir, ModelSource(f"{net}:make", str(weights)))


# ----------------------------------------------------------------- output checked first
@pytest.mark.parametrize("case", ["not_empty", "is_a_file", "parent_is_a_file", "read_only"])
def test_output_problems_are_found_before_quantizing(case: str, user_model, tmp_path: Path,  # noqa: F811
                                                     capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    net, weights, calib = user_model
    calls: list[int] = []

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        raise RuntimeError("quantize was called")

    monkeypatch.setattr(ptqkit.cli, "quantize", spy)
    out = tmp_path / "out"
    if case == "not_empty":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    elif case == "is_a_file":
        out.write_text("mine")
    elif case == "parent_is_a_file":
        (tmp_path / "f").write_text("mine")
        out = tmp_path / "f" / "run"
    else:
        if os.geteuid() == 0:
            pytest.skip("permissions do not apply to root")
        (tmp_path / "ro").mkdir()
        (tmp_path / "ro").chmod(0o555)
        out = tmp_path / "ro" / "run"
    assert _quantize(net, weights, calib, out) == 2
    _one_line_error(capsys)
    assert calls == []


# ----------------------------------------------------------------- clear messages
def test_factory_that_is_not_callable(tmp_path: Path, user_model, capsys) -> None:  # noqa: F811
    _, _, calib = user_model
    (tmp_path / "bad.py").write_text("make = 3\n")
    assert main(["quantize", f"{tmp_path / 'bad.py'}:make", "--calib", str(calib),
                 "--out", str(tmp_path / "run")]) == 2
    err = _one_line_error(capsys)
    assert "object is not callable" not in err and "make" in err and "nn.Module" in err


def test_weights_that_do_not_fit_name_the_keys(user_model, tmp_path: Path, capsys) -> None:  # noqa: F811
    net, weights, calib = user_model
    state = torch.load(weights)
    del state["1.running_mean"]
    state["extra.weight"] = torch.zeros(1)
    state["4.weight"] = torch.zeros(5, 144)
    torch.save(state, weights)
    assert _quantize(net, weights, calib, tmp_path / "run") == 2
    err = _one_line_error(capsys)
    assert "Error(s) in loading" not in err
    assert "1.running_mean" in err and "extra.weight" in err and "4.weight" in err


@pytest.mark.parametrize("kind", ["truncated", "empty", "pickled_module", "directory"])
def test_unreadable_weights_are_called_corrupt(kind: str, user_model, tmp_path: Path,  # noqa: F811
                                               capsys) -> None:
    net, weights, calib = user_model
    if kind == "truncated":
        weights.write_bytes(weights.read_bytes()[:200])
    elif kind == "empty":
        weights.write_bytes(b"")
    elif kind == "pickled_module":
        torch.save(nn.Linear(2, 2), weights)
    else:
        weights.unlink()
        weights.mkdir()
    assert _quantize(net, weights, calib, tmp_path / "run") == 2
    err = _one_line_error(capsys)
    assert "weights_only" not in err and "Errno" not in err
    assert ("corrupt" in err or "not a plain state dict" in err or "not a file" in err)


def test_disk_full_names_the_file(user_model, tmp_path: Path, capsys,  # noqa: F811
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    net, weights, calib = user_model
    real = torch.save

    def full(obj, f, *args, **kwargs):  # type: ignore[no-untyped-def]
        if str(f).endswith("quantized.pt"):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter "
                               "failed writing file data/3: file write failed")
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full)
    assert _quantize(net, weights, calib, tmp_path / "run") == 2
    err = _one_line_error(capsys)
    assert "no space left writing" in err and "quantized.pt" in err
    assert not (tmp_path / "run").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_run_json_without_a_key_names_it(run_dir: Path, tmp_path: Path, capsys) -> None:
    meta = json.loads((run_dir / "run.json").read_text())
    del meta["bits"]
    (run_dir / "run.json").write_text(json.dumps(meta))
    assert main(["export", str(run_dir), "--packed", str(tmp_path / "m.safetensors")]) == 2
    err = _one_line_error(capsys)
    assert "'bits'" in err and "run.json" in err and err != "ptqkit: error: 'bits'"


def test_interrupted_sweep_says_what_it_wrote(tmp_path: Path, capsys,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import ptqkit.sweep

    def interrupted(suite, cfg, on_row=None, done=()):  # type: ignore[no-untyped-def]
        on_row({"suite": suite, "method": "ip", "budget": 0.25})
        raise KeyboardInterrupt

    monkeypatch.setattr(ptqkit.sweep, "run_sweep", interrupted)
    rows = tmp_path / "rows.json"
    assert main(["sweep", "--suite", "fmnist-resnet20", "--json", str(rows)]) == 130
    err = capsys.readouterr().err
    assert "nothing was written" not in err and str(rows) in err
    assert json.loads(rows.read_text())[0]["method"] == "ip"


def test_interrupt_before_writing_says_nothing_was_written(user_model, tmp_path: Path, capsys,  # noqa: F811
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    net, weights, calib = user_model

    def interrupted(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise KeyboardInterrupt

    monkeypatch.setattr(ptqkit.cli, "quantize", interrupted)
    assert _quantize(net, weights, calib, tmp_path / "run") == 130
    assert "nothing was written" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------- inputs never ignored
def test_weights_with_a_zoo_model_are_used(tmp_path: Path) -> None:
    from ptqkit.zoo import load_model

    model = load_model("fmnist-resnet20")
    state = model.state_dict()
    fc = next(k for k in state if k.endswith("weight") and state[k].dim() == 2)
    state[fc] = torch.randn_like(state[fc])
    torch.save(state, tmp_path / "w.pt")
    torch.save(torch.randn(8, 1, 28, 28), tmp_path / "calib.pt")
    assert main(["quantize", "fmnist-resnet20", "--weights", str(tmp_path / "w.pt"),
                 "--calib", str(tmp_path / "calib.pt"), "--range", "minmax",
                 "--out", str(tmp_path / "run")]) == 0
    _, float_model, _ = load_run(tmp_path / "run")
    assert torch.equal(float_model.state_dict()[fc], state[fc])


@pytest.mark.parametrize("argv, flag", [(["--calib-size", "0"], "--calib-size"),
                                        (["--calib-size", "-3"], "--calib-size"),
                                        (["--range="], "--range"),
                                        (["--w-range="], "--w-range"),
                                        (["--recipe="], "--recipe")])
def test_empty_or_zero_inputs_are_refused(argv: list[str], flag: str, user_model,  # noqa: F811
                                          tmp_path: Path, capsys) -> None:
    net, weights, calib = user_model
    assert main(["quantize", f"{net}:make", "--weights", str(weights), "--calib", str(calib),
                 "--out", str(tmp_path / "run"), *argv]) == 2
    assert flag in _one_line_error(capsys)
    assert not (tmp_path / "run").exists()


def test_empty_values_are_refused_by_every_command(tmp_path: Path, capsys) -> None:
    for argv, flag in ((["sweep", "--suite", "fmnist-resnet20", "--tables="], "--tables"),
                       (["bench", "--suite", "fmnist-resnet20", "--json="], "--json"),
                       (["export", str(tmp_path), "--packed="], "--packed")):
        assert main(argv) == 2
        assert flag in _one_line_error(capsys)


# ----------------------------------------------------------------- portable run directories
def test_runs_work_from_any_working_directory(user_model, tmp_path: Path, capsys,  # noqa: F811
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["quantize", "net.py:make", "--weights", "w.pt", "--calib", "calib.pt",
                 "--range", "minmax", "--out", "run"]) == 0
    meta = json.loads((tmp_path / "run" / "run.json").read_text())
    assert meta["model"] == f"{tmp_path.resolve() / 'net.py'}:make"
    assert meta["weights"] == str(tmp_path.resolve() / "w.pt")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["export", str(tmp_path / "run"), "--packed", "m.safetensors"]) == 0
    assert (elsewhere / "m.safetensors").is_file()


# ----------------------------------------------------------------- permissions
def test_outputs_follow_the_umask(run_dir: Path, tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        out = tmp_path / "run2"
        assert main(["quantize", "--out", str(out), *_argv_of(run_dir)]) == 0
        assert main(["export", str(out), "--packed", str(tmp_path / "m.safetensors")]) == 0
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(out) == 0o750
    assert {mode(p) for p in out.iterdir()} == {0o640}
    assert mode(tmp_path / "m.safetensors") == 0o640


def _argv_of(run_dir: Path) -> list[str]:
    """quantize arguments that rebuild the user model of ``run_dir``'s test."""
    tmp = run_dir.parent
    return [f"{tmp / 'net.py'}:make", "--weights", str(tmp / "w.pt"), "--calib", str(tmp / "calib.pt"),
            "--range", "minmax"]

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

import ptqkit.cli
from ptqkit import Recipe, quantize
from ptqkit.cli import main
from ptqkit.runs import ModelSource, load_run, save_run
from tests.test_cli import user_model  # noqa: F401  (fixture)

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
    assert {p.name for p in run.iterdir()} == RUN_FILES
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


# ----------------------------------------------------------------- a run to load
@pytest.fixture
def run_dir(user_model, tmp_path: Path) -> Path:  # noqa: F811
    net, weights, calib = user_model
    run = tmp_path / "run"
    assert _quantize(net, weights, calib, run) == 0
    return run


# ----------------------------------------------------------------- what run.json lists
def test_run_json_records_the_sha256_of_the_state(run_dir: Path) -> None:
    meta = json.loads((run_dir / "run.json").read_text())
    digest = hashlib.sha256((run_dir / "quantized.pt").read_bytes()).hexdigest()
    assert meta["files"]["quantized.pt"] == digest


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
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(out) == 0o750
    assert {mode(p) for p in out.iterdir()} == {0o640}


def _argv_of(run_dir: Path) -> list[str]:
    """quantize arguments that rebuild the user model of ``run_dir``'s test."""
    tmp = run_dir.parent
    return [f"{tmp / 'net.py'}:make", "--weights", str(tmp / "w.pt"), "--calib", str(tmp / "calib.pt"),
            "--range", "minmax"]

"""File-system rules shared by the run directory and the CLI: what may be written or replaced,
how files are replaced atomically, and how unreadable or unwritable files are reported.

Every error is a one-line exception naming the file and the fix.
"""

from __future__ import annotations

import errno
import hashlib
import os
import secrets
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["protected_folder", "check_location", "check_new_file", "replacing_file", "sibling_dir",
           "sha256_file", "load_tensors", "write_failure", "inside", "umask"]


def inside(path: Path, folder: Path) -> bool:
    """Whether ``path`` is ``folder`` or lies below it (both resolved)."""
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def protected_folder(path: Path) -> str | None:
    """What ``path`` is if it must never be replaced or deleted: the file-system root, the home
    folder or a folder above it, the current directory or a folder above it; else None."""
    p = path.resolve()
    cwd, home = Path.cwd().resolve(), Path.home().resolve()
    if p == Path(p.anchor):
        return "the file-system root"
    if p == cwd:
        return "the current directory"
    if p in cwd.parents:
        return "a folder above the current directory"
    if p == home:
        return "your home folder"
    if p in home.parents:
        return "a folder above your home folder"
    return None


def check_location(path: Path, flag: str) -> None:
    """Raise unless ``path`` (a file or folder still to be created) can be created: its nearest
    existing ancestor must be a folder this user may write to."""
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise NotADirectoryError(f"{flag} {path}: {parent} is a file, not a folder; choose "
                                 "another path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"{flag} {path}: cannot write to {parent} (permission denied); "
                              "choose a folder you can write to")


def check_new_file(path: Path, force: bool, flag: str, keep: Iterable[Path] = ()) -> None:
    """Raise unless a file may be written at ``path``: not a folder, not one of ``keep`` (files
    that must survive, e.g. the inputs), not an existing file unless ``force``, and creatable."""
    for k in keep:
        if path.resolve() == Path(k).resolve():
            raise FileExistsError(f"{flag} {path} is an input of this command; choose another path")
    if path.is_dir():
        raise IsADirectoryError(f"{flag} {path} is a folder; give a file name")
    if (path.exists() or path.is_symlink()) and not force:
        raise FileExistsError(f"{flag} {path} exists; pass --force to replace it")
    check_location(path, flag)


def sibling_dir(target: Path, tag: str) -> Path:
    """Create a hidden, uniquely named folder next to ``target`` (same file system, so it can be
    renamed onto ``target``); its mode follows the umask like any new folder's."""
    for _ in range(100):
        path = target.parent / f".{target.name}.{tag}-{secrets.token_hex(4)}"
        try:
            os.mkdir(path, 0o777)
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"cannot create a temporary folder next to {target}")


def write_failure(exc: BaseException, path: Path) -> BaseException:
    """``exc`` raised while writing ``path``, as a one-line error when the disk is full."""
    text = str(exc)
    full = (isinstance(exc, OSError) and exc.errno == errno.ENOSPC) or "No space left" in text \
        or "os error 28" in text or ("inline_container.cc" in text and "write" in text)
    if full:
        return OSError(f"no space left writing {path}; free some space or write to another disk")
    return exc


def umask() -> int:
    """The process's file-mode creation mask."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def replacing_file(target: Path) -> Iterator[Path]:
    """A path to write the new content of ``target`` to, inside a temporary folder next to it.
    When the block succeeds the file gets the mode a new file has under the umask (whatever mode
    the writer gave it) and is moved onto ``target`` in one ``os.replace``; whatever
    happens the temporary folder (and anything a writer left there) is deleted, so a failure
    leaves ``target`` as it was. Check ``target`` first with :func:`check_new_file`."""
    tmp_dir = sibling_dir(target, "tmp")
    tmp = tmp_dir / target.name
    try:
        try:
            yield tmp
        except Exception as exc:
            err = write_failure(exc, target)
            if err is exc:
                raise
            raise err from exc
        if not tmp.is_file():
            raise FileNotFoundError(f"nothing was written for {target}")
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_tensors(path: str | os.PathLike[str], what: str, fix: str) -> Any:
    """The content of a torch (.pt/.pth, safe loader: tensors and plain containers only) or
    .safetensors file. A missing, unreadable, truncated or unsafe file raises a one-line
    ValueError/FileNotFoundError naming ``what`` (e.g. 'weights file') and ``fix``."""
    import pickle

    import numpy as np
    import torch

    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{what} {path} is a folder, not a file")
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    if path.stat().st_size == 0:
        raise ValueError(f"{what} {path} is empty (corrupt or not fully written); {fix}")
    if path.suffix == ".npy":
        try:
            return torch.from_numpy(np.load(path, allow_pickle=False))
        except Exception as exc:
            raise ValueError(f"{what} {path} is corrupt or not a plain numeric array "
                             f"({type(exc).__name__}); {fix}") from None
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(f"{what} {path} is not a plain state dict: it holds Python objects "
                         f"(e.g. a whole pickled model) that ptqkit does not load; {fix}") from None
    except Exception as exc:  # truncated or not a torch file at all: RuntimeError, EOFError, OSError
        raise ValueError(f"{what} {path} is corrupt or truncated ({type(exc).__name__}); {fix}"
                         ) from None

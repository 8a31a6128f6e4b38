"""Writing files so that a failure leaves nothing half-written: one file, or a set of files in a folder.

:func:`atomic_write` writes one file under a temporary name beside it and renames it over the old one;
:func:`atomic_folder` collects several files in a temporary folder beside the output folder and renames
that folder into place, so that readers see either every old file or every new one, never a mixture::

    >>> import tempfile
    >>> from pathlib import Path
    >>> out = Path(tempfile.mkdtemp()) / "run"
    >>> with atomic_folder(out) as staging:
    ...     _ = (staging / "a.txt").write_text("new a")
    ...     atomic_write(staging / "b.txt", lambda tmp: Path(tmp).write_text("new b"))
    >>> sorted(p.name for p in out.iterdir())
    ['a.txt', 'b.txt']

New files get the permissions the process's umask allows (as ``open`` gives them); a rewritten file keeps
its own. A target that cannot be replaced (a read-only file or folder, a folder where a file is expected,
a symbolic link inside an output folder) is a :class:`~slimtorch.errors.ConfigError` raised before
anything is written. Files of an existing output folder that are not rewritten stay (hard links, no copy).
"""

from __future__ import annotations

import fnmatch
import os
import reprlib
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from slimtorch.errors import ConfigError

__all__ = ["atomic_folder", "atomic_write", "check_output_file", "check_output_folder", "check_path", "save_figure"]


def check_path(value: Any, what: str) -> Path:
    """A file or folder path given as ``str`` or ``os.PathLike`` (not None, a number or an open file)."""
    if isinstance(value, (str, os.PathLike)) and str(value):
        return Path(value)
    raise ConfigError(f"{what} must be a path (a non-empty str or pathlib.Path), got {type(value).__name__} "
                      f"{reprlib.repr(value)}")


def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it; put it straight back
    os.umask(mask)
    return mask


def _read_only(path: Path) -> bool:
    """No write permission bit at all (a file protected on purpose, even from root), or not writable by us."""
    mode = path.stat().st_mode
    return not mode & 0o222 or not os.access(path, os.W_OK)


def _resolve(path: Path) -> Path:
    """``path`` with symbolic links followed (a link to a file is written through: its target is replaced)."""
    try:
        return path.resolve() if path.is_symlink() else path
    except (OSError, RuntimeError) as err:  # a loop of links
        raise ConfigError(f"{str(path)!r} is a symbolic link that leads nowhere ({err}); remove it") from None


def _check_parent(folder: Path) -> None:
    """``folder`` exists (or can be made) and is a writable folder."""
    existing = next((p for p in (folder, *folder.parents) if p.exists() or p.is_symlink()), None)
    if existing is not None and not existing.is_dir():
        raise ConfigError(f"{str(existing)!r} exists and is not a folder; choose another output location")
    if existing is not None and _read_only(existing):
        raise ConfigError(f"the folder {str(existing)!r} is read-only; make it writable or choose another output")


@contextmanager
def _parents(folder: Path) -> Iterator[None]:
    """Make ``folder`` and its missing parents; remove those made here again if the block fails."""
    made = [p for p in (folder, *folder.parents) if not p.exists()][::-1]
    folder.mkdir(parents=True, exist_ok=True)
    try:
        yield
    except BaseException:
        for p in reversed(made):
            try:
                p.rmdir()
            except OSError:  # (not empty: something else wrote there meanwhile)
                break
        raise


def check_output_file(path: str | Path) -> Path:
    """Raise a ConfigError unless ``path`` can be (re)written; returns the path that will be written
    (a symbolic link's target)."""
    path = _resolve(check_path(path, "the output file"))
    if path.is_dir():
        raise ConfigError(f"{str(path)!r} is a folder; give a file name")
    if path.exists() and _read_only(path):
        raise ConfigError(f"{str(path)!r} is read-only; make it writable or write elsewhere")
    _check_parent(path.parent)
    return path


def atomic_write(path: str | Path, write: Callable[[str], object]) -> None:
    """Call ``write(tmp_path)`` then rename over ``path``: a crash or an error mid-write leaves the old file
    intact, and no temporary file behind."""
    path = check_output_file(path)
    mode = stat.S_IMODE(path.stat().st_mode) if path.exists() else 0o666 & ~_umask()
    with _parents(path.parent):
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            write(tmp)
            os.chmod(tmp, mode)  # mkstemp makes 0600 files
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


def check_output_folder(directory: str | Path, names: Iterable[str] = ()) -> Path:
    """Raise a ConfigError unless ``directory`` can receive the files ``names`` through
    :func:`atomic_folder` (its parent must be writable: the new folder is renamed into place there);
    returns the folder that will be written (absolute, a symbolic link's target)."""
    directory = _resolve(Path(os.path.abspath(check_path(directory, "the output folder"))))
    if directory.exists() and not directory.is_dir():
        raise ConfigError(f"{str(directory)!r} exists and is not a folder; choose another output folder")
    if directory.exists() and _read_only(directory):
        raise ConfigError(f"the output folder {str(directory)!r} is read-only; make it writable or choose another")
    _check_parent(directory.parent)
    for name in names:
        target = directory / name
        if target.is_symlink():
            raise ConfigError(f"{str(target)!r} is a symbolic link; remove it or choose another output folder")
        if target.is_dir():
            raise ConfigError(f"{str(target)!r} is a folder where an output file goes; remove it or choose another "
                              "output folder")
        if target.exists() and _read_only(target):
            raise ConfigError(f"{str(target)!r} is read-only; make it writable or choose another output folder")
    return directory


def _carry(source: Path, target: Path) -> None:
    """Put ``source`` (a file, link or folder of the old output folder) at ``target`` without copying data."""
    if source.is_symlink():
        os.symlink(os.readlink(source), target)
    elif source.is_dir():
        target.mkdir()
        for entry in source.iterdir():
            _carry(entry, target / entry.name)
        os.chmod(target, stat.S_IMODE(source.stat().st_mode))
    else:
        try:
            os.link(source, target)
        except OSError:  # a file system without hard links
            shutil.copy2(source, target)


def _holds_cwd(directory: Path) -> bool:
    try:
        cwd, folder = Path.cwd().resolve(), directory.resolve()
    except OSError:  # (the working directory was removed)
        return False
    return cwd == folder or folder in cwd.parents


def _replace_each(staging: Path, directory: Path, names: list[str]) -> None:
    """Move the staged files into ``directory`` one by one (for a folder that cannot be swapped: the working
    directory, a mount point); if one move fails, the files already replaced are put back."""
    backups = Path(tempfile.mkdtemp(prefix=".replaced.", dir=staging))
    done: list[str] = []
    try:
        for name in names:
            if (directory / name).exists():
                _carry(directory / name, backups / name)
            os.replace(staging / name, directory / name)
            done.append(name)
    except BaseException:
        for name in reversed(done):
            if (backups / name).exists():
                os.replace(backups / name, directory / name)
            else:
                os.unlink(directory / name)
        raise


def _commit(staging: Path, directory: Path, replaces: tuple[str, ...] = ()) -> None:
    """Rename ``staging`` into place as ``directory``, keeping the old folder's other entries and modes (but
    not those matching a pattern of ``replaces``: files of an earlier save that the new one supersedes)."""
    names = sorted(p.name for p in staging.iterdir())
    check_output_folder(directory, names)
    if not directory.exists():
        os.chmod(staging, 0o777 & ~_umask())
        os.rename(staging, directory)
        return
    for entry in directory.iterdir():
        if entry.name in names:
            os.chmod(staging / entry.name, stat.S_IMODE(entry.stat().st_mode))  # a rewritten file keeps its mode
        elif not _holds_cwd(directory) and not any(fnmatch.fnmatch(entry.name, p) for p in replaces):
            _carry(entry, staging / entry.name)
    if _holds_cwd(directory):  # renaming the working directory away would leave the process nowhere
        _replace_each(staging, directory, names)
        return
    os.chmod(staging, stat.S_IMODE(directory.stat().st_mode))
    backup = staging.with_name(staging.name + ".old")
    try:
        os.rename(directory, backup)
    except OSError:  # a mount point, or a folder another program holds: file by file instead
        _replace_each(staging, directory, names)
        return
    try:
        os.rename(staging, directory)
    except BaseException:
        os.rename(backup, directory)
        raise
    shutil.rmtree(backup, ignore_errors=True)


@contextmanager
def atomic_folder(directory: str | Path, *, replaces: Iterable[str] = ()) -> Iterator[Path]:
    """Yield a temporary folder to write outputs into; when the block ends without an error, it becomes
    ``directory`` at once (the old folder's other files stay, except those matching a glob pattern of
    ``replaces``, e.g. the weight shards of an earlier save). On any error nothing has changed. (The working
    directory, or a folder that cannot be renamed such as a mount point, receives the new files one by one
    instead, each atomically, the ones already replaced put back if one fails.)"""
    directory = check_output_folder(directory)
    with _parents(directory.parent):
        staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
        try:
            yield staging
            _commit(staging, directory, tuple(replaces))
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)


def save_figure(fig: Any, path: str | Path, *, dpi: int = 110) -> None:
    """Save a matplotlib figure atomically, in the format its file name says (PNG without a suffix)."""
    kind = Path(path).suffix.lstrip(".").lower() or "png"
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format=kind))

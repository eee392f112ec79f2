"""Writing safely (the habits of git, zarr and DVC), for every command that writes.

Outputs are written into a temporary sibling named after their owner (``.tmp-<name>-<host>-<pid>-*``),
fsynced, and renamed into place by a rename that fails when the target appeared meanwhile; a
failure or a signal removes the sibling, and the next run removes siblings of dead processes.
An output may never be, contain or lie inside what the command reads, nor be the current folder
or a parent of it. Temporary files and folders get the mode the umask asks for.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from nodulab.common.errors import InputError


class DatasetError(InputError):
    """A dataset folder is missing, malformed, or would be overwritten without ``force``."""


class OutExists(DatasetError):
    """``--out`` exists (or appeared while the command ran) and ``force`` was not given.

    A caller that shares outputs between processes (a dataset cache) can catch it, wait for
    :func:`nodulab.data.dataset.is_complete` and then check the winner's hashes.
    """


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(path: Path | str) -> None:
    """Give a file or folder made by ``tempfile`` (0600 / 0700) the mode the umask asks for."""
    base = 0o777 if Path(path).is_dir() else 0o666
    os.chmod(path, base & ~_umask())


def check_out(out: Path | str, inputs: Iterable[Path | str] = (), *, flag: str = "--out") -> Path:
    """Refuse an output path that would replace or write into what a command reads.

    ``out`` may not be the current folder, a parent of it or a filesystem root, and may not be,
    contain or lie inside any of ``inputs`` (a dataset folder, a scenario file). Symlinks are
    resolved on both sides, so a link cannot smuggle the output into an input.

    Args:
        out: the path a command will create or replace.
        inputs: paths the command reads.
        flag: the option named in the message.

    Returns:
        ``out`` resolved.

    Raises:
        DatasetError: with a one-line message naming the conflict.
    """
    target = _resolve(out, flag)
    cwd = Path.cwd().resolve()
    if target == cwd or target in cwd.parents or target == Path(target.anchor):
        raise DatasetError(f"{flag} {out}: is the current folder or one of its parents; name a new folder")
    for given in inputs:
        source = _resolve(given, "input")
        if target == source or target in source.parents:
            raise DatasetError(f"{flag} {out}: would replace the input {given}; choose another path")
        if source in target.parents:
            raise DatasetError(f"{flag} {out}: lies inside the input {given}; choose a path outside it")
    return target


def _resolve(path: Path | str, flag: str) -> Path:
    """``path`` with symlinks resolved; a symlink loop is a one-line ``DatasetError``."""
    try:
        return Path(path).resolve()
    except (RuntimeError, OSError) as error:  # RuntimeError: a symlink loop (Python < 3.13)
        raise DatasetError(f"{flag} {path}: cannot be resolved ({' '.join(str(error).split())})") from None


def is_inside(root: Path, path: Path) -> bool:
    """Whether ``path`` (symlinks resolved) lies under ``root`` (symlinks resolved)."""
    root, path = _resolve(root, "path"), _resolve(path, "path")
    return path == root or root in path.parents


def write_atomically(path: Path | str, write: Callable[[str], Any], *, exclusive: bool = False) -> None:
    """Call ``write(tmp)`` on a temporary sibling of ``path``, then rename it into place.

    A reader never sees half a file, and a failed write leaves nothing behind. The file gets the
    mode the umask asks for.

    Args:
        path: the file to create or replace.
        write: writes the whole file at the path it is given.
        exclusive: fail with ``OutExists`` if ``path`` exists (checked at the rename).
    """
    path = Path(path)
    remove_stale_temp(path)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        follow_umask(tmp)  # after the write: a writer may replace the file (safetensors makes a new inode)
        fsync_file(Path(tmp))
        if exclusive:
            rename_no_replace(Path(tmp), path)
        else:
            os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_safetensors(path: Path | str, save: Callable[..., Any], tensors: Any, metadata: dict[str, str]) -> None:
    """``save(tensors, tmp, metadata=metadata)`` (a safetensors ``save_file``) through ``write_atomically``.

    safetensors reports a failed write (a full disk, a quota, a read-only folder) as its own
    ``SafetensorError``, not an ``OSError``; it becomes an ``OSError`` naming ``path``, with the
    errno the library reports (else EIO), so the command words it as one line. The temporary file
    is removed either way.
    """

    def write(tmp: str) -> None:
        from safetensors import SafetensorError

        try:
            save(tensors, tmp, metadata=metadata)
        except SafetensorError as error:
            raise _os_error(error, path) from None

    write_atomically(path, write)


def _os_error(error: BaseException, path: Path | str) -> OSError:
    """An ``OSError`` for a write that failed inside a library, with the errno its message names."""
    text = " ".join(str(error).split())
    found = re.search(r"code: (\d+)", text) or re.search(r"os error (\d+)", text)
    if found:
        number = int(found.group(1))
    elif "no space left" in text.lower() or "storagefull" in text.lower():
        number = errno.ENOSPC
    else:
        number = errno.EIO
    return OSError(number, os.strerror(number), str(path))


def fsync_file(path: Path) -> None:
    """Flush a written file to the device (before it is renamed into place)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_RENAME_NOREPLACE = 1
_AT_FDCWD = -100


def rename_no_replace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``; raise ``OutExists`` if ``dst`` exists, atomically.

    Uses Linux ``renameat2(RENAME_NOREPLACE)``; where that is missing, a file is hard-linked
    (``link`` fails on an existing name) and a folder renamed (``rename`` fails onto a non-empty
    folder, and a finished output is never empty).
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        code = libc.renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE)
        error = ctypes.get_errno() if code != 0 else 0
    except (AttributeError, OSError):
        code, error = -1, errno.ENOSYS
    if code == 0:
        return
    if error == errno.EEXIST:
        raise OutExists(f"--out {dst} appeared while this command ran (use --force to replace it)")
    if error not in (errno.ENOSYS, errno.EINVAL):
        raise OSError(error, os.strerror(error), str(dst))
    try:
        if src.is_dir():
            os.rename(src, dst)
        else:
            os.link(src, dst)
            os.unlink(src)
    except OSError as e:
        if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise OutExists(f"--out {dst} appeared while this command ran (use --force to replace it)") from None
        raise


_HOST = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname())[:40] or "host"


SHORT_NAME = 64
"""Longest output name kept whole inside a temporary sibling's name (NAME_MAX is 255 bytes)."""


def short_name(name: str) -> str:
    """``name`` as it appears inside a temporary sibling's name: whole up to ``SHORT_NAME`` bytes,
    else its first 40 characters and a hash of the whole (so a 255-byte ``--out`` still fits)."""
    if len(name.encode()) <= SHORT_NAME:
        return name
    return f"{name.encode()[:40].decode(errors='ignore')}~{hashlib.sha256(name.encode()).hexdigest()[:12]}"


def _scratch_prefix(kind: str, out: Path) -> str:
    """``.tmp-<name>-<host>-<pid>-``: who owns a temporary sibling, so a later run can tidy up."""
    return f".{kind}-{short_name(out.name)}-{_HOST}-{os.getpid()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _temp_prefix(path: Path) -> str:
    """``.<name>.<host>-<pid>.``: a temporary file of ``write_atomically`` names its owner."""
    return f".{short_name(path.name)}.{_HOST}-{os.getpid()}."


def _remove_dead(folder: Path, pattern: re.Pattern[str], inputs: Iterable[Path | str] = ()) -> list[Path]:
    """Remove the entries of ``folder`` whose name matches ``pattern`` (its ``pid`` group naming a
    process of this host) when that process no longer exists; a live process's are kept, and so is
    an entry that ``check_out`` refuses (the current folder or a parent, or one that is, holds or
    lies inside one of ``inputs``), whatever its name."""
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    inputs = list(inputs)
    for entry in folder.iterdir():
        match = pattern.match(entry.name)
        pid = int(match.group("pid")) if match else os.getpid()
        if pid == os.getpid() or _alive(pid):
            continue
        try:
            check_out(entry, inputs)
        except DatasetError:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def remove_stale_temp(path: Path) -> list[Path]:
    """Remove temporary files of ``path`` left by dead processes of this host (``write_atomically``'s,
    named ``.<name>.<host>-<pid>.*``)."""
    name, host = re.escape(short_name(path.name)), re.escape(_HOST)
    return _remove_dead(path.parent, re.compile(rf"^\.{name}\.{host}-(?P<pid>\d+)\.[A-Za-z0-9_]+$"))


def remove_stale_scratch(out: Path, inputs: Iterable[Path | str] = ()) -> list[Path]:
    """Remove temporary siblings of ``out`` left by dead processes of this host (kill -9, power loss).

    Only names this module makes for this very ``out`` are touched (``.tmp-<name>-<host>-<pid>-*``
    and ``.old-<name>-…``), only when process ``pid`` no longer exists, and never one that is,
    holds or lies inside one of ``inputs`` (nor the current folder or a parent of it).

    Returns:
        The folders removed.
    """
    name, host = re.escape(short_name(out.name)), re.escape(_HOST)
    return _remove_dead(out.parent, re.compile(rf"^\.(tmp|old)-{name}-{host}-(?P<pid>\d+)-[A-Za-z0-9_]+$"), inputs)


@contextmanager
def staged(
    out: Path,
    *,
    force: bool = False,
    is_file: bool = False,
    inputs: Iterable[Path | str] = (),
    owner: str | None = None,
) -> Iterator[Path]:
    """Yield a temporary sibling folder of ``out``; put the result in place only on success.

    The rename into place is exclusive: if ``out`` appeared meanwhile (another process), this one
    fails with ``OutExists`` unless ``force``. Temporary siblings of dead processes are removed
    first; the new folder follows the umask; a full disk becomes a one-line ``DatasetError``.
    ``out`` may not be ``.``, a parent of it, or be, hold or lie inside one of ``inputs``
    (``check_out``), and ``force`` replaces only what this kind of command made (``check_owned``).

    Args:
        out: final path (a folder, or a file when ``is_file``).
        force: replace an existing ``out`` (only after the new one is complete).
        is_file: the block writes ``tmp / out.name``, which becomes ``out``.
        inputs: paths the command reads.
        owner: the file every folder this command writes holds (``dataset.json``, ``config.json``,
            ...): an existing non-empty folder without it is not replaced, even with ``force``.

    Yields:
        The temporary folder. On any exception (SIGINT and SIGTERM included) it is removed, with
        any parents created for it.
    """
    out, inputs = Path(out), list(inputs)
    check_out(out, inputs)
    if (out.exists() or out.is_symlink()) and not force:
        raise OutExists(f"--out {out} already exists (use --force to replace it)")
    check_owned(out, is_file=is_file, owner=owner)
    created = [p for p in reversed(out.parents) if not p.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_scratch(out, inputs)
    tmp = Path(tempfile.mkdtemp(prefix=_scratch_prefix("tmp", out), dir=out.parent))
    try:
        follow_umask(tmp)
        yield tmp
        _replace(tmp / out.name if is_file else tmp, out, force=force, is_file=is_file, owner=owner)
    except BaseException as error:
        shutil.rmtree(tmp, ignore_errors=True)
        for parent in reversed(created):
            if parent.exists() and not any(parent.iterdir()):
                parent.rmdir()
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            raise DatasetError(f"--out {out}: no space left on the device; nothing was written") from None
        raise
    if is_file:
        shutil.rmtree(tmp, ignore_errors=True)


def check_owned(out: Path, *, is_file: bool = False, owner: str | None = None) -> None:
    """Refuse to replace an ``out`` this kind of command did not make (``--force`` included).

    A file output may replace a file, never a folder; a folder output may replace a link, an empty
    folder, or a folder holding ``owner`` (the file every such output holds), never anything else.
    """
    if out.is_symlink() or not out.exists():
        return
    if is_file:
        if out.is_dir():
            raise DatasetError(f"--out {out}: is a folder; not replacing it with a file")
        return
    if not out.is_dir():
        raise DatasetError(f"--out {out}: is a file; not replacing it with a folder")
    if any(out.iterdir()) and (owner is None or not (out / owner).is_file()):
        held = f" (it holds no {owner})" if owner else ""
        raise DatasetError(f"--out {out}: is a folder nodulab did not write{held}; not replacing it")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _replace(src: Path, out: Path, *, force: bool, is_file: bool, owner: str | None) -> None:
    """Rename ``src`` to ``out`` without ever replacing an ``out`` that appeared meanwhile.

    With ``force`` an existing ``out`` is moved aside first and deleted last (restored if the
    rename fails), once ``check_owned`` accepts it; without it, an ``out`` that appeared raises
    ``OutExists``.
    """
    for _ in range(8):
        try:
            rename_no_replace(src, out)
            return
        except OutExists:
            if not force:
                raise
        check_owned(out, is_file=is_file, owner=owner)  # what appeared meanwhile is checked too
        old = Path(tempfile.mkdtemp(prefix=_scratch_prefix("old", out), dir=out.parent)) / out.name
        try:
            os.rename(out, old)
        except FileNotFoundError:  # another process moved it first: try again
            _remove(old.parent)
            continue
        try:
            rename_no_replace(src, out)
        except BaseException:
            try:
                rename_no_replace(old, out)  # put the previous output back
            except OSError:
                pass  # it stays in the .old-* sibling rather than being deleted
            else:
                _remove(old.parent)
            raise
        _remove(old.parent)
        return
    raise OutExists(f"--out {out} keeps being replaced by another process")

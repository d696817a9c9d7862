"""Small file helpers shared by every writer: atomic writes, JSONL, safetensors with clear errors."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch


def default_mode(directory: bool = False) -> int:
    """The permissions a plain ``open`` / ``mkdir`` would give under the current umask (temp
    files and folders are created private, 0600 / 0700, and would keep that after the rename)."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def temp_dir(parent: Path, prefix: str) -> Path:
    """A fresh folder inside ``parent`` (to be renamed into place) with the usual permissions."""
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=prefix))
    os.chmod(tmp, default_mode(directory=True))
    return tmp


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same folder + rename, so readers never see
    half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, default_mode())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(directory: str | Path) -> None:
    """Make a rename inside ``directory`` durable: without it a power cut can leave the folder
    pointing at neither the old nor the new file, even though the file itself was fsynced."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return  # platforms that cannot open folders (Windows) have no such fsync
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a folder; the rename is still atomic
    finally:
        os.close(fd)


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def replace_dir(tmp_dir: Path, final_dir: Path) -> None:
    """Move a fully written ``tmp_dir`` to ``final_dir``; an older ``final_dir`` is removed only afterwards.

    A lock :func:`exclusive` holds on ``final_dir`` stays held: its lock file is hard-linked into
    ``tmp_dir`` first, so the new folder's lock file is the very file the holder has locked (a codec
    trained into its folder replaces that folder at every save)."""
    old = None
    lock = final_dir / LOCK_FILE
    if lock.exists():
        try:
            os.link(lock, tmp_dir / LOCK_FILE)
        except OSError:  # a filesystem without hard links: the folder is replaced unlocked
            pass
    if final_dir.exists():
        old = final_dir.with_name(f".{final_dir.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final_dir, old)
    os.replace(tmp_dir, final_dir)
    fsync_dir(final_dir.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(target: str | Path, merge: bool = False, last: str = "config.json") -> Iterator[Path]:
    """Write the folder ``target`` all at once: ``with atomic_dir(target) as tmp:`` write into ``tmp``,
    a fresh folder next to ``target`` (``.<name>.tmp*``, so a reader never mistakes it for the real
    one); when the block ends without an error it takes ``target``'s place (:func:`replace_dir`: a
    lock held on ``target`` stays held, the parent folder is fsynced). An error removes ``tmp`` and
    leaves ``target`` as it was.

    ``merge=True`` is for a folder that holds other things too (a run folder: metrics and
    checkpoints beside the exported model). Those are kept, and each entry written into ``tmp``
    replaces its namesake in ``target`` by its own atomic rename: folders first, then files, the
    file named ``last`` at the very end (the one that tells readers what the folder holds)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(target.parent, f".{target.name}.tmp")
    try:
        yield tmp
        if merge and target.is_dir():
            for entry in sorted(tmp.iterdir(), key=lambda e: (not e.is_dir(), e.name == last, e.name)):
                if entry.is_dir():
                    replace_dir(entry, target / entry.name)
                else:
                    os.replace(entry, target / entry.name)
            fsync_dir(target)
            tmp.rmdir()
        else:
            replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_json(path: str | Path) -> dict:
    """A JSON object from a file; invalid JSON or another top-level type is a ValueError naming it."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return obj


def read_jsonl(path: str | Path) -> Iterator[dict]:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: manifest not found")
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{n}: not UTF-8 (byte {e.start}: {e.reason})") from None
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{n}: expected a JSON object per line")
            yield row


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> int:
    lines = [json.dumps(r, ensure_ascii=False) for r in rows]
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode("utf-8") if lines else b"")
    return len(lines)


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None):
    from safetensors.torch import save

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write_bytes(path, save(tensors, metadata=metadata))


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file; a missing, truncated or corrupt file is a ``ValueError`` naming it."""
    from safetensors.torch import load

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: file not found")
    try:
        return load(path.read_bytes())
    except Exception as e:  # safetensors raises SafetensorError with a terse message
        raise ValueError(f"{path}: corrupt or truncated safetensors file ({e})") from None


class LockedError(RuntimeError):
    """Another process holds the lock on a folder this process wants to write."""


@contextlib.contextmanager
def exclusive(directory: str | Path, what: str):
    """Hold an exclusive lock on ``directory`` (``<directory>/.omni.lock``) while writing into it.

    A second process asking for the same folder is refused at once with :class:`LockedError`
    naming the holder's pid, instead of the two interleaving their files. The lock is an
    ``fcntl.flock`` on an open file, so the kernel drops it when the holder exits or is killed:
    a stale lock file from a crashed run never blocks the next one. ``what`` says what the folder
    is, for the message ("run", "speech corpus").
    """
    import fcntl

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lock = directory / LOCK_FILE
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "unknown"
            raise LockedError(f"{directory}: this {what} is being written by another process ({holder}); "
                              f"wait for it to finish or use another folder") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        yield directory
    finally:
        os.close(fd)  # releases the flock; the file stays (removing it would race a new holder)


LOCK_FILE = ".omni.lock"

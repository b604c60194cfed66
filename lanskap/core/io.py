"""Atomic outputs and small file helpers.

DVC records whatever a stage leaves behind, so a stage must never leave a half-written output: every
file and folder is written under a temporary name beside its target and renamed into place only when
complete (rename is atomic within one filesystem). A process killed mid-write (kill -9, power loss) leaves
its temporary name behind, never a partial output; temporary names carry the writer's pid, and the
next write of the same file or folder removes those whose process is gone. Outputs get the modes any other file
would (0666 or 0777 less the umask), not the owner-only modes of Python's temporary files.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import SafetensorError

from lanskap.core.errors import UserError

if TYPE_CHECKING:
    import pandas as pd

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
DISK_FAILED = (errno.EIO, errno.EROFS)  # the disk or its connection failed, or it was remounted read-only
# Writers that report a failed write without an OSError: safetensors quotes the OS error in its own error's text
# ("I/O error: No space left on device (os error 28)"; older: "Os { code: 28, ... }"); torch.save's zip writer
# only says that it could not write what it meant to ("[enforce fail at inline_container.cc] unexpected pos").
SAFETENSORS_ERRNO = re.compile(r"os error (\d+)|code: (\d+)")
TORCH_WRITE_FAILED = re.compile(r"inline_container\.cc|PytorchStreamWriter")


def process_exists(pid: int) -> bool:
    """Whether `pid` is a live process. A killed writer stays a zombie until its parent (or init, for an orphan)
    reaps it; a zombie writes nothing more, so it counts as gone (Linux: its state in /proc is Z)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except FileNotFoundError:  # reaped since the signal
        return False
    except (OSError, IndexError):  # no /proc here: trust the signal
        return True
    return state != "Z"


def umask() -> int:
    """The process's umask (reading it means setting it: it is put straight back)."""
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def with_umask_mode(path: Path, mode: int) -> Path:
    """`path` given `mode` less the umask, as open() and mkdir() would have created it (mkstemp and mkdtemp make
    owner-only files and folders, which a teammate sharing the outputs could not read)."""
    os.chmod(path, mode & ~umask())
    return path


def temporary_prefix(target: Path, kind: str) -> str:
    return f".{target.name}.{kind}-{os.getpid()}-"


def remove_stale_temporaries(target: Path) -> None:
    """Remove the staging files and folders and trash folders beside `target` left by writers that no longer run
    (killed mid-write)."""
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(tmp|old)-(\d+)-")
    for path in target.parent.glob(f".{glob.escape(target.name)}.*-*"):
        match = pattern.match(path.name)
        if match and int(match.group(2)) != os.getpid() and not process_exists(int(match.group(2))):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder; on success it replaces `target`, on error it is removed, and so is the
    parent folder if this call created it: a failed run leaves the tree as it found it."""
    target = Path(target)
    created_parent = not target.parent.exists()
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    staging = with_umask_mode(Path(tempfile.mkdtemp(prefix=temporary_prefix(target, "tmp"), dir=target.parent)), 0o777)
    try:
        with disk_full_as_user_error(target):
            yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created_parent and not any(target.parent.iterdir()):
            target.parent.rmdir()
        raise
    if target.exists():
        trash = move_aside(target)
        os.replace(staging, target)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(staging, target)


def move_aside(path: Path) -> Path:
    """Rename `path` into a fresh trash folder beside it (one atomic step) and return that folder, to delete."""
    trash = Path(tempfile.mkdtemp(prefix=temporary_prefix(path, "old"), dir=path.parent))
    os.replace(path, trash / path.name)
    return trash


def remove_dir(path: str | Path) -> None:
    """Delete a folder so that no reader ever finds it half-deleted: a kill during a plain rmtree leaves the folder
    under its own name with files missing; here it is renamed away first, then deleted."""
    path = Path(path)
    if path.exists():
        remove_stale_temporaries(path)
        shutil.rmtree(move_aside(path), ignore_errors=True)


@contextlib.contextmanager
def atomic_file(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `target`; on success it is renamed onto `target`."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    handle, staging = tempfile.mkstemp(prefix=temporary_prefix(target, "tmp"), suffix=target.suffix, dir=target.parent)
    os.close(handle)
    staging = with_umask_mode(Path(staging), 0o666)
    try:
        with disk_full_as_user_error(target):
            yield staging
        os.replace(staging, target)
    finally:
        staging.unlink(missing_ok=True)


def final_path(path: Path) -> Path:
    """The path a file written inside atomic_dir's staging folder will have: `.NAME.tmp-PID-x/a.csv` -> `NAME/a.csv`."""
    parts = [re.sub(r"^\.(.+)\.tmp-\d+-.*$", r"\1", part) for part in path.parts]
    return Path(*parts)


@contextlib.contextmanager
def disk_full_as_user_error(target: Path) -> Iterator[None]:
    """A disk that fills up or fails mid-write (after the stage's start-up check, or because another program wrote)
    is the user's to fix, not a bug: say which output and which folder's disk, and that the previous output is
    unchanged. Covers OSError and the writers that raise their own errors (safetensors, torch.save)."""
    try:
        yield
    except (OSError, SafetensorError, RuntimeError) as error:
        code = write_errno(error)
        if code is None:
            raise
        shown = final_path(target)
        what = f"disk full while writing {shown}" if code in DISK_FULL else f"could not write {shown}"
        fix = "free space on" if code in DISK_FULL else "check"
        raise UserError(
            f"{what} ({os.strerror(code) if code else short_reason(error)}): {fix} the disk holding "
            f"{shown.parent.resolve()} (`df -h {shown.parent}`) and rerun; the previous {shown} is "
            "unchanged and the partial one was removed"
        ) from None


def write_errno(error: BaseException) -> int | None:
    """The errno of a failed write, 0 for a failed write whose cause is unknown, None for any other error."""
    if isinstance(error, OSError):
        return error.errno if error.errno in DISK_FULL + DISK_FAILED else None
    if isinstance(error, SafetensorError):
        match = SAFETENSORS_ERRNO.search(str(error))
        code = int(match.group(1) or match.group(2)) if match else None
        return code if code in DISK_FULL + DISK_FAILED else None
    return 0 if TORCH_WRITE_FAILED.search(str(error)) else None


def short_reason(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error)[:120]}; a full or failing disk"


def write_json(path: str | Path, data: dict) -> None:
    with atomic_file(path) as staging:
        staging.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_text(path: str | Path, text: str) -> None:
    with atomic_file(path) as staging:
        staging.write_text(text)


def write_csv(path: str | Path, table: pd.DataFrame) -> None:
    with atomic_file(path) as staging:
        table.to_csv(staging, index=False, lineterminator="\n")


def canonicalise_safetensors(path: str | Path) -> None:
    """Rewrite a .safetensors file's JSON header with sorted keys and nothing else changed.

    The safetensors library writes the header (metadata included) in hash-map order, which differs from process to
    process, so identical tensors would give different bytes and DVC would see a changed output on every run."""
    path = Path(path)
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # the format pads the header with spaces to keep the tensor data 8-byte aligned
    with atomic_file(path) as staging:
        staging.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + length :])


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

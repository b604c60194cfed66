"""Resumable generation: the PNGs of every finished batch are kept outside DVC's outputs, as train_lora's checkpoints
are, in `.lanskap-cache/generate/<key>/`, so a killed generate continues where it stopped and ends with the bytes of
an uninterrupted run.

The key digests everything that decides an image's bytes: the base model's resolved revision, the LoRA files (for
the LoRA images), the generate params, the captions and seeds of all jobs, the code generate runs, the device type
and the torch and diffusers versions. A batch is reused only when all its images are there, each verified against
the sha256 written beside it after the image itself; otherwise the whole batch is drawn again, with the same
composition as in an uninterrupted run (a batch's images can depend on its other members in the last bits). The
stage removes its folder once its outputs are published, and the folders of other keys when it starts.
"""

import hashlib
import json
import os
import shutil
from pathlib import Path

from lanskap.core.io import remove_dir, sha256_file

GENERATE_CACHE_ROOT = Path(".lanskap-cache/generate")  # relative to the project root, outside DVC's outputs


def cache_key(parts: list, lora_dir: Path | None) -> str:
    """sha256 (16 hex digits) of JSON-able `parts` and, for LoRA images, the bytes of every file of `lora_dir`."""
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode())
    for path in sorted(Path(lora_dir).iterdir()) if lora_dir else []:
        if path.is_file():
            digest.update(path.name.encode() + b"\0" + sha256_file(path).encode())
    return digest.hexdigest()[:16]


def keep_only(keys: list[str], root: Path = GENERATE_CACHE_ROOT) -> None:
    """Remove the cached images of any other run: they would never be read, and a large run's take gigabytes."""
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        if folder.name not in keys:
            remove_dir(folder)


class ImageCache:
    """PNG bytes by file name in one key's folder, each beside its sha256; `get` returns None unless both are there
    and agree (a kill between the two writes, a damaged or truncated file)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def get(self, name: str) -> bytes | None:
        image, recorded = self.folder / name, self.folder / f"{name}.sha256"
        if not (image.is_file() and recorded.is_file()):
            return None
        data = image.read_bytes()
        return data if hashlib.sha256(data).hexdigest() == recorded.read_text() else None

    def discard(self) -> None:
        """Remove the folder, renamed away first (no reader finds it half-deleted); a no-op where another process
        sharing this disk renamed it first."""
        trash = self.folder.with_name(f".{self.folder.name}.old-{os.getpid()}-")
        try:
            os.replace(self.folder, trash)
        except FileNotFoundError:
            return
        shutil.rmtree(trash, ignore_errors=True)

    def has(self, name: str) -> bool:
        """Whether `name` was put, by this process or another (its sha256 is written last); not verified."""
        return (self.folder / f"{name}.sha256").is_file()

    def put(self, name: str, data: bytes) -> None:
        """The image, then its sha256, each written under a temporary name and renamed: a reader sees a complete
        file or none, and an image without its sha256 yet is not reused."""
        for file_name, content in ((name, data), (f"{name}.sha256", hashlib.sha256(data).hexdigest().encode())):
            temporary = self.folder / f".{file_name}.tmp-{os.getpid()}"
            temporary.write_bytes(content)
            os.replace(temporary, self.folder / file_name)

"""Image features computed once: each batch's CLIP and Inception outputs, kept outside DVC's outputs.

An entry holds one extractor's raw outputs (before CLIP's L2 normalisation, in the model's own dtype) for one
batch of images, keyed by the extractor's revision and the sha256 of every image in the batch, in order. The batch
is part of the key because a network's output for one image may differ in its last bits with the other images
beside it in the batch (convolution and matmul kernels block by batch shape): a hit gives the very bits a
recomputation would, so the metrics' bytes do not depend on what the cache held. Evaluate forms its batches from
the fixed order of each image set (lanskap.evaluate.extraction), so the same test set gives the same batches, and
the same entries, in every experiment.

An extractor's revision is its weights' digest, the code between the image file and the network (the decoder and
preprocessing in lanskap/evaluate/features.py, by syntax tree as lanskap/builtin/sources.py hashes it), the
versions of the packages that run it, the device kind and the CPU math mode: any change misses.

Location: .lanskap-cache/features/ under the project root (beside the training checkpoints), or the folder named by
LANSKAP_FEATURE_CACHE. Every entry can be deleted at any time (`rm -rf .lanskap-cache/features`); it is then
recomputed. Entries are written atomically (lanskap.core.io), so concurrent writers of one entry, which write the
same bytes, leave one whole file; a reader checks the key, the shape and the payload's sha256 before using an
entry, and treats a stale or damaged one as absent (it is then recomputed and replaced). A cache folder that cannot
be written (read-only, full) is warned about once and the evaluation goes on without it.
"""

from __future__ import annotations

import hashlib
import json
import os
from importlib.metadata import version
from pathlib import Path

import numpy as np

from lanskap.core.errors import UserError
from lanskap.core.io import atomic_file

FEATURE_CACHE_ROOT = Path(".lanskap-cache/features")  # relative to the project root, outside DVC's outputs
LOCATION_SWITCH = "LANSKAP_FEATURE_CACHE"
FORMAT = "lanskap-features-1"
DECODE = "lanskap/evaluate/extraction.py:decoded"
# The code from image file to features, per extractor (module-level members are followed transitively).
PREPROCESSING = {
    "clip": ["lanskap/evaluate/features.py:read_rgb,clip_pixels,ClipEmbedder", DECODE],
    "inception": ["lanskap/evaluate/features.py:read_rgb,inception_pixels,InceptionEmbedder", DECODE],
}
PACKAGES = {
    "clip": ["torch", "numpy", "pillow", "transformers"],
    "inception": ["torch", "numpy", "pillow", "clean-fid"],
}


def cache_root() -> Path:
    """Where entries live: LANSKAP_FEATURE_CACHE if set, else .lanskap-cache/features/ in the working directory."""
    return Path(os.environ.get(LOCATION_SWITCH) or FEATURE_CACHE_ROOT).expanduser()


def extractor_revision(kind: str, weights: str, device: str) -> str:
    """The identity of what turns an image file into `kind`'s ("clip" or "inception") features: sha256 hex."""
    from lanskap.builtin.sources import source_digest
    from lanskap.core.determinism import SWITCH

    parts = {
        "kind": kind,
        "weights": weights,
        "code": source_digest(PREPROCESSING[kind]),
        "packages": {name: version(name) for name in PACKAGES[kind]},
        "device": device.split(":")[0],  # cuda:0 and cuda:1 run the same kernels
        "cpu_math": os.environ.get(SWITCH, "pinned"),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


class FeatureCache:
    """Entries of one extractor revision under `root`/`kind`/; `read` and `write` take a batch's image sha256s."""

    def __init__(self, root: Path, kind: str, revision: str):
        self.folder = root / kind
        self.revision = revision
        self.write_failed = False  # warned once: a cache that cannot be written does not stop the evaluation

    def entry_path(self, images: list[str]) -> Path:
        key = hashlib.sha256(json.dumps([self.revision, images]).encode()).hexdigest()
        return self.folder / key[:2] / f"{key}.features"

    def read(self, images: list[str]) -> np.ndarray | None:
        """The batch's outputs [len(images), d], or None when absent, stale or damaged."""
        try:
            data = self.entry_path(images).read_bytes()
        except OSError:
            return None
        return verified(data, self.revision, images)

    def write(self, images: list[str], outputs: np.ndarray) -> None:
        """Store the batch's outputs, atomically: a reader sees the old entry, none, or this one whole."""
        outputs = np.ascontiguousarray(outputs)
        payload = outputs.tobytes()
        header = {
            "format": FORMAT,
            "revision": self.revision,
            "images": images,
            "shape": list(outputs.shape),
            "dtype": outputs.dtype.str,
            "sha256": hashlib.sha256(payload).hexdigest(),
        }
        try:
            with atomic_file(self.entry_path(images)) as staging:
                staging.write_bytes(json.dumps(header).encode() + b"\n" + payload)
        except (OSError, UserError) as error:  # a read-only or full cache folder: the features are still right
            if not self.write_failed:
                print(f"warning: feature cache {self.folder} not written ({error}); features are computed, not kept")
            self.write_failed = True


def verified(data: bytes, revision: str, images: list[str]) -> np.ndarray | None:
    """The array in an entry's bytes if its header names this revision and these images and its payload is whole
    and unchanged; None otherwise (a file name is only a hash: the header is what is checked)."""
    line, newline, payload = data.partition(b"\n")
    try:
        header = json.loads(line)
        expected = (FORMAT, revision, images, hashlib.sha256(payload).hexdigest())
        if not newline or (header["format"], header["revision"], header["images"], header["sha256"]) != expected:
            return None
        shape, dtype = tuple(header["shape"]), np.dtype(header["dtype"])
        if len(shape) != 2 or shape[0] != len(images) or len(payload) != shape[0] * shape[1] * dtype.itemsize:
            return None
        return np.frombuffer(payload, dtype=dtype).reshape(shape).copy()
    except (ValueError, KeyError, TypeError):  # not JSON, a field missing or of another type
        return None

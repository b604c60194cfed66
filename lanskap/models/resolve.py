"""Base models: resolve `model.base` to a local diffusers folder with safetensors weights.

`model.base` is one of
- `builtin:tiny-sd2`: a tiny model of the SD 2.x family (UNet with linear projection and cross-attention,
  VAE, CLIP text encoder with the real CLIP BPE tokenizer, v-prediction scheduler), pretrained by
  `lanskap.builtin` on the procedural base world and shipped in the package as a `save_pretrained`
  folder, loaded through the same `from_pretrained` path as a hub model. Its revision is the digest of
  its weights.
- a local diffusers folder (with `model_index.json`);
- a Hugging Face hub id with `model.revision`: taken from the local HF cache, downloaded only if the
  machine can reach the hub, otherwise a clear error says what is missing and how to get it.
"""

import hashlib
import os
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from lanskap.builtin import builtin_folder
from lanskap.core.errors import UserError
from lanskap.models.folders import check_model_folder

BUILTIN_TINY_SD2 = "builtin:tiny-sd2"
# Files a diffusers StableDiffusionPipeline folder needs; other weight formats in a hub repo are skipped.
PIPELINE_FILES = ["model_index.json", "*/config.json", "*/*.safetensors", "scheduler/*", "tokenizer/*"]
PIPELINE_WEIGHT_FOLDERS = ("unet", "vae", "text_encoder")  # the parts generate and train_lora load weights for
# Weight files that are Python pickles: opening one can run any code its author put in it.
PICKLE_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def clip_tokenizer_dir() -> Path:
    """The CLIP BPE vocabulary shipped with the package: tokenises exactly as SD 2.1's tokenizer."""
    return Path(str(resources.files("lanskap") / "assets" / "clip_tokenizer"))


def weights_digest(folder: Path) -> str:
    """sha256 (first 16 hex digits) of a model folder's weights and configs: the revision of a built-in model."""
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.suffix in (".safetensors", ".json", ".txt"):
            digest.update(path.relative_to(folder).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def require_safetensors(folder: Path, key: str) -> None:
    """Refuse a model folder without .safetensors weights, before a loader falls back to unpickling a
    .bin (transformers and diffusers do, unless given `use_safetensors=True`)."""
    if any(folder.glob("*.safetensors")):
        return
    pickles = sorted(path.name for path in folder.glob("*") if path.suffix in PICKLE_WEIGHT_SUFFIXES)
    found = f"only pickle weights ({', '.join(pickles)}), which are never loaded" if pickles else "no weights"
    raise UserError(
        f"{key}: {folder} has {found}; only .safetensors weights are read, because a pickle can run code when "
        "it is opened. Pin a revision that has .safetensors files, or convert once on a machine you trust: "
        "load the model with from_pretrained and save it with save_pretrained(folder, safe_serialization=True)."
    )


@dataclass(frozen=True)
class ResolvedModel:
    path: Path  # a local folder that from_pretrained reads
    spec: str  # what the user asked for (model.base)
    revision: str | None  # the commit actually used, for hub models


def resolve_base_model(base: str, revision: str | None) -> ResolvedModel:
    """Turn `model.base` into a local diffusers folder with safetensors weights, or fail saying what is
    missing and how to get it."""
    if base.startswith("builtin:"):
        if base != BUILTIN_TINY_SD2:
            raise UserError(f"model.base: unknown built-in {base!r}; the built-in model is {BUILTIN_TINY_SD2!r}")
        folder = builtin_folder(base, "model.base")
        return ResolvedModel(folder, base, weights_digest(folder))
    check_model_folder(base, "model.base")
    local = Path(base).expanduser()
    if local.exists():
        if not (local / "model_index.json").is_file():
            raise UserError(f"model.base: {local} is not a diffusers pipeline folder (no model_index.json)")
        resolved = ResolvedModel(local, base, None)
    else:
        resolved = ResolvedModel(*fetch_hub_snapshot(base, revision, PIPELINE_FILES, "model.base", "model.revision"))
    for part in PIPELINE_WEIGHT_FOLDERS:
        require_safetensors(resolved.path / part, "model.base")
    return resolved


def download_command(repo_id: str, revision: str, patterns: list[str]) -> str:
    """The `hf download` command that fetches exactly the files read (a whole SD repo also holds .ckpt, .bin and
    fp16 copies, several times the size)."""
    includes = " ".join(f"--include '{pattern}'" for pattern in patterns)
    return f"hf download {repo_id} --revision {revision} {includes}"


def is_commit(revision: str) -> bool:
    return len(revision) == 40 and all(char in "0123456789abcdef" for char in revision)


def warn_unpinned(revision: str, commit: str, key: str, revision_key: str) -> None:
    """A branch or tag moves: the next run may read other weights with the same params. Say which commit ran."""
    if not is_commit(revision):
        print(
            f"WARNING: {revision_key}={revision!r} for {key} is a branch or tag, not a commit: this run uses commit "
            f"{commit}, and a later run may silently get other weights. Pin it: set {revision_key}: {commit}",
            file=sys.stderr,
        )


def fetch_hub_snapshot(repo_id: str, revision: str | None, patterns: list[str], key: str, revision_key: str):
    """Local snapshot of a hub repo at `revision`: from the HF cache, else downloaded, else a UserError."""
    from huggingface_hub import snapshot_download

    if revision is None:
        raise UserError(
            f"{key}: hub model {repo_id!r} needs a pinned revision (a commit hash); set {revision_key} in params.yaml"
        )
    try:
        path = snapshot_download(repo_id, revision=revision, allow_patterns=patterns, local_files_only=True)
    except Exception:
        try:
            path = snapshot_download(repo_id, revision=revision, allow_patterns=patterns)
        except Exception as error:
            raise UserError(
                f"{key}: {repo_id!r} at revision {revision!r} is not in the Hugging Face cache "
                f"({os.environ.get('HF_HOME', '~/.cache/huggingface')}) and could not be downloaded "
                f"({type(error).__name__}). On a machine with network run: "
                f"`{download_command(repo_id, revision, patterns)}` (then copy the cache here), or set "
                f"{key} to a local folder saved with save_pretrained."
            ) from None
    warn_unpinned(revision, Path(path).name, key, revision_key)
    return Path(path), repo_id, Path(path).name

"""Say what is wrong with a model given as a local folder, before a loader reports something else.

A `model.base` (or `caption.model`, `evaluate.clip_model`) that names a folder which does not exist would otherwise
be taken for a hub id ("needs a pinned revision"), and a damaged `config.json` surfaces as "unet has no weights" or
a JSON traceback deep in a loader. Called first by the resolvers of model specs, which ingest's preflight runs
before any work.

A `model_index.json` names the class of each component, and diffusers imports and calls what it names: each must be a
known [library, class] pair, a model, scheduler, tokenizer or processor class of diffusers or transformers (or of a
diffusers pipeline module, as `["stable_diffusion", "StableDiffusionSafetyChecker"]`), never `["os", "system"]`.
"""

import importlib
import importlib.util
import json
import os
import re
from pathlib import Path

from lanskap.core.errors import UserError

# The base classes a component's class must derive from, per library.
COMPONENT_BASES = {
    "diffusers": ("ModelMixin", "SchedulerMixin", "DiffusionPipeline"),
    "transformers": (
        "PreTrainedModel",
        "PreTrainedTokenizerBase",
        "ProcessorMixin",
        "ImageProcessingMixin",
        "FeatureExtractionMixin",
    ),
}


def check_model_folder(spec: str, key: str) -> None:
    """UserError naming the real problem when `spec` is meant as a local folder and is missing or damaged; nothing
    for a healthy folder, a built-in or a hub id."""
    if spec.startswith("builtin:"):
        return
    path = Path(spec).expanduser()
    if path.is_dir():
        check_json_files(path, key)
        check_components(path, key)
    elif not path.exists() and looks_like_a_path(spec):
        raise UserError(
            f"{key}: the folder {spec} does not exist (looked in {Path.cwd()}); give a local folder saved "
            "with save_pretrained, a hub id such as org/name with its revision pinned, or a built-in "
            "(builtin:...)"
        )


def looks_like_a_path(spec: str) -> bool:
    """A hub id is `name` or `org/name`; anything with more parts, a leading `.`, `/` or `~`, a backslash, or whose
    first part is an existing folder here (`models/sd21`) is a path."""
    parts = spec.replace("\\", "/").split("/")
    return (
        spec.startswith((".", "/", "~"))
        or "\\" in spec
        or len(parts) > 2
        or spec.endswith("/")
        or (len(parts) == 2 and Path(parts[0]).is_dir())
    )


def check_json_files(folder: Path, key: str) -> None:
    """Every JSON file of the model (top level and one folder down: configs, model_index, tokenizer) must parse."""
    for path in sorted([*folder.glob("*.json"), *folder.glob("*/*.json")]):
        try:
            content = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as error:
            raise UserError(
                f"{key}: {path} is not valid JSON ({error}); the model folder is damaged: copy or download it again"
            ) from None
        if not isinstance(content, dict):
            raise UserError(
                f"{key}: {path} holds a JSON {type(content).__name__}, not an object; the model folder is "
                "damaged: copy or download it again"
            )


def check_components(folder: Path, key: str) -> None:
    """Each component a diffusers `model_index.json` lists ([library, class]) needs its folder; a model component
    (one with weights) also needs its config.json."""
    index = folder / "model_index.json"
    if not index.is_file():
        return
    for name, value in json.loads(index.read_text(encoding="utf-8")).items():
        if name.startswith("_") or not isinstance(value, list) or value == [None, None]:
            continue
        if not known_component(value):
            raise UserError(
                f"{key}: {index} names the component {name!r} as {json.dumps(value)}, which is no known "
                "[library, class] pair (a model, scheduler, tokenizer or processor class of diffusers or "
                "transformers); the folder is damaged or not a diffusers model: copy or download it again"
            )
        part = folder / name
        if not part.is_dir():
            raise UserError(
                f"{key}: {part} is missing, yet {index.name} lists the component {name!r}; the model "
                "folder is incomplete: copy or download it again"
            )
        has_weights = any(file.endswith((".safetensors", ".bin")) for file in os.listdir(part))
        if has_weights and not (part / "config.json").is_file():
            raise UserError(
                f"{key}: {part}/config.json is missing; the model folder is incomplete: copy or download it again"
            )


def known_component(value: list) -> bool:
    """[library, class] names a component class of diffusers or transformers (or a diffusers pipeline module's)."""
    if len(value) != 2 or not all(
        isinstance(part, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", part) for part in value
    ):
        return False
    library, name = value
    if library in COMPONENT_BASES:
        module_name, bases = library, COMPONENT_BASES[library]
    elif importlib.util.find_spec(f"diffusers.pipelines.{library}") is not None:
        module_name, bases = f"diffusers.pipelines.{library}", ("ModelMixin", "PreTrainedModel")
    else:
        return False
    try:
        component = getattr(importlib.import_module(module_name), name, None)
        base_classes = tuple(
            getattr(importlib.import_module(lib), base)
            for lib in COMPONENT_BASES
            for base in bases
            if base in COMPONENT_BASES[lib]
        )
    except (ImportError, RuntimeError, AttributeError):  # a class behind an optional backend not installed
        return False
    return isinstance(component, type) and issubclass(component, base_classes)

"""The project code and package data a stage runs: its import closure inside this project.

`import_closure("stages.train_lora")` follows every `import` of a project module (`lanskap.*`, `stages.*`) from
the stage's file, lazy imports inside functions included, and returns the files that run. `ASSET_FOLDERS` names
the package data each module reads. tests/test_dvc_deps.py checks dvc.yaml's `deps:` against both, and train_lora
keys its checkpoints by `code_digest`, so neither a stage's outputs nor a resumed run go stale when code changes.
"""

import ast
import hashlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the project root: the copy this code runs from (an experiment's own)
PACKAGES = ("lanskap", "stages")

# Data files under lanskap/assets each module reads (through importlib.resources). A module that mentions
# `assets` must be listed: the test refuses one that is not, so new package data cannot go undeclared.
ASSET_FOLDERS = {
    "lanskap.models.resolve": ("lanskap/assets/clip_tokenizer",),  # clip_tokenizer_dir(): the CLIP BPE vocabulary
    "lanskap.builtin": ("lanskap/assets/builtin",),  # builtin_folder(): the shipped built-in models' weights
}


def module_file(name: str) -> Path | None:
    """The file of project module `name` (a module or a package's __init__.py), None if it is not one."""
    base = ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_names(path: Path, package: str) -> set[str]:
    """Every module name `path` imports, anywhere in it; `from a import b` gives `a` and `a.b` (b may be a module)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            parent = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join(parent + ([node.module] if node.module else []))
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def import_closure(module: str) -> dict[str, Path]:
    """Project modules that running `python -m module` imports, with their files (parent packages included)."""
    found: dict[str, Path] = {}
    pending = [module]
    while pending:
        name = pending.pop()
        path = module_file(name)
        if name in found or path is None:
            continue
        found[name] = path
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        parts = name.split(".")
        pending += [".".join(parts[:end]) for end in range(1, len(parts))]
        pending += [imported for imported in imported_names(path, package) if imported.split(".")[0] in PACKAGES]
    return found


def closure_files(module: str) -> list[Path]:
    """The source files and asset files (relative to the project root) that `module`'s run reads."""
    closure = import_closure(module)
    files = {path.relative_to(ROOT) for path in closure.values()}
    for name in closure:
        for folder in ASSET_FOLDERS.get(name, ()):
            files.update(path.relative_to(ROOT) for path in (ROOT / folder).rglob("*") if path.is_file())
    return sorted(files)


def code_digest(module: str) -> str:
    """sha256 of the names and bytes of every file in `module`'s closure: changes whenever the code run changes."""
    digest = hashlib.sha256()
    for path in closure_files(module):
        digest.update(path.as_posix().encode() + b"\0" + (ROOT / path).read_bytes() + b"\0")
    return digest.hexdigest()

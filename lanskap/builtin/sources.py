"""The sources that decide each built-in model's weights, and their digest, which each model's card records.

The digest hashes what the code does, not how it is written: each Python source is parsed, docstrings dropped,
and its syntax tree hashed with its path, so `ruff format`, comments and docstrings leave it unchanged while any
change to the code changes it. Package data (the CLIP vocabulary) is hashed byte for byte. A module outside
lanskap/builtin is hashed only for the members the builder uses (`path:name,name`), with the module-level
definitions they refer to, so that unrelated edits there (the FID code, the LoRA trainer) do not stale the
weights. tests/test_builtin.py fails when a shipped card's digest differs from today's, and refuses a builder
import that no model lists here and `NOT_WEIGHTS` does not excuse.
"""

import ast
import hashlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# What draws the images every model learns from (also the key of the drawn images kept between builds).
DATA_SOURCES = ["lanskap/builtin/worlds.py", "lanskap/data/procedural.py", "lanskap/data/augment.py:canonical_image"]
# What every model's build runs: the command line, the data, the training loop and the pinned CPU math.
SHARED = [
    "lanskap/builtin/__main__.py",
    "lanskap/builtin/build.py",
    "lanskap/builtin/config.py",
    "lanskap/builtin/training.py",
    "lanskap/core/determinism.py:pin_cpu_math",
    *DATA_SOURCES,
]
CLIP_VOCABULARY = ["lanskap/models/resolve.py:clip_tokenizer_dir", "lanskap/assets/clip_tokenizer"]
MODEL_SOURCES = {
    "tiny-sd2": [
        *SHARED,
        "lanskap/builtin/vae.py",
        "lanskap/builtin/diffusion.py",
        "lanskap/train/step.py:tokenize",
        *CLIP_VOCABULARY,
    ],
    "tiny-clip": [
        *SHARED,
        "lanskap/builtin/clip.py",
        "lanskap/evaluate/features.py:CLIP_CONTEXT_LENGTH,clip_pixels",
        *CLIP_VOCABULARY,
    ],
    "tiny-inception": [
        *SHARED,
        "lanskap/builtin/inception.py",
        "lanskap/builtin/heads.py",
        "lanskap/evaluate/features.py:TinyInception,inception_pixels",
    ],
}
# What the builder imports that decides no weight: where builtins live, the cards and their scores and sample
# grids, progress bars, atomic writes, errors, and the code that loads saved weights back to check them.
NOT_WEIGHTS = [
    "lanskap/builtin/__init__.py",
    "lanskap/builtin/card.py",
    "lanskap/builtin/samples.py",
    "lanskap/builtin/sources.py",
    "lanskap/core/console.py:progress",
    "lanskap/core/errors.py:UserError",
    "lanskap/core/figures.py:image_grid,save_loss_curves,save_png",
    "lanskap/core/io.py:atomic_dir",
    "lanskap/core/params.py:GenerateParams",
    "lanskap/evaluate/features.py:ClipEmbedder,InceptionEmbedder,load_tiny_inception",
    "lanskap/evaluate/metrics.py:frechet_distance",
    "lanskap/generate/sampling.py:load_pipeline,sample",
]


def code_of(tree) -> str:
    """The tree without positions, docstrings or empty fields, each run of imports as its sorted bindings: the same
    for any layout of the same code (ruff's format and import sorting), and across Python versions that only add
    optional fields."""
    if isinstance(tree, ast.AST):
        fields = [(name, value) for name, value in ast.iter_fields(tree) if value is not None and value != []]
        return f"{type(tree).__name__}({', '.join(f'{name}={code_of(value)}' for name, value in fields)})"
    if isinstance(tree, list):
        body = tree[1:] if tree and is_docstring(tree[0]) else tree
        return f"[{', '.join(code_of(item) if isinstance(item, ast.AST) else item for item in imports_sorted(body))}]"
    return repr(tree)


def imports_sorted(body: list) -> list:
    """Each run of consecutive import statements replaced by its sorted bindings (an import moved past other code
    still changes the code: `pin_cpu_math()` must run before torch is imported)."""
    out, run = [], []
    for item in [*body, None]:
        if isinstance(item, ast.Import | ast.ImportFrom):
            run += bindings(item)
            continue
        if run:
            out.append(f"Imports({sorted(run)})")
            run = []
        if item is not None:
            out.append(item)
    return out


def bindings(statement: ast.Import | ast.ImportFrom) -> list[str]:
    source = f"from {'.' * statement.level}{statement.module or ''} " if isinstance(statement, ast.ImportFrom) else ""
    return [f"{source}import {alias.name} as {alias.asname or alias.name}" for alias in statement.names]


def is_docstring(statement) -> bool:
    return (
        isinstance(statement, ast.Expr)
        and isinstance(statement.value, ast.Constant)
        and isinstance(statement.value.value, str)
    )


def defined_names(statement: ast.stmt) -> set[str]:
    """The module-level names a top-level statement binds."""
    if isinstance(statement, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
        return {statement.name}
    if isinstance(statement, ast.Import | ast.ImportFrom):
        return {bound_name(alias) for alias in statement.names}
    if isinstance(statement, ast.Assign | ast.AnnAssign | ast.AugAssign):
        targets = statement.targets if isinstance(statement, ast.Assign) else [statement.target]
        return {node.id for target in targets for node in ast.walk(target) if isinstance(node, ast.Name)}
    return set()


def bound_name(alias: ast.alias) -> str:
    return alias.asname or alias.name.split(".")[0]


def members(module: ast.Module, names: list[str], where: str) -> list[ast.stmt]:
    """The top-level statements defining `names` and, transitively, every module-level name they refer to (of an
    import statement, only the names wanted)."""
    wanted, pending = set(), list(names)
    while pending:
        name = pending.pop()
        if name in wanted:
            continue
        wanted.add(name)
        defining = [statement for statement in module.body if name in defined_names(statement)]
        if not defining and name in names:
            raise KeyError(f"{where}: no module-level definition of {name!r}; update lanskap/builtin/sources.py")
        for statement in defining:
            pending += [node.id for node in ast.walk(statement) if isinstance(node, ast.Name)]
    chosen = []
    for statement in module.body:
        if isinstance(statement, ast.Import | ast.ImportFrom):
            aliases = [alias for alias in statement.names if bound_name(alias) in wanted]
            if aliases:
                chosen.append(type(statement)(**{**dict(ast.iter_fields(statement)), "names": aliases}))
        elif defined_names(statement) & wanted:
            chosen.append(statement)
    return chosen


def source_code(source: str, root: Path) -> list[tuple[str, bytes]]:
    """(path, what is hashed) for one entry of MODEL_SOURCES: a file, `file:member,member`, or a data folder."""
    path_text, _, names = source.partition(":")
    path = root / path_text
    if path.is_dir():
        files = sorted(file for file in path.rglob("*") if file.is_file())
        return [(file.relative_to(root).as_posix(), file.read_bytes()) for file in files]
    module = ast.parse(path.read_text(), filename=str(path))
    body = members(module, names.split(","), source) if names else module.body
    return [(source, code_of(body).encode())]


def source_digest(sources: list[str], root: Path = ROOT) -> str:
    digest = hashlib.sha256()
    for source in sources:
        for name, code in source_code(source, root):
            digest.update(name.encode() + b"\0" + code + b"\0")
    return digest.hexdigest()


def model_digest(model: str) -> str:
    """The digest of what decides `model`'s weights (a key of MODEL_SOURCES), as its card records it."""
    return source_digest(MODEL_SOURCES[model])


def source_files(model: str) -> list[str]:
    """The files behind `model`'s sources, for `git status`."""
    return sorted({source.partition(":")[0] for source in MODEL_SOURCES[model]})


def undeclared_imports() -> list[str]:
    """Builder modules, and project names they import, that neither MODEL_SOURCES nor NOT_WEIGHTS lists: a change
    to one of them would change weights without changing any digest, or is not known not to."""
    listed = [*NOT_WEIGHTS, *(source for model in MODEL_SOURCES.values() for source in model)]
    whole = {source for source in listed if ":" not in source}
    named = {
        (path, name) for path, _, names in (source.partition(":") for source in listed) for name in names.split(",")
    }
    undeclared = []
    for file in sorted((ROOT / "lanskap/builtin").glob("*.py")):
        if file.relative_to(ROOT).as_posix() not in whole:
            undeclared.append(file.relative_to(ROOT).as_posix())
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lanskap."):
                path = module_path(node.module)
                if path not in whole:
                    undeclared += [f"{path}:{alias.name}" for alias in node.names if (path, alias.name) not in named]
    return sorted(set(undeclared))


def module_path(module: str) -> str:
    base = module.replace(".", "/")
    return f"{base}.py" if (ROOT / f"{base}.py").is_file() else f"{base}/__init__.py"

"""dvc.yaml declares every file a stage runs: the project modules it imports (lazily too) and the package data they
read, so a change to any of them reruns the stage instead of leaving its results silently stale."""

import ast

import pytest
import yaml

from lanskap.core import code_closure
from lanskap.core.code_closure import ASSET_FOLDERS, ROOT, import_closure

PIPELINE = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
PROJECT_CODE = ("lanskap/", "stages/")


def declared_paths(stage: str) -> list[str]:
    """The stage's deps that are paths in the project (not `${data}/...` pipeline data)."""
    return [dep for dep in PIPELINE[stage]["deps"] if "${" not in dep]


def covered(path: str, deps: list[str]) -> bool:
    """A dep names the file itself or a folder holding it."""
    return any(path == dep or path.startswith(dep.rstrip("/") + "/") for dep in deps)


def needed_paths(stage: str) -> list[str]:
    """Source files of the stage's import closure (an empty package marker runs nothing) and its asset folders."""
    closure = import_closure(f"stages.{stage}")
    files = [
        path.relative_to(ROOT).as_posix()
        for path in closure.values()
        if not (path.name == "__init__.py" and not path.read_text().strip())
    ]
    folders = [folder for name in closure for folder in ASSET_FOLDERS.get(name, ())]
    return sorted(files + folders)


def test_the_stages_are_the_stage_modules():
    assert sorted(PIPELINE) == sorted(path.stem for path in (ROOT / "stages").glob("*.py") if path.stem != "__init__")


@pytest.mark.parametrize("stage", sorted(PIPELINE))
def test_every_imported_module_and_asset_is_a_dep(stage):
    missing = [path for path in needed_paths(stage) if not covered(path, declared_paths(stage))]
    assert not missing, (
        f"dvc.yaml stage {stage!r} runs {', '.join(missing)} but does not list "
        f"{'it' if len(missing) == 1 else 'them'} in its deps: add to its `deps:`"
    )


@pytest.mark.parametrize("stage", sorted(PIPELINE))
def test_no_code_dep_the_stage_does_not_run(stage):
    """Precise deps: a module the stage never imports would only rerun it for nothing."""
    needed = needed_paths(stage)
    extra = [
        dep
        for dep in declared_paths(stage)
        if dep.startswith(PROJECT_CODE) and not any(covered(path, [dep]) for path in needed)
    ]
    assert not extra, f"dvc.yaml stage {stage!r} lists {', '.join(extra)} in its deps, but never imports them"


def reads_package_data(path) -> bool:
    """The module builds a path into lanskap/assets (`resources.files("lanskap") / "assets"`, or `lanskap.assets`)."""
    return any(
        isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and (node.value == "assets" or node.value.startswith("lanskap.assets"))
        for node in ast.walk(ast.parse(path.read_text()))
    )


def test_every_module_that_reads_package_data_names_its_folders():
    """Importing a package's submodule imports the package, so a listed package covers its submodules."""
    readers = [
        ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for path in sorted((ROOT / "lanskap").rglob("*.py"))
        if reads_package_data(path)
    ]
    assert readers, "no module reads lanskap/assets: the check has lost track of how they do"
    unmapped = [
        name for name in readers if not any(name == listed or name.startswith(listed + ".") for listed in ASSET_FOLDERS)
    ]
    assert not unmapped, f"{unmapped} read lanskap/assets: add the folders they read to code_closure.ASSET_FOLDERS"
    for folders in ASSET_FOLDERS.values():
        assert all((ROOT / folder).is_dir() for folder in folders), folders


def test_closure_follows_lazy_imports_and_stays_inside_the_stage():
    evaluate = import_closure("stages.evaluate")
    assert {"lanskap.evaluate.comparisons", "lanskap.evaluate.report", "lanskap.evaluate.metrics"} <= set(
        evaluate
    )  # evaluation: lazy
    ingest = import_closure("stages.ingest")
    assert "lanskap.evaluate.report" not in ingest and "lanskap.train" not in ingest  # negative controls


def make_project(root):
    """A miniature project: stage `s` imports lanskap.used lazily (relatively, from a package); lanskap.unused is
    imported by nothing."""
    (root / "stages").mkdir(parents=True)
    (root / "lanskap" / "sub").mkdir(parents=True)
    for package in ("stages", "lanskap", "lanskap/sub"):
        (root / package / "__init__.py").write_text("")
    (root / "stages" / "s.py").write_text("def main():\n    from lanskap.sub import helper\n")
    (root / "lanskap" / "sub" / "helper.py").write_text("from ..used import f\n")
    (root / "lanskap" / "used.py").write_text("def f():\n    return 1\n")
    (root / "lanskap" / "unused.py").write_text("def g():\n    return 2\n")


def test_code_digest_changes_with_the_code_run_and_only_with_it(tmp_path, monkeypatch):
    make_project(tmp_path)
    monkeypatch.setattr(code_closure, "ROOT", tmp_path)
    assert set(import_closure("stages.s")) == {
        "stages",
        "stages.s",
        "lanskap",
        "lanskap.sub",
        "lanskap.sub.helper",
        "lanskap.used",
    }
    before = code_closure.code_digest("stages.s")
    (tmp_path / "lanskap" / "unused.py").write_text("def g():\n    return 3\n")
    assert code_closure.code_digest("stages.s") == before
    (tmp_path / "lanskap" / "used.py").write_text("def f():\n    return 2\n")
    assert code_closure.code_digest("stages.s") != before


def test_code_digest_covers_the_package_data_a_module_reads(tmp_path, monkeypatch):
    make_project(tmp_path)
    (tmp_path / "lanskap" / "assets" / "vocab").mkdir(parents=True)
    (tmp_path / "lanskap" / "assets" / "vocab" / "words.txt").write_text("a b")
    monkeypatch.setattr(code_closure, "ROOT", tmp_path)
    monkeypatch.setattr(code_closure, "ASSET_FOLDERS", {"lanskap.used": ("lanskap/assets/vocab",)})
    before = code_closure.code_digest("stages.s")
    (tmp_path / "lanskap" / "assets" / "vocab" / "words.txt").write_text("a b c")
    assert code_closure.code_digest("stages.s") != before

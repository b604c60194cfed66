"""Reading `dvc exp show --json` (run here, or a copy saved with --from-json) and checking its shape.

The sweep reads only these fields; a file of another shape (hand-edited, another tool's JSON, another DVC version)
stops with the first thing wrong, named by its place in the file (`[1].experiments[0].revs`), not a traceback:

    [ {"experiments": null | [ {"name": str?, "executor": null | {"state": str},
                                "revs": [ {"rev": str, "name": str?, "data": null | {
                                    "params": null | {FILE: {"data": null | {...}}},
                                    "metrics": null | {FILE: {"data": null | {...}}}}}, ...]}, ...]}, ...]
"""

import json
import subprocess
import sys
from pathlib import Path

from lanskap.core.errors import UserError

KINDS = {list: "a list", dict: "an object", str: "a string", int: "a number", float: "a number", bool: "true or false"}


def read_exp_show(saved: str | None) -> list:
    """`dvc exp show --json` of the current project, or a saved copy of it, checked for the fields the sweep reads."""
    if saved:
        try:
            shown = json.loads(Path(saved).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise UserError(f"--from-json {saved}: cannot read it as `dvc exp show --json` output ({error})") from None
    else:
        run = subprocess.run([sys.executable, "-m", "dvc", "exp", "show", "--json"], capture_output=True, text=True)
        if run.returncode != 0:
            raise UserError(f"`dvc exp show --json` failed (run this in the project root):\n{run.stderr.strip()}")
        shown = json.loads(run.stdout)
    check_shape(shown, f"--from-json {saved}" if saved else "`dvc exp show --json`")
    return shown


def expect(value, kind: type, where: str, source: str, optional: bool = False):
    """`value` when it is of `kind` (or None, when optional); a UserError naming `where` otherwise."""
    if isinstance(value, kind) or (optional and value is None):
        return value
    found = KINDS.get(type(value), "null" if value is None else f"a {type(value).__name__}")
    raise UserError(
        f"{source}: {where or 'the top level'} is {found}, expected {KINDS[kind]}"
        f"{' or null' if optional else ''}: this is not `dvc exp show --json` output (save it with "
        "`dvc exp show --json > FILE`)"
    )


def check_shape(shown, source: str) -> None:
    for index, baseline in enumerate(expect(shown, list, "", source)):
        where = f"[{index}]"
        experiments = expect(
            expect(baseline, dict, where, source).get("experiments"),
            list,
            f"{where}.experiments",
            source,
            optional=True,
        )
        for number, experiment in enumerate(experiments or []):
            check_experiment(experiment, f"{where}.experiments[{number}]", source)


def check_experiment(experiment, where: str, source: str) -> None:
    expect(experiment, dict, where, source)
    expect(experiment.get("name"), str, f"{where}.name", source, optional=True)
    executor = expect(experiment.get("executor"), dict, f"{where}.executor", source, optional=True)
    expect((executor or {}).get("state", ""), str, f"{where}.executor.state", source)
    revs = expect(experiment.get("revs"), list, f"{where}.revs", source)
    if not revs:
        raise UserError(
            f"{source}: {where}.revs is empty, expected the experiment's commit: this is not "
            "`dvc exp show --json` output"
        )
    head = expect(revs[0], dict, f"{where}.revs[0]", source)
    expect(head.get("rev"), str, f"{where}.revs[0].rev", source)
    expect(head.get("name"), str, f"{where}.revs[0].name", source, optional=True)
    data = expect(head.get("data"), dict, f"{where}.revs[0].data", source, optional=True) or {}
    for part in ("params", "metrics"):
        for file, content in (expect(data.get(part), dict, f"{where}.revs[0].data.{part}", source, True) or {}).items():
            place = f"{where}.revs[0].data.{part}[{json.dumps(file)}]"
            expect(expect(content, dict, place, source).get("data"), dict, f"{place}.data", source, optional=True)

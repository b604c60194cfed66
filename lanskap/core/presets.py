"""Compose params.yaml from conf/ exactly as `dvc exp run -S ...` does (DVC's own Hydra composition).

    python -m lanskap.core.presets                      # demo preset -> params.yaml
    python -m lanskap.core.presets preset=paper lora.rank=16

The composed params are validated before they replace params.yaml. A misspelt key, group or preset, or a bad
value, is one line naming it (a misspelt key with the valid key nearest it), and params.yaml is removed: left in
place, the next stage would silently run with the previous params. `--help` prints this and changes nothing.
"""

import argparse
import re
from pathlib import Path

from lanskap.core.errors import UserError, run_stage
from lanskap.core.params import GROUPS, PARAMS_FILE, known_keys, unknown_key_message, validate_group


def compose_params(overrides: list[str], out: str | Path = PARAMS_FILE, conf_dir: str | Path = "conf") -> None:
    """Write the composed, validated params to `out`; on a bad override raise UserError, with `out` removed."""
    import yaml
    from dvc.utils.hydra import compose_and_dump
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from lanskap.core.io import atomic_file

    out = Path(out)
    try:
        with atomic_file(out) as staging:
            try:
                compose_and_dump(staging, str(Path(conf_dir).resolve()), None, "config", "", overrides)
            except (HydraException, OmegaConfBaseException) as error:
                reason = "; ".join(misspelt_keys(overrides)) or first_line(error)
                raise UserError(f"cannot compose {out} from {conf_dir}/ with {overrides}: {reason}") from None
            check_groups(yaml.safe_load(staging.read_text()) or {}, out)
    except UserError as error:
        out.unlink(missing_ok=True)
        raise UserError(
            f"{error}. {out} was removed so that no stage runs with the previous params: fix the "
            "override (keys in conf/config.yaml, presets in conf/preset/) and compose again"
        ) from None


def check_groups(document: dict, out: Path) -> None:
    """Each group validated (a wrong type or value names its key), and no group the stages do not know."""
    unknown = sorted(set(document) - set(GROUPS) - {"preset"})  # `preset` records which preset was chosen
    if unknown:
        keys = [f"{name}.{key}" for name in unknown for key in (document[name] or {})]
        raise UserError(
            f"{out}: unknown params group(s) {unknown}; the groups are {sorted(GROUPS)}"
            + "".join(f"; {unknown_key_message(key)}" for key in keys)
        )
    for name in GROUPS:
        try:
            validate_group(name, document.get(name) or {}, str(out))
        except UserError as error:  # one line: "invalid params in params.yaml: lora.rank: ..."
            raise UserError(str(error).replace(":\n  ", ": ").replace("\n  ", "; ")) from None


def misspelt_keys(overrides: list[str]) -> list[str]:
    """For each override whose key params.yaml cannot hold: `lora.rnk is not a key: did you mean lora.rank?`.
    Hydra's own message would advise `+lora.rnk=...`, which composes the typo, and never names lora.rank."""
    keys = [re.sub(r"^[~+]+", "", override).partition("=")[0].strip() for override in overrides]
    return [unknown_key_message(key) for key in keys if key not in known_keys()]


def first_line(error: Exception) -> str:
    """Hydra's message on one line, without its search-path listing: "In 'config': Could not find 'preset/papr'
    Available options in 'preset': demo, paper" """
    text = str(error).split("Config search path:")[0]
    text = text.replace(":\n\t", ": ").replace("\n\t", ", ")
    text = re.sub(r"To append to your config use \S+", "No such key in conf/ (misspelt?)", text)  # `+` would not help
    return " ".join(line.strip() for line in text.splitlines() if line.strip()) or type(error).__name__


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m lanskap.core.presets", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides: KEY=VALUE, preset=NAME (as `dvc exp run -S`)")
    overrides = parser.parse_args(argv).overrides
    compose_params(overrides)
    print(f"wrote {PARAMS_FILE} from conf/ with overrides {overrides or 'none'}")


if __name__ == "__main__":
    run_stage(main)

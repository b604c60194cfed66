"""Compose params.yaml from conf/ exactly as `dvc exp run -S ...` does (DVC's own Hydra composition).

    python -m lanskap.presets                      # demo preset -> params.yaml
    python -m lanskap.presets preset=paper lora.rank=16
"""

import sys
from pathlib import Path

from lanskap.params import PARAMS_FILE


def compose_params(overrides: list[str], out: str | Path = PARAMS_FILE, conf_dir: str | Path = "conf") -> None:
    from dvc.utils.hydra import compose_and_dump

    compose_and_dump(out, str(Path(conf_dir).resolve()), None, "config", "", overrides)


if __name__ == "__main__":
    compose_params(sys.argv[1:])
    print(f"wrote {PARAMS_FILE} from conf/ with overrides {sys.argv[1:] or 'none'}")

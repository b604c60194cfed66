"""The built-in models, trained by this package on procedural data and shipped in `lanskap/assets/builtin/`.

- `builtin:tiny-sd2`: a tiny SD 2.x-family text-to-image model pretrained on the procedural *base* world;
- `builtin:tiny-clip`: a tiny CLIP trained contrastively on both worlds (CMMD, CLIP score);
- `builtin:tiny-inception`: a tiny convolutional scene classifier whose pool features stand in for Inception's
  (FID, KID).

Params name them explicitly (`model.base`, `evaluate.clip_model`, `evaluate.inception_weights`); they load
through the same `from_pretrained` / feature-extractor code as real weights, straight from the package, so new
weights are served the moment they are written. `make builtins` (python -m lanskap.builtin) rebuilds them: about
an hour on 2 CPU cores; each model's README.md says what it learnt from, for how long, its losses and scores, the
build time and the commit that built it.
"""

from importlib import resources
from pathlib import Path

from lanskap.core.errors import UserError

BUILTIN_FOLDERS = {
    "builtin:tiny-sd2": "tiny-sd2",
    "builtin:tiny-clip": "tiny-clip",
    "builtin:tiny-inception": "tiny-inception",
}


def builtin_assets() -> Path:
    return Path(str(resources.files("lanskap") / "assets" / "builtin"))


def builtin_folder(spec: str, key: str) -> Path:
    """The shipped folder of the built-in `spec` (named by params key `key`), or a UserError saying what to do."""
    if spec not in BUILTIN_FOLDERS:
        raise UserError(f"{key}: unknown built-in {spec!r}; the built-in models are {', '.join(BUILTIN_FOLDERS)}")
    folder = builtin_assets() / BUILTIN_FOLDERS[spec]
    if not any(folder.rglob("*.safetensors")):
        raise UserError(
            f"{key}: the weights of {spec} are missing from {folder}; they ship with the repository "
            "(check out lanskap/assets/builtin/ again), or rebuild them with `make builtins`"
        )
    return folder

"""The built-in models, trained by this package on procedural data and shipped in `lanskap/assets/builtin/`.

- `builtin:tiny-sd2`: a tiny SD 2.x-family text-to-image model pretrained on the procedural *base* world;
- `builtin:tiny-clip`: a tiny CLIP trained contrastively on both worlds (CMMD, CLIP score);
- `builtin:tiny-inception`: a tiny convolutional scene classifier whose pool features stand in for Inception's
  (FID, KID); its linear scene heads ship too (heads.py), for evaluation's diagnostics.

Params name them explicitly (`model.base`, `evaluate.clip_model`, `evaluate.inception_weights`); they load
through the same `from_pretrained` / feature-extractor code as real weights, straight from the package, so new
weights are served the moment they are written. Each model's README.md says what it learnt from, for how long,
its losses and scores, the build time, the commit that built it and the digest of the sources that decide its
weights.

The shipped weights are what the committed builder makes. `sources.MODEL_SOURCES` lists, per model, the code
that decides its weights (here, the procedural data, the pinned CPU math, and the few functions the builder
borrows from evaluate and train); tests/test_builtin.py fails when a shipped card's digest differs from today's
sources, naming the models to rebuild. A formatting, comment or docstring edit changes no digest; any code
change does. If you change that code:

1. commit the change (the card then says "builder sources as committed" and names the commit);
2. rebuild what the test names, one torch thread each, on an idle machine (minutes on 2 CPU cores, as last
   measured): `python -m lanskap.builtin tiny-inception` (~4), `python -m lanskap.builtin tiny-clip` (~24),
   `python -m lanskap.builtin tiny-sd2` (~51), or all three with `make builtins` (about 55 min wall-clock: it runs
   tiny-sd2 beside the other two). Builds are deterministic (same bytes from the same code, tests/test_builtin.py
   checks a miniature build) and write atomically into lanskap/assets/builtin/<model>/;
3. commit the rebuilt folders (weights, README.md, config, training_log.tsv, loss.png) with the build times;
4. if the builder imports a new project module or function, list it in `sources.py`, under the models whose
   weights it decides or in NOT_WEIGHTS (the test refuses an undeclared one).
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

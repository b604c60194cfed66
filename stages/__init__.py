"""The pipeline's stages, one module each, which dvc.yaml runs as `sh stages/python -m stages.NAME ...`.

Importing the package pins the CPU math libraries' code paths and thread count (lanskap/core/determinism.py) before
any stage loads them: they read these settings once, when they load.
"""

from lanskap.core.determinism import pin_cpu_math

pin_cpu_math()

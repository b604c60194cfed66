"""The pipeline's stages, one module each, which dvc.yaml runs as `sh stages/python -m stages.NAME ...`.

Importing the package makes a Ctrl-C during the stage's imports one line, not a traceback (lanskap/core/errors.py),
and pins the CPU math libraries' code paths and thread count (lanskap/core/determinism.py) before any stage loads
them: they read these settings once, when they load.
"""

from lanskap.core.determinism import pin_cpu_math
from lanskap.core.errors import exit_quietly_on_ctrl_c

exit_quietly_on_ctrl_c()
pin_cpu_math()

from lanskap.core.errors import run_stage
from lanskap.sweep.aggregate import main

run_stage(main)

from lanskap.core.determinism import pin_cpu_math

pin_cpu_math()  # before torch loads: the same builder then gives the same weights on any x86-64 CPU

from lanskap.builtin.build import main  # noqa: E402

main()

from lanskap.builtin.build import main

main()

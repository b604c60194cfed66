"""`python -m lanskap.sweep`: statistics across training seeds of finished DVC experiments. aggregate (read, group
by setting, compare), seed_stats (mean, t-interval, paired and Welch differences), report (the files it writes).
It is a command, not a stage: a stage runs inside one experiment and cannot see the others. run_queue
(`python -m lanskap.sweep.run_queue`, `make queue`) runs the queued experiments a sweep reads."""

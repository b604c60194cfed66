"""The paper's qualitative evaluation as a measurement: a blind, recorded side-by-side rating of base and LoRA
images, and its statistics.

    python -m lanskap.rate     (`make rate`) serves the rating page on 127.0.0.1 (__main__.py, server.py, static/)
    items.py                   what is rated: generate's base/LoRA pairs with their reference, sha256 and opaque ids
    votes.py                   the SQLite votes file, committed to git with the experiment
    stats.py                   Wilson interval, exact sign test, Krippendorff's alpha
    summary.py                 per-criterion results for the `qualitative` stage (metrics, plot table, report)
"""

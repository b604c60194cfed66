"""The shared core every stage uses, and which imports no other lanskap package.

params (typed, validated params groups), presets (compose params.yaml from conf/: `make params`), errors (the one
error a user sees, and its exit code), console (progress and summaries), io (atomic outputs), determinism (the
same bytes on any x86-64 CPU), provenance (which run a report describes), figures (image grids and loss curves),
code_closure (the files a stage runs: its DVC deps and checkpoint key).
"""

"""lanskap: the library behind the pipeline in dvc.yaml. Each stage module in stages/ is a thin shell over one
package here; imports run one way, from the stage packages down to the shared core.

    dvc.yaml stage   stages/        the package that does its work
    ingest           ingest.py      data/ (sources, images, download, manifest, procedural), preflight.py
    caption          caption.py     data/captions.py
    split            split.py       data/split.py
    preprocess       preprocess.py  data/ (augment, buckets), core/figures.py
    train_lora       train_lora.py  train/ (the loop), lora/ (adapters and their files)
    generate         generate.py    generate/ (paired sampling, resume, shards across processes)
    evaluate         evaluate.py    evaluate/ (extraction, feature cache, features, metrics, KID, paired gaps,
                                    comparisons, traits, report)
    qualitative      qualitative.py rate/ (the blind rating page `make rate`, its votes, their statistics)

Beside the pipeline: models/ (resolving and checking a base model: hub id, folder, built-in), builtin/ (the
built-in models' builder, `make builtins`), sweep/ (`python -m lanskap.sweep`, statistics across training seeds),
and core/ (params, io, errors, console, determinism, provenance, figures, presets, code_closure), which every
package may import and which imports none of them. preflight.py checks, at ingest, what every later stage will
need, so it sits above the stage packages.
"""

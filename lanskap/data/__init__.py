"""The data stages: ingest, caption, split, preprocess.

ingest: sources (what a folder or manifest offers), images (decode and validate to 8-bit sRGB), download (URLs,
bounded and resumable), procedural (the built-in dataset `builtin:procedural`), manifest (the tables stages
share). caption: captions. split: split. preprocess: augment (the paper's augmentation, also used on the fly by
train/) and buckets (aspect-ratio buckets, also used by train/'s batches).
"""

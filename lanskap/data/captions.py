"""Captions: choose each image's training caption and check it fits CLIP's 77-token context."""

from pathlib import Path

import pandas as pd

from lanskap.core.errors import UserError
from lanskap.core.params import CaptionParams
from lanskap.data.sources import clean_caption, sidecar_names

CLIP_MAX_TOKENS = 77  # including the start and end tokens


def read_overrides(manifest: pd.DataFrame, overrides_file: str | None) -> pd.Series:
    """Per row, the caption from the overrides CSV (matched by `sha256`, or by `file`: the source's file
    name), or NaN where it has none."""
    if not overrides_file:
        return pd.Series(float("nan"), index=manifest.index, dtype=object)
    path = Path(overrides_file)
    if not path.is_file():
        raise UserError(f"caption.overrides: {path} not found; give a CSV with columns (sha256 or file) and caption")
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    key = next((column for column in ("sha256", "file") if column in table.columns), None)
    if key is None or "caption" not in table.columns:
        raise UserError(f"caption.overrides: {path} needs a caption column and a sha256 or file column; "
                        f"found {list(table.columns)}")
    by_key = {key: caption for key, caption in zip(table[key], table["caption"].map(clean_caption)) if caption}
    keys = manifest["sha256"] if key == "sha256" else manifest["source"].map(lambda source: Path(source).name)
    unmatched = set(by_key) - set(keys)
    if unmatched:
        print(f"  warning: {len(unmatched)} override(s) in {path} match no image, e.g. {sorted(unmatched)[:3]}")
    return keys.map(by_key)


def resolve_captioner(params: CaptionParams) -> Path:
    """Local folder of the image-to-text model: a folder as given, or a hub snapshot at the pinned revision."""
    from lanskap.models.folders import check_model_folder
    from lanskap.models.resolve import fetch_hub_snapshot, require_safetensors

    check_model_folder(params.model, "caption.model")
    local = Path(params.model).expanduser()
    if not local.exists():
        patterns = ["*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*"]
        local = fetch_hub_snapshot(params.model, params.model_revision, patterns, "caption.model",
                                   "caption.model_revision")[0]
    require_safetensors(local, "caption.model")
    return local


def model_captions(paths: list[str], params: CaptionParams) -> pd.Series:
    """Captions written by an image-to-text model (BLIP and kin), batched, greedy, so reruns agree."""
    import torch
    from lanskap.core.console import progress
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from lanskap.data.manifest import open_rgb

    folder = resolve_captioner(params)
    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder, use_safetensors=True).eval()
    captions = []
    for start in progress(range(0, len(paths), params.batch_size), desc="caption", unit="batch"):
        images = [open_rgb(path) for path in paths[start:start + params.batch_size]]
        with torch.inference_mode():
            ids = model.generate(**processor(images=images, return_tensors="pt"), do_sample=False,
                                 max_new_tokens=params.max_new_tokens)
        captions += [text.strip() for text in processor.batch_decode(ids, skip_special_tokens=True)]
    return pd.Series(captions)


def choose_captions(manifest: pd.DataFrame, params: CaptionParams) -> pd.Series:
    """The caption per row: an override if given, else the source's own (method=keep), the model's
    (method=model) or the template; then prefix and suffix (a trigger word applies to overrides too)."""
    if params.method == "keep":
        base = manifest["source_caption"].str.strip()
    elif params.method == "model":
        base = model_captions(manifest["path"].tolist(), params).set_axis(manifest.index)
    else:
        base = pd.Series(params.template, index=manifest.index)
    base = read_overrides(manifest, params.overrides).fillna(base.replace("", float("nan")))
    missing = manifest.loc[base.isna(), "source"].tolist()
    if missing:
        looked_for = "; ".join(f"{source} (looked for {', '.join(sidecar_names(Path(source)))} beside it)"
                               for source in missing[:3])
        raise UserError(
            f"caption.method={params.method}: {len(missing)} image(s) have no caption (an empty caption file counts as "
            f"none), e.g. {looked_for}; add sidecar caption files (any case) / a caption column in the manifest / "
            "caption.overrides entries, or change caption.method"
        )
    return params.prefix + base.astype(str) + params.suffix


def token_counts(captions: pd.Series) -> pd.Series:
    """CLIP BPE token count of each caption, start and end tokens included (SD 2.x's tokenizer)."""
    from transformers import CLIPTokenizer

    from lanskap.models.resolve import clip_tokenizer_dir

    tokenizer = CLIPTokenizer.from_pretrained(clip_tokenizer_dir(), model_max_length=CLIP_MAX_TOKENS)
    return pd.Series([len(ids) for ids in tokenizer(captions.tolist())["input_ids"]], index=captions.index)

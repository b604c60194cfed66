"""Captions: choose each image's training caption and check it fits CLIP's 77-token context."""

import pandas as pd

from lanskap.errors import UserError
from lanskap.params import CaptionParams

CLIP_MAX_TOKENS = 77  # including the start and end tokens


def choose_captions(manifest: pd.DataFrame, params: CaptionParams) -> pd.Series:
    """The caption per row: the source's own (method=keep) or the template, with prefix and suffix."""
    if params.method == "keep":
        missing = manifest.loc[manifest["source_caption"].str.strip() == "", "source"].tolist()
        if missing:
            raise UserError(
                f"caption.method=keep but {len(missing)} image(s) have no caption, e.g. {missing[:3]}; "
                "add sidecar .txt files / a caption column, or set caption.method=template"
            )
        base = manifest["source_caption"].str.strip()
    else:
        base = pd.Series([params.template] * len(manifest), index=manifest.index)
    return params.prefix + base + params.suffix


def token_counts(captions: pd.Series) -> pd.Series:
    """CLIP BPE token count of each caption, start and end tokens included (SD 2.x's tokenizer)."""
    from transformers import CLIPTokenizer

    from lanskap.models import clip_tokenizer_dir

    tokenizer = CLIPTokenizer.from_pretrained(clip_tokenizer_dir(), model_max_length=CLIP_MAX_TOKENS)
    return pd.Series([len(ids) for ids in tokenizer(captions.tolist())["input_ids"]], index=captions.index)

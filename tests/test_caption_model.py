"""caption.method=model with a tiny image-to-text model (BLIP architecture) built locally, offline."""

import pandas as pd
import pytest
import torch

from lanskap.core.errors import UserError
from stages import caption, ingest
from tests.conftest import write_params
from tests.test_data_stages import make_folder

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "fantasy", "landscape", "moon", "lake"]


@pytest.fixture(scope="module")
def tiny_captioner(tmp_path_factory):
    """A random BLIP whose language head is biased towards "landscape", so it writes real words."""
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    folder = tmp_path_factory.mktemp("tiny-blip")
    (folder / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    tokenizer = BertTokenizer(str(folder / "vocab.txt"), model_max_length=40)
    text = dict(
        vocab_size=len(WORDS),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=40,
        bos_token_id=2,
        sep_token_id=3,
        pad_token_id=0,
        eos_token_id=3,
    )
    vision = dict(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8
    )
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision, projection_dim=16))
    with torch.no_grad():
        model.text_decoder.cls.predictions.bias[WORDS.index("landscape")] = 50.0
    model.save_pretrained(folder)
    BlipProcessor(
        image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer
    ).save_pretrained(folder)
    return folder


def run_caption(workdir, project_params, caption_params):
    folder = make_folder(workdir)
    write_params(
        workdir,
        {
            **project_params,
            "caption": {**project_params["caption"], **caption_params},
            "ingest": {**project_params["ingest"], "source": str(folder), "min_size": 32},
        },
    )
    ingest.main(["--out", "data/ingested"])
    caption.main(["--manifest", "data/ingested/manifest.csv", "--out", "data/captions.csv"])
    return pd.read_csv(workdir / "data/captions.csv")


def test_model_captions_are_batched_deterministic_and_prefixed(workdir, project_params, tiny_captioner):
    settings = {
        "method": "model",
        "model": str(tiny_captioner),
        "batch_size": 3,
        "max_new_tokens": 4,
        "prefix": "lnskp, ",
    }
    first = run_caption(workdir, project_params, settings)["caption"]
    assert first.str.startswith("lnskp, ").all() and first.str.contains("landscape").all()
    again = pd.read_csv(workdir / "data/captions.csv")["caption"]
    caption.main(["--manifest", "data/ingested/manifest.csv", "--out", "data/captions.csv"])
    assert pd.read_csv(workdir / "data/captions.csv")["caption"].equals(again)


def test_a_hub_captioner_without_a_pinned_revision_or_cache_is_a_clear_error(
    workdir, project_params, tmp_path, monkeypatch
):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(UserError, match="caption.model_revision"):
        run_caption(workdir, project_params, {"method": "model", "model": "Salesforce/blip-image-captioning-large"})

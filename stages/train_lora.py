"""train_lora: fine-tune the base model's UNet with LoRA on the training images.

Inputs:  PROCESSED/train.csv, PROCESSED/test.csv and their images (from preprocess); the base model
Outputs: OUT/pytorch_lora_weights.safetensors  diffusers/PEFT format, alpha kept in the adapter metadata
         OUT/lora_kohya.safetensors           kohya format for AUTOMATIC1111 / ComfyUI / Forge
         OUT/README.md                        model card: base model, params, data hash, training summary
         LIVE/                                DVCLive log: per-step loss, validation loss, lr, images/s
Params:  model, lora, train, augment
"""

import argparse
import hashlib
import json
from pathlib import Path

from PIL import Image

from lanskap.data import read_table
from lanskap.errors import run_stage
from lanskap.io import atomic_dir
from lanskap.params import load_params


def model_card(base: dict, summary: dict, loaded: dict) -> str:
    params = {name: group.model_dump(mode="json") for name, group in loaded.items()}
    return "\n".join([
        f"# LoRA for {base['model']}", "",
        f"- base model: `{base['model']}` revision `{base['revision']}` ({base['prediction_type']})",
        f"- trained at {base['resolution']} px on {base['train_images']} images; data sha256 `{base['data_sha256']}`",
        "- files: `pytorch_lora_weights.safetensors` (diffusers: `pipe.load_lora_weights(dir)`), "
        "`lora_kohya.safetensors` (AUTOMATIC1111 / ComfyUI)", "",
        "## Training summary", "", "```json", json.dumps(summary, indent=2), "```", "",
        "## Params", "", "```json", json.dumps(params, indent=2), "```", "",
    ])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--live", type=Path, required=True)
    args = parser.parse_args(argv)
    loaded = load_params("model", "lora", "train", "augment")

    from dvclive import Live

    from lanskap.lora import export_lora
    from lanskap.models import resolve_base_model
    from lanskap.train import summarise, train_lora

    model = resolve_base_model(loaded["model"].base, loaded["model"].revision)
    train_table = read_table(args.data / "train.csv", ["path", "caption"])
    test_table = read_table(args.data / "test.csv", ["path", "caption"])
    resolution = Image.open(train_table["path"][0]).width
    with Live(dir=str(args.live), save_dvc_exp=False, dvcyaml=None, report=None) as live:
        result = train_lora(model.path, train_table, test_table, loaded["lora"], loaded["train"],
                            loaded["augment"], resolution, live)
        summary = summarise(result)
        for key, value in summary.items():
            live.summary[key] = value
    base = {
        "model": model.spec, "revision": model.revision or "n/a", "resolution": resolution,
        "prediction_type": result.prediction_type,
        "train_images": len(train_table), "steps": loaded["train"].steps,
        "data_sha256": hashlib.sha256((args.data / "train.csv").read_bytes()).hexdigest(),
    }
    with atomic_dir(args.out) as staging:
        export_lora(result.unet, staging, loaded["lora"], base)
        (staging / "README.md").write_text(model_card(base, summary, loaded))
    print(f"train_lora: {summary['steps']} steps in {summary['seconds']} s ({summary['images_per_second']} img/s); "
          f"loss {summary['loss_first']:.4f} -> {summary['loss_final']:.4f}; validation loss best "
          f"{summary['validation_loss_best']:.4f} at step {summary['validation_loss_best_step']} -> {args.out}")


if __name__ == "__main__":
    run_stage(main)

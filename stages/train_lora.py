"""train_lora: fine-tune the base model's UNet with LoRA on the training images.

Inputs:  PROCESSED/train.csv, PROCESSED/test.csv and their images (from preprocess); the base model
Outputs: OUT/pytorch_lora_weights.safetensors  diffusers/PEFT format, alpha kept in the adapter metadata
         OUT/lora_kohya.safetensors           kohya format for AUTOMATIC1111 / ComfyUI / Forge
         OUT/README.md                        model card: base model, params, data hash, training summary
         LIVE/                                DVCLive log: per-step loss, validation loss, lr, images/s,
                                              validation images
Params:  model, lora, train, augment

Several GPUs or machines: `accelerate launch --multi_gpu --num_processes N -m stages.train_lora ...` (the global
batch is batch_size x gradient_accumulation_steps x N; the main process logs and writes the outputs).
"""

import argparse
import hashlib
import json
from pathlib import Path

from PIL import Image

from lanskap.data import read_table
from lanskap.errors import run_stage
from lanskap.io import atomic_dir, remove_dir, sha256_file
from lanskap.params import load_params

FILE_USE = {"diffusers": "diffusers: `pipe.load_lora_weights(dir)`", "kohya": "AUTOMATIC1111 / ComfyUI"}
CHECKPOINT_ROOT = Path(".lanskap-cache/checkpoints")  # relative to the project root, outside DVC's outputs


MACHINE_DEPENDENT = ("seconds", "images_per_second", "peak_gpu_memory_gib", "peak_process_memory_gib")


def model_card(base: dict, summary: dict, loaded: dict, files: dict[str, Path]) -> str:
    """The card travels with the weights: timings stay in the training log, so the same run gives the same bytes."""
    params = {name: group.model_dump(mode="json") for name, group in loaded.items()}
    summary = {key: value for key, value in summary.items() if key not in MACHINE_DEPENDENT}
    return "\n".join([
        f"# LoRA for {base['model']}", "",
        f"- base model: `{base['model']}` revision `{base['revision']}` ({base['prediction_type']})",
        f"- trained at {base['resolution']} px on {base['train_images']} images; data sha256 `{base['data_sha256']}`",
        f"- adapters: {base['adapters']}",
        "- files: " + ", ".join(f"`{path.name}` ({FILE_USE[kind]})" for kind, path in files.items()), "",
        "## Training summary", "", "```json", json.dumps(summary, indent=2), "```", "",
        "## Params", "", "```json", json.dumps(params, indent=2), "```", "",
    ])


def checkpoint_dir(loaded: dict, data: Path, train_paths: list[str]) -> Path:
    """This run's checkpoint folder, keyed by everything that shapes the weights and the logged curves (params,
    split tables, training image bytes), so a checkpoint is only ever resumed by a run it belongs to."""
    digest = hashlib.sha256()
    for name, group in sorted(loaded.items()):
        exclude = {"checkpoint_every", "dataloader_workers"} if name == "train" else None  # they change no result
        digest.update(json.dumps([name, group.model_dump(mode="json", exclude=exclude)], sort_keys=True).encode())
    for path in [data / "train.csv", data / "test.csv", *train_paths]:
        digest.update(sha256_file(path).encode())
    return CHECKPOINT_ROOT / digest.hexdigest()[:16]


def process_state():
    """This process's place among `accelerate launch`'s (a single process when run directly)."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


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

    processes = process_state()
    with processes.main_process_first():  # one process downloads or builds the base model, the others then read it
        model = resolve_base_model(loaded["model"].base, loaded["model"].revision)
    train_table = read_table(args.data / "train.csv", ["path", "caption"])
    test_table = read_table(args.data / "test.csv", ["path", "caption"])
    resolution = min(Image.open(train_table["path"][0]).size)  # the shorter side: preprocess.resolution
    checkpoints = checkpoint_dir(loaded, args.data, train_table["path"].tolist())
    if not processes.is_main_process:  # another of `accelerate launch`'s processes: trains its share, writes nothing
        train_lora(model.path, train_table, test_table, loaded["lora"], loaded["train"], loaded["augment"],
                   resolution, checkpoint_dir=checkpoints)
        return
    with Live(dir=str(args.live), save_dvc_exp=False, dvcyaml=None, report=None) as live:
        result = train_lora(model.path, train_table, test_table, loaded["lora"], loaded["train"],
                            loaded["augment"], resolution, live, checkpoints)
        summary = summarise(result)
        for key, value in summary.items():
            live.summary[key] = value
    base = {
        "model": model.spec, "revision": model.revision or "n/a", "resolution": resolution,
        "prediction_type": result.prediction_type,
        "adapters": "UNet" if result.text_encoder is None else "UNet and text encoder",
        "train_images": len(train_table), "steps": loaded["train"].steps,
        "data_sha256": hashlib.sha256((args.data / "train.csv").read_bytes()).hexdigest(),
    }
    with atomic_dir(args.out) as staging:
        files = export_lora(result.unet, staging, loaded["lora"], base, result.text_encoder)
        (staging / "README.md").write_text(model_card(base, summary, loaded, files))
    remove_dir(checkpoints)  # the run is recorded; a forced rerun must train again
    print(f"train_lora: {summary['steps']} steps in {summary['seconds']} s ({summary['images_per_second']} img/s); "
          f"loss {summary['loss_first']:.4f} -> {summary['loss_final']:.4f}; validation loss best "
          f"{summary['validation_loss_best']:.4f} at step {summary['validation_loss_best_step']} -> {args.out}")


if __name__ == "__main__":
    run_stage(main)

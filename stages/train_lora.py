"""train_lora: fine-tune the base model's UNet with LoRA (or LoHa, LoKr: lora.type) on the training images.

Inputs:  PROCESSED/train.csv, PROCESSED/test.csv and their images (from preprocess); the base model
Outputs: OUT/pytorch_lora_weights.safetensors  lora.type=lora: diffusers/PEFT format, alpha kept in the adapter
                                              metadata (checked: diffusers' loader restores every trained module)
         OUT/peft_adapter_weights.safetensors lora.type=loha/lokr: PEFT keys and configs, what generate loads
                                              (checked: every trained module and tensor is restored)
         OUT/<type>_kohya.safetensors         kohya format (LyCORIS keys for loha/lokr) for AUTOMATIC1111 /
                                              ComfyUI / Forge; not written for DoRA
         OUT/ema/                             with train.ema_decay: the same files for the EMA weights
         OUT/README.md                        model card: base model, params, data hash, training summary
         LIVE/                                DVCLive log: per-step loss, validation loss, lr, images/s,
                                              validation images
Params:  model, lora, train, augment
The weights in OUT are the last step's (with train.optimizer=adamw_schedulefree: its averaged evaluation weights).

Several GPUs or machines: `accelerate launch --multi_gpu --num_processes N -m stages.train_lora ...` (the global
batch is batch_size x gradient_accumulation_steps x N; the main process logs and writes the outputs).
"""

import argparse
import hashlib
import json
import sys
from pathlib import Path

from lanskap.core.errors import run_stage

FILE_USE = {
    "diffusers": "diffusers: `pipe.load_lora_weights(dir)`",
    "kohya": "AUTOMATIC1111 / ComfyUI",
    "peft": "peft: inject the config in its metadata, then `set_peft_model_state_dict`",
}
CHECKPOINT_ROOT = Path(".lanskap-cache/checkpoints")  # relative to the project root, outside DVC's outputs


MACHINE_DEPENDENT = (
    "seconds",
    "images_per_second",
    "monitoring_seconds",
    "peak_gpu_memory_gib",
    "peak_process_memory_gib",
)


def model_card(base: dict, summary: dict, loaded: dict, files: dict[str, Path]) -> str:
    """The card travels with the weights: timings stay in the training log, so the same run gives the same bytes."""
    from lanskap.lora.adapters import ADAPTER_TITLES

    params = {name: group.model_dump(mode="json") for name, group in loaded.items()}
    summary = {key: value for key, value in summary.items() if key not in MACHINE_DEPENDENT}
    return "\n".join(
        [
            f"# {ADAPTER_TITLES[loaded['lora'].type]} for {base['model']}",
            "",
            f"- base model: `{base['model']}` revision `{base['revision']}` ({base['prediction_type']})",
            f"- trained at {base['resolution']} px on {base['train_images']} images; "
            f"data sha256 `{base['data_sha256']}`",
            *([f"- aspect-ratio buckets (W x H: training images): {base['buckets']}"] if base.get("buckets") else []),
            f"- adapters: {base['adapters']}",
            "- files: " + ", ".join(f"`{path.name}` ({FILE_USE[kind]})" for kind, path in files.items()),
            *ema_card_lines(loaded["train"]),
            "",
            "## Training summary",
            "",
            "```json",
            json.dumps(summary, indent=2),
            "```",
            "",
            "## Params",
            "",
            "```json",
            json.dumps(params, indent=2),
            "```",
            "",
        ]
    )


def ema_card_lines(train) -> list[str]:
    """The model card's line on the EMA weights, when train.ema_decay trained them."""
    from lanskap.lora.files import EMA_SUBDIR

    if train.ema_decay is None:
        return []
    return [
        f"- `{EMA_SUBDIR}/`: the same files for the exponential moving average of the weights (train.ema_decay "
        f"{train.ema_decay}, warm-up {'on' if train.ema_warmup else 'off'}); the files above hold the last step's "
        "weights"
    ]


def checkpoint_dir(loaded: dict, data: Path, train_paths: list[str], base_revision: str | None) -> Path:
    """This run's checkpoint folder, keyed by everything that shapes the weights and the logged curves (params,
    the base model's resolved revision, the code and package data this stage runs, split tables, training image
    bytes), so a checkpoint is only ever resumed by a run it belongs to."""
    from lanskap.core.code_closure import code_digest
    from lanskap.core.io import sha256_file

    digest = hashlib.sha256(json.dumps([base_revision, code_digest("stages.train_lora")]).encode())
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
    from lanskap.core.console import quiet_libraries  # here, not above: --help needs none of them
    from lanskap.core.determinism import use_threads_for_device
    from lanskap.core.io import remove_dir
    from lanskap.core.params import load_params
    from lanskap.data.buckets import BUCKET_COLUMNS
    from lanskap.data.manifest import read_table

    loaded = load_params("model", "lora", "train", "augment")
    quiet_libraries()

    from lanskap.models.resolve import resolve_base_model
    from lanskap.train.loop import train_lora

    processes = process_state()
    # CPU: the pinned thread (the demo's recorded bytes); a GPU host: its cores for decoding and augmenting beside
    # the GPU (lanskap/core/determinism.py: threads_for_device)
    use_threads_for_device(processes.device.type)
    with processes.main_process_first():  # one process downloads or builds the base model, the others then read it
        model = resolve_base_model(loaded["model"].base, loaded["model"].revision)
    train_table = read_table(args.data / "train.csv", ["path", "caption", *BUCKET_COLUMNS])
    test_table = read_table(args.data / "test.csv", ["path", "caption", *BUCKET_COLUMNS])
    checkpoints = checkpoint_dir(loaded, args.data, train_table["path"].tolist(), model.revision)
    if not processes.is_main_process:  # another of `accelerate launch`'s processes: trains its share, writes nothing
        train_lora(
            model.path,
            train_table,
            test_table,
            loaded["lora"],
            loaded["train"],
            loaded["augment"],
            checkpoint_dir=checkpoints,
        )
        return
    try:
        summary = train_and_export(args, loaded, model, train_table, test_table, checkpoints)
    except KeyboardInterrupt:
        resume = (
            f"; the next run resumes from the newest checkpoint in {checkpoints}"
            if any(checkpoints.glob("step-*"))
            else ""
        )
        print(
            f"\ntrain_lora: interrupted: {args.out} and {args.live} are as they were before this run{resume}",
            file=sys.stderr,
        )
        raise
    remove_dir(checkpoints)  # the run is recorded; a forced rerun must train again
    print(
        f"train_lora: {summary['steps']} steps in {summary['seconds']} s ({summary['images_per_second']} img/s "
        f"training; {summary['monitoring_seconds']} s of it validating and checkpointing); "
        f"loss {summary['loss_first']:.4f} -> {summary['loss_final']:.4f}; validation loss best "
        f"{summary['validation_loss_best']:.4f} at step {summary['validation_loss_best_step']} -> {args.out}"
    )


def train_and_export(args, loaded: dict, model, train_table, test_table, checkpoints: Path) -> dict:
    """Train, then write the LoRA and the DVCLive log into staging folders swapped in only when both are complete:
    an interruption (Ctrl-C, an error) leaves the previous LoRA and log (tracked in git) as they were. dvc.yaml marks
    them `persist`, so that DVC does not delete them before the run either."""
    from dvclive import Live
    from lanskap.core.io import atomic_dir
    from lanskap.train.loop import summarise, train_lora

    with atomic_dir(args.live) as live_dir, atomic_dir(args.out) as staging:
        with Live(dir=str(live_dir), save_dvc_exp=False, dvcyaml=None, report=None) as live:
            result = train_lora(
                model.path,
                train_table,
                test_table,
                loaded["lora"],
                loaded["train"],
                loaded["augment"],
                live,
                checkpoints,
            )
            summary = summarise(result)
            for key, value in summary.items():
                live.summary[key] = value
        write_lora(staging, result, summary, loaded, model, args.data, train_table)
    return summary


def bucket_summary(train_table) -> str | None:
    """The training buckets and their image counts, or None for a single square size (no buckets)."""
    from lanskap.data.buckets import bucket_groups, size_name, table_sizes

    groups = bucket_groups(table_sizes(train_table))
    if len(groups) == 1 and next(iter(groups))[0] == next(iter(groups))[1]:
        return None
    return ", ".join(f"{size_name(size)}: {len(rows)}" for size, rows in groups.items())


def write_lora(staging: Path, result, summary: dict, loaded: dict, model, data: Path, train_table) -> None:
    from lanskap.data.buckets import nominal_resolution, table_sizes
    from lanskap.lora.files import EMA_SUBDIR, export_lora, require_lora_reloads

    base = {
        "model": model.spec,
        "revision": model.revision or "n/a",
        "resolution": nominal_resolution(table_sizes(train_table)),
        "buckets": bucket_summary(train_table),
        "prediction_type": result.prediction_type,
        "adapters": "UNet" if result.text_encoder is None else "UNet and text encoder",
        "train_images": len(train_table),
        "steps": loaded["train"].steps,
        "data_sha256": hashlib.sha256((data / "train.csv").read_bytes()).hexdigest(),
    }
    files = export_lora(result.unet, staging, loaded["lora"], base, result.text_encoder)
    require_lora_reloads(model.path, staging)  # every trained module comes back through diffusers' loader
    if result.ema is not None:
        (staging / EMA_SUBDIR).mkdir()
        with result.ema.applied():
            export_lora(result.unet, staging / EMA_SUBDIR, loaded["lora"], base, result.text_encoder)
        require_lora_reloads(model.path, staging / EMA_SUBDIR)
    (staging / "README.md").write_text(model_card(base, summary, loaded, files))


if __name__ == "__main__":
    run_stage(main)

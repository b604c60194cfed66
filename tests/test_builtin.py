"""The built-in models: the builder runs and is reproducible (a miniature build, in seconds), a missing weight is a
clear error, and the shipped stand-ins learnt what evaluate relies on (on procedural pairs none of them saw)."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lanskap import builtin
from lanskap.builtin import card, sources
from lanskap.builtin.build import main as build_main
from lanskap.builtin.clip import retrieval_accuracy
from lanskap.builtin.config import FULL
from lanskap.builtin.heads import LABELS, SceneHeads, head_accuracy, load_scene_heads, save_scene_heads
from lanskap.builtin.training import LossLog
from lanskap.builtin.worlds import render_world
from lanskap.core.errors import UserError
from lanskap.evaluate.features import (
    BUILTIN_TINY_CLIP,
    BUILTIN_TINY_INCEPTION,
    InceptionEmbedder,
    load_clip,
    load_inception,
    load_tiny_inception,
)
from lanskap.evaluate.metrics import frechet_distance
from lanskap.models.resolve import BUILTIN_TINY_SD2, resolve_base_model

FRESH_SEED = 4242  # neither the builder's training (TRAIN_SEED) nor its held-out seed, nor the demo's (0)


@pytest.fixture(scope="module")
def miniature_builds(tmp_path_factory) -> list[Path]:
    """Two miniature builds from scratch, each with its own work folder."""
    outs = []
    for attempt in range(2):
        root = tmp_path_factory.mktemp(f"build{attempt}")
        build_main(["--miniature", "--out", str(root / "out"), "--work", str(root / "work")])
        outs.append(root / "out")
    return outs


def weight_files(folder: Path) -> dict[str, bytes]:
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in sorted(folder.rglob("*.safetensors"))}


def test_miniature_build_writes_every_model_with_its_card(miniature_builds):
    out = miniature_builds[0]
    for name in builtin.BUILTIN_FOLDERS.values():
        card = (out / name / "README.md").read_text()
        for section in ("## Data", "## Training", "## Results", "build time", "commit", "builder sources sha256"):
            assert section in card, (name, section)
        assert (out / name / "training_log.tsv").is_file() and (out / name / "loss.png").is_file()
        assert weight_files(out / name)
    assert (out / "tiny-sd2" / "samples.png").is_file()


def test_same_builder_same_weights(miniature_builds):
    first, second = miniature_builds
    for name in builtin.BUILTIN_FOLDERS.values():
        assert weight_files(first / name) == weight_files(second / name), name


def test_built_folders_load_through_the_real_loaders(miniature_builds):
    out = miniature_builds[0]
    assert resolve_base_model(str(out / "tiny-sd2"), None).path == out / "tiny-sd2"
    clip = load_clip(str(out / "tiny-clip"), None, device="cpu")
    assert clip.text_embeddings(["a fantasy landscape"]).shape == (1, 32)


def test_miniature_inception_ships_heads_that_load_beside_its_features(miniature_builds, fresh_pairs):
    folder = miniature_builds[0] / "tiny-inception"
    heads = load_scene_heads(folder)
    assert heads.labels == LABELS and not heads.training
    paths, _, _ = fresh_pairs
    features = InceptionEmbedder(load_tiny_inception(folder), "miniature", 64, "cpu").features(paths["base"][:5])
    logits = heads(torch.from_numpy(features))
    assert {name: tuple(rows.shape) for name, rows in logits.items()} == {
        name: (5, len(labels)) for name, labels in LABELS.items()
    }


def test_scene_heads_round_trip_through_their_files(tmp_path):
    torch.manual_seed(0)
    heads = SceneHeads(64, LABELS)
    save_scene_heads(heads, tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"heads": heads.layout()}))
    loaded, features = load_scene_heads(tmp_path), torch.randn(3, 64)
    with torch.no_grad():
        for name, logits in heads(features).items():
            torch.testing.assert_close(loaded(features)[name], logits, atol=2e-3, rtol=2e-3)  # shipped in fp16


def test_folder_without_heads_says_how_to_rebuild(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architecture": {}}))
    with pytest.raises(UserError, match="python -m lanskap.builtin tiny-inception"):
        load_scene_heads(tmp_path)


def test_missing_builtin_weights_say_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setattr(builtin, "builtin_assets", lambda: tmp_path)
    for spec, load in (
        (BUILTIN_TINY_SD2, lambda: resolve_base_model(BUILTIN_TINY_SD2, None)),
        (BUILTIN_TINY_CLIP, lambda: load_clip(BUILTIN_TINY_CLIP, None, device="cpu")),
        (BUILTIN_TINY_INCEPTION, lambda: load_inception(BUILTIN_TINY_INCEPTION, device="cpu")),
    ):
        with pytest.raises(UserError, match="make builtins") as error:
            load()
        assert spec in str(error.value)


def test_builtin_revision_is_the_digest_of_the_shipped_weights():
    resolved = resolve_base_model(BUILTIN_TINY_SD2, None)
    assert resolved.path == builtin.builtin_assets() / "tiny-sd2"
    assert resolved.revision and len(resolved.revision) == 16


# ------------------------------------------------------------- what the shipped stand-ins learnt


@pytest.fixture(scope="module")
def fresh_pairs(tmp_path_factory):
    """Procedural image files, captions and scenes of both worlds that no built-in model was trained or checked on."""
    folder = tmp_path_factory.mktemp("fresh")
    paths, captions, scenes = {}, {}, {}
    for world in ("base", "fantasy"):
        images = render_world(world, 40, FRESH_SEED, FULL.render_size, FULL.resolution)
        paths[world] = []
        for index, pixels in enumerate(images.pixels):
            path = folder / f"{world}-{index:02d}.png"
            Image.fromarray(pixels).save(path)
            paths[world].append(path)
        captions[world], scenes[world] = images.captions, images.scenes
    return paths, captions, scenes


def test_tiny_clip_retrieves_captions_far_above_chance(fresh_pairs):
    paths, captions, _ = fresh_pairs
    clip = load_clip(BUILTIN_TINY_CLIP, None, device="cpu")
    all_paths, all_captions = paths["base"] + paths["fantasy"], captions["base"] + captions["fantasy"]
    scores = retrieval_accuracy(clip.image_embeddings(all_paths), clip.text_embeddings(all_captions), all_captions)
    assert scores["image_to_caption_top1"] > 5 * scores["chance"], scores


def test_tiny_inception_features_tell_the_worlds_apart(fresh_pairs):
    paths, _, _ = fresh_pairs
    inception = load_inception(BUILTIN_TINY_INCEPTION, device="cpu")
    base, fantasy = inception.features(paths["base"]), inception.features(paths["fantasy"])
    within = frechet_distance(fantasy[:20], fantasy[20:])
    between = frechet_distance(base[:20], fantasy[20:])
    assert between > 3 * within, (between, within)


def test_tiny_inception_heads_see_what_fresh_scenes_show(fresh_pairs):
    paths, _, scenes = fresh_pairs
    features = load_inception(BUILTIN_TINY_INCEPTION, device="cpu").features(paths["base"] + paths["fantasy"])
    heads = load_scene_heads(builtin.builtin_folder(BUILTIN_TINY_INCEPTION, "test"))
    accuracy = head_accuracy(heads, features, scenes["base"] + scenes["fantasy"])
    chance = {name: 1 / len(labels) for name, labels in LABELS.items()}
    assert accuracy["palette"] > 0.9, accuracy  # the card's held-out palette accuracy is 1
    assert sum(accuracy.values()) > sum(chance.values()) + 1.0, (accuracy, chance)


def test_tiny_inception_islands_head_looks_at_the_picture_not_the_sky(fresh_pairs):
    """Within the fantasy world every sky is a fantasy sky, so a head that learnt "fantasy sky, so islands" scores
    only the majority share there: the head trained jointly on both worlds did (58 % at a prevalence of 61 %)."""
    paths, _, scenes = fresh_pairs
    features = load_inception(BUILTIN_TINY_INCEPTION, device="cpu").features(paths["fantasy"])
    heads = load_scene_heads(builtin.builtin_folder(BUILTIN_TINY_INCEPTION, "test"))
    accuracy = head_accuracy(heads, features, scenes["fantasy"])["islands"]
    prevalence = np.mean([scene.has_islands for scene in scenes["fantasy"]])
    assert accuracy >= max(prevalence, 1 - prevalence) + 0.1, (accuracy, prevalence)


# ------------------------------------------------------------- shipped weights = committed builder


def test_shipped_cards_record_todays_builder_sources():
    stale = []
    for model in sources.MODEL_SOURCES:
        card = (builtin.builtin_assets() / model / "README.md").read_text()
        recorded = re.search(r"builder sources sha256 `([0-9a-f]{64})`", card)
        if not recorded or recorded.group(1) != sources.model_digest(model):
            stale.append(model)
    assert not stale, (
        f"the shipped {', '.join(stale)} were built by other code than today's (their cards' digests differ from "
        "lanskap.builtin.sources.model_digest): rebuild with "
        + " and ".join(f"`python -m lanskap.builtin {model}`" for model in stale)
        + " (or all with `make builtins`), then commit "
        + ", ".join(f"lanskap/assets/builtin/{model}/" for model in stale)
    )


@pytest.mark.parametrize("edited_during_the_build", [False, True])
def test_card_records_the_sources_the_build_started_from(tmp_path, monkeypatch, edited_during_the_build):
    started = card.AT_START["tiny-inception"]
    if edited_during_the_build:
        started = ("0123456789ab (builder sources as committed)", "0" * 64)
        monkeypatch.setitem(card.AT_START, "tiny-inception", started)
    loss_log = LossLog([(1, "train_loss", 1.0), (1, "held_out_loss", 1.0)])
    card.Card("builtin:tiny-inception", "summary", [], [], {"loss": 1.0}, 60.0).write(tmp_path, loss_log, 1)
    text = (tmp_path / "README.md").read_text()
    assert f"- commit: {started[0]}; builder sources sha256 `{started[1]}`" in text
    assert ("changed during the build" in text) == edited_during_the_build


@pytest.fixture
def inception_sources(tmp_path) -> Path:
    """A copy of the files tiny-inception's digest reads, to edit."""
    for file in sources.source_files("tiny-inception"):
        (tmp_path / file).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(sources.ROOT / file, tmp_path / file)
    return tmp_path


def inception_digest(root: Path) -> str:
    return sources.source_digest(sources.MODEL_SOURCES["tiny-inception"], root)


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, (path, old)
    path.write_text(text.replace(old, new))


def test_digest_ignores_formatting_comments_and_docstrings(inception_sources):
    root = inception_sources
    before = inception_digest(root)
    files = [root / file for file in sources.source_files("tiny-inception")]
    texts = {file: file.read_text() for file in files}
    ruff = [
        sys.executable,
        "-m",
        "ruff",
        "format",
        "--isolated",
        "--line-length=60",
        "--config=format.quote-style='single'",
    ]
    subprocess.run([*ruff, *map(str, files)], check=True, capture_output=True)
    edit(root / "lanskap/builtin/heads.py", "import numpy as np\nimport torch\n", "import torch\nimport numpy as np\n")
    edit(root / "lanskap/builtin/inception.py", "model = SceneClassifier()\n", "model = SceneClassifier()  # why\n")
    edit(root / "lanskap/builtin/training.py", "AdamW with a linear warmup", "AdamW with a linear warm-up")
    unchanged = [file.name for file in files if file.read_text() == texts[file]]
    assert unchanged == ["__main__.py"]  # it has no string or long line to rewrite
    assert inception_digest(root) == before


@pytest.mark.parametrize(
    ("file", "old", "new"),
    [
        ("lanskap/builtin/inception.py", "weight_decay=1e-4", "weight_decay=2e-4"),
        ("lanskap/builtin/config.py", '"strides": [4, 2, 2]', '"strides": [4, 2, 1]'),
        ("lanskap/evaluate/features.py", '"bicubic", (299, 299)', '"bilinear", (299, 299)'),  # used by a used member
        ("lanskap/core/determinism.py", '"ATEN_CPU_CAPABILITY": "avx2"', '"ATEN_CPU_CAPABILITY": "default"'),
    ],
)
def test_digest_changes_with_the_code(inception_sources, file, old, new):
    before = inception_digest(inception_sources)
    edit(inception_sources / file, old, new)
    assert inception_digest(inception_sources) != before


def test_digest_ignores_members_the_builder_does_not_use(inception_sources):
    before = inception_digest(inception_sources)
    edit(
        inception_sources / "lanskap/evaluate/features.py",
        "def text_embeddings(self, captions",
        "def text_embeddings(self, texts",
    )
    assert inception_digest(inception_sources) == before


def test_every_builder_import_is_a_weight_source_or_excused(monkeypatch):
    assert sources.undeclared_imports() == []
    excused = [source for source in sources.NOT_WEIGHTS if not source.startswith("lanskap/core/io.py")]
    monkeypatch.setattr(sources, "NOT_WEIGHTS", excused)
    assert sources.undeclared_imports() == ["lanskap/core/io.py:atomic_dir"]

"""The feature cache (lanskap/evaluate/feature_cache.py): a hit gives the metrics' bytes a miss gives, a damaged or
stale entry is never used, concurrent writers leave whole entries, each image is decoded once; and
`evaluate_project`, a small project with everything evaluate reads, which tests/test_evaluate_distributed.py
shares."""

import json
import multiprocessing
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from lanskap.data.procedural import generate
from lanskap.evaluate import extraction, feature_cache
from lanskap.evaluate.extraction import Extractor
from lanskap.evaluate.feature_cache import FeatureCache, extractor_revision
from lanskap.evaluate.features import read_rgb
from stages import evaluate
from tests.conftest import EVALUATE_ARGS, ROOT, shrink, write_params

REVISION = "0" * 64


def write_images(root: Path, folder: str, items) -> list[str]:
    paths = []
    for index, (image, _) in enumerate(items):
        path = f"{folder}/{index:04d}.png"
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        image.save(root / path)
        paths.append(path)
    return paths


def evaluate_project(root: Path, prompts: int) -> Path:
    """Test images and captions, base and LoRA images (one per prompt, drawn procedurally), the report's sources and
    params.yaml: what evaluate reads, without running the stages before it."""
    params = shrink(yaml.safe_load((ROOT / "params.yaml").read_text()))
    write_params(root, params)
    test = generate(prompts, 64, seed=0)
    captions = [caption for _, caption in test]
    pd.DataFrame({"path": write_images(root, "data/processed/images", test), "caption": captions}).to_csv(
        root / "data/processed/test.csv", index=False
    )
    rows = []
    for seed, model in ((1, "base"), (2, "lora")):
        paths = write_images(root, f"data/generated/{model}", generate(prompts, 64, seed=seed))
        weights = "raw" if model == "lora" else "none"
        rows += [(i, 0, captions[i], i, model, paths[i], weights) for i in range(prompts)]
    columns = ["prompt_index", "sample", "caption", "seed", "model", "path", "lora_weights"]
    pd.DataFrame(rows, columns=columns).to_csv(root / "data/generated/index.csv", index=False)
    for source in ("reports/generate/comparison.png", "reports/preprocess/data_card.md"):
        (root / source).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / source, root / source)
    card_params = json.dumps({group: params[group] for group in ("model", "lora", "train", "augment")}, indent=2)
    (root / "models/lora").mkdir(parents=True)
    (root / "models/lora/README.md").write_text(
        "# LoRA for builtin:tiny-sd2\n\n- base model: `builtin:tiny-sd2` revision `0` (v_prediction)\n"
        f"- trained at 32 px on 4 images; data sha256 `{'0' * 64}`\n- adapters: UNet\n\n"
        f"## Params\n\n```json\n{card_params}\n```\n"
    )
    return root


@pytest.fixture
def project(tmp_path, monkeypatch):
    """The project as cwd (3 batches per set of 70 prompts), its cache in .lanskap-cache/features/ there."""
    monkeypatch.delenv(feature_cache.LOCATION_SWITCH, raising=False)
    monkeypatch.chdir(evaluate_project(tmp_path, 70))
    return tmp_path


def run_evaluate(capsys) -> tuple[bytes, str]:
    evaluate.main(EVALUATE_ARGS)
    return Path("metrics/eval.json").read_bytes(), capsys.readouterr().out


def entries(root: Path) -> list[Path]:
    return sorted((root / ".lanskap-cache/features").rglob("*.features"))


def test_a_hit_gives_the_bytes_of_a_miss_and_a_damaged_entry_is_recomputed(project, capsys):
    missed, out = run_evaluate(capsys)
    assert "0 batch entries from the cache, 18 computed" in out  # 3 sets x 3 batches x 2 extractors
    stored = entries(project)
    assert len(stored) == 18
    hit, out = run_evaluate(capsys)
    assert "18 batch entries from the cache, 0 computed" in out
    assert hit == missed
    report = Path("reports/evaluate/report.md").read_bytes()

    damaged = bytearray(stored[0].read_bytes())
    damaged[-3] ^= 1  # one payload bit: the header still parses
    stored[0].write_bytes(bytes(damaged))
    stored[1].write_bytes(stored[1].read_bytes()[:100])  # truncated
    again, out = run_evaluate(capsys)
    assert "16 batch entries from the cache, 2 computed" in out
    assert again == missed and Path("reports/evaluate/report.md").read_bytes() == report
    assert stored[0].read_bytes() != bytes(damaged) and len(stored[1].read_bytes()) > 100  # replaced


def test_a_changed_extractor_revision_misses_and_gives_the_same_bytes(project, capsys, monkeypatch):
    before, _ = run_evaluate(capsys)
    # the preprocessing's code identity changes (as an edit of the decoder would)
    monkeypatch.setitem(feature_cache.PREPROCESSING, "clip", ["lanskap/evaluate/features.py:clip_pixels"])
    after, out = run_evaluate(capsys)
    assert "9 batch entries from the cache, 9 computed" in out  # CLIP's missed, Inception's hit
    assert after == before and len(entries(project)) == 27


def test_cache_location_follows_the_switch(tmp_path, monkeypatch):
    monkeypatch.setenv(feature_cache.LOCATION_SWITCH, str(tmp_path / "elsewhere"))
    assert feature_cache.cache_root() == tmp_path / "elsewhere"
    monkeypatch.delenv(feature_cache.LOCATION_SWITCH)
    assert feature_cache.cache_root() == Path(".lanskap-cache/features")


def test_revision_changes_with_weights_code_device_and_math_mode(monkeypatch):
    base = extractor_revision("clip", "w1", "cpu")
    assert extractor_revision("clip", "w1", "cpu") == base
    assert extractor_revision("clip", "w2", "cpu") != base
    assert extractor_revision("clip", "w1", "cuda:0") != base
    assert extractor_revision("clip", "w1", "cuda:0") == extractor_revision("clip", "w1", "cuda:1")
    assert extractor_revision("inception", "w1", "cpu") != base
    monkeypatch.setenv("LANSKAP_CPU_MATH", "native")
    assert extractor_revision("clip", "w1", "cpu") != base


def test_read_refuses_stale_and_damaged_entries(tmp_path):
    outputs = np.random.default_rng(0).normal(size=(3, 5)).astype(np.float32)
    cache, images = FeatureCache(tmp_path, "clip", REVISION), ["a", "b", "c"]
    assert cache.read(images) is None
    cache.write(images, outputs)
    assert np.array_equal(cache.read(images), outputs) and cache.read(images).dtype == np.float32
    assert cache.read(["a", "b"]) is None and cache.read(["b", "a", "c"]) is None
    assert FeatureCache(tmp_path, "clip", "1" * 64).read(images) is None
    path = cache.entry_path(images)
    good = path.read_bytes()
    header, _, payload = good.partition(b"\n")
    moved = json.loads(header) | {"revision": "1" * 64}  # an entry of another revision under this name
    for damaged in (b"", good[:-4], b"not json\n" + payload, json.dumps(moved).encode() + b"\n" + payload):
        path.write_bytes(damaged)
        assert cache.read(images) is None
    path.write_bytes(good)
    assert np.array_equal(cache.read(images), outputs)


def write_repeatedly(root: Path) -> None:
    cache = FeatureCache(root, "inception", REVISION)
    outputs = np.arange(64 * 2048, dtype=np.float32).reshape(64, 2048)  # every writer writes the same entry
    for _ in range(20):
        cache.write([str(i) for i in range(64)], outputs)


def test_concurrent_writers_leave_one_whole_entry(tmp_path):
    context = multiprocessing.get_context("fork")
    writers = [context.Process(target=write_repeatedly, args=(tmp_path,)) for _ in range(4)]
    for writer in writers:
        writer.start()
    cache, images = FeatureCache(tmp_path, "inception", REVISION), [str(i) for i in range(64)]
    reads = []
    while any(writer.is_alive() for writer in writers):
        reads.append(cache.read(images))
    for writer in writers:
        writer.join()
        assert writer.exitcode == 0
    expected = np.arange(64 * 2048, dtype=np.float32).reshape(64, 2048)
    assert all(found is None or np.array_equal(found, expected) for found in reads)  # never a partial entry
    assert np.array_equal(cache.read(images), expected)
    # no staging file left beside it
    assert [path.name for path in cache.entry_path(images).parent.iterdir()] == [cache.entry_path(images).name]


class MeanColour:
    """A stand-in extractor: each image's mean colour."""

    def embed_images(self, images):
        return torch.tensor(np.stack([np.asarray(image, dtype=np.float32).mean(axis=(0, 1)) for image in images]))


def test_each_image_is_decoded_once_for_both_extractors_and_not_at_all_on_a_hit(tmp_path, monkeypatch):
    paths = [tmp_path / path for path in write_images(tmp_path, "images", generate(40, 32, seed=0))]
    decodes = []
    monkeypatch.setattr(extraction, "read_rgb", lambda file: decodes.append(file) or read_rgb(file))
    extractors = {kind: Extractor(MeanColour(), FeatureCache(tmp_path / "cache", kind, REVISION)) for kind in "ab"}
    alone = SimpleNamespace(process_index=0, num_processes=1, is_main_process=True)
    first, counts = extraction.extract_sets({"set": paths}, extractors, alone)
    assert len(decodes) == 40 and counts == {"hit": 0, "miss": 4}  # 2 batches x 2 extractors
    again, counts = extraction.extract_sets({"set": paths}, extractors, alone)
    assert len(decodes) == 40 and counts == {"hit": 4, "miss": 0}
    assert all(np.array_equal(first[kind]["set"], again[kind]["set"]) for kind in "ab")


def test_a_cache_that_cannot_be_written_warns_once_and_the_features_are_still_given(tmp_path, capsys):
    (tmp_path / "a-file").write_text("")
    cache = FeatureCache(tmp_path / "a-file", "clip", REVISION)  # its folder cannot be made under a file
    for images in (["a"], ["b"]):
        cache.write(images, np.zeros((1, 2), dtype=np.float32))
        assert cache.read(images) is None
    assert capsys.readouterr().out.count("warning: feature cache") == 1

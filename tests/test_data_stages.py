"""Contracts of the data stages: ingest, caption, split, preprocess, each run as DVC runs it."""

import hashlib
import io

import pandas as pd
import pytest
from PIL import Image

from lanskap.core.errors import UserError
from lanskap.data.procedural import generate_item
from lanskap.data.split import split_table
from stages import caption, ingest, preprocess, split
from tests.conftest import PREPROCESS_ARGS, write_params


def photo(seed=0, size=(96, 80)) -> Image.Image:
    """A landscape photograph, a different one for each seed (one colour throughout would be rejected as blank)."""
    return generate_item(seed, max(size), 0)[0].resize(size, Image.Resampling.LANCZOS)


def png_bytes(size=(96, 80), seed=0) -> bytes:
    buffer = io.BytesIO()
    photo(seed, size).save(buffer, format="PNG")
    return buffer.getvalue()


def make_folder(root, count=4):
    """A user folder: good images with sidecar captions, plus one corrupt, one tiny and one duplicate."""
    folder = root / "raw"
    (folder / "sub").mkdir(parents=True)
    for index in range(count):
        (folder / "sub" / f"img{index}.png").write_bytes(png_bytes(seed=index))
        (folder / "sub" / f"img{index}.txt").write_text(f"a landscape number {index}\n")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (folder / "tiny.png").write_bytes(png_bytes(size=(8, 8)))
    (folder / "zz_copy.png").write_bytes((folder / "sub" / "img0.png").read_bytes())
    return folder


def tree_digest(folder) -> dict:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def run_data_stages(workdir):
    ingest.main(["--out", "data/ingested"])
    caption.main(["--manifest", "data/ingested/manifest.csv", "--out", "data/captions.csv"])
    split.main(["--captions", "data/captions.csv", "--out", "data/split"])
    preprocess.main(PREPROCESS_ARGS)


def test_data_stages_on_builtin_procedural(workdir, project_params):
    run_data_stages(workdir)
    manifest = pd.read_csv(workdir / "data/ingested/manifest.csv")
    assert len(manifest) == project_params["ingest"]["num_images"]
    assert list(manifest.columns[:5]) == ["path", "sha256", "width", "height", "source"]
    train = pd.read_csv(workdir / "data/processed/train.csv")
    test = pd.read_csv(workdir / "data/processed/test.csv")
    assert len(train) + len(test) == len(manifest) and len(test) > 0
    resolution = project_params["preprocess"]["resolution"]
    for path in pd.concat([train, test])["path"]:
        with Image.open(workdir / path) as image:
            assert image.size == (resolution, resolution) and image.mode == "RGB"
    assert (workdir / "reports/preprocess/preview.png").is_file()
    assert "Data card" in (workdir / "reports/preprocess/data_card.md").read_text()


def test_rerun_with_unchanged_inputs_changes_no_byte(workdir):
    run_data_stages(workdir)
    first = tree_digest(workdir / "data") | tree_digest(workdir / "reports")
    run_data_stages(workdir)
    assert tree_digest(workdir / "data") | tree_digest(workdir / "reports") == first


def test_ingest_folder_reports_bad_files_and_never_touches_the_source(workdir, project_params):
    folder = make_folder(workdir)
    before = tree_digest(folder)
    write_params(
        workdir, {**project_params, "ingest": {**project_params["ingest"], "source": str(folder), "min_size": 32}}
    )
    ingest.main(["--out", "data/ingested"])
    assert tree_digest(folder) == before
    manifest = pd.read_csv(workdir / "data/ingested/manifest.csv", keep_default_na=False)
    rejected = pd.read_csv(workdir / "data/ingested/rejected.csv").set_index("source")["reason"]
    assert len(manifest) == 4
    assert set(manifest["source_caption"]) == {f"a landscape number {i}" for i in range(4)}
    assert "corrupt" in rejected[str(folder / "broken.jpg")] or "not an image" in rejected[str(folder / "broken.jpg")]
    assert "too small" in rejected[str(folder / "tiny.png")]
    assert "duplicate" in rejected[str(folder / "zz_copy.png")]
    for row in manifest.itertuples():  # accepted copies are byte-identical to their sources
        assert hashlib.sha256((workdir / row.path).read_bytes()).hexdigest() == row.sha256


def test_ingest_fails_clearly_when_too_few_images_remain(workdir, project_params):
    folder = workdir / "raw"
    folder.mkdir()
    (folder / "only.png").write_bytes(png_bytes())
    for index in range(5):
        (folder / f"broken{index}.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    write_params(workdir, {**project_params, "ingest": {**project_params["ingest"], "source": str(folder)}})
    with pytest.raises(UserError, match=r"only 1 usable image\(s\) from .*: 5 rejected \(listed above\)"):
        ingest.main(["--out", "data/ingested"])
    assert not (workdir / "data/ingested").exists()  # no partial output for DVC to record


def test_caption_keep_requires_captions_and_template_adds_prefix(workdir, project_params):
    folder = make_folder(workdir)
    (folder / "sub/img1.txt").unlink()
    write_params(
        workdir, {**project_params, "ingest": {**project_params["ingest"], "source": str(folder), "min_size": 32}}
    )
    ingest.main(["--out", "data/ingested"])
    with pytest.raises(UserError, match="no caption"):
        caption.main(["--manifest", "data/ingested/manifest.csv", "--out", "data/captions.csv"])
    write_params(
        workdir,
        {
            **project_params,
            "caption": {**project_params["caption"], "method": "template", "template": "a castle", "prefix": "lnskp, "},
        },
    )
    caption.main(["--manifest", "data/ingested/manifest.csv", "--out", "data/captions.csv"])
    table = pd.read_csv(workdir / "data/captions.csv")
    assert set(table["caption"]) == {"lnskp, a castle"}
    assert (table["clip_tokens"] == table["clip_tokens"][0]).all() and table["clip_tokens"][0] > 4


def test_caption_warns_when_a_caption_exceeds_77_clip_tokens(workdir, project_params, capsys):
    long_caption = " ".join(["mountain"] * 100)
    write_params(
        workdir,
        {**project_params, "caption": {**project_params["caption"], "method": "template", "template": long_caption}},
    )
    ingest.main(["--out", "data/ingested"])
    caption.main(["--manifest", "data/ingested/manifest.csv", "--out", "data/captions.csv"])
    assert "102 CLIP tokens, truncated to 77" in capsys.readouterr().out  # 100 words + start and end


def table_of(n, start=0):
    return pd.DataFrame(
        {
            "sha256": [hashlib.sha256(str(i).encode()).hexdigest() for i in range(start, start + n)],
            "path": [f"img{i}.png" for i in range(start, start + n)],
            "caption": "x",
        }
    )


def test_split_is_deterministic_and_stable_when_images_are_added():
    train, test = split_table(table_of(100), 0.2, seed=0)
    again_train, again_test = split_table(table_of(100), 0.2, seed=0)
    assert train.equals(again_train) and test.equals(again_test)
    grown_train, grown_test = split_table(table_of(150), 0.2, seed=0)
    assert set(test["sha256"]) <= set(grown_test["sha256"])
    assert set(train["sha256"]) <= set(grown_train["sha256"])
    assert 10 <= len(test) <= 30
    other_train, _ = split_table(table_of(100), 0.2, seed=1)
    assert set(other_train["sha256"]) != set(train["sha256"])


def test_split_refuses_an_empty_side():
    with pytest.raises(UserError, match="both sides"):
        split_table(table_of(2), 0.01, seed=0)


def test_stratified_split_keeps_each_groups_share():
    table = table_of(100).assign(group=["mountains"] * 80 + ["lakes"] * 20)
    train, test = split_table(table, 0.2, seed=0, stratify="group")
    assert test["group"].value_counts().to_dict() == {"mountains": 16, "lakes": 4}
    with pytest.raises(UserError, match="no column 'style'"):
        split_table(table, 0.2, seed=0, stratify="style")


def test_caption_overrides_win_and_keep_the_trigger_word(workdir, project_params):
    folder = make_folder(workdir)
    (folder / "sub/img1.txt").unlink()  # no sidecar: the override provides it
    (workdir / "overrides.csv").write_text("file,caption\nimg1.png,a caption from the overrides file\nnone.png,x\n")
    caption_params = {**project_params["caption"], "overrides": str(workdir / "overrides.csv"), "prefix": "lnskp, "}
    write_params(
        workdir,
        {
            **project_params,
            "caption": caption_params,
            "ingest": {**project_params["ingest"], "source": str(folder), "min_size": 32},
        },
    )
    ingest.main(["--out", "data/ingested"])
    caption.main(["--manifest", "data/ingested/manifest.csv", "--out", "data/captions.csv"])
    table = pd.read_csv(workdir / "data/captions.csv").set_index("source")["caption"]
    assert table[str(folder / "sub/img1.png")] == "lnskp, a caption from the overrides file"
    assert table[str(folder / "sub/img0.png")] == "lnskp, a landscape number 0"


def test_preprocess_without_centre_crop_keeps_the_aspect_ratio(workdir, project_params):
    folder = make_folder(workdir, count=12)  # 96 x 80 images
    write_params(
        workdir,
        {
            **project_params,
            "preprocess": {**project_params["preprocess"], "center_crop": False},
            "ingest": {**project_params["ingest"], "source": str(folder), "min_size": 32},
            "split": {**project_params["split"], "test_fraction": 0.5},
        },
    )
    run_data_stages(workdir)
    resolution = project_params["preprocess"]["resolution"]
    for path in pd.read_csv(workdir / "data/processed/train.csv")["path"]:
        with Image.open(workdir / path) as image:
            assert min(image.size) == resolution and image.width > image.height

"""A hostile corpus: every item gets a per-item reason or a clear stage error, never a traceback,
and the source folder is never modified."""

import io
import struct
import zlib
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from lanskap.errors import UserError
from stages import caption, ingest
from tests.conftest import write_params
from tests.test_data_stages import png_bytes, tree_digest


def png_claiming(width: int, height: int) -> bytes:
    """A valid PNG signature and IHDR that claim a huge size, with no real pixel data behind them."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def jpeg_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (96, 96), (10, 200, 10)).save(buffer, format="JPEG")
    return buffer.getvalue()


def hostile_folder(root: Path) -> tuple[Path, dict[str, str]]:
    """Files and the reason fragment expected for each rejected one."""
    folder = root / "raw"
    (folder / "a").mkdir(parents=True)
    (folder / "b").mkdir()
    files = {
        "zero.png": (b"", "not an image"),
        "truncated.jpg": (jpeg_bytes()[:200], "corrupt or truncated"),
        "truncated.png": (png_bytes()[:60], "corrupt or truncated"),
        "page.jpg": (b"<!DOCTYPE html><html><body>hello</body></html>", "not an image"),
        "bomb.png": (png_claiming(50_000, 50_000), "decompression bomb"),
        "a/same.png": (png_bytes(seed=1), None),
        "b/same.png": (png_bytes(seed=2), None),  # same name, other folder: both kept
        "latin1.png": (png_bytes(seed=3), None),
        "long.png": (png_bytes(seed=4), None),
    }
    for name, (data, _) in files.items():
        (folder / name).write_bytes(data)
    (folder / "a/same.txt").write_text("first")
    (folder / "b/same.txt").write_text("second")
    (folder / "latin1.txt").write_bytes("caf\xe9 au lac".encode("latin-1"))  # not UTF-8
    (folder / "long.txt").write_text(" ".join(["mountain"] * 10_000))
    (folder / "loop").symlink_to(folder, target_is_directory=True)
    return folder, {name: reason for name, (_, reason) in files.items() if reason}


def test_hostile_folder_gives_reasons_and_leaves_the_source_untouched(workdir, project_params, capsys):
    folder, expected = hostile_folder(workdir)
    before = tree_digest(folder)
    write_params(workdir, {**project_params, "caption": {**project_params["caption"], "method": "keep"},
                           "ingest": {**project_params["ingest"], "source": str(folder), "min_size": 32}})
    ingest.main(["--out", "data/ingested"])
    assert tree_digest(folder) == before
    rejected = pd.read_csv(workdir / "data/ingested/rejected.csv").set_index("source")["reason"]
    for name, reason in expected.items():
        assert reason in rejected[str(folder / name)], (name, rejected.get(str(folder / name)))
    manifest = pd.read_csv(workdir / "data/ingested/manifest.csv")
    assert len(manifest) == 4 and manifest["path"].is_unique
    caption.main(["--manifest", "data/ingested/manifest.csv", "--out", "data/captions.csv"])
    captions = pd.read_csv(workdir / "data/captions.csv").set_index("source")["caption"]
    assert captions[str(folder / "latin1.png")] == "caf\ufffd au lac"  # undecodable byte replaced, not a crash
    assert "truncated to 77" in capsys.readouterr().out


def test_unreadable_file_is_a_rejected_item(workdir, project_params, monkeypatch):
    folder = workdir / "raw"
    folder.mkdir()
    for index in range(3):
        (folder / f"{index}.png").write_bytes(png_bytes(seed=index))
    original = Path.read_bytes

    def read_bytes(path):
        if path.name == "1.png":  # as root, chmod 000 does not stop reads: simulate the permission error
            raise PermissionError(13, "Permission denied", str(path))
        return original(path)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    write_params(workdir, {**project_params, "ingest": {**project_params["ingest"], "source": str(folder), "min_size": 32}})
    ingest.main(["--out", "data/ingested"])
    rejected = pd.read_csv(workdir / "data/ingested/rejected.csv").set_index("source")["reason"]
    assert "Permission denied" in rejected[str(folder / "1.png")]


@pytest.mark.parametrize("manifest_text, message", [
    ("caption,licence\nhello,CC0\n", "needs a 'path' column"),
    ('path\n"unterminated\n', "cannot parse manifest"),
])
def test_broken_manifests_are_clear_stage_errors(workdir, project_params, manifest_text, message):
    (workdir / "manifest.csv").write_text(manifest_text)
    write_params(workdir, {**project_params, "ingest": {**project_params["ingest"], "source": str(workdir / "manifest.csv")}})
    with pytest.raises(UserError, match=message):
        ingest.main(["--out", "data/ingested"])
    assert not (workdir / "data/ingested").exists()

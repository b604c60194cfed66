"""A hostile corpus: every item gets a per-item reason or a clear stage error, never a traceback,
and the source folder is never modified."""

import codecs
import errno
import hashlib
import importlib
import io
import json
import re
import struct
import unicodedata
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from lanskap.core.errors import UserError
from lanskap.core.params import IngestParams
from lanskap.data.manifest import open_rgb
from stages import caption, ingest
from tests.conftest import write_params
from tests.icc_profiles import gray_profile, icc_profile, reference_to_srgb
from tests.test_data_stages import photo, png_bytes, tree_digest


def png_claiming(width: int, height: int) -> bytes:
    """A valid PNG signature and IHDR that claim a huge size, with no real pixel data behind them."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


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
    write_params(
        workdir,
        {
            **project_params,
            "caption": {**project_params["caption"], "method": "keep"},
            "ingest": {**project_params["ingest"], "source": str(folder), "min_size": 32},
        },
    )
    ingest.main(["--out", "data/ingested"])
    assert tree_digest(folder) == before
    rejected = pd.read_csv(workdir / "data/ingested/rejected.csv").set_index("source")["reason"]
    for name, reason in expected.items():
        assert reason in rejected[str(folder / name)], (name, rejected.get(str(folder / name)))
    manifest = pd.read_csv(workdir / "data/ingested/manifest.csv")
    assert len(manifest) == 4 and manifest["path"].is_unique
    caption.main(["--manifest", "data/ingested/manifest.csv", "--out", "data/captions.csv"])
    captions = pd.read_csv(workdir / "data/captions.csv").set_index("source")["caption"]
    assert captions[str(folder / "latin1.png")] == "café au lac"  # not UTF-8: read as Windows-1252, with a note
    assert "truncated to 77" in capsys.readouterr().out


def test_unreadable_file_is_a_rejected_item(workdir, project_params, monkeypatch):
    folder = workdir / "raw"
    folder.mkdir()
    for index in range(6):
        (folder / f"{index}.png").write_bytes(png_bytes(seed=index))
    original = Path.read_bytes

    def read_bytes(path):
        if path.name == "1.png":  # as root, chmod 000 does not stop reads: simulate the permission error
            raise PermissionError(13, "Permission denied", str(path))
        return original(path)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    write_params(
        workdir, {**project_params, "ingest": {**project_params["ingest"], "source": str(folder), "min_size": 32}}
    )
    ingest.main(["--out", "data/ingested"])
    rejected = pd.read_csv(workdir / "data/ingested/rejected.csv").set_index("source")["reason"]
    assert "Permission denied" in rejected[str(folder / "1.png")]


@pytest.mark.parametrize(
    ("manifest_text", "message"),
    [
        ("caption,licence\nhello,CC0\n", "needs a 'path' column"),
        ('path\n"unterminated\n', "cannot parse manifest"),
    ],
)
def test_broken_manifests_are_clear_stage_errors(workdir, project_params, manifest_text, message):
    (workdir / "manifest.csv").write_text(manifest_text)
    write_params(
        workdir, {**project_params, "ingest": {**project_params["ingest"], "source": str(workdir / "manifest.csv")}}
    )
    with pytest.raises(UserError, match=message):
        ingest.main(["--out", "data/ingested"])
    assert not (workdir / "data/ingested").exists()


# --- The second round: real photo collections (issue 12). Every file is made from a landscape photograph. ---


def encoded(image: Image.Image, fmt: str, **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


def png_rgb48(image: Image.Image) -> bytes:
    """A 16-bit-per-channel RGB PNG (Pillow cannot write one), each 8-bit value v stored as v * 257."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    pixels = (np.asarray(image, dtype=">u2") * 257).reshape(image.height, -1)
    rows = b"".join(b"\0" + row.tobytes() for row in pixels)  # filter type 0 on every row
    header = struct.pack(">IIBBBBB", image.width, image.height, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def photo_collection(root: Path) -> tuple[Path, dict, dict]:
    """A folder as phones, cameras and file managers leave them. Returns the folder, {accepted name: stored
    extension} and {rejected name: reason fragment}."""
    folder = root / "raw"
    for sub in ("sub", ".thumbnails"):
        (folder / sub).mkdir(parents=True)
    grey = np.asarray(photo(20).convert("L"))
    accepted = {  # name: (bytes, the extension ingest must store it under)
        "adobe.jpg": (encoded(photo(11), "JPEG", quality=95, icc_profile=icc_profile("adobe")), ".jpg"),
        "p3.jpg": (encoded(photo(12), "JPEG", quality=95, icc_profile=icc_profile("p3")), ".jpg"),
        "p3.png": (encoded(photo(13), "PNG", icc_profile=icc_profile("p3")), ".png"),
        "split-profile.jpeg": (encoded(photo(14), "JPEG", icc_profile=icc_profile("adobe", 16384)), ".jpeg"),
        "float.tif": (encoded(Image.fromarray((grey / 255).astype(np.float32), "F"), "TIFF"), ".tif"),
        "deep.png": (encoded(Image.fromarray(grey.astype(np.uint16) * 257), "PNG"), ".png"),
        "deep.tiff": (encoded(Image.fromarray(grey.astype(np.uint16) * 257), "TIFF"), ".tiff"),
        "rgb48.png": (png_rgb48(photo(21)), ".png"),
        "photo.avif": (encoded(photo(15), "AVIF", quality=90), ".avif"),
        "photo.ico": (encoded(photo(16, (64, 64)), "ICO", sizes=[(64, 64)]), ".ico"),
        "photo.ppm": (encoded(photo(17), "PPM"), ".ppm"),
        "grey.pgm": (encoded(photo(18).convert("L"), "PPM"), ".pgm"),
        "jpeg-named.png": (encoded(photo(19), "JPEG"), ".jpg"),  # stored under its real type
        "sub/png-named.jpg": (png_bytes(seed=22), ".png"),
        "sub/IMG_0001": (encoded(photo(23), "JPEG"), ".jpg"),  # no extension at all
        "panorama.jpg": (encoded(photo(24, (240, 80)), "JPEG"), ".jpg"),  # 3:1, within ingest.max_aspect_ratio
        "café.jpg": (encoded(photo(25), "JPEG"), ".jpg"),
        "bom.png": (png_bytes(seed=26), ".png"),
        "utf16.png": (png_bytes(seed=27), ".png"),
        "utf16-nobom.png": (png_bytes(seed=28), ".png"),
        "control.png": (png_bytes(seed=29), ".png"),
        "empty-caption.png": (png_bytes(seed=30), ".png"),
        "bom-only.png": (png_bytes(seed=31), ".png"),
        "upper.png": (png_bytes(seed=32), ".png"),
    }
    rejected = {
        "black.png": (encoded(Image.new("RGB", (96, 96)), "PNG"), "blank image: every pixel is (0, 0, 0)"),
        "white.jpg": (encoded(Image.new("RGB", (96, 96), "white"), "JPEG"), "blank image"),
        "strip.png": (
            encoded(photo(33, (64, 4096)), "PNG"),
            "aspect ratio 64.0:1 (64x4096) is beyond ingest.max_aspect_ratio=4: a square training crop would keep 1.6%",
        ),
        "photo.heic": (b"\0\0\0\x18ftypheic\0\0\0\0mif1heic" + encoded(photo(34), "JPEG"), "HEIC/HEIF image"),
        "bad-profile.jpg": (encoded(photo(35), "JPEG", icc_profile=b"not a profile" * 20), "unreadable ICC"),
    }
    hidden = {
        ".hidden.jpg": photo(36),
        ".thumbnails/a.jpg": photo(37),
        ".thumbnails/b.png": photo(38),
        "sub/._IMG_0001": photo(39),
    }
    for name, (data, _) in {**accepted, **rejected}.items():
        (folder / name).write_bytes(data)
    for name, image in hidden.items():
        (folder / name).write_bytes(encoded(image, "JPEG"))
    (folder / "notes.md").write_text("shot on holiday\n")
    (folder / "sub/metadata.json").write_text("{}")
    return folder, {name: suffix for name, (_, suffix) in accepted.items()}, {n: r for n, (_, r) in rejected.items()}


CAPTIONS = {  # sidecar name: (bytes, the caption ingest must read, "" for none)
    "adobe.jpg.txt": (b"a ridge at dawn", "a ridge at dawn"),  # foo.jpg.txt
    "p3.TXT": (b"a violet dusk", "a violet dusk"),  # upper-case extension
    unicodedata.normalize("NFD", "café.txt"): ("un café au lac".encode(), "un café au lac"),  # macOS: NFD name
    "bom.txt": (codecs.BOM_UTF8 + b"misty lake", "misty lake"),
    "utf16.txt": ("floating islands, ½ moon".encode("utf-16"), "floating islands, ½ moon"),  # Notepad: BOM + LE
    "utf16-nobom.txt": ("emerald aurora".encode("utf-16-le"), "emerald aurora"),
    "control.txt": (b"a\x00 lake\x07 at\tdusk\r\n\x1b[0m", "a lake at dusk [0m"),
    "empty-caption.txt": (b" \n\t ", ""),
    "bom-only.txt": (codecs.BOM_UTF8, ""),
    "UPPER.caption": (b"spires in the mist", "spires in the mist"),  # <stem>.caption, any case
}


def test_photo_collection_decodes_or_gives_a_reason_for_every_file(workdir, project_params, capsys):
    folder, accepted, rejected = photo_collection(workdir)
    for name, (data, _) in CAPTIONS.items():
        (folder / name).write_bytes(data)
    before = tree_digest(folder)
    write_params(
        workdir, {**project_params, "ingest": {**project_params["ingest"], "source": str(folder), "min_size": 32}}
    )
    ingest.main(["--out", "data/ingested"])
    assert tree_digest(folder) == before
    assert (
        "5 rejected, 3 near-duplicate pair(s) reported, 4 hidden file(s) skipped, 2 non-image file(s) ignored"
        in capsys.readouterr().out
    )
    near = pd.read_csv(workdir / "data/ingested/near_duplicates.csv")  # the same grey picture three ways; no blanks
    assert sorted(sorted(Path(a).name for a in pair) for pair in zip(near["source_a"], near["source_b"])) == [
        ["deep.png", "deep.tiff"],
        ["deep.png", "float.tif"],
        ["deep.tiff", "float.tif"],
    ]
    manifest = pd.read_csv(workdir / "data/ingested/manifest.csv", keep_default_na=False).set_index("source")
    reasons = pd.read_csv(workdir / "data/ingested/rejected.csv").set_index("source")["reason"]
    assert sorted(manifest.index) == sorted(str(folder / name) for name in accepted)  # nothing hidden, nothing lost
    assert {str(folder / name): Path(manifest.loc[str(folder / name), "path"]).suffix for name in accepted} == {
        str(folder / name): suffix for name, suffix in accepted.items()
    }
    assert sorted(reasons.index) == sorted(str(folder / name) for name in rejected)
    for name, reason in rejected.items():
        assert reason in reasons[str(folder / name)], (name, reasons[str(folder / name)])
    captions = {Path(source).name: caption for source, caption in manifest["source_caption"].items()}
    image_of = {"adobe.jpg.txt": "adobe.jpg", "p3.TXT": "p3.jpg", "UPPER.caption": "upper.png"}
    for sidecar, (_, expected) in CAPTIONS.items():
        image = image_of.get(sidecar) or unicodedata.normalize("NFC", sidecar).replace(".txt", ".png")
        image = image if image in captions else image.replace(".png", ".jpg")
        assert captions[image] == expected, (sidecar, captions[image])
    stored = {name: workdir / manifest.loc[str(folder / name), "path"] for name in accepted}
    grey = np.asarray(photo(20).convert("L"))
    for name in ("float.tif", "deep.png", "deep.tiff"):  # [0, 1] floats and 16-bit values back to the 8-bit picture
        assert np.abs(np.asarray(open_rgb(stored[name]))[..., 0].astype(int) - grey).max() <= 1, name
    assert np.abs(np.asarray(open_rgb(stored["rgb48.png"])).astype(int) - np.asarray(photo(21))).max() <= 1


def test_a_caption_that_is_missing_says_which_names_were_looked_for(workdir, project_params):
    folder = workdir / "raw"
    folder.mkdir()
    for index, name in enumerate(["a.png", "b.png", "c.png", "d.png", "e.png", "f.png"]):
        (folder / name).write_bytes(png_bytes(seed=index))
        if name not in ("a.png", "b.png"):
            (folder / name.replace(".png", ".txt")).write_text("a caption")
    (folder / "a.txt").write_bytes(codecs.BOM_UTF8)  # only a byte-order mark: no caption
    write_params(
        workdir,
        {
            **project_params,
            "caption": {**project_params["caption"], "method": "keep"},
            "ingest": {**project_params["ingest"], "source": str(folder), "min_size": 32},
        },
    )
    ingest.main(["--out", "data/ingested"])
    with pytest.raises(UserError, match=r"2 image\(s\) have no caption.*looked for a\.png\.txt, a\.txt, a\.caption"):
        caption.main(["--manifest", "data/ingested/manifest.csv", "--out", "data/captions.csv"])


@pytest.mark.parametrize(
    ("space", "table_size", "fmt"),
    [("adobe", 0, "JPEG"), ("p3", 0, "JPEG"), ("p3", 0, "PNG"), ("adobe", 16384, "JPEG")],
)
def test_icc_profiles_are_converted_to_srgb_as_the_reference_conversion(space, table_size, fmt):
    profile = icc_profile(space, table_size)
    data = encoded(photo(40, (128, 128)), fmt, quality=95, icc_profile=profile)
    if table_size:
        assert data.count(b"ICC_PROFILE\0") >= 2  # the profile is split over several APP2 segments
    with Image.open(io.BytesIO(data)) as image:
        stored_pixels = np.asarray(image.convert("RGB"))  # the values as encoded in the profile's space
    reference = reference_to_srgb(stored_pixels, space)
    converted = np.asarray(open_rgb(data)).astype(np.float64)
    assert np.abs(converted - reference).mean() < 0.5 and np.abs(converted - reference).max() < 1.5
    assert np.abs(stored_pixels - reference).mean() > 2.0  # negative control: ignoring the profile is visibly off


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"path": "a.png"}', '{"caption": "no path"}'], "line 2: no 'path'"),
        (['{"path": "a.png"}', '["a.png", "a caption"]'], "line 2: each line must be a JSON object"),
        (['"a.png"'], "line 1: each line must be a JSON object .* got a str"),
        (['{"path": "a.png"}', "", '{"path": "b.png",'], "line 3: cannot parse manifest: not valid JSON"),
        (['{"path": null}'], "line 1: no 'path'"),
    ],
)
def test_malformed_jsonl_rows_are_clean_errors_naming_the_line(workdir, project_params, lines, message):
    (workdir / "a.png").write_bytes(png_bytes())
    (workdir / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    write_params(workdir, {**project_params, "ingest": {**project_params["ingest"], "source": "manifest.jsonl"}})
    with pytest.raises(UserError, match=message):
        ingest.main(["--out", "data/ingested"])
    assert not (workdir / "data/ingested").exists()


def test_manifests_with_a_bom_are_read_and_local_sha256_is_checked(workdir, project_params):
    images = {f"{index}.png": png_bytes(seed=index) for index in range(6)}
    for name, data in images.items():
        (workdir / name).write_bytes(data)
    digest = {name: hashlib.sha256(data).hexdigest() for name, data in images.items()}
    rows = [
        {"path": "0.png", "sha256": digest["0.png"], "caption": "right"},
        {"path": "1.png", "sha256": digest["1.png"].upper(), "caption": "upper-case hex"},
        {"path": "2.png", "sha256": digest["3.png"], "caption": "wrong"},
        {"path": "3.png", "caption": "no checksum"},
        {"path": "4.png", "caption": "no checksum"},
        {"path": "5.png", "caption": "no checksum"},
    ]
    for manifest in ("manifest.csv", "manifest.jsonl"):
        text = (
            pd.DataFrame(rows).to_csv(index=False)
            if manifest.endswith(".csv")
            else "".join(json.dumps(row) + "\n" for row in rows)
        )
        (workdir / manifest).write_bytes(codecs.BOM_UTF8 + text.encode())
        write_params(
            workdir, {**project_params, "ingest": {**project_params["ingest"], "source": manifest, "min_size": 32}}
        )
        ingest.main(["--out", "data/ingested"])
        accepted = pd.read_csv(workdir / "data/ingested/manifest.csv")["source_caption"]
        rejected = pd.read_csv(workdir / "data/ingested/rejected.csv").set_index("source")["reason"]
        assert sorted(accepted) == ["no checksum"] * 3 + ["right", "upper-case hex"], manifest
        assert "sha256 differs from the manifest's sha256 column" in rejected["2.png"]


def test_a_folder_without_images_says_what_it_found_not_rejected_files(workdir, project_params):
    folder = workdir / "raw"
    (folder / ".thumbnails").mkdir(parents=True)
    (folder / ".thumbnails/a.jpg").write_bytes(encoded(photo(1), "JPEG"))
    (folder / "README.md").write_text("put images here")
    params = IngestParams(**{**project_params["ingest"], "source": str(folder)})
    with pytest.raises(UserError) as error:  # the library call: ingest's preflight stops the stage before this
        ingest.ingest(params, workdir / "data/ingested")
    assert "no image files found (1 hidden file(s) skipped, 1 non-image file(s) ignored (README.md))" in str(
        error.value
    )
    assert "rejected" not in str(error.value)


def test_disk_full_mid_write_is_a_clear_error_and_the_previous_output_stays(workdir, project_params, monkeypatch):
    ingest.main(["--out", "data/ingested"])  # builtin:procedural, the previous complete output
    before = tree_digest(workdir / "data/ingested")
    original, writes = Path.write_bytes, []

    def write_bytes(path, data):
        writes.append(path)
        if len(writes) == 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return original(path, data)

    monkeypatch.setattr(Path, "write_bytes", write_bytes)
    with pytest.raises(
        UserError,
        match=r"disk full while writing data/ingested \(No space left on device\): free "
        r"space on the disk holding /.*/data .* the previous data/ingested is unchanged",
    ):
        ingest.main(["--out", "data/ingested"])
    assert tree_digest(workdir / "data/ingested") == before
    assert sorted(path.name for path in (workdir / "data").iterdir()) == ["ingested"]  # no staging folder left


# --- The third round (issue 22): mismatched profiles, float ranges, deep pixels within 8 bits, cp1252 captions ---


def float_tiff(pixels: np.ndarray) -> bytes:
    """An uncompressed little-endian TIFF of float32 pixels, (H, W) or (H, W, channels): Pillow writes only one
    channel, and cannot read more."""
    height, width = pixels.shape[:2]
    channels = 1 if pixels.ndim == 2 else pixels.shape[2]
    data = pixels.astype("<f4").tobytes()
    tags = {  # tag: (type: 3 short, 4 long; values); 273 StripOffsets is filled in below
        256: (4, [width]), 257: (4, [height]), 258: (3, [32] * channels), 259: (3, [1]),
        262: (3, [1 if channels == 1 else 2]), 273: (4, [0]), 277: (3, [channels]), 278: (4, [height]),
        279: (4, [len(data)]), 339: (3, [3] * channels),  # SampleFormat 3: IEEE float
    }  # fmt: skip
    start = 8 + 2 + 12 * len(tags) + 4  # header, then the directory, then values too long for an entry
    entries, extra = [], b""
    for tag, (kind, values) in sorted(tags.items()):
        packed = struct.pack(f"<{len(values)}{'H' if kind == 3 else 'I'}", *values)
        if len(packed) > 4:
            packed, extra = struct.pack("<I", start + len(extra)), extra + packed
        entries.append([tag, kind, len(values), packed.ljust(4, b"\0")])
    entries[[entry[0] for entry in entries].index(273)][3] = struct.pack("<I", start + len(extra))
    directory = b"".join(struct.pack("<HHI", *entry[:3]) + entry[3] for entry in entries)
    return b"II*\0" + struct.pack("<IH", 8, len(tags)) + directory + b"\0" * 4 + extra + data


def tiff_f(pixels: np.ndarray, declared: tuple[float, float] | None = None) -> bytes:
    """A one-channel float TIFF, with SMinSampleValue/SMaxSampleValue tags when `declared`."""
    info = {340: declared[0], 341: declared[1]} if declared else {}
    return encoded(Image.fromarray(pixels.astype(np.float32), "F"), "TIFF", tiffinfo=info)


def third_round(folder: Path) -> tuple[dict, dict, dict]:
    """Files made from one landscape photograph's grey values. Returns {accepted name: the 8-bit grey values or RGB
    ingest must decode to}, {rejected name: reason fragment}, {accepted name: note fragment}."""
    folder.mkdir(parents=True)
    grey = np.asarray(photo(41).convert("L")).astype(np.int64)
    accepted = {  # name: (bytes, the pixels expected)
        "gray-profile.jpg": (encoded(photo(42), "JPEG", quality=95, icc_profile=gray_profile()), None),
        "float-0-255.tif": (tiff_f(grey.astype(np.float64)), grey),  # an 8-bit picture saved as floats
        "float-0-1.tif": (tiff_f(grey / 255), grey),
        "float-declared.tif": (tiff_f(grey * 4.0 + 0.5, (0.0, 1022.0)), grey),  # 0..1022 as its tags say
        "deep-within-8-bits.png": (encoded(Image.fromarray(grey.astype(np.uint16)), "PNG"), grey),
        "deep-within-8-bits.tif": (encoded(Image.fromarray(grey.astype(np.int32), "I"), "TIFF"), grey),
        "deep-16.png": (encoded(Image.fromarray(grey.astype(np.uint16) * 257), "PNG"), grey),
        "cafe.png": (png_bytes(seed=43), None),
        "chateau.png": (png_bytes(seed=44), None),
    }
    hdr = 3 * (grey - grey.min()) / np.ptp(grey.astype(np.float64))  # 0..3 (a high dynamic range), not whole numbers
    rejected = {
        "float-0-3.tif": (tiff_f(hdr), "float pixels span 0..3, beyond the range 0..1 of float images"),
        "float-beyond-declared.tif": (tiff_f(hdr, (0.0, 1.0)), "beyond the range 0..1 of its SMinSampleValue"),
        "float-rgb.tif": (float_tiff(np.asarray(photo(45)) / 255), "TIFF of 3 channel(s) of 32-bit float, which "),
        "deep-32.tif": (encoded(Image.fromarray(grey.astype(np.int32) * 400, "I"), "TIFF"), "beyond the 16-bit"),
        "binary-caption.png": (png_bytes(seed=46), "binary-caption.txt: caption file is not text in UTF-8, UTF-16"),
    }
    for name, (data, _) in {**accepted, **rejected}.items():
        (folder / name).write_bytes(data)
    (folder / "cafe.txt").write_bytes("Café crème, €5".encode("cp1252"))
    (folder / "chateau.txt").write_bytes("un château".encode("latin-1"))
    (folder / "binary-caption.txt").write_bytes(bytes(range(256)))
    notes = {
        "gray-profile.jpg": "ICC colour profile for GRAY ignored: the pixels are RGB",
        "cafe.png": "caption decoded as Windows-1252",
        "chateau.png": "caption decoded as Windows-1252",
    }
    return {name: pixels for name, (_, pixels) in accepted.items()}, {n: r for n, (_, r) in rejected.items()}, notes


def test_third_round_images_and_captions_are_read_right_or_refused(workdir, project_params, capsys):
    folder = workdir / "raw"
    accepted, rejected, notes = third_round(folder)
    before = tree_digest(folder)
    write_params(
        workdir, {**project_params, "ingest": {**project_params["ingest"], "source": str(folder), "min_size": 32}}
    )
    ingest.main(["--out", "data/ingested"])
    assert tree_digest(folder) == before
    out = capsys.readouterr().out
    assert "note: 2 item(s): caption decoded as Windows-1252" in out and "notes.csv" in out
    manifest = pd.read_csv(workdir / "data/ingested/manifest.csv", keep_default_na=False).set_index("source")
    reasons = pd.read_csv(workdir / "data/ingested/rejected.csv").set_index("source")["reason"]
    assert sorted(manifest.index) == sorted(str(folder / name) for name in accepted)
    assert sorted(reasons.index) == sorted(str(folder / name) for name in rejected)
    for name, reason in rejected.items():
        assert reason in reasons[str(folder / name)], (name, reasons[str(folder / name)])
    stored = {name: open_rgb(workdir / manifest.loc[str(folder / name), "path"]) for name in accepted}
    for name, grey in accepted.items():
        if grey is not None:
            assert np.abs(np.asarray(stored[name])[..., 0].astype(int) - grey).max() <= 1, name
    colour = np.asarray(stored["gray-profile.jpg"]).astype(int)
    assert np.abs(colour - np.asarray(open_rgb(encoded(photo(42), "JPEG", quality=95)))).mean() < 0.5
    assert np.abs(colour[..., 0] - colour[..., 1]).mean() > 10  # negative control: greyscale would be R = G = B
    captions = manifest["source_caption"]
    assert captions[str(folder / "cafe.png")] == "Café crème, €5"
    assert captions[str(folder / "chateau.png")] == "un château"
    assert not captions.str.contains("\ufffd").any()
    written = pd.read_csv(workdir / "data/ingested/notes.csv").set_index("source")["note"]
    assert sorted(written.index) == sorted(str(folder / name) for name in notes)
    for name, note in notes.items():
        assert note in written[str(folder / name)]


def test_the_data_card_counts_the_items_read_by_a_documented_rule(tmp_path):
    from stages.preprocess import data_card

    empty = {"rejected": ["source", "reason"], "near_duplicates": ["source_a", "source_b", "hash_distance"]}
    for name, columns in empty.items():
        pd.DataFrame(columns=columns).to_csv(tmp_path / f"{name}.csv", index=False)
    notes = ["caption decoded as Windows-1252 (not UTF-8 or UTF-16)"] * 2 + ["ICC colour profile for GRAY ignored"]
    pd.DataFrame({"source": ["a", "b", "c"], "note": notes}).to_csv(tmp_path / "notes.csv", index=False)
    table = pd.DataFrame({"caption": ["a lake", "a hill"], "clip_tokens": 4, "width": 64, "height": 64})
    card = data_card(table, table.iloc[:0], tmp_path, 64, bucketed=False)
    assert (
        "- read by a documented rule at ingest: 3; 2 caption decoded as Windows-1252 (not UTF-8 or UTF-16); "
        "1 ICC colour profile for GRAY ignored" in card
    )


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ("Café crème".encode("cp1252"), ("Café crème", "Windows-1252")),
        ("€5, naïve".encode("cp1252"), ("€5, naïve", "Windows-1252")),
        ("Café".encode(), ("Café", "")),
        ("Café".encode("utf-16"), ("Café", "")),
        (b"caf\xe9\x81", None),  # 0x81 is undefined in Windows-1252
        (b"\x00\x01\x02\xe9abc", None),  # control bytes: no text
        (codecs.BOM_UTF16_LE + b"a\x00\x00", None),  # a UTF-16 file cut in the middle of a character
    ],
)
def test_caption_bytes_are_decoded_with_a_note_or_refused_never_replaced(data, expected):
    from lanskap.data.images import ItemRejected
    from lanskap.data.sources import decode_caption

    if expected is None:
        with pytest.raises(ItemRejected, match="caption file is not text in UTF-8, UTF-16 or Windows-1252"):
            decode_caption(data)
    else:
        text, note = decode_caption(data)
        assert text == expected[0] and expected[1] in note and (note == "") == (expected[1] == "")


# --- Disk full and failing disks at every writer (issue 22): the errors each library really raises ---

ENOSPC = OSError(errno.ENOSPC, "No space left on device")
SAFETENSORS_FULL = "Error while serializing: I/O error: No space left on device (os error 28)"  # from a full tmpfs
TORCH_FULL = "[enforce fail at inline_container.cc:671] . unexpected pos 576 vs 534"  # torch.save on a full tmpfs


def raising(error: BaseException):
    def fail(*args, **kwargs):
        raise error

    return fail


def previous_output(path: Path) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"the previous output")
    return path.read_bytes()


@pytest.mark.parametrize(
    ("writer", "patched", "error", "message"),
    [
        ("csv", (pd.DataFrame, "to_csv"), ENOSPC, "disk full while writing {target} (No space left on device)"),
        ("json", (Path, "write_text"), ENOSPC, "disk full while writing {target} (No space left on device)"),
        ("text", (Path, "write_text"), OSError(errno.EIO, "I/O"), "could not write {target} (Input/output error)"),
        ("png", (Image.Image, "save"), ENOSPC, "disk full while writing {target} (No space left on device)"),
        ("safetensors", (Path, "write_bytes"), ENOSPC, "disk full while writing {target} (No space left on device)"),
    ],
)
def test_each_writer_maps_a_full_or_failing_disk_to_the_disk_message(
    tmp_path, monkeypatch, writer, patched, error, message
):
    import safetensors.torch
    import torch

    from lanskap.core.figures import save_png
    from lanskap.core.io import canonicalise_safetensors, write_csv, write_json, write_text

    target = tmp_path / "out" / f"a.{writer}"
    before = previous_output(target)
    if writer == "safetensors":  # the header rewrite of every exported file
        safetensors.torch.save_file({"a": torch.zeros(4)}, target)
        before = target.read_bytes()
    monkeypatch.setattr(*patched, raising(error))
    write = {
        "csv": lambda: write_csv(target, pd.DataFrame({"a": [1]})),
        "json": lambda: write_json(target, {"a": 1}),
        "text": lambda: write_text(target, "a"),
        "png": lambda: save_png(Image.new("RGB", (8, 8)), target),
        "safetensors": lambda: canonicalise_safetensors(target),
    }[writer]
    with pytest.raises(UserError, match=re.escape(message.format(target=target))) as raised:
        write()
    assert "the previous" in str(raised.value) and f"df -h {target.parent}" in str(raised.value)
    assert target.read_bytes() == before and sorted(path.name for path in target.parent.iterdir()) == [target.name]


@pytest.mark.parametrize(
    ("failing", "error"),
    [
        ("safetensors.torch.save_file", "safetensors"),
        ("torch.save", RuntimeError(TORCH_FULL)),
        ("pathlib.Path.write_text", ENOSPC),
    ],
)
def test_a_full_disk_while_saving_a_checkpoint_is_the_disk_message(tmp_path, monkeypatch, failing, error):
    from safetensors import SafetensorError

    from lanskap.train.checkpoints import TrainingState, save_checkpoint
    from tests.test_interruptions import tiny_training

    parameters, optimizer, scheduler = tiny_training()
    checkpoint_dir = tmp_path / ".lanskap-cache/checkpoints/key"
    save_checkpoint(checkpoint_dir, TrainingState(step=4), parameters, optimizer, scheduler)
    module, name = failing.rsplit(".", 1)
    monkeypatch.setattr(
        importlib.import_module(module) if module != "pathlib.Path" else Path,
        name,
        raising(SafetensorError(SAFETENSORS_FULL) if error == "safetensors" else error),
    )
    with pytest.raises(UserError, match=r"(disk full|could not) .*step-00000008.* the previous .* unchanged"):
        save_checkpoint(checkpoint_dir, TrainingState(step=8), parameters, optimizer, scheduler)
    assert sorted(path.name for path in checkpoint_dir.iterdir()) == ["step-00000004"]


def test_a_full_disk_during_the_lora_export_is_the_disk_message(tmp_path, monkeypatch):
    """The export as train_lora runs it (inside its output's staging folder), with safetensors' own error type."""
    import safetensors.torch
    from diffusers import UNet2DConditionModel
    from safetensors import SafetensorError

    from lanskap.core.io import atomic_dir
    from lanskap.core.params import conf_group
    from lanskap.lora.adapters import add_unet_lora
    from lanskap.lora.files import export_lora
    from lanskap.models.resolve import BUILTIN_TINY_SD2, resolve_base_model

    unet = UNet2DConditionModel.from_pretrained(resolve_base_model(BUILTIN_TINY_SD2, None).path, subfolder="unet")
    params = conf_group("lora", rank=4, alpha=4.0)
    add_unet_lora(unet, params)
    out = tmp_path / "models/lora"
    before = previous_output(out / "pytorch_lora_weights.safetensors")
    monkeypatch.setattr(safetensors.torch, "save_file", raising(SafetensorError(SAFETENSORS_FULL)))
    message = r"disk full while writing .*models/lora \(No space left on device\)"
    with pytest.raises(UserError, match=message), atomic_dir(out) as staging:
        export_lora(unet, staging, params, {"model": "builtin:tiny-sd2", "revision": ""})
    assert (out / "pytorch_lora_weights.safetensors").read_bytes() == before
    assert sorted(path.name for path in out.parent.iterdir()) == ["lora"]


@pytest.mark.parametrize(
    "error",
    [RuntimeError("CUDA out of memory"), OSError(errno.ENOENT, "No such file"), ValueError("a bug")],
)
def test_errors_that_are_no_disk_failure_keep_their_own_type(tmp_path, error):
    """The negative control: only a failed write becomes the disk message."""
    from lanskap.core.io import atomic_dir

    with pytest.raises(type(error), match=str(error.args[-1])), atomic_dir(tmp_path / "out"):
        raise error


# --- Manifests as Windows tools save them (issue 22) ---


@pytest.mark.parametrize(
    ("name", "encode"),
    [
        ("manifest.csv", lambda text: text.encode("utf-16")),  # with a byte-order mark, as Notepad saves "Unicode"
        ("manifest.csv", lambda text: text.encode("utf-16-le")),  # without one
        ("manifest.csv", lambda text: text.encode("utf-16-be")),
        ("manifest.jsonl", lambda text: text.encode("utf-16")),
    ],
)
def test_a_utf16_manifest_is_read(workdir, project_params, name, encode):
    rows = [{"path": f"{index}.png", "caption": f"café n°{index}"} for index in range(6)]
    for index in range(6):
        (workdir / f"{index}.png").write_bytes(png_bytes(seed=index))
    text = (
        pd.DataFrame(rows).to_csv(index=False)
        if name.endswith(".csv")
        else "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    )
    (workdir / name).write_bytes(encode(text))
    write_params(workdir, {**project_params, "ingest": {**project_params["ingest"], "source": name, "min_size": 32}})
    ingest.main(["--out", "data/ingested"])
    manifest = pd.read_csv(workdir / "data/ingested/manifest.csv")
    assert sorted(manifest["source_caption"]) == [f"café n°{index}" for index in range(6)]


def test_a_manifest_in_another_encoding_is_one_clear_error(workdir, project_params):
    (workdir / "manifest.csv").write_bytes("path,caption\n0.png,café\n".encode("cp1252"))
    write_params(workdir, {**project_params, "ingest": {**project_params["ingest"], "source": "manifest.csv"}})
    with pytest.raises(UserError, match=r"manifest.csv: cannot parse manifest: not UTF-8 or UTF-16 text .*save it as"):
        ingest.main(["--out", "data/ingested"])
    assert not (workdir / "data/ingested").exists()


def test_windows_paths_in_a_manifest_get_a_hint(workdir, project_params):
    (workdir / "photos").mkdir()
    for index in range(7):
        (workdir / f"photos/{index}.png").write_bytes(png_bytes(seed=index))
    paths = [f"photos/{index}.png" for index in range(6)] + ["photos\\6.png", "C:\\Users\\me\\photos\\6.png"]
    (workdir / "manifest.csv").write_text(pd.DataFrame({"path": paths}).to_csv(index=False))
    before = tree_digest(workdir / "photos")
    write_params(
        workdir, {**project_params, "ingest": {**project_params["ingest"], "source": "manifest.csv", "min_size": 32}}
    )
    ingest.main(["--out", "data/ingested"])
    assert tree_digest(workdir / "photos") == before
    reasons = pd.read_csv(workdir / "data/ingested/rejected.csv").set_index("source")["reason"]
    assert reasons["photos\\6.png"] == (
        "no such file: photos\\6.png; this looks like a Windows path: write paths with / between folders, relative "
        "to the manifest (e.g. photos/6.png)"
    )
    assert "this looks like a Windows path" in reasons["C:\\Users\\me\\photos\\6.png"]
    assert "(not a drive letter such as C:)" in reasons["C:\\Users\\me\\photos\\6.png"]
    assert len(pd.read_csv(workdir / "data/ingested/manifest.csv")) == 6


def test_a_symlink_out_of_the_source_is_followed_in_a_folder_and_refused_in_a_manifest(workdir, project_params):
    """The documented rule (README, Your own images): a folder is the user's own selection, links included; a
    manifest's rows are confined to its folder, so a shared manifest cannot read files elsewhere on the machine."""
    outside, folder = workdir / "elsewhere", workdir / "raw"
    outside.mkdir(), folder.mkdir()
    (outside / "linked.png").write_bytes(png_bytes(seed=9))
    for index in range(6):
        (folder / f"{index}.png").write_bytes(png_bytes(seed=index))
    (folder / "linked.png").symlink_to(outside / "linked.png")
    (folder / "manifest.csv").write_text("path\n" + "".join(f"{index}.png\n" for index in range(6)) + "linked.png\n")
    for source, accepted, refused in ((folder, 7, 0), (folder / "manifest.csv", 6, 1)):
        write_params(
            workdir, {**project_params, "ingest": {**project_params["ingest"], "source": str(source), "min_size": 32}}
        )
        ingest.main(["--out", "data/ingested"])
        rejected = pd.read_csv(workdir / "data/ingested/rejected.csv")
        assert (len(pd.read_csv(workdir / "data/ingested/manifest.csv")), len(rejected)) == (accepted, refused)
    assert "path outside the manifest's folder" in rejected["reason"][0]

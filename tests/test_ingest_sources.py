"""ingest from URL and local manifests against a local HTTP server, and image-mode conversions."""

import contextlib
import hashlib
import http.server
import io
import re
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from lanskap.data.manifest import open_rgb
from stages import ingest
from tests.conftest import write_params
from tests.test_data_stages import photo, png_bytes, tree_digest

HITS: dict[str, int] = {}
REDIRECTS = {"/to-file.png": "file:///etc/passwd", "/to-ftp.png": "ftp://127.0.0.1/a.png"}


def path_seed(path: str) -> int:
    """A distinct picture per URL path, so distinct files are not exact duplicates of each other."""
    return int.from_bytes(hashlib.sha256(path.encode()).digest()[:3], "big")


class Handler(http.server.BaseHTTPRequestHandler):
    """good.png, slow.png (stalls), missing.png (404), page.jpg (HTML), huge.png (over the cap),
    flaky.png (500 once, then fine), to-file.png and to-ftp.png (redirect to file:// and ftp://)."""

    def do_GET(self):  # noqa: N802 - the http.server API
        HITS[self.path] = HITS.get(self.path, 0) + 1
        if self.path == "/slow.png":
            time.sleep(2.0)
        if self.path == "/missing.png" or (self.path == "/flaky.png" and HITS[self.path] == 1):
            return self.send_error(404 if self.path == "/missing.png" else 500)
        if self.path in REDIRECTS:
            self.send_response(302)
            self.send_header("Location", REDIRECTS[self.path])
            return self.end_headers()
        body = {
            "/page.jpg": b"<!DOCTYPE html><html>not an image</html>",
            "/huge.png": png_bytes(size=(64, 64)) + b"\0" * 3_000_000,
        }.get(self.path, png_bytes(seed=path_seed(self.path)))
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the client gave up on purpose (cap, timeout)
            self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}"
    httpd.shutdown()


def ingest_manifest(workdir, project_params, rows):
    folder = workdir / "raw"
    folder.mkdir(exist_ok=True)
    pd.DataFrame(rows).to_csv(folder / "manifest.csv", index=False)
    ingest_params = {
        **project_params["ingest"],
        "source": str(folder / "manifest.csv"),
        "min_size": 32,
        "download_timeout": 0.5,
        "max_download_mb": 1.0,
        "download_retries": 1,
    }
    write_params(workdir, {**project_params, "ingest": ingest_params})
    ingest.main(["--out", "data/ingested"])
    rejected = pd.read_csv(workdir / "data/ingested/rejected.csv").set_index("source")["reason"].to_dict()
    return pd.read_csv(workdir / "data/ingested/manifest.csv", keep_default_na=False), rejected


def test_url_manifest_accepts_good_files_and_gives_a_reason_for_each_bad_one(workdir, project_params, server):
    names = [
        "good.png",
        "other.png",
        "slow.png",
        "missing.png",
        "page.jpg",
        "huge.png",
        "flaky.png",
        "to-file.png",
        "to-ftp.png",
    ]
    rows = [
        {"path": f"{server}/{name}", "caption": name, "licence": "CC-BY-4.0", "attribution": "me"} for name in names
    ]
    rows += [{"path": "ftp://example.org/a.png"}, {"path": "../outside.png"}]
    manifest, rejected = ingest_manifest(workdir, project_params, rows)
    assert sorted(manifest["source_caption"]) == ["flaky.png", "good.png", "other.png"]  # flaky: retried
    assert set(manifest["licence"]) == {"CC-BY-4.0"}
    reasons = {name: rejected.get(f"{server}/{name}", "") for name in names}
    assert "timed out" in reasons["slow.png"] or "download failed" in reasons["slow.png"]
    assert "HTTP 404" in reasons["missing.png"]
    assert "not an image" in reasons["page.jpg"]
    assert "too large" in reasons["huge.png"]
    assert "file:///etc/passwd" in reasons["to-file.png"] and "not allowed" in reasons["to-file.png"]
    assert "redirect to a non-http(s) URL refused: ftp://" in reasons["to-ftp.png"]  # urllib itself follows ftp
    assert "unsupported URL scheme 'ftp'" in rejected["ftp://example.org/a.png"]
    assert "outside the manifest's folder" in rejected["../outside.png"]


def test_stored_names_come_from_the_content_hash_whatever_the_url(workdir, project_params, server):
    """A URL's query or odd name never reaches the file system: a 300-character "suffix" once made the
    stored name too long to write and stopped the whole ingest."""
    rows = [
        {"path": f"{server}/long.png?v={'a' * 300}", "caption": "long"},
        {"path": f"{server}/..%2F..%2Fescape", "caption": "no suffix"},
    ]
    rows += [
        {"path": f"{server}/filler-{index}.png", "caption": "enough images for the preflight"} for index in range(4)
    ]
    manifest, rejected = ingest_manifest(workdir, project_params, rows)
    assert not rejected and len(manifest) == 6
    assert [Path(path).parent.as_posix() for path in manifest["path"]] == ["data/ingested/images"] * 6
    assert all(re.fullmatch(r"[0-9a-f]{16}\.png", Path(path).name) for path in manifest["path"])
    assert sorted(path.name for path in (workdir / ".lanskap-cache/downloads").iterdir()) == sorted(
        hashlib.sha256(row["path"].encode()).hexdigest() for row in rows
    )


def test_downloads_resume_from_the_cache(workdir, project_params, server):
    rows = [{"path": f"{server}/cached-{i}.png", "caption": "x"} for i in range(6)]
    ingest_manifest(workdir, project_params, rows)
    hits_after_first = {path: HITS[path] for path in (f"/cached-{i}.png" for i in range(6))}
    ingest_manifest(workdir, project_params, rows)
    assert {path: HITS[path] for path in hits_after_first} == hits_after_first


def image_bytes(image: Image.Image, fmt: str, **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


def test_modes_and_orientation_become_upright_rgb(workdir, project_params):
    folder = workdir / "raw"
    folder.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    transparent_corner = photo(5).convert("RGBA")
    transparent_corner.paste((0, 0, 255, 0), (0, 0, 16, 16))
    grey = photo(4).convert("L")
    files = {
        "cmyk.jpg": image_bytes(photo(0).convert("CMYK"), "JPEG"),
        "palette.png": image_bytes(photo(1).convert("P"), "PNG"),
        "alpha.png": image_bytes(transparent_corner, "PNG"),
        "deep.png": image_bytes(Image.fromarray(np.asarray(grey).astype(np.uint16) * 257), "PNG"),  # 16-bit grey
        "rotated.jpg": image_bytes(photo(2, (120, 80)), "JPEG", exif=exif.tobytes()),
        "anim.gif": image_bytes(photo(3).convert("P"), "GIF", save_all=True, append_images=[photo(6).convert("P")]),
        "photo.webp": image_bytes(photo(7), "WEBP"),
        "photo.tiff": image_bytes(photo(8), "TIFF"),
        "photo.bmp": image_bytes(photo(9), "BMP"),
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    before = tree_digest(folder)
    write_params(
        workdir, {**project_params, "ingest": {**project_params["ingest"], "source": str(folder), "min_size": 32}}
    )
    ingest.main(["--out", "data/ingested"])
    manifest = pd.read_csv(workdir / "data/ingested/manifest.csv").set_index("source")
    assert len(manifest) == len(files) and tree_digest(folder) == before
    assert tuple(manifest.loc[str(folder / "rotated.jpg"), ["width", "height"]]) == (80, 120)
    assert open_rgb(workdir / manifest.loc[str(folder / "alpha.png"), "path"]).getpixel((0, 0)) == (255, 255, 255)
    deep = open_rgb(workdir / manifest.loc[str(folder / "deep.png"), "path"])
    assert np.array_equal(np.asarray(deep)[..., 0], np.asarray(grey))  # 65535 * v / 257 -> v: as viewers scale 16 bits


def test_near_duplicates_are_reported_not_rejected(workdir, project_params):
    from lanskap.data.procedural import generate_item

    folder = workdir / "raw"
    folder.mkdir()
    image, _ = generate_item(0, 128, 0)
    (folder / "a.png").write_bytes(image_bytes(image, "PNG"))
    (folder / "b.jpg").write_bytes(image_bytes(image.resize((120, 120)), "JPEG", quality=85))
    for index in range(1, 5):  # other pictures
        (folder / f"c{index}.png").write_bytes(image_bytes(generate_item(index, 128, 0)[0], "PNG"))
    write_params(
        workdir, {**project_params, "ingest": {**project_params["ingest"], "source": str(folder), "min_size": 32}}
    )
    ingest.main(["--out", "data/ingested"])
    near = pd.read_csv(workdir / "data/ingested/near_duplicates.csv")
    assert len(pd.read_csv(workdir / "data/ingested/manifest.csv")) == 6
    assert [(a.rsplit("/", 1)[1], b.rsplit("/", 1)[1]) for a, b in zip(near["source_a"], near["source_b"])] == [
        ("a.png", "b.jpg")
    ]

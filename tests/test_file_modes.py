"""Outputs get the modes any other file would under the user's umask: a teammate sharing the project (umask 022)
can read the LoRA and the data, and a umask that shuts others out (027) is kept, never widened."""

import os
import stat

import pytest

from lanskap.core.io import atomic_dir, atomic_file, write_text


@pytest.fixture(params=[0o022, 0o027], ids=["umask022", "umask027"])
def umask(request):
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_file_and_dir_outputs_follow_the_umask(tmp_path, umask):
    write_text(tmp_path / "metrics.json", "{}")
    with atomic_file(tmp_path / "lora.safetensors") as staging:
        staging.write_bytes(b"weights")
    with atomic_dir(tmp_path / "data" / "ingested") as staging:
        (staging / "images").mkdir()
        (staging / "images" / "a.png").write_bytes(b"png")
    # what open() and mkdir() give a fresh file and folder in the same process
    (tmp_path / "plain.txt").write_text("x")
    (tmp_path / "plain").mkdir()
    assert mode(tmp_path / "metrics.json") == mode(tmp_path / "lora.safetensors") == 0o666 & ~umask
    assert mode(tmp_path / "data" / "ingested") == mode(tmp_path / "data" / "ingested" / "images") == 0o777 & ~umask
    assert mode(tmp_path / "metrics.json") == mode(tmp_path / "plain.txt")
    assert mode(tmp_path / "data" / "ingested") == mode(tmp_path / "plain")
    assert os.umask(umask) == umask  # reading the umask put it back

"""Fixtures shared by the data tests."""

import glob
import json
import shutil

import pytest


@pytest.fixture
def media_root(tmp_path, demo_data):
    """A folder with one good image, one truncated image and one video."""
    root = tmp_path / "media"
    (root / "images").mkdir(parents=True)
    (root / "videos").mkdir()
    with open(demo_data["instruct"]) as f:
        first = json.loads(f.readline())
    shutil.copy(f"{demo_data['media_root']}/{first['image']}", root / "images" / "a.png")
    data = (root / "images" / "a.png").read_bytes()
    (root / "images" / "broken.png").write_bytes(data[: len(data) // 2])
    shutil.copy(sorted(glob.glob(f"{demo_data['media_root']}/videos/*.mp4"))[0], root / "videos" / "v.mp4")
    return str(root)

"""benchmarks/input_pipeline.py: the JPEG stand-ins it writes, and its command line timing threads and processes."""

import os
import subprocess
import sys

import numpy as np
from PIL import Image

BENCHMARKS = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks")
sys.path.insert(0, BENCHMARKS)

import input_pipeline  # noqa: E402


def test_write_jpegs_makes_imagenet_sized_class_folders_once(tmp_path):
    root = str(tmp_path / "jpegs")
    input_pipeline.write_jpegs(root, 8)
    assert sorted(os.listdir(root)) == ["train", "val"]
    assert sorted(os.listdir(os.path.join(root, "train"))) == [f"class{c}" for c in range(4)]
    class0 = os.path.join(root, "train", "class0")
    files = [os.path.join(class0, f) for f in sorted(os.listdir(class0))]
    assert len(files) == 2 and len(os.listdir(os.path.join(root, "val", "class3"))) == 4
    image = Image.open(files[0])
    assert image.size == (500, 375) and image.mode == "RGB" and 30_000 < os.path.getsize(files[0]) < 200_000
    assert not np.array_equal(np.asarray(image), np.asarray(Image.open(files[1])))
    before = os.path.getmtime(files[0])
    input_pipeline.write_jpegs(root, 80)  # a root that holds files is left as it is
    assert os.path.getmtime(files[0]) == before and len(os.listdir(class0)) == 2


def test_command_line_times_threads_and_processes(tmp_path):
    root = str(tmp_path / "jpegs")
    out = subprocess.run(
        [sys.executable, os.path.join(BENCHMARKS, "input_pipeline.py"), "--config",
         os.path.join(BENCHMARKS, "..", "configs", "demo.py"), "--sources", "folder", "--data-dir", root,
         "--write-jpegs", "80", "--workers", "1", "--processes", "0,1", "--batches", "1"],
        capture_output=True, text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [line for line in out.stdout.splitlines() if "img/s" in line]
    assert len(lines) == 2 and "1 threads" in lines[0] and "1 processes" in lines[1]
    assert all("image uint8[" in line for line in lines)

"""benchmarks/conv_channels.py: its shape list, FLOP count, and a command-line run on small shapes."""

import json
import os
import subprocess
import sys

import pytest

BENCHMARKS = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks")
sys.path.insert(0, BENCHMARKS)

import conv_channels  # noqa: E402


def test_shapes_parse_into_size_channel_pairs():
    assert conv_channels.parse_shapes("56:64,80;28:160") == [(56, 64), (56, 80), (28, 160)]
    with pytest.raises(ValueError, match="size:channels"):
        conv_channels.parse_shapes("56")


def test_flops_count_a_3x3_convolution():
    assert conv_channels.conv_flops(128, 56, 80) == 2 * 128 * 56 * 56 * 80 * 80 * 9  # 46.2 GFLOP


def test_command_line_times_each_shape(tmp_path):
    out = tmp_path / "conv.json"
    result = subprocess.run(
        [sys.executable, os.path.join(BENCHMARKS, "conv_channels.py"), "--batch", "2", "--dtype", "float32",
         "--shapes", "8:8,16;4:24", "--out", str(out)],
        capture_output=True, text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["size"], r["channels"]) for r in rows] == [(8, 8), (8, 16), (4, 24)]
    assert all(r["forward_us"] > 0 and r["backward_us"] > 0 and r["forward_tflops"] > 0 for r in rows)
    assert len(result.stdout.strip().splitlines()) == 2 + 3  # device line, header, a row a shape

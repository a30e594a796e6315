"""Runs a test body in a subprocess with 2 fake CPU devices (XLA_FLAGS must be set before jax starts).

The body sees ``jax``, ``jnp``, ``np``, ``Mesh``, ``NamedSharding``, ``P`` and a 1-D ``mesh`` over both devices
named "data", and prints one line ``RESULT:<json>``, which :func:`run_on_two_devices` returns parsed."""

import json
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PREAMBLE = f"""
import json, os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, {ROOT!r})
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
mesh = Mesh(np.array(jax.devices()), ("data",))
"""


def run_on_two_devices(body: str) -> dict:
    code = PREAMBLE + textwrap.dedent(body)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT:"))
    return json.loads(line[len("RESULT:") :])

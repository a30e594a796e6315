"""Multi-process training through jax.distributed: 2 processes x 2 CPU devices give the same per-step losses and the
same best-model weights as 1 process x 4 devices (same global batch, each process feeding its own slice), launched
exactly as on a cluster without SLURM/MPI: the same main.py command with JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES
/ JAX_PROCESS_ID."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from mambavision_jax.train import loop
from mambavision_jax.weights import load_converted
from tests.train.conftest import ROOT

ARGS = [
    "--config=" + os.path.join(ROOT, "tests", "train", "tiny_config.py"),
    "--config.total_steps=4",
    "--config.checkpoint_every_steps=2",
    "--config.eval_every_steps=0",
]


def _train_losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


def _launch(env, workdir, extra_args, args=ARGS):
    return subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "main.py"), *args, *extra_args, f"--workdir={workdir}"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _with_devices(env, count):
    """The environment's XLA_FLAGS (the tests' compile options) plus ``count`` fake CPU devices."""
    return f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={count}".strip()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_two_processes(jax_cache_env, workdir, extra_args, args=ARGS, timeout=600) -> list[str]:
    """Runs main.py as 2 processes x 2 CPU devices (gloo collectives); returns their outputs once both succeeded."""
    port = _free_port()
    procs = [
        _launch(
            dict(
                jax_cache_env,
                XLA_FLAGS=_with_devices(jax_cache_env, 2),
                JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
                JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                JAX_NUM_PROCESSES="2",
                JAX_PROCESS_ID=str(i),
            ),
            workdir,
            extra_args,
            args,
        )
        for i in range(2)
    ]
    try:
        outs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]
    return outs


@pytest.mark.parametrize(
    "sharding_args",
    [[], ["--config.sharding=fsdp", "--config.fsdp_min_size=256"]],
    ids=["replicated", "fsdp"],
)
def test_two_processes_match_one(jax_cache_env, tiny_config, tmp_path, sharding_args):
    """With FSDP the large leaves are split over both processes' devices: the best model's weights must then be
    gathered from both, not read from process 0's own shards."""
    env = dict(jax_cache_env, XLA_FLAGS=_with_devices(jax_cache_env, 4))
    single = _launch(env, tmp_path / "one", sharding_args)
    out, _ = single.communicate(timeout=600)
    assert single.returncode == 0, out[-4000:]

    outs = _run_two_processes(jax_cache_env, tmp_path / "two", sharding_args)
    assert "; 4 devices (cpu)" in outs[0], "process 0 must see the 4 devices of both processes: " + outs[0][-2000:]
    assert f"sharding={'fsdp' if sharding_args else 'data'}," in outs[0], outs[0][-2000:]

    one, two = _train_losses(tmp_path / "one"), _train_losses(tmp_path / "two")
    assert sorted(one) == sorted(two) == [1, 2, 3, 4]
    np.testing.assert_allclose([two[s] for s in sorted(two)], [one[s] for s in sorted(one)], rtol=1e-5)

    # the final eval (step 4) is the best: process 0 writes the weights gathered from both processes, which are the
    # run's own step-4 weights (exported here from its checkpoint, in this one process)
    records = [json.load(open(os.path.join(tmp_path / run, "best", "best.json"))) for run in ("one", "two")]
    assert records[0]["step"] == records[1]["step"] == 4 and records[0]["top1"] == records[1]["top1"], records
    for key, value in (("total_steps", 4), ("checkpoint_every_steps", 2), ("eval_every_steps", 0)):
        setattr(tiny_config, key, value)
    for arg in sharding_args:
        key, value = arg.removeprefix("--config.").split("=")
        setattr(tiny_config, key, type(tiny_config[key])(value))
    plain, *ema = loop.export(tiny_config, str(tmp_path / "two"))
    exported = ema[0] if records[1]["metric"] == "ema_top1" else plain
    (_, best), (_, want) = (load_converted(str(d)) for d in (tmp_path / "two" / "best", exported))
    assert jax.tree.structure(best) == jax.tree.structure(want)
    for got, expected in zip(jax.tree.leaves(best), jax.tree.leaves(want)):
        np.testing.assert_array_equal(got, expected)


def test_two_processes_run_many_steps_between_logs(jax_cache_env, tmp_path):
    """120 steps logged once: the loop keeps few steps unfinished. With every step queued as fast as the host could,
    XLA:CPU's launch threads deadlocked in a collective (see ``loop._DispatchWindow``): 3 of 4 such runs hung."""
    args = [ARGS[0], "--config.total_steps=120", "--config.log_every_steps=120", "--config.checkpoint_every_steps=0"]
    _run_two_processes(jax_cache_env, tmp_path, ["--config.sharding=fsdp", "--config.fsdp_min_size=256"], args, 300)
    assert sorted(_train_losses(tmp_path)) == [120]

"""Subprocess helper for the training tests. Usage: ``python runner.py '<json spec>'``; prints one JSON line
prefixed with ``RESULT:``. Spec keys:
  devices: int           fake CPU devices (XLA_FLAGS is set before jax is imported)
  task: "compare_steps" | "train"
  overrides: {dotted.key: value}   applied to tests/train/tiny_config.get_config()
  workdir: str (train)
  exit_after_step: int (train)     hard-exits (os._exit: no cleanup, async saves cut off, like SIGKILL) right
                                   after the train row of that step is written
  out: str (compare_steps)         .npz path for the updated params
"""

import json
import os
import sys

spec = json.loads(sys.argv[1])
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={int(spec.get('devices', 1))}"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from tests.train import tiny_config  # noqa: E402


def make_config():
    c = tiny_config.get_config()
    for key, value in spec.get("overrides", {}).items():
        target = c
        *parents, leaf = key.split(".")
        for p in parents:
            target = target[p]
        target[leaf] = tuple(value) if isinstance(value, list) else value
    return c


def compare_steps():
    """Runs 3 train steps on one fixed global batch under each sharding strategy; saves params, prints losses."""
    import mambavision_jax.data as data
    from flax import traverse_util
    from mambavision_jax.train import loop, optim, sharding, state as state_lib, step as step_lib
    from mambavision_jax.train.packing import Packing

    out = {}
    arrays = {}
    rs = np.random.RandomState(0)
    gb = 8
    images = rs.normal(size=(gb, 32, 32, 3)).astype(np.float32)
    labels = rs.randint(0, 10, size=(gb,)).astype(np.int32)
    base = make_config()
    model = loop.build_model(base)
    rng = jax.random.PRNGKey(0)
    variables = jax.jit(model.init)({"params": rng}, jax.numpy.zeros((1, 32, 32, 3)))  # one init compile
    for strategy in ("data", "fsdp"):
        c = make_config()
        c.sharding = strategy
        c.fsdp_min_size = 256
        mesh = sharding.make_mesh()
        spe = 10
        packing = Packing.of(variables["params"])
        tx, schedule = optim.make_optimizer(c, spe, variables["params"], packing)
        state_fn = state_lib.make_state_fn(tx, use_ema=bool(c.get("ema_decay")), packing=packing)
        shardings = sharding.state_shardings(jax.eval_shape(state_fn, variables), mesh, strategy, c.fsdp_min_size)
        st = state_lib.state_from_variables(state_fn, variables, shardings)
        n_sharded = sum(1 for s in jax.tree.leaves(shardings) if any(a is not None for a in s.spec))
        train_step = step_lib.make_train_step(model, tx, schedule, c, spe, data, mesh, shardings)
        batch = sharding.global_batch({"image": images, "label": labels}, mesh)
        losses = []
        for i in range(2):
            st, m = train_step(st, batch, jax.random.PRNGKey(1), i)
            losses.append(float(m["loss"]))
        out[strategy] = {"losses": losses, "n_sharded_leaves": n_sharded}
        for k, v in traverse_util.flatten_dict(jax.device_get(st.variables()["params"])).items():
            arrays[strategy + "/" + "/".join(k)] = np.asarray(v)
        if st.ema_params is not None:
            for k, v in traverse_util.flatten_dict(jax.device_get(st.variables(ema=True)["params"])).items():
                arrays[strategy + "/ema/" + "/".join(k)] = np.asarray(v)
    np.savez(spec["out"], **arrays)
    out["device_count"] = jax.device_count()
    return out


def train():
    from mambavision_jax.train import loop

    c = make_config()
    exit_after = spec.get("exit_after_step")
    if exit_after is not None:
        # Hard exit right after step `exit_after` was logged (metrics row written), like a SIGKILL.
        from mambavision_jax.train import metrics as metrics_lib

        orig_write = metrics_lib.MetricWriter.write

        def write(self, step, split, metrics):
            orig_write(self, step, split, metrics)
            if split == "train" and step >= exit_after:
                os._exit(17)

        metrics_lib.MetricWriter.write = write
    result = loop.train_and_evaluate(c, spec["workdir"])
    return {"eval": result}


if __name__ == "__main__":
    task = spec["task"]
    result = {"compare_steps": compare_steps, "train": train}[task]()
    print("RESULT:" + json.dumps(result), flush=True)

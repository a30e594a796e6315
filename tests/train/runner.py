"""Subprocess helper for the training tests. Usage: ``python runner.py '<json spec>'``; prints one JSON line
prefixed with ``RESULT:``. Spec keys:
  devices: int           fake CPU devices (XLA_FLAGS is set before jax is imported)
  task: "compare_steps" | "per_device_step" | "accumulated_steps" | "train"
  overrides: {dotted.key: value}   applied to tests/train/tiny_config.get_config()
  workdir: str (train)
  exit_after_step: int (train)     hard-exits (os._exit: no cleanup, async saves cut off, like SIGKILL) right
                                   after the train row of that step is written
                                   (train's result: {"eval": final metrics, "train_steps": the steps it logged})
  out: str (compare_steps, accumulated_steps)   .npz path for the updated params (and BatchNorm statistics)
  grad_accum_steps: int, rows: [int], first_step: int (accumulated_steps)   micro-batches an update; the order of
                         the 8 rows; the step count of the first update
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


def accumulated_steps():
    """Two updates with ``grad_accum_steps`` over all devices, on a fixed 8-image global batch whose rows are taken in
    the spec's order, random draws on (mixup, cutmix, erasing, drop path), the config's sharding (packed params), from
    step ``first_step`` of 10-step epochs (MESA's teacher runs past its start ratio); saves the variables, returns
    the losses, MESA terms and gradient norms (LAMB's trust ratio hides a gradient's scale from the update)."""
    import mambavision_jax.data as data
    from flax import traverse_util
    from mambavision_jax.train import loop, optim, sharding, state as state_lib, step as step_lib
    from mambavision_jax.train.packing import Packing

    rs = np.random.RandomState(0)
    rows = np.asarray(spec.get("rows", range(8)))
    images = rs.randint(0, 256, size=(8, 32, 32, 3)).astype(np.uint8)[rows]
    labels = rs.randint(0, 10, size=(8,)).astype(np.int32)[rows]
    erase = np.stack([rs.randint(0, 8, 8), rs.randint(0, 8, 8), rs.randint(0, 9, 8), rs.randint(1, 9, 8)], 1)
    c = make_config()
    c.grad_accum_steps = int(spec["grad_accum_steps"])
    c.batch_size_per_device = 8 // jax.device_count() // c.grad_accum_steps
    model = loop.build_model(c)
    variables = jax.jit(model.init)({"params": jax.random.PRNGKey(0)}, jax.numpy.zeros((1, 32, 32, 3)))
    mesh = sharding.make_mesh()
    packing = Packing.of(variables["params"])
    tx, schedule = optim.make_optimizer(c, 10, variables["params"], packing)
    state_fn = state_lib.make_state_fn(tx, use_ema=bool(c.get("ema_decay")), packing=packing)
    abstract = jax.eval_shape(state_fn, variables)
    shardings = sharding.state_shardings(abstract, mesh, c.get("sharding", "data"), c.get("fsdp_min_size", 256))
    st = state_lib.state_from_variables(state_fn, variables, shardings)
    train_step = step_lib.make_train_step(model, tx, schedule, c, 10, data, mesh, shardings)
    batch = sharding.global_batch({"image": images, "label": labels, "erase": erase[rows].astype(np.int32)}, mesh)
    losses, mesa, grad_norms = [], [], []
    for i in range(int(spec.get("first_step", 0)), int(spec.get("first_step", 0)) + 2):
        st, m = train_step(st, batch, jax.random.PRNGKey(1), i)
        losses.append(float(m["loss"]))
        mesa.append(float(m.get("mesa_loss", 0.0)))
        grad_norms.append(float(m["grad_norm"]))
    flat = traverse_util.flatten_dict(jax.device_get(st.variables()), sep="/")
    np.savez(spec["out"], **{k: np.asarray(v) for k, v in flat.items()})
    n_sharded = sum(1 for s in jax.tree.leaves(shardings) if any(a is not None for a in s.spec))
    return {
        "losses": losses,
        "mesa": mesa,
        "grad_norms": grad_norms,
        "devices": jax.device_count(),
        "n_sharded_leaves": n_sharded,
    }


def per_device_step():
    """One step on an 8-image global batch over all devices with per-device BatchNorm statistics, against one-device
    steps on each device's rows from the same state. The spec's overrides must make the update linear in the
    gradient (plain SGD, no clipping) and the step free of random draws (no drop path, mixup or erasing), so the
    per-device step must give the average of the one-device results. Prints the largest differences."""
    import mambavision_jax.data as data
    from flax import traverse_util
    from mambavision_jax.train import loop, optim, sharding, state as state_lib, step as step_lib

    rs = np.random.RandomState(0)
    images = rs.normal(size=(8, 32, 32, 3)).astype(np.float32)
    labels = rs.randint(0, 10, size=(8,)).astype(np.int32)
    c = make_config()
    model = loop.build_model(c)
    variables = jax.jit(model.init)({"params": jax.random.PRNGKey(0)}, jax.numpy.zeros((1, 32, 32, 3)))

    def one_step(devices, rows, sync_batch_norm):
        c.sync_batch_norm = sync_batch_norm
        mesh = sharding.make_mesh(devices)
        tx, schedule = optim.make_optimizer(c, 10, variables["params"])
        state_fn = state_lib.make_state_fn(tx, use_ema=False)
        shardings = sharding.state_shardings(jax.eval_shape(state_fn, variables), mesh)
        st = state_lib.state_from_variables(state_fn, variables, shardings)
        train_step = step_lib.make_train_step(model, tx, schedule, c, 10, data, mesh, shardings)
        batch = sharding.global_batch({"image": images[rows], "label": labels[rows]}, mesh)
        compiled = train_step.lower(st, batch, jax.random.PRNGKey(1), 0).compile()
        st, m = compiled(st, batch, jax.random.PRNGKey(1))
        hlo = compiled.as_text()
        flat = traverse_util.flatten_dict(jax.device_get(st.variables()), sep="/")
        return float(m["loss"]), {k: np.asarray(v, np.float64) for k, v in flat.items()}, hlo

    n = jax.device_count()
    per = 8 // n
    loss, tree, hlo = one_step(jax.devices(), slice(None), False)
    singles = [one_step(jax.devices()[:1], slice(k * per, (k + 1) * per), True) for k in range(n)]
    sync_loss, sync_tree, _ = one_step(jax.devices(), slice(None), True)
    mean_tree = {k: np.mean([s[1][k] for s in singles], axis=0) for k in tree}
    scale = {k: max(1e-3, float(np.max(np.abs(mean_tree[k])))) for k in tree}

    def worst(a, b, part):
        return max(float(np.max(np.abs(a[k] - b[k]))) / scale[k] for k in a if k.startswith(part))

    def all_reduce_dtypes(text):
        """The element types of the results of the all-reduces in an optimized HLO text."""
        results = [
            line.split("=", 1)[1].split(op)[0]
            for line in text.splitlines()
            for op in (" all-reduce(", " all-reduce-start(")
            if op in line
        ]
        return sorted({t for r in results for t in ("bf16", "f16", "f32") if t + "[" in r})

    return {
        "devices": n,
        "loss": loss,
        "mean_single_loss": float(np.mean([s[0] for s in singles])),
        "sync_loss": sync_loss,
        "params_vs_mean_single": worst(tree, mean_tree, "params"),
        "stats_vs_mean_single": worst(tree, mean_tree, "batch_stats"),
        "stats_vs_sync": worst(tree, sync_tree, "batch_stats"),
        "all_reduce_dtypes": all_reduce_dtypes(hlo),
    }


def train():
    from mambavision_jax.train import loop

    from mambavision_jax.train import metrics as metrics_lib

    c = make_config()
    exit_after = spec.get("exit_after_step")
    train_steps = []  # the train rows this process writes: where it started shows whether it resumed
    orig_write = metrics_lib.MetricWriter.write

    def write(self, step, split, metrics):
        orig_write(self, step, split, metrics)
        if split == "train":
            train_steps.append(int(step))
            if exit_after is not None and step >= exit_after:
                os._exit(17)  # hard exit right after step `exit_after` was logged, like a SIGKILL

    metrics_lib.MetricWriter.write = write
    result = loop.train_and_evaluate(c, spec["workdir"])
    return {"eval": result, "train_steps": train_steps}


if __name__ == "__main__":
    task = spec["task"]
    tasks = {
        "compare_steps": compare_steps,
        "per_device_step": per_device_step,
        "accumulated_steps": accumulated_steps,
        "train": train,
    }
    result = tasks[task]()
    print("RESULT:" + json.dumps(result), flush=True)

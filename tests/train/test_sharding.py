"""Data parallelism on fake CPU devices, each device count in its own subprocess (XLA_FLAGS must precede jax init).

With global BatchNorm statistics (``sync_batch_norm``) the same global batch on 1 and on 4 devices gives the same
losses and updated params, for both data parallelism and FSDP. With per-device statistics (the default, the official
recipe) a step on 2 devices gives the average of one-device steps on each device's rows. Gradient accumulation's
micro-batches act as more devices."""

import json
import zlib

import numpy as np


def test_one_vs_four_devices_data_and_fsdp(run_runner, tmp_path):
    # LAMB (the official optimizer). eps is raised to 1e-3 because the conv biases in front of BatchNorm have an
    # exactly-zero true gradient: Adam would turn their float round-off (which differs with the reduction order
    # across devices) into +-lr sized updates. With eps 1e-3 those updates are ~1e-9 and everything else compares.
    spec = {
        "task": "compare_steps",
        "overrides": {
            "ema_decay": 0.99,
            "optimizer.name": "lamb",
            "optimizer.eps": 1e-3,
            "optimizer.lr": 5e-3,
            "sync_batch_norm": True,
        },
    }
    r1 = run_runner({**spec, "devices": 1, "out": str(tmp_path / "d1.npz")})
    r4 = run_runner({**spec, "devices": 4, "out": str(tmp_path / "d4.npz")})
    assert r1["device_count"] == 1 and r4["device_count"] == 4
    assert r4["fsdp"]["n_sharded_leaves"] > 0  # FSDP really sharded something on 4 devices
    assert r4["data"]["n_sharded_leaves"] == 0
    for strategy in ("data", "fsdp"):
        np.testing.assert_allclose(r4[strategy]["losses"], r1[strategy]["losses"], rtol=1e-5, atol=1e-6)
    p1, p4 = np.load(tmp_path / "d1.npz"), np.load(tmp_path / "d4.npz")
    assert sorted(p1.files) == sorted(p4.files) and len(p1.files) > 20
    for k in p1.files:
        np.testing.assert_allclose(p4[k], p1[k], rtol=1e-4, atol=1e-5, err_msg=k)
    # data-parallel and FSDP agree with each other too
    for k in [f for f in p4.files if f.startswith("data/")]:
        np.testing.assert_allclose(p4["fsdp/" + k[len("data/") :]], p4[k], rtol=1e-4, atol=1e-5, err_msg=k)


def test_per_device_batch_norm_with_fsdp_matches_data_parallel(run_runner, tmp_path):
    overrides = {"ema_decay": 0.99, "optimizer.name": "lamb", "optimizer.eps": 1e-3, "sync_batch_norm": False}
    r = run_runner({"task": "compare_steps", "devices": 4, "out": str(tmp_path / "p.npz"), "overrides": overrides})
    assert r["fsdp"]["n_sharded_leaves"] > 0
    np.testing.assert_allclose(r["fsdp"]["losses"], r["data"]["losses"], rtol=1e-5, atol=1e-6)
    p = np.load(tmp_path / "p.npz")
    for k in [f for f in p.files if f.startswith("data/")]:
        np.testing.assert_allclose(p["fsdp/" + k[len("data/") :]], p[k], rtol=1e-4, atol=1e-5, err_msg=k)


def test_per_device_batch_norm_averages_one_device_steps(run_runner):
    # Plain SGD without clipping makes the update linear in the gradient, and no drop path, mixup or erasing makes
    # the step free of random draws: then the 2-device step must equal the average of one-device steps on the two
    # halves of the batch (params, BatchNorm running statistics and loss), in bfloat16 compute. norm_impl="pallas"
    # puts Pallas kernels (interpret mode here) with their batch-parallel custom_partitioning inside the shard_map,
    # as the scan's are on GPUs.
    overrides = {
        "optimizer.name": "sgd",
        "optimizer.momentum": 0.0,
        "optimizer.clip_grad_norm": 0.0,
        "model.drop_path_rate": 0.0,
        "aug.mixup": 0.0,
        "aug.cutmix": 0.0,
        "ema_decay": None,
        "compute_dtype": "bfloat16",
        "model.norm_impl": "pallas",
    }
    r = run_runner({"task": "per_device_step", "devices": 2, "overrides": overrides})
    assert r["devices"] == 2
    np.testing.assert_allclose(r["loss"], r["mean_single_loss"], rtol=1e-4)
    assert r["params_vs_mean_single"] < 1e-4, r
    assert r["stats_vs_mean_single"] < 2e-3, r
    # The global-batch statistics are something else: the per-device path really normalised per device.
    assert r["stats_vs_sync"] > 2e-2, r
    assert abs(r["loss"] - r["sync_loss"]) > 1e-3, r
    # Gradients and statistics are averaged as float32 (the bfloat16 compute copies' gradients cast first).
    assert r["all_reduce_dtypes"] == ["f32"], r


def _accumulated(run_runner, tmp_path, devices, accum, overrides, rows=tuple(range(8)), first_step=0):
    spec = {"task": "accumulated_steps", "devices": devices, "grad_accum_steps": accum, "rows": list(rows)}
    spec.update(first_step=first_step, overrides=overrides)
    out = str(tmp_path / f"{zlib.crc32(json.dumps(spec, sort_keys=True).encode())}.npz")
    r = run_runner({**spec, "out": out})
    assert r["devices"] == devices
    return r, np.load(out)


def _assert_same_run(a, b):
    (result_a, vars_a), (result_b, vars_b) = a, b
    np.testing.assert_allclose(result_b["losses"], result_a["losses"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result_b["mesa"], result_a["mesa"], rtol=1e-4, atol=1e-6)
    # a gradient scaled by A/(A-1) shows here (the first step matches exactly; the second moves with the params)
    np.testing.assert_allclose(result_b["grad_norms"], result_a["grad_norms"], rtol=1e-3)
    assert sorted(vars_a.files) == sorted(vars_b.files) and len(vars_a.files) > 20
    for k in vars_a.files:
        np.testing.assert_allclose(vars_b[k], vars_a[k], rtol=1e-4, atol=1e-5, err_msg=k)


# LAMB with eps 1e-3 (see above), EMA, and every random draw on: mixup/cutmix, erasing (the batch's rectangles, with
# per-pixel noise), drop path
ACCUMULATION = {
    "optimizer.name": "lamb",
    "optimizer.eps": 1e-3,
    "ema_decay": 0.99,
    "aug.mixup": 0.8,
    "aug.cutmix": 1.0,
    "aug.reprob": 0.25,
}
# the same with MESA's EMA teacher on (the updates start at step 20, past its start) and FSDP's sharded state
MESA_FSDP = {**ACCUMULATION, "mesa": 0.5, "mesa_start_ratio": 0.0, "sharding": "fsdp", "fsdp_min_size": 256}


def test_gradient_accumulation_acts_as_more_devices(run_runner, tmp_path):
    """Per-device statistics: D devices with A micro-batches an update give the two updates of D·A devices, random
    draws and MESA's teacher included."""
    two_devices = _accumulated(run_runner, tmp_path, 2, 1, ACCUMULATION)
    _assert_same_run(two_devices, _accumulated(run_runner, tmp_path, 1, 2, ACCUMULATION))
    four_virtual = _accumulated(run_runner, tmp_path, 2, 2, MESA_FSDP, first_step=20)
    assert four_virtual[0]["n_sharded_leaves"] > 0 and min(four_virtual[0]["mesa"]) > 1e-3
    _assert_same_run(four_virtual, _accumulated(run_runner, tmp_path, 1, 4, MESA_FSDP, first_step=20))
    # the layouts give different numbers: the comparisons above are not vacuous
    assert abs(four_virtual[0]["losses"][0] - two_devices[0]["losses"][0]) > 1e-3


def test_gradient_accumulation_with_global_statistics(run_runner, tmp_path):
    """Global statistics: micro-batch j holds the j-th block of every device's rows, so 2 devices with 2 micro-batches
    give one device's updates on the same rows in that order (FSDP and MESA's teacher on)."""
    overrides = {**MESA_FSDP, "sync_batch_norm": True}
    two_devices = _accumulated(run_runner, tmp_path, 2, 2, overrides, first_step=20)
    one_device = _accumulated(run_runner, tmp_path, 1, 2, overrides, rows=(0, 1, 4, 5, 2, 3, 6, 7), first_step=20)
    _assert_same_run(two_devices, one_device)
    in_order = _accumulated(run_runner, tmp_path, 1, 2, overrides, first_step=20)
    assert abs(in_order[0]["losses"][0] - two_devices[0]["losses"][0]) > 1e-3

"""The same global batch on 1 and on 4 (fake CPU) devices gives the same losses and updated params, for both
data parallelism and FSDP. Each device count runs in its own subprocess (XLA_FLAGS must precede jax init)."""

import numpy as np


def test_one_vs_four_devices_data_and_fsdp(run_runner, tmp_path):
    # LAMB (the official optimizer). eps is raised to 1e-3 because the conv biases in front of BatchNorm have an
    # exactly-zero true gradient: Adam would turn their float round-off (which differs with the reduction order
    # across devices) into +-lr sized updates. With eps 1e-3 those updates are ~1e-9 and everything else compares.
    spec = {
        "task": "compare_steps",
        "overrides": {"ema_decay": 0.99, "optimizer.name": "lamb", "optimizer.eps": 1e-3, "optimizer.lr": 5e-3},
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

"""The Pallas scan under SPMD: with the batch sharded over devices, each device scans its own rows
(mambavision_jax.pallas.partitioning), and values and gradients equal the one-device ones.

Runs in a subprocess with 2 fake CPU devices (XLA_FLAGS must be set before jax starts); the kernels run in
interpret mode, wrapped exactly as on the GPU."""

import pytest

from two_devices import run_on_two_devices

BODY = """
    from mambavision_jax.pallas import selective_scan_pallas
    from mambavision_jax.pallas.testing import make_inputs

    def unnamed(spec, rank):  # the same layout without mesh axis names (no public API builds one)
        from jax._src.sharding_impls import GSPMDSharding
        return GSPMDSharding(tuple(jax.devices()), NamedSharding(mesh, spec)._to_xla_hlo_sharding(rank))

    out = {}
    for case, batch, spec in (CASES):
        batched, repl = NamedSharding(mesh, spec), NamedSharding(mesh, P())
        if case == "unnamed":
            try:
                batched, repl = unnamed(spec, 3), unnamed(P(), 1)
            except (ImportError, AttributeError, TypeError):
                out[case] = None
                continue
        args = make_inputs(np.random.default_rng(batch), batch, 7, 24)
        weights = jax.random.normal(jax.random.PRNGKey(99), (batch, 7, 24))
        scan = lambda *a: selective_scan_pallas(*a, delta_softplus=True, interpret=True)
        loss = lambda *a: jnp.sum(scan(*a) * weights)
        grad = jax.value_and_grad(loss, argnums=tuple(range(7)))
        shardings = (batched, batched, repl, batched, batched, repl, repl)
        placed = [jax.device_put(a, s) for a, s in zip(args, shardings)]
        local = [jax.device_put(a, jax.devices()[0]) for a in args]
        row = {}
        for name, fn in (("forward", scan), ("grad", grad)):
            sharded = jax.jit(fn, in_shardings=shardings)
            text = sharded.lower(*placed).as_text()
            row[name + "_partitioned_calls"] = text.count("CustomSPMDPartitioning")
            got = jax.tree.leaves(sharded(*placed))
            want = jax.tree.leaves(jax.jit(fn)(*local))
            row[name + "_max_err"] = max(
                float(np.max(np.abs(np.asarray(g) - np.asarray(w))) / (np.max(np.abs(np.asarray(w))) + 1e-30))
                for g, w in zip(got, want)
            )
            if name == "forward" and isinstance(got[0].sharding, NamedSharding):
                row["forward_spec"] = list(got[0].sharding.spec)
        out[case] = row
    print("RESULT:" + json.dumps(out))
"""


def _run(cases: str):
    return run_on_two_devices(BODY.replace("CASES", cases))


@pytest.fixture(scope="module")
def results():
    return _run('("batch", 4, P("data")), ("channels", 4, P(None, None, "data")), ("unnamed", 4, P("data"))')


def test_batch_sharded_scan_is_partitioned_and_matches_one_device(results):
    row = results["batch"]
    # The primal alone is one partitioned kernel call; value_and_grad runs the training forward and the backward.
    assert row["forward_partitioned_calls"] == 1
    assert row["grad_partitioned_calls"] == 2
    assert row["forward_spec"][0] == "data"
    assert row["forward_max_err"] < 1e-6
    # dA, dD and d(delta_bias) sum over all rows: a missing psum over the batch's devices shows up here.
    assert row["grad_max_err"] < 1e-5


def test_unsharded_batch_is_computed_whole(results):
    """Channels sharded, batch not: every device runs the kernels on the whole (gathered) arrays; still exact."""
    row = results["channels"]
    assert row["forward_partitioned_calls"] == 1
    assert row["forward_max_err"] < 1e-6
    assert row["grad_max_err"] < 1e-5


def test_batch_sharded_without_axis_names_is_computed_whole(results):
    """A batch sharded by an unnamed (GSPMD) sharding has no axes to psum over: the kernels run on the whole batch
    on every device, as XLA itself would run them; the results are exact."""
    row = results["unnamed"]
    if row is None:
        pytest.skip("this jax has no GSPMDSharding to build an unnamed sharding with")
    assert row["forward_partitioned_calls"] == 1
    assert row["forward_max_err"] < 1e-6
    assert row["grad_max_err"] < 1e-5


@pytest.mark.parametrize(
    "rule, summed, message",
    [
        ("l b d -> l b d", (), "must lead"),
        ("b l d, d n -> b l d, b n", (1,), "still has the batch axis"),
    ],
)
def test_batch_parallel_rejects_bad_rules(rule, summed, message):
    from mambavision_jax.pallas.partitioning import batch_parallel

    with pytest.raises(ValueError, match=message):
        batch_parallel(lambda *a: a, rule, num_static=0, summed_results=summed)

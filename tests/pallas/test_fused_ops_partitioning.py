"""The fused residual update + LayerNorm under SPMD: with the token rows sharded over two devices each device runs
the kernels on its own rows, and values and every gradient (the column sums psum-ed) equal the one-device ones. A
subprocess with 2 fake CPU devices; the kernels in interpret mode."""

import pytest

from two_devices import run_on_two_devices

BODY = """
    from mambavision_jax.pallas import layer_norm as ln

    rows, repl = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    rng = np.random.default_rng(0)
    normal = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
    m, c = 64, 32
    cases = {
        "norm": (
            lambda x, b, g, r, s, t: ln.add_layer_norm(x, b, gamma=g, row_scale=r, scale=s, bias=t, impl="pallas"),
            [normal(m, c), normal(m, c), normal(c), jnp.asarray(rng.choice([0.0, 2.0], m), jnp.float32),
             normal(c), normal(c)],
            [rows, rows, repl, rows, repl, repl],
        ),
    }
    out = {}
    for name, (fn, args, shardings) in cases.items():
        loss = lambda *a, fn=fn: sum(jnp.sum(jnp.sin(o)) for o in jax.tree.leaves(fn(*a)))
        grad = jax.value_and_grad(loss, argnums=tuple(range(len(args))))
        placed = [jax.device_put(a, s) for a, s in zip(args, shardings)]
        local = [jax.device_put(a, jax.devices()[0]) for a in args]
        row = {}
        for kind, f in (("forward", fn), ("grad", grad)):
            sharded = jax.jit(f, in_shardings=shardings)
            row[kind + "_partitioned_calls"] = sharded.lower(*placed).as_text().count("CustomSPMDPartitioning")
            got, want = jax.tree.leaves(sharded(*placed)), jax.tree.leaves(jax.jit(f)(*local))
            row[kind + "_max_err"] = max(
                float(np.max(np.abs(np.asarray(g) - np.asarray(w))) / (np.max(np.abs(np.asarray(w))) + 1e-30))
                for g, w in zip(got, want)
            )
        row["forward_spec"] = list(jax.tree.leaves(jax.jit(fn, in_shardings=shardings)(*placed))[0].sharding.spec)
        out[name] = row
    print("RESULT:" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def results():
    return run_on_two_devices(BODY)


def test_row_sharded_fused_norm_is_partitioned_and_matches_one_device(results):
    row = results["norm"]
    assert row["forward_partitioned_calls"] == 1
    assert row["grad_partitioned_calls"] == 2  # the forward kernel and the backward kernel
    assert row["forward_spec"][0] == "data"
    assert row["forward_max_err"] < 1e-6
    # the bias / gamma / scale gradients sum over all rows: a missing psum over the devices shows up here
    assert row["grad_max_err"] < 1e-5

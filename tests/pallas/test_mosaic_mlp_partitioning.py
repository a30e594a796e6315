"""The Mosaic MLP under SPMD: with the token rows sharded over two devices, its fc1 and GELU'-gradient calls are
partitioned (each device computes its own rows) and the value and every gradient (the weight and bias gradients
summed over all rows) equal the one-device ones. A subprocess with 2 fake CPU devices; 48 rows a device do not tile
the kernels, so each device runs their XLA equivalents, which is what a GPU falls back to as well."""

from two_devices import run_on_two_devices

BODY = """
    from mambavision_jax.pallas import mosaic_mlp

    rows, repl = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    rng = np.random.default_rng(0)
    normal = lambda *s: jnp.asarray(rng.standard_normal(s) / np.sqrt(s[0] if len(s) > 1 else 1), jnp.bfloat16)
    m, c, hidden = 96, 64, 256
    args = [normal(m, c), normal(c, hidden), jnp.asarray(rng.standard_normal(hidden), jnp.float32),
            normal(hidden, c), jnp.asarray(rng.standard_normal(c), jnp.float32)]
    shardings = [rows, repl, repl, repl, repl]
    loss = lambda *a: jnp.sum(jnp.sin(mosaic_mlp.gelu_mlp(*a).astype(jnp.float32)))
    grad = jax.value_and_grad(loss, argnums=tuple(range(5)))
    placed = [jax.device_put(a, s) for a, s in zip(args, shardings)]
    local = [jax.device_put(a, jax.devices()[0]) for a in args]
    out = {}
    for kind, f in (("forward", mosaic_mlp.gelu_mlp), ("grad", grad)):
        sharded = jax.jit(f, in_shardings=shardings)
        out[kind + "_partitioned_calls"] = sharded.lower(*placed).as_text().count("CustomSPMDPartitioning")
        got, want = jax.tree.leaves(sharded(*placed)), jax.tree.leaves(jax.jit(f)(*local))
        out[kind + "_max_err"] = max(
            float(np.max(np.abs(np.asarray(g, np.float32) - np.asarray(w, np.float32)))
                  / (np.max(np.abs(np.asarray(w, np.float32))) + 1e-30))
            for g, w in zip(got, want)
        )
    out["forward_spec"] = list(jax.jit(mosaic_mlp.gelu_mlp, in_shardings=shardings)(*placed).sharding.spec)
    print("RESULT:" + json.dumps(out))
"""


def test_row_sharded_mosaic_mlp_is_partitioned_and_matches_one_device():
    row = run_on_two_devices(BODY)
    assert row["forward_partitioned_calls"] == 1  # fc1 + GELU
    assert row["grad_partitioned_calls"] == 2  # fc1 + GELU with the pre-activation, and the GELU'-gradient GEMM
    assert row["forward_spec"][0] == "data"
    assert row["forward_max_err"] < 1e-2  # bf16 outputs: the devices' GEMMs may round differently
    assert row["grad_max_err"] < 2e-2

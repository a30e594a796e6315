"""The Pallas ops under JAX transformations: jax.vmap (the mapped axis folded into the kernels' batch, or one call
per mapped index), jax.checkpoint and higher-order differentiation (a clear error), against the pure-JAX impls.

Small shapes. The Pallas kernels run in interpret mode; on a GPU the vmap cases run once more with the compiled
Triton kernels (the trace-time vmap rule must hand the GPU the same folded batch)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mambavision_jax.pallas import KernelConfig, selective_scan, selective_scan_pallas
from mambavision_jax.pallas.layer_norm import add_layer_norm
from mambavision_jax.pallas.testing import make_inputs, rel_err

MAPPED = 2  # the vmapped axis' size
# (interpret, tolerance): interpret mode everywhere; the compiled kernels too where there is a GPU to run them
MODES = {"interpret": (True, 1e-5)}
if jax.default_backend() == "gpu":
    MODES["compiled"] = (False, 1e-4)


def _scan(impl, interpret=True):
    return lambda *a: selective_scan(*a, delta_softplus=True, impl=impl, interpret=interpret)


def _loss(fn):
    return lambda *a: jnp.sum(jnp.sin(fn(*a).astype(jnp.float32)))


def _assert_close(got, want, where, tol=1e-5):
    """Same shapes and dtypes, and relative errors within ``tol`` or, for a 16-bit leaf, one rounding of it."""
    for i, (g, w) in enumerate(zip(jax.tree.leaves(got), jax.tree.leaves(want))):
        assert g.shape == w.shape and g.dtype == w.dtype, (where, i, g.shape, w.shape, g.dtype, w.dtype)
        err = rel_err(g, np.asarray(jnp.asarray(w, jnp.float32), np.float64))
        allowed = max(tol, float(jnp.finfo(g.dtype).eps))
        assert err <= allowed, f"{where}: leaf {i} ({g.dtype}) rel err {err:.2e} > {allowed:.1e}"


def _stacked_inputs(seed):
    """selective_scan's arguments with a leading mapped axis: (MAPPED, batch 2, length 5, dim 16), d_state 8."""
    per_index = [make_inputs(np.random.default_rng([seed, i]), 2, 5, 16) for i in range(MAPPED)]
    return [jnp.stack(arrays) for arrays in zip(*per_index)]


@pytest.mark.parametrize(
    "in_axes",
    [(0, 0, None, 0, 0, None, None), 0],
    ids=["weights_shared_folded", "weights_mapped_per_index"],
)
@pytest.mark.parametrize("mode", MODES)
def test_vmap_of_scan_and_per_example_gradients_match_sequential(in_axes, mode):
    """vmap used to fail with "Batching rule for 'custom_partitioning' not implemented"."""
    interpret, tol = MODES[mode]
    args = _stacked_inputs(0)
    if in_axes != 0:
        args = [a[0] if axis is None else a for a, axis in zip(args, in_axes)]
    for fn in (
        lambda impl: _scan(impl, interpret),
        lambda impl: jax.value_and_grad(_loss(_scan(impl, interpret)), argnums=tuple(range(7))),
    ):
        got, want = (jax.jit(jax.vmap(fn(impl), in_axes=in_axes))(*args) for impl in ("pallas", "sequential"))
        _assert_close(got, want, f"in_axes={in_axes}, {mode}", tol)


@pytest.mark.parametrize("mode", MODES)
def test_nested_vmap_with_a_grouped_inference_config(mode):
    interpret, tol = MODES[mode]
    args = [jnp.stack([a, 0.9 * a]) for a in _stacked_inputs(1)]
    config = KernelConfig(chunk=16, state_groups=2)
    pallas = lambda *a: selective_scan_pallas(*a, delta_softplus=True, interpret=interpret, config=config)
    got = jax.jit(jax.vmap(jax.vmap(pallas)))(*args)
    _assert_close(got, jax.jit(jax.vmap(jax.vmap(_scan("sequential"))))(*args), f"nested vmap, {mode}", tol)


@pytest.mark.parametrize("mode", MODES)
def test_vmap_of_add_layer_norm_matches_xla(mode):
    """Forward and every gradient under vmap, with per-index row scales (drop path) and a per-index LayerNorm scale
    (an operand without the row axis: one kernel call per mapped index)."""
    interpret, tol = MODES[mode]
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    x, branch = (jax.random.normal(k, (MAPPED, 4, 6, 40)) for k in keys[:2])
    row_scale = jnp.where(jax.random.uniform(keys[2], (MAPPED, 24)) < 0.3, 0.0, 1.5)
    scale = 1.0 + 0.1 * jnp.arange(MAPPED * 40, dtype=jnp.float32).reshape(MAPPED, 40) / 40
    bias, gamma = jnp.full((40,), 0.1), jnp.full((40,), 0.5)

    def norm(impl):
        def f(x, b, r, s, bi, g):
            return add_layer_norm(x, b, scale=s, bias=bi, gamma=g, row_scale=r, impl=impl, interpret=interpret)

        return f

    for scale_axis in (None, 0):
        in_axes = (0, 0, 0, scale_axis, None, None)
        s = scale[0] if scale_axis is None else scale
        for wrap in (lambda f: f, lambda f: jax.grad(lambda *a: sum(map(jnp.sum, map(jnp.sin, f(*a)))), range(6))):
            got, want = (
                jax.jit(jax.vmap(wrap(norm(impl)), in_axes=in_axes))(x, branch, row_scale, s, bias, gamma)
                for impl in ("pallas", "xla")
            )
            _assert_close(got, want, f"scale_axis={scale_axis}, {mode}", tol)


@pytest.mark.parametrize("mode", MODES)
def test_checkpointed_gradients_with_mixed_dtypes_agree_across_impls(mode):
    """bfloat16 u, float32 delta, float16 B: every impl gives the same y and gradients (in the inputs' dtypes) under
    jax.checkpoint. Compiled on an H100, this case (B a float16 argument of the jitted gradient) used to stop with an
    illegal address: the backward's B/C prefetch read before step 0.

    The gradients are pulled back from one fixed cotangent: a loss of the bfloat16 y would carry y's roundings into
    every float32 gradient, and XLA's GPU fusions keep such a y in float32 (excess precision: on an H100 the
    sequential impl's loss differed by 15 % from the same y rounded)."""
    interpret, tol = MODES[mode]
    args = list(make_inputs(np.random.default_rng(2), 2, 7, 24))
    args[0], args[3] = args[0].astype(jnp.bfloat16), args[3].astype(jnp.float16)
    y_bar = jax.random.normal(jax.random.PRNGKey(2), args[0].shape, jnp.bfloat16)

    def y_and_gradients(impl):
        def run(*a):
            y, pullback = jax.vjp(jax.checkpoint(_scan(impl, interpret)), *a)
            return y, pullback(y_bar)

        return jax.jit(run)(*args)

    results = {impl: y_and_gradients(impl) for impl in ("pallas", "sequential", "associative")}
    for impl in ("pallas", "associative"):
        _assert_close(results[impl], results["sequential"], f"{impl}, {mode}", max(tol, 1e-4))


def _scan_delta_bias_loss():
    return _loss(_scan("pallas")), make_inputs(np.random.default_rng(3), 1, 3, 16), 6


def _norm_scale_loss():
    x = jnp.ones((4, 16)) * jnp.arange(16.0)
    loss = lambda x, b, s, bi: jnp.sum(jnp.sin(add_layer_norm(x, b, scale=s, bias=bi, impl="pallas")[1]))
    return loss, (x, x, jnp.ones(16), jnp.zeros(16)), 2


@pytest.mark.parametrize("setup", [_scan_delta_bias_loss, _norm_scale_loss], ids=["scan", "add_layer_norm"])
@pytest.mark.parametrize("order", ["hessian", "grad_of_grad"])
def test_higher_order_derivatives_name_the_alternative(setup, order):
    """Used to fail with "Differentiation rule for 'custom_partitioning' not implemented"."""
    loss, args, argnum = setup()
    if order == "hessian":
        second = jax.hessian(loss, argnums=argnum)
    else:
        second = jax.grad(lambda *a: jnp.sum(jax.grad(loss, argnums=argnum)(*a)), argnums=argnum)
    with pytest.raises(NotImplementedError, match="one reverse-mode derivative.*pure-JAX impl"):
        second(*args)


@pytest.mark.parametrize(
    "field,value", [("block_d", 32.0), ("splits", 2.5), ("num_stages", 1.5), ("chunk", True), ("state_groups", "2")]
)
def test_kernel_config_refuses_non_integers(field, value):
    """A float splits used to fail deep inside the kernel's tracing (a TracerBoolConversionError); a float
    num_stages was accepted."""
    with pytest.raises(TypeError, match=rf"KernelConfig\.{field} must be an integer"):
        KernelConfig(**{field: value})


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="on a GPU the default compiles the kernels")
def test_the_pallas_impl_runs_off_a_gpu_without_asking_for_interpret_mode():
    """interpret=None (the default of selective_scan and selective_scan_pallas) interprets the kernels off a GPU, as
    add_layer_norm does."""
    args = make_inputs(np.random.default_rng(11), 2, 7, 16)
    want = selective_scan(*args, delta_softplus=True, impl="sequential")
    _assert_close(selective_scan(*args, delta_softplus=True, impl="pallas"), want, "selective_scan")
    config = KernelConfig(chunk=16, state_groups=2)
    _assert_close(selective_scan_pallas(*args, delta_softplus=True, config=config), want, "selective_scan_pallas")

"""Deployment: a MambaVision forward exported with ``jax.export`` (StableHLO, a symbolic batch, CPU and CUDA
lowerings), serialised, read back and called, gives the jitted model's logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

import mambavision_jax as mvj

SMALL = dict(depths=(1, 1, 2, 2), dim=16, in_dim=8, num_heads=(1, 2, 2, 4), window_size=(8, 8, 4, 2))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_exported_forward_round_trips_with_any_batch(dtype):
    model = mvj.create_model("mamba_vision_T", dtype=dtype, **SMALL)
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))
    (batch,) = export.symbolic_shape("b")
    images = jax.ShapeDtypeStruct((batch, 64, 64, 3), jnp.float32)
    exported = export.export(jax.jit(model.apply), platforms=("cpu", "cuda"))(variables, images)
    restored = export.deserialize(exported.serialize())
    assert restored.platforms == ("cpu", "cuda")
    tolerance = 1e-5 if dtype == jnp.float32 else 2e-2  # of the largest logit; XLA compiles each side on its own
    for size in (1, 3):
        x = np.random.default_rng(size).standard_normal((size, 64, 64, 3)).astype(np.float32)
        got, want = (np.asarray(y, np.float32) for y in (restored.call(variables, x), model.apply(variables, x)))
        assert got.shape == (size, 1000) and np.abs(got - want).max() <= tolerance * np.abs(want).max()
    with pytest.raises(ValueError, match="shape"):  # the resolution is fixed at export time
        restored.call(variables, np.zeros((1, 96, 96, 3), np.float32))

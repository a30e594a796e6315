"""Deployment: a MambaVision forward exported with ``jax.export`` (StableHLO; symbolic batch, height and width;
CPU and CUDA lowerings), serialised, read back and called, gives the model's logits at every size it accepts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

import mambavision_jax as mvj

SMALL = dict(depths=(1, 1, 2, 2), dim=16, in_dim=8, num_heads=(1, 2, 2, 4), window_size=(8, 8, 4, 2))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_exported_forward_round_trips_at_any_batch_and_size(dtype):
    model = mvj.create_model("mamba_vision_T", dtype=dtype, **SMALL)
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))
    batch, height, width = export.symbolic_shape("b, 32*h, 32*w")  # the model's total stride is 32
    images = jax.ShapeDtypeStruct((batch, height, width, 3), jnp.float32)
    exported = export.export(jax.jit(model.apply), platforms=("cpu", "cuda"))(variables, images)
    restored = export.deserialize(exported.serialize())
    assert restored.platforms == ("cpu", "cuda")
    tolerance = 1e-5 if dtype == jnp.float32 else 2e-2  # of the largest logit; XLA compiles each side on its own
    # 96 rows make stage 3's 6-row map pad to its 4-row windows: the padding is symbolic in the export
    for shape in ((1, 64, 64, 3), (3, 96, 64, 3)):
        x = np.random.default_rng(shape[0]).standard_normal(shape).astype(np.float32)
        got, want = (np.asarray(y, np.float32) for y in (restored.call(variables, x), model.apply(variables, x)))
        assert got.shape == (shape[0], 1000) and np.abs(got - want).max() <= tolerance * np.abs(want).max()
    with pytest.raises(ValueError, match="polymorphic shapes"):
        restored.call(variables, np.zeros((1, 80, 64, 3), np.float32))  # not a multiple of 32

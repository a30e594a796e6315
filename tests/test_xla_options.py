"""mvj.compiler_options(): per-platform XLA options for jax.jit. On the CPU they must be accepted by this jaxlib,
take YNNPACK out of the compiled program (dots and the model's step alike) and leave the logits as they were."""

import jax
import jax.numpy as jnp
import numpy as np

import mambavision_jax as mvj

SMALL = dict(depths=(1, 1, 2, 2), dim=16, in_dim=8, num_heads=(1, 2, 2, 4), window_size=(8, 8, 4, 2), num_classes=5)


def test_options_per_platform():
    assert mvj.compiler_options("gpu") is None
    assert mvj.compiler_options("cpu") == {"xla_cpu_experimental_ynn_fusion_type": ""}
    assert mvj.compiler_options() == mvj.compiler_options(jax.default_backend())


def test_cpu_options_remove_ynnpack_and_keep_the_logits():
    model = mvj.create_model("mamba_vision_T", **SMALL)
    images = jax.random.normal(jax.random.PRNGKey(1), (2, 64, 64, 3))
    variables = model.init(jax.random.PRNGKey(0), images)
    options = mvj.compiler_options("cpu")
    dot = jax.jit(lambda a: a @ a, compiler_options=options).lower(jnp.ones((64, 64))).compile().as_text()
    assert "__ynn_fusion" not in dot
    tuned = jax.jit(model.apply, compiler_options=options)
    assert "__ynn_fusion" not in tuned.lower(variables, images).compile().as_text()
    np.testing.assert_allclose(tuned(variables, images), jax.jit(model.apply)(variables, images), rtol=1e-5, atol=1e-5)

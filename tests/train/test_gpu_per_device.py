"""On a GPU: MambaVision-T's bf16 training loss, gradients and BatchNorm statistics with the Pallas kernels are the
same inside ``jax.shard_map`` (how ``train/step.py`` runs each device's rows by default on several devices) as under
plain ``jit``.

Skipped without a GPU (CI is CPU-only; on fake CPU devices ``tests/train/test_sharding.py`` checks the whole
per-device step, the Pallas kernels in interpret mode). One GPU is enough: a one-device mesh puts the kernels and
their ``custom_partitioning`` wrappers inside ``shard_map`` as on many. ``python -m pytest
tests/train/test_gpu_per_device.py`` (two compiles of T's gradient a case).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import mambavision_jax as mvj

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
TOLERANCE = 1e-2  # of each leaf's largest entry; bf16 compute, and both sides run the same kernels


def loss_grads_and_statistics(model, params, batch_stats, images, labels):
    def loss(params):
        logits, new = model.apply(
            {"params": params, "batch_stats": batch_stats}, images, train=True, mutable=["batch_stats"]
        )
        logp = jax.nn.log_softmax(logits.astype(jnp.float32))
        return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], 1)), new["batch_stats"]

    (value, statistics), grads = jax.value_and_grad(loss, has_aux=True)(params)
    return value, grads, statistics


@pytest.mark.parametrize("norm_impl", ["xla", "pallas"])
def test_pallas_kernels_inside_shard_map_match_jit(norm_impl):
    model = mvj.create_model(
        "mamba_vision_T", dtype=jnp.bfloat16, norm_impl=norm_impl, scan_impl="pallas", drop_path_rate=0.0
    )
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(size=(32, 224, 224, 3)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 1000, size=(32,)))
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), images[:1])
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))

    def per_device(params, batch_stats, images, labels):
        def local(*args):
            return jax.lax.pmean(loss_grads_and_statistics(model, *args), "data")

        specs = (P(), P(), P("data"), P("data"))
        return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=P(), check_vma=False)(
            params, batch_stats, images, labels
        )

    args = (variables["params"], variables["batch_stats"])
    plain = jax.jit(lambda *a: loss_grads_and_statistics(model, *a))(*args, images, labels)
    rows = NamedSharding(mesh, P("data"))
    sharded = jax.jit(per_device)(*args, jax.device_put(images, rows), jax.device_put(labels, rows))
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(plain)[0], jax.tree.leaves(sharded), strict=True):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        scale = float(np.max(np.abs(a))) or 1.0
        assert np.max(np.abs(a - b)) <= TOLERANCE * scale, jax.tree_util.keystr(path)

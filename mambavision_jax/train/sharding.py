"""Device mesh and shardings. One mesh axis, "data", over all devices of all processes.

* ``"data"`` (data parallel): every state leaf replicated, the batch sharded on its leading axis.
* ``"fsdp"``: every state leaf with at least ``min_size`` elements is sharded along its largest axis that the
  mesh size divides (so parameters, EMA copies and optimizer moments of a weight share one layout); smaller or
  indivisible leaves stay replicated. XLA inserts the all-gathers / reduce-scatters under ``jax.jit``.
No pmap anywhere: all parallelism is ``jax.jit`` with in/out shardings.
"""

from __future__ import annotations

import numpy as np
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(devices=None) -> Mesh:
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices).reshape(len(devices)), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis sharded over "data"."""
    return NamedSharding(mesh, P(DATA_AXIS))


def _fsdp_spec(shape, n: int, min_size: int) -> P:
    if n <= 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return P()
    for axis in sorted(range(len(shape)), key=lambda a: (-shape[a], a)):
        if shape[axis] % n == 0:
            spec = [None] * len(shape)
            spec[axis] = DATA_AXIS
            return P(*spec)
    return P()


def state_shardings(abstract_state, mesh: Mesh, strategy: str = "data", min_size: int = 2**14):
    """Shardings pytree for an (abstract) state pytree."""
    if strategy == "data":
        return jax.tree.map(lambda _: replicated(mesh), abstract_state)
    if strategy == "fsdp":
        n = mesh.shape[DATA_AXIS]
        return jax.tree.map(
            lambda x: NamedSharding(mesh, _fsdp_spec(tuple(getattr(x, "shape", np.shape(x))), n, min_size)),
            abstract_state,
        )
    raise ValueError(f"Unknown sharding strategy {strategy!r} (expected 'data' or 'fsdp').")


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
    """Builds global arrays (batch axis sharded over "data") from this process's local batch."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}

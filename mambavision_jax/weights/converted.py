"""The converted-weights directory: an Orbax checkpoint of the Flax variables plus a small JSON manifest.

Layout::

    DIR/mambavision.json   {"format": "mambavision-jax/converted", "version": 1, "model_name": ...,
                            "overrides": {...}, "pretrained_cfg": {...}, "source": ..., "ema": ...}
    DIR/variables/         Orbax StandardCheckpointer tree {"params": ..., "batch_stats": ...} (float32)
"""

import json
import os
import shutil
from typing import Any, Mapping, Optional

import jax
import numpy as np

from mambavision_jax.weights.readers import CheckpointError, read_json

MANIFEST = "mambavision.json"
VARIABLES = "variables"
FORMAT = "mambavision-jax/converted"
VERSION = 1


def is_converted_dir(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, MANIFEST))


def save_converted(
    directory: str,
    model_name: str,
    variables: Mapping[str, Any],
    overrides: Optional[Mapping[str, Any]] = None,
    *,
    source: str = "",
    ema: bool = False,
    overwrite: bool = False,
) -> None:
    """Write ``variables`` of ``model_name`` (created with ``overrides``) as a converted directory, from the calling
    process alone.

    ``directory`` must be missing or empty; with ``overwrite`` it may also be an earlier converted directory, which
    is replaced. Any other non-empty directory is refused, so that nothing but converted weights is ever deleted."""
    from mambavision_jax.models.registry import pretrained_cfg, resolve_name
    import orbax.checkpoint as ocp

    directory = os.path.abspath(directory)
    if os.path.exists(directory) and os.listdir(directory):
        if not is_converted_dir(directory):
            raise FileExistsError(
                f"{directory!r} exists, is not empty and holds no converted weights ({MANIFEST}): "
                "choose a new or empty directory"
            )
        if not overwrite:
            raise FileExistsError(f"{directory!r} holds converted weights; pass overwrite=True (--overwrite)")
        shutil.rmtree(directory)
    os.makedirs(directory, exist_ok=True)
    tree = jax.tree.map(lambda x: np.asarray(x, np.float32), dict(variables))
    # the calling process alone writes (in a multi-process run, process 0 writes the best model while the others
    # train on): Orbax's barriers then wait for no other process
    me = jax.process_index()
    checkpointer = ocp.StandardCheckpointer(
        multiprocessing_options=ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
    )
    checkpointer.save(os.path.join(directory, VARIABLES), tree)
    checkpointer.wait_until_finished()
    name = resolve_name(model_name)
    manifest = dict(
        format=FORMAT,
        version=VERSION,
        model_name=name,
        overrides=_jsonable(overrides or {}),
        pretrained_cfg=pretrained_cfg(name),
        source=os.path.basename(source),
        ema=ema,
    )
    with open(os.path.join(directory, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1)


def load_converted(directory: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(manifest, variables as numpy)`` from a converted directory; CheckpointError when it is not one."""
    import orbax.checkpoint as ocp

    manifest = read_json(os.path.join(directory, MANIFEST))
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise CheckpointError(
            f"{directory!r}: {MANIFEST} is not a mambavision-jax converted manifest "
            f"(format {manifest.get('format')!r}, version {manifest.get('version')!r})"
        )
    path = os.path.join(os.path.abspath(directory), VARIABLES)
    try:
        variables = ocp.StandardCheckpointer().restore(path)
    except Exception as e:  # orbax raises assorted errors for missing or damaged checkpoints
        raise CheckpointError(f"could not restore the Flax variables from {path!r}: {e}") from e
    return manifest, jax.tree.map(np.asarray, variables)


def _jsonable(overrides: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in overrides.items():
        if key == "dtype":  # a compute choice of the caller, not part of the weights
            continue
        out[key] = list(value) if isinstance(value, tuple) else value
    return out

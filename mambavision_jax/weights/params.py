"""The one key map between the official PyTorch state_dict and the Flax variables.

Flax variables are ``{"params": ..., "batch_stats": ...}`` trees whose module names mirror the torch modules with
``.i`` indices written ``_i`` (``levels.2.blocks.0.mixer.in_proj`` <-> ``levels_2/blocks_0/mixer/in_proj``). Leaf
names and layouts differ only as follows:

===================  ===================  ============================================================
torch leaf           flax leaf            layout change
===================  ===================  ============================================================
Conv2d ``weight``    ``kernel``           (O, I, kh, kw) -> (kh, kw, I, O)
Conv1d ``weight``    ``kernel``           depthwise (h, 1, k) -> (k, 1, h)
Linear ``weight``    ``kernel``           (out, in) -> (in, out)
norm ``weight``      ``scale``            none (BatchNorm and LayerNorm)
``running_mean``     ``mean``             batch_stats collection
``running_var``      ``var``              batch_stats collection
``bias``, ``A_log``, ``D``, ``gamma*``    none
===================  ===================  ============================================================

``num_batches_tracked`` has no Flax counterpart and is dropped.
"""

import re
from typing import Any, Mapping

import numpy as np
from flax import traverse_util

IGNORED_SUFFIXES = ("num_batches_tracked",)
_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "mean": "running_mean", "var": "running_var"}


def torch_key(collection: str, path: tuple[str, ...]) -> str:
    """The official state_dict key of the Flax leaf ``collection/path``."""
    *modules, leaf = path
    modules = [re.sub(r"_(\d+)$", r".\1", m) for m in modules]
    return ".".join(modules + [_LEAF_TO_TORCH.get(leaf, leaf)])


# Flax kernel axes as a permutation of the torch weight axes, by rank: conv2d, depthwise conv1d, linear.
_KERNEL_PERMUTATION = {4: (2, 3, 1, 0), 3: (2, 1, 0), 2: (1, 0)}


def torch_to_flax_array(leaf: str, value: np.ndarray) -> np.ndarray:
    """Torch layout -> Flax layout for a leaf named ``leaf`` (see the module table)."""
    if leaf == "kernel" and value.ndim in _KERNEL_PERMUTATION:
        return value.transpose(_KERNEL_PERMUTATION[value.ndim])
    return value


def flax_to_torch_array(leaf: str, value: np.ndarray) -> np.ndarray:
    """Flax layout -> torch layout; the inverse of :func:`torch_to_flax_array`."""
    if leaf == "kernel" and value.ndim in _KERNEL_PERMUTATION:
        return value.transpose(np.argsort(_KERNEL_PERMUTATION[value.ndim]))
    return value


def flat_leaves(variables: Mapping[str, Any]) -> dict[tuple[str, ...], Any]:
    """``{(collection, *path): leaf}`` for a Flax variables dict."""
    return traverse_util.flatten_dict(dict(variables))


def to_torch_state_dict(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Flax variables -> official state_dict (numpy arrays, torch layouts, without num_batches_tracked)."""
    return {
        torch_key(col, path): np.ascontiguousarray(flax_to_torch_array(path[-1], np.asarray(v)))
        for (col, *path), v in flat_leaves(variables).items()
    }


def expected_torch_keys(abstract_variables: Mapping[str, Any]) -> dict[str, tuple[str, ...]]:
    """``{torch key: flax (collection, *path)}`` for every leaf of an (abstract) Flax variables tree."""
    return {torch_key(col, tuple(path)): (col, *path) for (col, *path) in flat_leaves(abstract_variables)}

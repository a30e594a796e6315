"""Every config key the training code reads with a default is a field of the recipe, so that ``--config.<key>=...``
can set it: ml_collections refuses a command-line override of a key the config lacks."""

import glob
import os
import re

import pytest

from mambavision_jax.train.recipe import recipe

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SOURCES = sorted(
    glob.glob(os.path.join(ROOT, "mambavision_jax", "train", "*.py"))
    + glob.glob(os.path.join(ROOT, "mambavision_jax", "data", "*.py"))
    + [os.path.join(ROOT, "main.py")]
)
# how the code names each part of the config, and the part
READS = {
    r"\bconfig\.get\(\"(\w+)\"": None,
    r"\bconfig\.data\.get\(\"(\w+)\"": "data",
    r"\b(?:config\.aug|aug)\.get\(\"(\w+)\"": "aug",
    r"\b(?:config\.optimizer|o)\.get\(\"(\w+)\"": "optimizer",
    r"\bcfg_get\(config, \"(\w+)\"": None,
    r"\bcfg_get\(config\.data, \"(\w+)\"": "data",
    r"\bcfg_get\(config\.aug, \"(\w+)\"": "aug",
}


def _keys_read() -> set[tuple[str | None, str]]:
    """(part, key) of every ``.get("key", ...)`` read of the config in the training and data code."""
    found = set()
    for path in SOURCES:
        with open(path) as f:
            text = f.read()
        for pattern, part in READS.items():
            found.update((part, m.group(1)) for m in re.finditer(pattern, text))
    return found


def test_the_code_reads_config_keys_with_defaults():
    expected = {(None, "save_best"), ("optimizer", "momentum"), ("data", "prefetch"), (None, "grad_accum_steps")}
    assert expected <= _keys_read()


@pytest.mark.parametrize("name", ["mamba_vision_T", "mamba_vision_B"])
def test_every_key_read_with_a_default_is_a_recipe_field(name):
    c = recipe(name)
    missing = sorted(
        f"{part + '.' if part else ''}{key}" for part, key in _keys_read() if key not in (c[part] if part else c)
    )
    assert not missing, f"not in recipe({name!r}), so --config.<key> cannot set them: {missing}"

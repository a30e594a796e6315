"""The HLO reader behind benchmarks/step_attribution.py: bytes of each instruction and the model place it came from,
on a real optimized module dumped by XLA on the CPU."""

import glob
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))

import hlo_costs  # noqa: E402


class Tiny(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(48, name="fc1")(x)
        x = nn.LayerNorm(name="norm")(jnp.tanh(x))
        return nn.Dense(16, name="fc2")(x)


@pytest.fixture(scope="module")
def instructions(tmp_path_factory):
    dump = str(tmp_path_factory.mktemp("hlo"))
    model = Tiny()
    x = jnp.ones((8, 32), jnp.float32)
    params = model.init(jax.random.PRNGKey(0), x)

    def step(params, x):
        return jax.grad(lambda p: jnp.sum(model.apply(p, x) ** 2))(params)

    jax.jit(step, compiler_options=dict(xla_dump_to=dump, xla_dump_hlo_as_text=True)).lower(params, x).compile()
    (path,) = [p for p in glob.glob(os.path.join(dump, "*after_optimizations.txt")) if "step" in p]
    with open(path) as f:
        return hlo_costs.link(hlo_costs.parse_module(f.read()))


def test_array_bytes_counts_every_array_of_a_tuple():
    assert hlo_costs.array_bytes("(bf16[2,3]{1,0}, f32[4]{0}, pred[])") == 2 * 6 + 4 * 4 + 1


def test_module_path_strips_wrappers_methods_and_the_primitive():
    path, backward = hlo_costs.module_path(
        "jit(step)/transpose(jvp(MambaVision))/MambaVision._stages/levels_2/blocks_3/mlp/fc1/dot_general"
    )
    assert (path, backward) == ("levels_2/blocks_3/mlp/fc1", True)
    assert hlo_costs.module_path("jit(step)/jvp(MambaVision)/levels_0/blocks_1/DropPath_0/jit(_bernoulli)/lt") == (
        "levels_0/blocks_1/DropPath_0",
        False,
    )
    assert hlo_costs.group_of("levels_2/blocks_3/mlp/fc1") == "levels_2/mlp"


def test_dots_are_found_with_their_bytes_and_places(instructions):
    dots = [
        i for i in instructions.values() if i.opcode == "dot" or any(n.endswith("/dot_general") for n in i.op_names)
    ]
    places = {hlo_costs.origin(i) for i in dots}
    # forward fc1 and fc2 and the backward's weight and input gradients
    assert ("fc1", False) in places and ("fc2", False) in places
    assert ("fc1", True) in places and ("fc2", True) in places
    fc1_forward = [i for i in dots if hlo_costs.origin(i) == ("fc1", False)]
    assert any(i.result == "f32[8,48]" for i in fc1_forward)  # the result's arrays, without their layout
    # (8, 32) @ (32, 48) in float32: operands and result, at least
    assert max(i.bytes for i in fc1_forward) >= 4 * (8 * 32 + 32 * 48 + 8 * 48)


def test_fusions_take_the_places_of_the_ops_inside_them(instructions):
    fusions = [i for i in instructions.values() if i.opcode == "fusion"]
    assert fusions
    assert any(hlo_costs.origin(i)[0] == "norm" for i in fusions)
    assert all(i.bytes > 0 for i in fusions)

"""The training layout of the parameters (no-weight-decay leaves packed into one vector, small decayed leaves into
rows): exact round trips, clear errors, and the same updates as leaf by leaf for every optimizer and for the whole
train step."""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import traverse_util

import mambavision_jax.data as data
from mambavision_jax.train import loop, optim, sharding, state as state_lib, step as step_lib
from mambavision_jax.train.packing import PACKED, Packing
from tests.train.conftest import EvalBatches


def _params(seed=0):
    rng = np.random.default_rng(seed)
    shapes = {
        "conv": {"kernel": (3, 3, 4, 8), "bias": (8,)},
        "norm": {"scale": (8,), "bias": (8,)},
        "mixer": {"A_log": (4, 8), "D": (4,), "odd": {"bias": (2, 3)}, "x_proj": {"kernel": (70, 64)}},
        "head": {"kernel": (8, 10), "bias": (10,)},
        "big": {"kernel": (256, 256)},  # SMALL_LEAF elements: stays dense
    }
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s).astype(np.float32)), shapes,
                        is_leaf=lambda x: isinstance(x, tuple))


def test_packs_the_leaves_without_weight_decay_and_the_small_ones():
    params = _params()
    packing = Packing.of(params)
    mask = traverse_util.flatten_dict(optim.weight_decay_mask(params))
    assert set(packing.paths) == {k for k, decays in mask.items() if not decays}
    assert packing.size == 8 + 8 + 8 + 4 + 6 + 10
    # the decayed leaves under SMALL_LEAF elements, sorted by path, each on whole rows of NORM_ROW
    want = (("conv", "kernel"), ("head", "kernel"), ("mixer", "A_log"), ("mixer", "x_proj", "kernel"))
    assert packing.row_paths == want
    assert packing.row_counts == (1, 1, 1, 3) and packing.segments == {("packed_rows",): (1, 1, 1, 3)}
    packed = packing.pack(params)
    assert packed["packed"].shape == (packing.size,) and packed["packed"].dtype == jnp.float32
    assert packed["packed_rows"].shape == (6, optim.NORM_ROW) and packed["packed_rows"].dtype == jnp.float32
    assert packed["dense"] == {"big": {"kernel": params["big"]["kernel"]}}
    # the padding is zero: row 3 starts x_proj (70 x 64 = 4,480 elements on 3 rows of 2,048)
    np.testing.assert_array_equal(packed["packed_rows"][3:].reshape(-1)[4480:], 0.0)
    x_proj = params["mixer"]["x_proj"]["kernel"]
    np.testing.assert_array_equal(packed["packed_rows"][3:].reshape(-1)[:4480], x_proj.ravel())
    back = packing.unpack(packed)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), back, params)
    # the optimizer's mask of the packed layout: the vector (1-D) takes no decay, the rows and dense leaves do
    packed_mask = optim.weight_decay_mask(packed)
    assert packed_mask["packed"] is False and packed_mask["packed_rows"] is True and all(
        jax.tree.leaves(packed_mask["dense"])
    )
    # abstract packing computes nothing and agrees with the concrete one
    abstract = packing.abstract(jax.eval_shape(lambda: params))
    assert jax.tree.map(lambda a: (a.shape, a.dtype), abstract) == jax.tree.map(lambda a: (a.shape, a.dtype), packed)


def test_bad_inputs_name_the_problem():
    params = _params()
    packing = Packing.of(params)
    missing = {k: v for k, v in params.items() if k != "norm"}
    with pytest.raises(ValueError, match="norm/bias"):
        packing.pack(missing)
    wrong = jax.tree.map(lambda x: x, params)
    wrong["conv"]["bias"] = jnp.zeros((9,))
    with pytest.raises(ValueError, match=r"conv/bias has shape \(9,\).*\(8,\)"):
        packing.pack(wrong)
    packed = packing.pack(params)
    with pytest.raises(ValueError, match="packed vector has shape"):
        packing.unpack({**packed, "packed": packed["packed"][:-1]})
    with pytest.raises(ValueError, match=r"packed rows have shape \(5, 2048\), the packing expects \(6, 2048\)"):
        packing.unpack({**packed, "packed_rows": packed["packed_rows"][:-1]})
    with pytest.raises(ValueError, match="keys 'dense', 'packed' and 'packed_rows'"):
        packing.unpack(params)
    with pytest.raises(ValueError, match="not a packed layout"):
        optim.make_optimizer(ml_collections.ConfigDict({"optimizer": {"name": "lamb"}}), 1, packed)
    with pytest.raises(ValueError, match=r"4 row segments must be \(6, 2048\)"):
        optim.leaf_squared_norms([packed["packed_rows"][:-1]], [(1, 1, 1, 3)])


def test_gradient_through_unpack_is_the_packed_gradient():
    params = _params()
    weights = _params(seed=1)
    packing = Packing.of(params)

    def loss(p):
        return sum(jnp.sum(jnp.sin(a) * w) for a, w in zip(jax.tree.leaves(p), jax.tree.leaves(weights)))

    packed_grad = jax.grad(lambda q: loss(packing.unpack(q)))(packing.pack(params))
    want = packing.pack(jax.grad(loss)(params))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), packed_grad, want)


@pytest.mark.parametrize("name", ["lamb", "adamw", "sgd"])
def test_optimizers_update_packed_params_as_leaf_by_leaf(tiny_config, name):
    """Clip, Adam/SGD, weight decay and LAMB's trust ratios on the packed layout give the leaf-by-leaf result."""
    c = tiny_config
    c.optimizer.name = name
    c.optimizer.weight_decay = 0.05
    c.optimizer.clip_grad_norm = 5.0
    c.optimizer.warmup_epochs = 0
    params = _params()
    packing = Packing.of(params)
    tx_leaf, _ = optim.make_optimizer(c, 10, params)
    tx_packed, _ = optim.make_optimizer(c, 10, params, packing)
    leafwise, packed = params, packing.pack(params)
    s_leaf, s_packed = tx_leaf.init(leafwise), tx_packed.init(packed)
    rng = np.random.default_rng(2)
    for norm in (0.5, 20.0, 3.0):  # one step above the clip
        g = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape).astype(np.float32)), params)
        g = jax.tree.map(lambda a: a * norm / optim.global_norm(g), g)
        u, s_leaf = tx_leaf.update(g, s_leaf, leafwise)
        leafwise = optax.apply_updates(leafwise, u)
        u, s_packed = tx_packed.update(packing.pack(g), s_packed, packed)
        packed = optax.apply_updates(packed, u)
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), leafwise, params)
    assert min(jax.tree.leaves(moved)) > 0  # every leaf was updated
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-7), packing.unpack(packed), leafwise)


def test_train_step_on_packed_state_matches_leaf_by_leaf(tiny_config, jax_cache_env):
    """The tiny model's train step (LAMB, EMA): the packed state gives the same losses, params and EMA."""
    c = tiny_config
    c.ema_decay = 0.9
    c.optimizer.warmup_epochs = 0
    mesh = sharding.make_mesh()
    model = loop.build_model(c)
    rng = jax.random.PRNGKey(0)
    abstract = jax.eval_shape(lambda r: model.init({"params": r}, jnp.zeros((1, 32, 32, 3))), rng)["params"]
    packing = Packing.of(abstract)
    rs = np.random.RandomState(0)
    batch = sharding.global_batch(
        {"image": rs.normal(size=(16, 32, 32, 3)).astype(np.float32), "label": rs.randint(0, 10, 16).astype(np.int32)},
        mesh,
    )
    results = []
    for p in (None, packing):
        tx, schedule = optim.make_optimizer(c, 10, abstract, p)
        state, shardings = state_lib.create_train_state(state_lib.make_init_fn(model, tx, 32, True, p), rng, mesh)
        train_step = step_lib.make_train_step(model, tx, schedule, c, 10, data, mesh, shardings)
        losses = []
        for i in range(2):
            state, m = train_step(state, batch, jax.random.PRNGKey(1), i)
            losses.append(float(m["loss"]))
        results.append((losses, jax.device_get(state.variables()), jax.device_get(state.variables(ema=True))))
    (l0, v0, e0), (l1, v1, e1) = results
    np.testing.assert_allclose(l1, l0, rtol=1e-5)
    for a, b in ((v1, v0), (e1, e0)):
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6), a, b)
    assert not np.allclose(jax.tree.leaves(v1["params"])[0], jax.tree.leaves(e1["params"])[0])


def test_leaf_by_leaf_checkpoint_is_refused_by_a_packed_state(tmp_path):
    """A checkpoint of the leaf-by-leaf layout (written before packing) does not half-restore into a packed state:
    the error says the checkpoint does not match."""
    from mambavision_jax.train import checkpoint as ckpt_lib

    params = _params()
    packing = Packing.of(params)
    ckpt = ckpt_lib.Checkpointer(str(tmp_path / "ck"), async_save=False)
    ckpt.save(3, {"params": params})
    ckpt.wait()
    with pytest.raises(ValueError, match="step 3 .* does not match the train state"):
        ckpt.restore({"params": packing.abstract(params)})
    ckpt.close()


def test_the_loop_unpacks_outside_a_step_in_one_compiled_program(tmp_path, monkeypatch):
    """The eval's variables and the best model's weights come from one compiled unpacking, never from the packed
    layout unpacked op by op: in a two-process CPU run those few hundred small programs hung XLA:CPU (see
    ``state.compiled_variables``). Both still give the model's variables of the state (or of its EMA)."""
    from mambavision_jax.train import checkpoint as ckpt_lib

    params = _params(seed=3)
    packing = Packing.of(params)
    packed, ema_packed = packing.pack(params), packing.pack(jax.tree.map(lambda p: 2 * p, params))
    stats = {"norm": {"mean": jnp.arange(8.0)}}
    state = state_lib.TrainState(
        step=jnp.int32(0),
        params=packed,
        batch_stats=stats,
        opt_state=(),
        ema_params=ema_packed,
        ema_batch_stats=stats,
        packing=packing,
    )
    unpacked_concrete = []
    unpack = Packing.unpack

    def recording_unpack(self, tree):
        unpacked_concrete.append(not isinstance(tree[PACKED], jax.core.Tracer))
        return unpack(self, tree)

    monkeypatch.setattr(Packing, "unpack", recording_unpack)
    state_lib.compiled_variables.clear_cache()  # every call below traces (and so unpacks) afresh or not at all

    seen = []

    def eval_step(variables, batch):
        seen.append(jax.device_get(variables))
        return {k: jnp.float32(1) for k in ("loss_sum", "correct1", "correct5", "count")}

    one_batch = EvalBatches([{"label": np.zeros((jax.device_count(),), np.int32)}])
    config = ml_collections.ConfigDict({"data": {"prefetch": 0}})
    metrics = loop._eval_all(eval_step, state, one_batch, config, sharding.make_mesh())
    assert metrics["top1"] == metrics["ema_top1"] == 1.0
    written = {}

    def write(directory, variables, step, ema):
        os.makedirs(directory)
        written.update(variables=variables)

    best = ckpt_lib.BestWeights(str(tmp_path / "best"), write, log=print)
    assert best.update(1, {"top1": 0.5, "ema_top1": 0.7}, state)
    assert unpacked_concrete == [False, False]  # once with the model's params, once with the EMA's; both traced
    for got, scale in ((seen[0], 1), (seen[1], 2), (written["variables"], 2)):
        want = jax.tree.map(lambda p: scale * np.asarray(p), params)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), got["params"], want)
        np.testing.assert_array_equal(got["batch_stats"]["norm"]["mean"], np.arange(8.0))


"""End-to-end throughput of MambaVision in JAX, optionally next to the official PyTorch model on the same card.

    python benchmarks/throughput.py --models T,S,B,L [--batches 128,256] [--train-models T,B] \
        [--compare-official] [--out results.json]

Inference: eval mode, 16-bit compute (``--dtype``, bfloat16 by default; float32 params and BN statistics), 224x224,
each batch size in ``--batches``. Training: forward + backward + AdamW step, bf16 compute, float32 master
weights, batch ``--train-batch``, donated state, no host sync inside the step; the same work as the official
anchor's step (cross-entropy on hard labels, AdamW). Compile time and the executable's memory (arguments +
outputs + temporaries, from XLA's memory analysis) are reported separately from throughput. The inference and
training executables are compiled with ``mvj.compiler_options()`` (on the CPU: XLA's own dot kernels, not
YNNPACK's) and any ``--xla-option`` on top; the recipe steps as ``main.py`` compiles them. Timings exclude warm-up
and are medians of timed windows synchronised with ``block_until_ready``, each window at least
``--min-window-s`` long (1 s: steady state, see ``MIN_WINDOW_S``). ``--compare-official`` runs
``.anchor/official_torch.py`` (the anchor, kept outside this repository) for the inference and training models, and
``official_recipe.py`` (the official train.py's iteration) for the recipe configs' models, in subprocesses after the
JAX runs, so each ratio comes from one machine. Prints a table and writes JSON (``--out``, or ``$OUT/throughput.json``).

Variants: ``--variants "norm_impl=pallas;xla_gpu_enable_cudnn_layer_norm=true"`` times every inference and training
config once with the base options and once per variant (``;``-separated sets of ``name=value`` laid over the base:
names starting with ``xla_`` are XLA compiler options, the others model options), one after the other in one
process, so an A/B comes from one machine and one warm-up; a variant's results are keyed
``T_bs256[norm_impl=pallas]``.

Recipe: ``--recipe-configs configs/tiny.py,...`` times the step ``main.py`` runs for each config (its optimizer,
gradient clipping, EMA, mixup/cutmix, random erasing, soft-target loss, uint8 images normalised on the device) on
device-resident synthetic batches of ``--train-batch`` rows a micro-batch (an update of a config with
``grad_accum_steps = A`` takes A of them, and img/s counts them all), so the host input pipeline is left out; with
``--recipe-mesa`` the step is timed in the second half of the schedule, where MESA's EMA-teacher forward runs.
"""

import argparse
import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import mambavision_jax as mvj  # noqa: E402
from mambavision_jax.train.packing import Packing  # noqa: E402
from config_file import load_config  # noqa: E402
from extension_build import anchor_script, clear_stale_lock  # noqa: E402
from timing import compile_seconds, median_seconds, top_device_ops  # noqa: E402

SHORT = {
    "T": "mamba_vision_T",
    "T2": "mamba_vision_T2",
    "S": "mamba_vision_S",
    "B": "mamba_vision_B",
    "L": "mamba_vision_L",
    "L2": "mamba_vision_L2",
}
PROFILE_TOP = 40  # ops printed per profiled config (the JSON keeps every op)
DTYPES = {"bfloat16": jnp.bfloat16, "float16": jnp.float16, "float32": jnp.float32}
KINDS = (("inference", "infer"), ("training", "train"), ("recipe", "recipe"))  # result groups, their row prefixes
# Shortest timed window, s. Each window starts from an idle device: dispatching a step from idle takes ~5 ms of host
# time before its first kernel (B's training step has ~1,100 argument buffers), which back-to-back steps hide. A
# 0.2 s window held 3 of B's training steps and so added 1.1-1.7 ms a step (H200: 3,391-3,433 img/s against 3,503
# with 2 s windows, one process; benchmarks/NOTES.md session 16); at 1 s the start is under 0.3 ms a step.
MIN_WINDOW_S = 1.0


def random_images(batch, size, dtype, count, seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), count)
    return [jax.random.normal(k, (batch, size, size, 3), dtype) for k in keys]


def inference(name, batch, dtype, size, overrides, profile_dir=None, compiler_options=None, min_window_s=MIN_WINDOW_S):
    model = mvj.create_model(name, dtype=dtype, **overrides)
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3), jnp.float32))
    images = random_images(batch, size, dtype, 3)
    jitted = jax.jit(model.apply, compiler_options=compiler_options)
    compiled, compile_s, memory = compile_seconds(jitted, variables, images[0])
    seconds = median_seconds(compiled, [(variables, x) for x in images], min_window_s)
    result = dict(img_per_s=batch / seconds, step_ms=1e3 * seconds, compile_s=compile_s, **memory)
    if profile_dir:
        result["profile"] = top_device_ops(compiled, (variables, images[0]), profile_dir, top=None)
    return result


def build_training(name, batch, dtype, size, overrides, compiler_options=None):
    """The compiled bf16 AdamW training step of ``name`` at ``batch``: ``(run, input_sets, compile_s, memory)``,
    ``run(images)`` advancing a donated state held inside (see the module docstring)."""
    return build_training_of(mvj.create_model(name, dtype=dtype, **overrides), batch, size, compiler_options)


def build_training_of(model, batch, size, compiler_options=None):
    """:func:`build_training` for a given linen classifier ``model`` (``apply(..., train=True)`` -> logits). The
    parameters are held in the training loop's layout (``mambavision_jax.train.packing``), as main.py holds them."""
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3), jnp.float32))
    packing = Packing.of(variables["params"])
    tx = optax.adamw(1e-4, weight_decay=0.05)
    params = packing.pack(variables["params"])
    state = (params, variables["batch_stats"], tx.init(params))

    def step(state, images, labels, rng):
        params, batch_stats, opt_state = state

        def loss_fn(params):
            logits, new = model.apply(
                {"params": packing.unpack(params), "batch_stats": batch_stats},
                images,
                train=True,
                rngs={"dropout": rng},
                mutable=["batch_stats"],
            )
            logp = jax.nn.log_softmax(logits.astype(jnp.float32))
            return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=1)), new["batch_stats"]

        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), batch_stats, opt_state), loss

    images = random_images(batch, size, jnp.float32, 3)
    labels = jax.random.randint(jax.random.PRNGKey(1), (batch,), 0, 1000)
    rng = jax.random.PRNGKey(2)
    jitted = jax.jit(step, donate_argnums=(0,), compiler_options=compiler_options)
    compiled, compile_s, memory = compile_seconds(jitted, state, images[0], labels, rng)
    holder = [state]

    def run(images):
        holder[0], loss = compiled(holder[0], images, labels, rng)
        return loss

    return run, [(x,) for x in images], compile_s, memory


def training(name, batch, dtype, size, overrides, profile_dir=None, compiler_options=None, min_window_s=MIN_WINDOW_S):
    run, input_sets, compile_s, memory = build_training(name, batch, dtype, size, overrides, compiler_options)
    seconds = median_seconds(run, input_sets, min_window_s, windows=5)
    result = dict(img_per_s=batch / seconds, step_ms=1e3 * seconds, compile_s=compile_s, **memory)
    if profile_dir:
        result["profile"] = top_device_ops(run, input_sets[0], profile_dir, top=None)
    return result


def recipe_batches(batch, size, count, random_erasing, seed=0):
    """``count`` batches as the input pipeline hands them to the train step: uint8 images, int32 labels and, with
    ``random_erasing``, one erasing rectangle (top, left, height, width) per image."""
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(count):
        b = dict(
            image=jnp.asarray(rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)),
            label=jnp.asarray(rng.integers(0, 1000, (batch,), dtype=np.int32)),
        )
        if random_erasing:
            corner = rng.integers(0, size // 2, (batch, 2))
            extent = rng.integers(0, size // 2, (batch, 2))
            b["erase"] = jnp.asarray(np.concatenate([corner, extent], axis=1).astype(np.int32))
        batches.append(b)
    return batches


def recipe(config_path, batch, mesa, profile_dir=None, min_window_s=MIN_WINDOW_S):
    """img/s of ``main.py``'s train step for ``config_path`` (see the module docstring)."""
    from mambavision_jax import data
    from mambavision_jax.data.config_utils import global_batch_size
    from mambavision_jax.train import loop, step as step_lib

    config = load_config(config_path)
    config.batch_size_per_device = batch // jax.device_count()
    update = global_batch_size(config)  # the rows of one update: ``batch`` times the config's grad_accum_steps
    config.data.name = "synthetic"
    config.data.synthetic_examples = 10 * update
    # main.py's setup; its checkpointer wants a workdir, kept until exit (orbax cleans it up in a background thread).
    workdir = tempfile.mkdtemp(prefix="mvj_recipe_")
    atexit.register(shutil.rmtree, workdir, ignore_errors=True)
    s = loop._setup(config, workdir, None, data)
    s["ckpt"].close()
    state = jax.jit(s["init_fn"], out_shardings=s["shardings"])(s["init_rng"])
    step = config.optimizer.epochs * s["spe"] // 2 if mesa else 0
    state = state.replace(step=jnp.asarray(step, state.step.dtype))
    train_step = step_lib.make_train_step(
        s["model"], s["tx"], s["schedule"], config, s["spe"], data, s["mesh"], s["shardings"]
    )
    size, rng = s["image_size"], s["train_rng"]
    batches = recipe_batches(update, size, 3, float(config.aug.get("reprob", 0.0)) > 0)
    compiled, compile_s, memory = compile_seconds(train_step, state, batches[0], rng, step)
    holder = [state]

    def run(b):
        holder[0], metrics = compiled(holder[0], b, rng)
        return metrics["loss"]

    seconds = median_seconds(run, [(b,) for b in batches], min_window_s, windows=5)
    result = dict(img_per_s=update / seconds, step_ms=1e3 * seconds, compile_s=compile_s, **memory)
    result.update(model=config.model_name, mesa=bool(mesa))
    if profile_dir:
        result["profile"] = top_device_ops(run, (batches[0],), profile_dir, top=None)
    return result


def recipe_key(model_name: str, batch: int, mesa: bool) -> str:
    """The key of a recipe step in the official results (``official_recipe.py``'s JSON)."""
    return f"recipe_{model_name}_bs{batch}{'_mesa' if mesa else ''}"


def official_recipe(model_names, batch, mesa):
    """Runs ``official_recipe.py`` (the official train.py's iteration) for ``model_names``; returns img/s by
    :func:`recipe_key`."""
    shorts = {name: short for short, name in SHORT.items()}
    out = os.path.join(os.environ.get("OUT", "/tmp"), "official_recipe.json")
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "official_recipe.py")
    args = ["--models", ",".join(shorts[m] for m in model_names), "--batch", str(batch), "--out", out]
    subprocess.run([sys.executable, script, *args] + (["--mesa"] if mesa else []), check=True)
    with open(out) as f:
        rows = json.load(f)
    return {key: round(row["img_per_s"]) for key, row in rows.items() if key.startswith("recipe_")}


def official(models, train_models):
    """Runs the anchor script; returns its JSON (img/s per model and batch).

    The anchor trains the first ``TRAIN_MODELS`` of its ``MODELS`` and infers all of them, so ``train_models`` go
    first: a trained model that is not in ``models`` is inferred too."""
    ordered = list(dict.fromkeys([*train_models, *models]))
    env = dict(
        os.environ,
        MODELS=",".join(SHORT[m] for m in ordered),
        TRAIN_MODELS=str(len(train_models)),
        MAMBA_CSRC=os.environ.get("MAMBA_CSRC", ".anchor/csrc/selective_scan"),
    )
    out_dir = os.environ.get("OUT", "/tmp")
    env["OUT"] = out_dir
    clear_stale_lock()
    subprocess.run([sys.executable, anchor_script()], env=env, check=True)
    with open(os.path.join(out_dir, "official_torch.json")) as f:
        return json.load(f)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="T,S,B,L")
    parser.add_argument("--batches", default="128,256")
    parser.add_argument("--train-models", default="T,B")
    parser.add_argument("--train-batch", type=int, default=128)
    parser.add_argument("--recipe-configs", default="", help="comma list of configs/*.py whose main.py step to time")
    parser.add_argument("--recipe-mesa", action="store_true", help="time the recipe steps with MESA's teacher on")
    parser.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    parser.add_argument("--min-window-s", type=float, default=MIN_WINDOW_S, help="shortest timed window, seconds")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--scan-impl", default="auto")
    parser.add_argument("--attention-impl", default="auto")
    parser.add_argument("--norm-impl", default="xla", help="xla or pallas (LayerNorms with the residual update)")
    parser.add_argument(
        "--variants",
        default="",
        help="';'-separated sets of NAME=VALUE[,NAME=VALUE] (model options; xla_* compiler options) to time next to "
        "the base options",
    )
    parser.add_argument("--compare-official", action="store_true")
    parser.add_argument(
        "--official-json",
        default=None,
        help="official_torch.json from a run of the anchor earlier in the same device call",
    )
    parser.add_argument("--out", default=None)
    parser.add_argument(
        "--xla-option",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an XLA compiler option for the inference and training executables, not the recipe steps "
        "(repeatable), e.g. xla_gpu_enable_cublaslt=true",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="profile each inference and training config and print its top ops (raw traces under /tmp)",
    )
    args = parser.parse_args()

    models = [m for m in args.models.split(",") if m]
    train_models = [m for m in args.train_models.split(",") if m]
    if args.size != 224 and (args.compare_official or args.official_json) and (models or train_models):
        parser.error("--compare-official/--official-json: the anchor times 224x224 images only (--size 224)")
    if args.compare_official and (models or train_models):
        anchor_script()  # before the JAX runs: a missing anchor is found at once, not after them
    overrides = dict(
        scan_impl=args.scan_impl, attention_impl=args.attention_impl, norm_impl=args.norm_impl
    )
    compiler_options = dict(mvj.compiler_options() or {}, **(parse_compiler_options(args.xla_option) or {})) or None
    dtype = DTYPES[args.dtype]
    device = jax.devices()[0].device_kind
    results = dict(
        device=device,
        jax=jax.__version__,
        dtype=args.dtype,
        overrides=overrides,
        compiler_options=compiler_options,
        date=time.strftime("%Y-%m-%d"),
        min_window_s=args.min_window_s,
        inference={},
        training={},
        recipe={},
    )
    out = args.out or os.path.join(os.environ.get("OUT", "."), "throughput.json")

    def save():
        with open(out, "w") as f:
            json.dump(results, f, indent=1)

    variants = [("", overrides, compiler_options)]
    for tag, options in parse_variants(args.variants):
        xla = {k: v for k, v in options.items() if k.startswith("xla_")}
        model = {k: v for k, v in options.items() if not k.startswith("xla_")}
        variants.append((tag, dict(overrides, **model), dict(compiler_options or {}, **xla) or None))
    for m in models:
        for batch in (int(b) for b in args.batches.split(",")):
            for tag, options, compiler in variants:
                key = f"{m}_bs{batch}{tag}"
                profile_dir = os.path.join("/tmp", f"trace_{key}") if args.profile else None
                r = inference(SHORT[m], batch, dtype, args.size, options, profile_dir, compiler, args.min_window_s)
                results["inference"][key] = r
                report(f"infer {key} {args.dtype}", r)
                save()
    for m in train_models:
        for tag, options, compiler in variants:
            key = f"{m}_bs{args.train_batch}{tag}"
            profile_dir = os.path.join("/tmp", f"trace_train_{key}") if args.profile else None
            r = training(
                SHORT[m], args.train_batch, jnp.bfloat16, args.size, options, profile_dir, compiler, args.min_window_s
            )
            results["training"][key] = r
            report(f"train {key} bf16 AdamW", r)
            save()
    for path in (p for p in args.recipe_configs.split(",") if p):
        name = os.path.splitext(os.path.basename(path))[0]
        profile_dir = os.path.join("/tmp", f"trace_recipe_{name}") if args.profile else None
        r = recipe(path, args.train_batch, args.recipe_mesa, profile_dir, args.min_window_s)
        results["recipe"][f"{name}_bs{args.train_batch}"] = r
        report(f"recipe {name} bs{args.train_batch}{' MESA on' if args.recipe_mesa else ''}", r)
        save()
    if args.official_json:
        with open(args.official_json) as f:
            results["official"] = json.load(f)
    elif args.compare_official:
        results["official"] = official(models, train_models) if models or train_models else {}
        recipe_models = list(dict.fromkeys(r["model"] for r in results["recipe"].values()))
        if recipe_models:
            results["official"].update(official_recipe(recipe_models, args.train_batch, args.recipe_mesa))
    save()
    print_table(results)


def parse_value(value: str):
    """An option's value from the command line: ``true``/``false`` as booleans, integers as ints, else the string."""
    lowered = value.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    try:
        return int(value)
    except ValueError:
        return value


def parse_options(items, flag: str) -> dict:
    """``["name=value", ...]`` -> ``{name: parse_value(value)}``; a malformed item is named with its ``flag``."""
    options = {}
    for item in items:
        name, sep, value = item.strip().partition("=")
        if not sep or not name:
            raise ValueError(f"{flag} wants NAME=VALUE, got {item!r}")
        options[name] = parse_value(value)
    return options


def parse_compiler_options(items):
    """``["name=value", ...]`` -> XLA compiler options (None if none; XLA rejects unknown names at compile time)."""
    return parse_options(items, "--xla-option") or None


def parse_variants(text: str) -> list:
    """``"a=1,b=x;c=true"`` -> ``[("[a=1,b=x]", {"a": 1, "b": "x"}), ("[c=true]", {"c": True})]``: each variant's
    result-key tag and its model options."""
    variants = []
    for group in (g.strip() for g in text.split(";")):
        if group:
            items = [i for i in group.split(",") if i.strip()]
            variants.append((f"[{','.join(i.strip() for i in items)}]", parse_options(items, "--variants")))
    return variants


def report(label, result):
    """One result line (throughput, compile time, executable memory), then its profiled top ops if any."""
    print(
        f"{label}: {result['img_per_s']:.0f} img/s, compile {result['compile_s']:.1f}s, "
        f"mem {result.get('peak_bytes_estimate', 0) / 2**30:.2f} GiB",
        flush=True,
    )
    profile = result.get("profile", {})
    for kind, (ms, frac) in profile.get("kinds", {}).items():
        print(f"   {ms:8.3f} ms/batch {frac:6.1%}  [{kind}]")
    for name, ms, frac in profile.get("top", [])[:PROFILE_TOP]:
        print(f"   {ms:8.3f} ms/batch {frac:6.1%}  {name[:100]}")


def print_table(results):
    official_results = results.get("official", {})
    rows = [(kind, prefix, key) for kind, prefix in KINDS for key in results[kind]]
    width = max([22] + [len(f"{prefix} {key}") + 2 for _, prefix, key in rows])
    print(f"\n{results['device']}, jax {results['jax']}, {results['date']}")
    print(f"{'what':<{width}}{'ours img/s':>12}{'official':>10}{'ratio':>8}{'compile s':>11}{'mem GiB':>9}")
    for kind, prefix, key in rows:
        r = results[kind][key]
        m, bs = key.split("[")[0].split("_bs")  # a variant's tag, "[...]", is not part of the official's key
        if kind == "recipe":  # keyed by config; the official's by model
            theirs = official_results.get(recipe_key(r["model"], int(bs), r["mesa"]))
        else:
            theirs = official_results.get(f"{prefix}_{SHORT[m]}_bs{bs}") if m in SHORT else None
        ratio = f"{r['img_per_s'] / theirs:.2f}" if theirs else "-"
        print(
            f"{prefix + ' ' + key:<{width}}{r['img_per_s']:>12.0f}{theirs or '-':>10}{ratio:>8}"
            f"{r['compile_s']:>11.1f}{r.get('peak_bytes_estimate', 0) / 2**30:>9.2f}"
        )


if __name__ == "__main__":
    main()

"""Training and evaluation loops: ``train_and_evaluate(config, workdir)`` and ``evaluate(config, workdir)``."""

from __future__ import annotations

import collections
import functools
import gc
import json
import logging
import os
import queue
import threading
import time
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from mambavision_jax.data.config_utils import global_batch_size, grad_accum_steps, preprocess_settings
from mambavision_jax.train import checkpoint as ckpt_lib
from mambavision_jax.train import metrics as metrics_lib
from mambavision_jax.train import optim
from mambavision_jax.train import sharding as sharding_lib
from mambavision_jax.train import state as state_lib
from mambavision_jax.train import step as step_lib
from mambavision_jax.train.packing import Packing

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Raised when a train step produced a non-finite loss or gradient norm."""


# ----------------------------------------------------------------------------------------------- model / data


def compute_dtype(config):
    name = config.get("compute_dtype", "auto") or "auto"
    if name == "auto":
        return jnp.bfloat16 if jax.default_backend() in ("gpu", "tpu") else jnp.float32
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]


def _model_overrides(config) -> dict:
    overrides = config.model.to_dict() if hasattr(config.model, "to_dict") else dict(config.model)
    overrides["num_classes"] = config.data.num_classes
    # None means "model default" (timm's create_model drops None kwargs the same way).
    return {k: (tuple(v) if isinstance(v, list) else v) for k, v in overrides.items() if v is not None}


def build_model(config):
    import mambavision_jax as mvj

    return mvj.create_model(config.model_name, dtype=compute_dtype(config), **_model_overrides(config))


def load_pretrained(config):
    """``from_pretrained`` with the config's overrides. Returns (module, variables)."""
    import mambavision_jax as mvj

    return mvj.from_pretrained(
        config.model_name, config.init_from, dtype=compute_dtype(config), **_model_overrides(config)
    )


def merge_pretrained(fresh, pretrained, logger=print):
    """Takes each leaf from ``pretrained`` where path and shape match ``fresh``; keeps the fresh leaf otherwise
    (e.g. a classifier head whose class count differs)."""
    from flax import traverse_util

    f = traverse_util.flatten_dict(jax.device_get(fresh))
    p = traverse_util.flatten_dict(jax.device_get(pretrained))
    out, replaced = {}, []
    for k, v in f.items():
        if k in p and np.shape(p[k]) == np.shape(v):
            out[k] = np.asarray(p[k]).astype(np.asarray(v).dtype)
        else:
            out[k] = v
            replaced.append("/".join(k))
    if replaced:
        logger(
            f"Fine-tune: kept fresh initialisation for {len(replaced)} leaves not matching the pretrained "
            f"weights: {replaced[:8]}{' ...' if len(replaced) > 8 else ''}"
        )
    return traverse_util.unflatten_dict(out)


def _data_module(data_module):
    if data_module is not None:
        return data_module
    import mambavision_jax.data as data

    return data


def _mean_std(config) -> tuple:
    """The config's input normalisation (what the eval step applies to uint8 batches)."""
    pre = preprocess_settings(config)
    return pre.mean, pre.std


def _prefetch(iterator: Iterator[dict], mesh, size: int) -> Iterator[dict]:
    """Converts local batches to global sharded arrays in a background thread, ``size`` batches ahead. Closing the
    generator (or leaving it) ends the thread and drops the batches it made ahead, which sit in device memory."""
    if size <= 0:
        for b in iterator:
            yield sharding_lib.global_batch(b, mesh)
        return
    q: queue.Queue = queue.Queue(maxsize=size)
    sentinel = object()
    stop = threading.Event()

    def work():
        try:
            for b in iterator:
                if stop.is_set():
                    return
                q.put(sharding_lib.global_batch(b, mesh))
            q.put(sentinel)
        except BaseException as e:  # surfaced in the consumer
            q.put(e)

    t = threading.Thread(target=work, name="mvj-prefetch", daemon=True)
    t.start()
    try:
        while True:
            item = q.get()
            if item is sentinel:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while t.is_alive():  # a put blocked on a full queue returns, the thread sees `stop` and ends
            try:
                q.get(timeout=0.1)
            except queue.Empty:
                pass


def _freeze_gc() -> bool:
    """Collects once, then moves every object the cyclic garbage collector tracks into its permanent generation
    (``gc.freeze()``). Called once the train step is compiled: the model, optimizer, jit caches and traced programs
    (hundreds of thousands of objects) are long-lived, and a full (generation-2) collection walking them holds the
    GIL for 100-750 ms on a 2-core host, stalling the input threads and the dispatch of the next steps. Frozen
    objects are still freed by reference counting; only reference cycles among them wait for ``gc.unfreeze()``.
    Returns whether the freeze count was zero before (the caller then unfreezes at the end)."""
    was_unfrozen = gc.get_freeze_count() == 0
    gc.collect()
    gc.freeze()
    return was_unfrozen


class _DispatchWindow:
    """Keeps at most ``SIZE`` dispatched programs unfinished: ``push(x)`` (an output of the program just dispatched)
    blocks until the output pushed ``SIZE`` calls earlier is ready.

    JAX returns from a step before it runs; unbounded, the host queues as many steps as it gets to. XLA:CPU holds 32
    unfinished programs a device and launches a multi-device program's parts from a pool of max(cores, devices)
    threads: with more queued, a launch waits for a slot while the other threads wait in a collective for that
    launch, and a multi-process CPU run hangs (3 of 4 two-process runs of 120 steps logged once did). A few steps
    ahead keep a GPU as busy as many."""

    SIZE = 8

    def __init__(self):
        self._outputs = collections.deque()

    def push(self, output):
        self._outputs.append(output)
        if len(self._outputs) > self.SIZE:
            jax.block_until_ready(self._outputs.popleft())


# ------------------------------------------------------------------------------------------------------ eval


@jax.jit
def _add_sums(totals: dict, sums: dict) -> dict:
    """The eval's running sums plus one batch's, as one program (not one a key)."""
    return jax.tree.map(jnp.add, totals, sums)


def run_eval(eval_step, variables, data, config, mesh) -> dict:
    """One pass over the eval split: loss, top-1 and top-5 over its examples (mask 1), and their count. The eval
    iterator is closed however the pass ends (its worker threads or processes stop)."""
    it = data.build_eval_iterator(config, process_index=jax.process_index(), process_count=jax.process_count())
    totals, in_flight = None, _DispatchWindow()
    try:
        for batch in _prefetch(it, mesh, int(config.data.get("prefetch", 2))):
            out = eval_step(variables, batch)
            totals = out if totals is None else _add_sums(totals, out)
            in_flight.push(totals)
    finally:
        it.close()
    if totals is None:
        return {}
    t = jax.device_get(totals)
    n = max(float(t["count"]), 1.0)
    return {
        "loss": float(t["loss_sum"]) / n,
        "top1": float(t["correct1"]) / n,
        "top5": float(t["correct5"]) / n,
        "num_examples": float(t["count"]),
    }


def _eval_all(eval_step, state, data, config, mesh) -> dict:
    m = run_eval(eval_step, state_lib.compiled_variables(state), data, config, mesh)
    if state.ema_params is not None and config.get("eval_ema", True):
        ema = run_eval(eval_step, state_lib.compiled_variables(state, ema=True), data, config, mesh)
        m.update({f"ema_{k}": v for k, v in ema.items() if k != "num_examples"})
    return m


# ----------------------------------------------------------------------------------------------------- setup


def _setup(config, workdir, model, data, training: bool = True):
    """Everything a run needs around its train state: mesh, model, optimizer, the state's abstract value and
    shardings, the checkpointer. ``training=False`` (restoring a checkpoint to evaluate or export it) reads no train
    split: the learning-rate schedule then spans one step an epoch, which changes no leaf of the state's structure."""
    mesh = sharding_lib.make_mesh()
    model = model if model is not None else build_model(config)
    spe = int(data.steps_per_epoch(config)) if training else 1
    image_size = int(config.data.image_size)
    rng = jax.random.PRNGKey(int(config.seed))
    init_rng, train_rng = jax.random.split(rng)
    dummy = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    abstract_params = jax.eval_shape(lambda r: model.init({"params": r}, dummy), init_rng)["params"]
    packing = Packing.of(abstract_params) if config.get("pack_params", True) else None
    tx, schedule = optim.make_optimizer(config, spe, abstract_params, packing)
    init_fn = state_lib.make_init_fn(model, tx, image_size, use_ema=bool(config.get("ema_decay")), packing=packing)
    abstract = jax.eval_shape(init_fn, init_rng)
    shardings = sharding_lib.state_shardings(
        abstract, mesh, config.get("sharding", "data"), int(config.get("fsdp_min_size", 2**14))
    )
    ckpt = ckpt_lib.Checkpointer(
        os.path.join(workdir, "checkpoints"),
        max_to_keep=config.get("keep_checkpoints", 3),
        async_save=bool(config.get("async_checkpointing", True)),
    )
    return dict(
        mesh=mesh,
        model=model,
        spe=spe,
        init_rng=init_rng,
        train_rng=train_rng,
        tx=tx,
        packing=packing,
        schedule=schedule,
        init_fn=init_fn,
        abstract=abstract,
        shardings=shardings,
        ckpt=ckpt,
        image_size=image_size,
        dummy=dummy,
    )


RUN_RECORD = "run.json"


def _check_global_batch(workdir: str, global_batch: int, resuming: bool):
    """A run's global batch stays what it started with: the step count, the data position (step × global batch)
    and the learning-rate schedule (steps an epoch) only continue the same run with it. A fresh start records it in
    ``<workdir>/run.json`` (process 0); a resumed run with another global batch is refused, naming both and the way
    to keep it on another device count (grad_accum_steps). A run from before the record is not checked."""
    path = os.path.join(workdir, RUN_RECORD)
    if not resuming:
        if jax.process_index() == 0:
            os.makedirs(workdir, exist_ok=True)
            with open(path, "w") as f:
                json.dump({"global_batch": int(global_batch)}, f)
        return
    if not os.path.exists(path):
        return
    with open(path) as f:
        recorded = int(json.load(f)["global_batch"])
    if recorded != global_batch:
        raise ValueError(
            f"{workdir!r} holds a run with a global batch of {recorded} examples, and this config gives "
            f"{global_batch} (batch_size_per_device × {jax.device_count()} devices × grad_accum_steps): resuming would "
            "change its data position and learning-rate schedule. Set batch_size_per_device and grad_accum_steps so "
            f"that they give {recorded} on these devices, or start a new --workdir (fine-tune from an export with "
            "config.init_from)."
        )


def _truncate_metrics(workdir: str, step: int):
    """Drop rows written after ``step``, where a run resumes (0: a fresh start), so metrics.jsonl describes one
    trajectory."""
    path = os.path.join(workdir, "metrics.jsonl")
    if jax.process_index() != 0 or not os.path.exists(path):
        return
    rows = metrics_lib.read_jsonl(path)
    keep = [r for r in rows if int(r.get("step", 0)) <= step]
    if len(keep) != len(rows):
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in keep)
        os.replace(tmp, path)


def _restore_latest(config, workdir, model, data, missing: str):
    """``(setup, state, step)`` of the workdir's latest checkpoint (the checkpointer closed); FileNotFoundError
    starting with ``missing`` when there is none."""
    s = _setup(config, workdir, model, data, training=False)
    latest = s["ckpt"].latest_step()
    if latest is None:
        s["ckpt"].close()
        raise FileNotFoundError(f"{missing} checkpoint under {s['ckpt'].directory}")
    state = s["ckpt"].restore(ckpt_lib.abstract_with_shardings(s["abstract"], s["shardings"]), latest)
    s["ckpt"].close()
    return s, state, latest


def _write_converted(config, workdir: str, directory: str, variables, step: int, ema: bool):
    """Writes ``variables`` of the run in ``workdir`` at ``step`` as a converted-weights directory, replacing an
    earlier one there; ``mvj.from_pretrained(config.model_name, directory)`` loads it with the config's model
    overrides (e.g. ``num_classes``), which its manifest records."""
    from mambavision_jax.weights import save_converted

    save_converted(
        directory,
        config.model_name,
        jax.device_get(variables),
        _model_overrides(config),
        source=f"{os.path.basename(workdir.rstrip(os.sep))}_step{step}",
        ema=ema,
        overwrite=True,
    )


def _best_weights(config, workdir: str, log) -> ckpt_lib.BestWeights | None:
    """The run's best-model tracker, writing ``<workdir>/best`` (process 0 writes it); None with
    ``config.save_best=False``."""
    if not config.get("save_best", True):
        return None
    write = functools.partial(_write_converted, config, workdir)
    return ckpt_lib.BestWeights(os.path.join(workdir, "best"), write, log)


def _recorded_eval(workdir: str, step: int) -> dict | None:
    """The metrics of the eval row metrics.jsonl holds for ``step``, or None. Process 0 reads the file (only it
    writes one); in a multi-process run the others get ``{}`` when it has the row, so every process takes the same
    branch."""
    row = None
    path = os.path.join(workdir, "metrics.jsonl")
    if jax.process_index() == 0 and os.path.exists(path):
        rows = [r for r in metrics_lib.read_jsonl(path) if r.get("split") == "eval" and r.get("step") == step]
        row = {k: v for k, v in rows[-1].items() if k not in ("step", "split", "time")} if rows else None
    if jax.process_count() > 1 and ckpt_lib.process_zeros(row is not None):
        row = row if row is not None else {}
    return row


# ----------------------------------------------------------------------------------------------------- train


def compilation_cache_dir(config, workdir: str) -> str:
    """Where ``main.py`` keeps compiled programs between runs, so that a resumed (or repeated) run loads its steps
    instead of compiling them: ``config.compilation_cache_dir`` if set (the empty string: nowhere), else
    ``$JAX_COMPILATION_CACHE_DIR``, else ``<workdir>/compilation_cache``. Returns an absolute path, or "" for none.

    JAX keys each entry by the program, the devices and the jax/XLA versions, so a changed config or machine compiles
    afresh; programs that compile in under ``jax_persistent_cache_min_compile_time_secs`` (1 s) are not stored."""
    directory = config.get("compilation_cache_dir")
    if directory is None:
        directory = os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(workdir, "compilation_cache")
    return os.path.abspath(os.path.expanduser(directory)) if directory else ""


def train_and_evaluate(config, workdir: str, *, model=None, data_module=None) -> dict:
    """Trains (resuming from ``workdir``'s latest checkpoint if any) with periodic eval. Returns final eval metrics.

    ``config.gc_freeze`` (default True): after the first train step of this call has been compiled, collect once and
    ``gc.freeze()`` the objects built so far, so the cyclic garbage collector's full collections no longer walk
    them (each one pauses every Python thread: input pipeline and step dispatch); undone on return if nothing was
    frozen before.

    Each eval that beats the best top-1 so far (the EMA's when the run keeps and evaluates one) writes its weights to
    ``<workdir>/best`` (``ckpt_lib.BestWeights``; ``config.save_best=False``: not kept). A run resumed at an eval
    step whose eval row is missing (killed between the checkpoint and the row) evaluates it first; rerunning a
    finished run evaluates only when its final row is missing and otherwise returns that row's metrics.

    ``model`` / ``data_module`` are injection points for tests; by default the model comes from
    ``mambavision_jax.create_model(config.model_name, **config.model)`` and data from ``mambavision_jax.data``.
    """
    data = _data_module(data_module)
    s = _setup(config, workdir, model, data)
    mesh, model, ckpt, shardings = s["mesh"], s["model"], s["ckpt"], s["shardings"]
    total = optim.total_train_steps(config, s["spe"])
    is_main = jax.process_index() == 0
    say = (lambda m: print(m, flush=True)) if is_main else (lambda m: None)

    global_bs, accum = global_batch_size(config), grad_accum_steps(config)
    latest = ckpt.latest_step()
    _check_global_batch(workdir, global_bs, resuming=latest is not None)
    # rows past where this run starts are from a run that was killed later (or before its first checkpoint)
    _truncate_metrics(workdir, latest or 0)
    if latest is not None:
        state = ckpt.restore(ckpt_lib.abstract_with_shardings(s["abstract"], shardings), latest)
        say(f"Resumed from {ckpt.directory} at step {latest}.")
    elif config.get("init_from"):
        _, pre = load_pretrained(config)
        fresh = jax.jit(lambda r: model.init({"params": r}, s["dummy"]))(s["init_rng"])
        variables = merge_pretrained(fresh, pre, say)
        state = state_lib.state_from_variables(
            state_lib.make_state_fn(s["tx"], bool(config.get("ema_decay")), s["packing"]), variables, shardings
        )
        say(f"Fine-tuning from {config.init_from}.")
    else:
        state = jax.jit(s["init_fn"], out_shardings=shardings)(s["init_rng"])
    start = int(jax.device_get(state.step))
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    say(
        f"{config.model_name}: {num_params:,} params; {jax.device_count()} devices ({jax.default_backend()}), "
        f"sharding={config.get('sharding', 'data')}, "
        f"BatchNorm statistics {'global' if config.get('sync_batch_norm', False) else 'per device'}, "
        f"compute dtype={jnp.dtype(compute_dtype(config)).name}; global batch {global_bs}"
        f"{f' ({accum} micro-batches an update)' if accum > 1 else ''}, "
        f"{s['spe']} steps/epoch, steps {start}->{total}."
    )

    train_step = step_lib.make_train_step(model, s["tx"], s["schedule"], config, s["spe"], data, mesh, shardings)
    eval_step = step_lib.make_eval_step(model, mesh, int(config.data.num_classes), *_mean_std(config))
    writer = metrics_lib.MetricWriter(
        workdir, total_steps=total, initial_step=start, progress=bool(config.get("progress_bar", True))
    )
    log_every = max(int(config.get("log_every_steps", 50) or 50), 1)
    ckpt_every = int(config.get("checkpoint_every_steps", 0) or 0)
    eval_every = int(config.get("eval_every_steps", 0) or 0)
    best = _best_weights(config, workdir, writer.log)

    def is_eval_step(cur: int) -> bool:
        """Whether the loop evaluates after step ``cur``: every ``eval_every`` steps and at the end."""
        return bool(eval_every and cur % eval_every == 0) or cur >= total

    def eval_and_record(cur: int, state) -> dict:
        """Evaluates ``state`` (of step ``cur``), keeps it as the best model if it is, then writes the eval row: a
        run killed in between evaluates the step again when it resumes, and finds the same best."""
        metrics = _eval_all(eval_step, state, data, config, mesh)
        if best is not None:
            best.update(cur, metrics, state)
        writer.write(cur, "eval", metrics)
        return metrics

    pending: list[tuple[int, dict]] = []
    window_t0 = time.perf_counter()

    def flush():
        """Pulls pending step metrics to host, stops on a non-finite value, writes one averaged train row."""
        nonlocal window_t0
        if not pending:
            return
        host = jax.device_get([m for _, m in pending])
        for (st, _), m in zip(pending, host):
            if not bool(m["finite"]):
                ckpt.wait()
                msg = (
                    f"Non-finite loss at step {st} (loss={float(m['loss'])}, grad_norm={float(m['grad_norm'])}); "
                    f"stopping. The last good checkpoint (step {ckpt.latest_step()}) in {ckpt.directory} is kept; "
                    f"no state after it was saved."
                )
                writer.log(msg)
                writer.close()
                ckpt.close()
                raise NonFiniteLossError(msg)
        dt = time.perf_counter() - window_t0
        n = len(host)
        row = {k: float(np.mean([float(m[k]) for m in host])) for k in host[0] if k not in ("finite", "lr")}
        row["lr"] = float(host[-1]["lr"])
        row["step_time"] = dt / n
        row["img_per_sec"] = global_bs * n / dt
        writer.write(pending[-1][0], "train", row)
        pending.clear()
        window_t0 = time.perf_counter()

    final_eval: dict = {}
    if start and is_eval_step(start):  # the eval of the restored step, unless its row was written
        final_eval = _recorded_eval(workdir, start)
        if final_eval is None:
            say(f"Evaluating step {start} first: the run stopped before writing its eval row.")
            final_eval = eval_and_record(start, state)
    it = data.build_train_iterator(
        config, start_step=start, process_index=jax.process_index(), process_count=jax.process_count()
    )
    batches = _prefetch(it, mesh, int(config.data.get("prefetch", 2)))
    gc_freeze, unfreeze = bool(config.get("gc_freeze", True)), False
    in_flight = _DispatchWindow()
    try:
        for step in range(start, total):
            batch = next(batches)
            state, m = train_step(state, batch, s["train_rng"], step)
            in_flight.push(m["loss"])
            if step == start:  # the step is compiled (and running): setup's objects are long-lived
                unfreeze = gc_freeze and _freeze_gc()
                window_t0 = time.perf_counter()  # the first window times the steps, not the compile
            cur = step + 1
            pending.append((cur, m))
            last = cur == total
            do_ckpt = (ckpt_every and cur % ckpt_every == 0) or last
            do_eval = is_eval_step(cur)
            if cur % log_every == 0 or do_ckpt or do_eval:
                flush()
                writer.advance(cur)
            if do_ckpt:
                ckpt.save(cur, state)  # only after flush() checked every step up to `cur` finite
            if do_eval:
                final_eval = eval_and_record(cur, state)
            if do_ckpt or do_eval:  # the next window times train steps only
                window_t0 = time.perf_counter()
    finally:
        batches.close()
        it.close()  # its worker threads or processes
        if unfreeze:
            gc.unfreeze()
    ckpt.close()
    writer.close()
    return final_eval


# ---------------------------------------------------------------------------------------------------- export


def export(config, workdir: str, *, model=None, data_module=None) -> list[str]:
    """Writes the workdir's latest checkpoint as converted-weights directories (``mambavision_jax.weights``): the
    trained variables to ``config.export_dir`` (default ``<workdir>/converted``) and, when the run keeps an EMA, the
    EMA copy to the same path with ``_ema`` appended; an earlier export there is replaced, any other non-empty
    directory refused. Returns the directories.
    Load one with ``mvj.from_pretrained(config.model_name, directory)``; its manifest records the config's model
    overrides (e.g. ``num_classes``), which ``from_pretrained`` applies. One process only."""
    if jax.process_count() > 1:
        raise RuntimeError("mode=export runs in one process: start it without --multihost on one host.")
    _, state, latest = _restore_latest(config, workdir, model, _data_module(data_module), "mode=export: no")
    base = os.path.abspath(config.get("export_dir") or os.path.join(workdir, "converted"))
    copies = [(base, False)] + ([(base + "_ema", True)] if state.ema_params is not None else [])
    for directory, ema in copies:
        _write_converted(config, workdir, directory, state_lib.compiled_variables(state, ema=ema), latest, ema)
        print(f"wrote {'EMA ' if ema else ''}weights of step {latest} to {directory}", flush=True)
    return [d for d, _ in copies]


# ------------------------------------------------------------------------------------------------------ eval


def evaluate(config, workdir: str, *, model=None, data_module=None) -> dict:
    """Evaluates ``config.init_from`` (converted weights via from_pretrained) or the workdir's latest checkpoint."""
    data = _data_module(data_module)
    mesh = sharding_lib.make_mesh()
    eval_step_for = lambda mdl: step_lib.make_eval_step(mdl, mesh, int(config.data.num_classes), *_mean_std(config))
    if config.get("init_from"):
        module, variables = load_pretrained(config)
        variables = jax.device_put(variables, sharding_lib.replicated(mesh))
        metrics = run_eval(eval_step_for(module), variables, data, config, mesh)
        step = 0
    else:
        s, state, step = _restore_latest(config, workdir, model, data, "mode=eval: no config.init_from and no")
        metrics = _eval_all(eval_step_for(s["model"]), state, data, config, mesh)
    writer = metrics_lib.MetricWriter(workdir, progress=False)
    writer.write(step, "eval", metrics)
    writer.close()
    if jax.process_index() == 0:
        print(f"eval @ step {step}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()), flush=True)
    return metrics

"""MambaVision-JAX training / evaluation entry point.

  python main.py --config=configs/tiny.py [--workdir=workdirs/tiny] [--config.key=value ...]
  python main.py --config=configs/demo.py --workdir=/tmp/demo
  python main.py --config=configs/tiny.py --config.mode=eval --config.init_from=<converted dir> --workdir=/tmp/ev
  python main.py --config=configs/tiny.py --config.mode=eval --config.init_from=hf-hub --workdir=/tmp/ev  # official
  python main.py --config=configs/tiny.py --config.mode=export --workdir=/tmp/mv_t   # -> /tmp/mv_t/converted[_ema]

Running the same command again (the same --workdir, or none) resumes from the latest checkpoint.
Multi-process (multi-host) runs call jax.distributed.initialize() when --multihost is given or the environment
looks like a multi-process launch (JAX_COORDINATOR_ADDRESS, SLURM with >1 task, OpenMPI with >1 rank). Without
SLURM or MPI, give every process JAX_COORDINATOR_ADDRESS=host0:port, JAX_NUM_PROCESSES=N and JAX_PROCESS_ID=i.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir",
    None,
    "Directory for checkpoints, metrics.jsonl and TensorBoard logs (default: workdirs/<config file name>, e.g. "
    "workdirs/tiny for configs/tiny.py).",
)
_MULTIHOST = flags.DEFINE_bool(
    "multihost", None, "Call jax.distributed.initialize(). Default: detect from the environment."
)
flags.mark_flags_as_required(["config"])


def default_workdir(config_file: str) -> str:
    """``workdirs/<stem>`` for a config file ``<dir>/<stem>.py`` (a ``:argument`` after it ignored), relative to the
    current directory, so that the same command run again resumes the same run."""
    stem = os.path.splitext(os.path.basename(config_file.split(":")[0]))[0]
    return os.path.join("workdirs", stem)


def _is_multiprocess_env() -> bool:
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return True
    if int(env.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_JOB_ID" in env:
        return True
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
        return True
    return False


def _process_layout() -> dict:
    """num_processes / process_id from JAX_NUM_PROCESSES / JAX_PROCESS_ID when set (a launch without SLURM or
    MPI: every process gets JAX_COORDINATOR_ADDRESS, which jax reads itself, plus these two); otherwise empty,
    and jax.distributed detects the cluster."""
    layout = {}
    for env_name, key in (("JAX_NUM_PROCESSES", "num_processes"), ("JAX_PROCESS_ID", "process_id")):
        if os.environ.get(env_name):
            layout[key] = int(os.environ[env_name])
    return layout


def main(argv):
    del argv
    if not flags.FLAGS["verbosity"].present:  # Orbax logs every save step at INFO; keep the console readable.
        logging.set_verbosity(logging.WARNING)
    import jax

    multihost = _MULTIHOST.value if _MULTIHOST.value is not None else _is_multiprocess_env()
    if multihost:
        jax.distributed.initialize(**_process_layout())
    from mambavision_jax.train import loop

    config = _CONFIG.value
    mode = config.get("mode", "train")
    if mode not in ("train", "eval", "export"):
        raise app.UsageError(f"config.mode must be 'train', 'eval' or 'export', got {mode!r}")
    config_file = config_flags.get_config_filename(flags.FLAGS["config"])
    workdir = os.path.abspath(_WORKDIR.value or default_workdir(config_file))
    if _WORKDIR.value is None and jax.process_index() == 0:
        print(f"workdir: {workdir}", flush=True)
    os.makedirs(workdir, exist_ok=True)
    cache_dir = loop.compilation_cache_dir(config, workdir)
    if cache_dir:  # a resumed or repeated run then loads its compiled steps instead of compiling them again
        jax.config.update("jax_compilation_cache_dir", cache_dir)
    if jax.process_index() == 0:  # eval and export keep a training run's config.json in the same workdir
        name = "config.json" if mode == "train" else f"config_{mode}.json"
        with open(os.path.join(workdir, name), "w") as f:
            f.write(config.to_json_best_effort(indent=2))
    logging.info(
        "process %d/%d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    try:
        if mode == "train":
            loop.train_and_evaluate(config, workdir)
        elif mode == "eval":
            loop.evaluate(config, workdir)
        else:
            loop.export(config, workdir)
    except loop.NonFiniteLossError as e:
        print(f"ERROR: {e}", file=sys.stderr, flush=True)
        sys.exit(3)


if __name__ == "__main__":
    app.run(main)

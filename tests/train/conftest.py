"""Shared fixtures for the training tests. All compiled programs go to a per-session persistent compilation cache
shared with the subprocesses, so each distinct program compiles once per test session (CPU compiles dominate)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RUNNER = os.path.join(ROOT, "tests", "train", "runner.py")


@pytest.fixture(scope="session")
def jax_cache_env(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("jax_cache"))
    env = dict(
        os.environ,
        JAX_COMPILATION_CACHE_DIR=cache,
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    import jax

    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return env


@pytest.fixture(scope="session")
def run_runner(jax_cache_env):
    def run(spec: dict, *, expect_rc: int = 0) -> dict | None:
        p = subprocess.run(
            [sys.executable, RUNNER, json.dumps(spec)],
            env=jax_cache_env,
            capture_output=True,
            text=True,
            timeout=600,
            cwd=ROOT,
        )
        assert p.returncode == expect_rc, f"rc={p.returncode}\nSTDOUT:\n{p.stdout[-4000:]}\nSTDERR:\n{p.stderr[-4000:]}"
        for line in p.stdout.splitlines():
            if line.startswith("RESULT:"):
                return json.loads(line[len("RESULT:") :])
        return None

    return run


@pytest.fixture(scope="session")
def run_main(jax_cache_env):
    def run(*args: str, expect_rc: int = 0) -> subprocess.CompletedProcess:
        p = subprocess.run(
            [sys.executable, os.path.join(ROOT, "main.py"), *args],
            env=jax_cache_env,
            capture_output=True,
            text=True,
            timeout=600,
            cwd=ROOT,
        )
        assert p.returncode == expect_rc, f"rc={p.returncode}\nSTDOUT:\n{p.stdout[-4000:]}\nSTDERR:\n{p.stderr[-4000:]}"
        return p

    return run


@pytest.fixture
def tiny_config():
    from tests.train import tiny_config as tc

    return tc.get_config()



class EvalBatches:
    """A data module whose eval split is ``batches`` (host batches, in order); its iterator has the ``close()`` the
    training loop calls on data iterators."""

    def __init__(self, batches):
        self._batches = batches

    def build_eval_iterator(self, config, process_index, process_count):
        return _ClosingIterator(self._batches)


class _ClosingIterator:
    def __init__(self, items):
        self._it = iter(items)

    def __iter__(self):
        return self

    def __next__(self):
        return next(self._it)

    def close(self):
        pass

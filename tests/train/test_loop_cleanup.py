"""When the train loop returns, or an eval pass fails, its input side is gone: the iterators are closed (their
worker threads or processes stop) and the prefetch threads have ended, releasing the batches they had made ahead on
the device."""

import threading

import pytest

import mambavision_jax.data as data
from mambavision_jax.train import loop
from mambavision_jax.train import sharding as sharding_lib


def _recording_close(it):
    """``it`` with ``it.closed`` set by its close()."""
    close = it.close
    it.closed = False

    def recording_close():
        it.closed = True
        close()

    it.close = recording_close
    return it


class _RecordingData:
    """mambavision_jax.data whose train and eval iterators record whether they were closed."""

    def __init__(self):
        self.iterators = []

    def __getattr__(self, name):
        return getattr(data, name)

    def build_train_iterator(self, config, **kwargs):
        self.iterators.append(_recording_close(data.build_train_iterator(config, **kwargs)))
        return self.iterators[-1]

    def build_eval_iterator(self, config, **kwargs):
        self.iterators.append(_recording_close(data.build_eval_iterator(config, **kwargs)))
        return self.iterators[-1]


def _prefetch_threads():
    return [t for t in threading.enumerate() if t.name == "mvj-prefetch"]


def test_the_loop_closes_its_iterators_and_ends_its_prefetch_threads(tiny_config, tmp_path, jax_cache_env):
    c = tiny_config
    c.total_steps = 2
    c.checkpoint_every_steps = 0
    c.data.prefetch = 4  # the thread fills the queue ahead of the two steps and blocks on it
    recording = _RecordingData()
    assert not _prefetch_threads()
    loop.train_and_evaluate(c, str(tmp_path / "wd"), data_module=recording)
    assert len(recording.iterators) >= 2  # train, then the final eval
    assert all(it.closed for it in recording.iterators)
    assert not _prefetch_threads()


def test_an_eval_pass_that_fails_closes_its_iterator(tiny_config):
    def failing_eval_step(variables, batch):
        raise RuntimeError("eval step failed")

    recording = _RecordingData()
    with pytest.raises(RuntimeError, match="eval step failed"):
        loop.run_eval(failing_eval_step, {}, recording, tiny_config, sharding_lib.make_mesh())
    assert [it.closed for it in recording.iterators] == [True]
    assert not _prefetch_threads()

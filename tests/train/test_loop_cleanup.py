"""When the train loop returns, its input side is gone: the train iterator is closed (its worker threads or
processes stop) and the prefetch thread has ended, releasing the batches it had made ahead on the device."""

import threading

import mambavision_jax.data as data
from mambavision_jax.train import loop


class _RecordingData:
    """mambavision_jax.data whose train iterators record whether they were closed."""

    def __init__(self):
        self.iterators = []

    def __getattr__(self, name):
        return getattr(data, name)

    def build_train_iterator(self, config, **kwargs):
        it = data.build_train_iterator(config, **kwargs)
        self.iterators.append(it)
        close = it.close
        it.closed = False

        def recording_close():
            it.closed = True
            close()

        it.close = recording_close
        return it


def _prefetch_threads():
    return [t for t in threading.enumerate() if t.name == "mvj-prefetch"]


def test_the_loop_closes_its_train_iterator_and_ends_its_prefetch_thread(tiny_config, tmp_path, jax_cache_env):
    c = tiny_config
    c.total_steps = 2
    c.checkpoint_every_steps = 0
    c.data.prefetch = 4  # the thread fills the queue ahead of the two steps and blocks on it
    recording = _RecordingData()
    assert not _prefetch_threads()
    loop.train_and_evaluate(c, str(tmp_path / "wd"), data_module=recording)
    assert [it.closed for it in recording.iterators] == [True]
    assert not _prefetch_threads()

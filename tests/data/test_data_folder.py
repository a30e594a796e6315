"""Image-folder source on generated JPEGs, including a corrupt file."""

import os
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from mambavision_jax import data as D
from mvj_data_helpers import make_config

CLASSES = ["cat", "dog", "eel"]


def _write_folder(root, per_class=4, corrupt=True, corrupt_split="train"):
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("val", 2)):
        for c in CLASSES:
            os.makedirs(root / split / c)
            for i in range(n):
                arr = rng.integers(0, 256, (20 + i, 24, 3), dtype=np.uint8)
                ext = "png" if i == 1 else "jpg"
                Image.fromarray(arr).save(root / split / c / f"{c}{i}.{ext}")
    bad = root / corrupt_split / "dog" / "dog_bad.jpg"
    if corrupt:
        bad.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    return str(bad)


def _cfg(root, on_corrupt, bs=4):
    return make_config(
        "folder", size=16, bs=bs, num_classes=3, data_dir=str(root), on_corrupt=on_corrupt, eval_split="val"
    )


def test_class_mapping_and_eval(tmp_path):
    _write_folder(tmp_path, corrupt=False)
    cfg = _cfg(tmp_path, "raise")
    src = D.build_source(cfg, "val")
    assert src.classes == CLASSES and len(src) == 6
    batches = list(D.build_eval_iterator(cfg, process_index=0, process_count=1))
    labels = np.concatenate([b["label"] for b in batches])
    masks = np.concatenate([b["mask"] for b in batches])
    assert labels[masks == 1].tolist() == [0, 0, 1, 1, 2, 2]
    assert batches[0]["image"].shape == (4, 16, 16, 3)


def test_a_data_dir_under_home_written_with_a_tilde(tmp_path, monkeypatch):
    """``--config.data.data_dir=~/images`` reaches the config unexpanded (the shell expands '~' at a word's start
    only); the source expands it."""
    _write_folder(tmp_path / "images", corrupt=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert len(D.build_source(_cfg("~/images", "raise"), "val")) == 6


def test_corrupt_raise_names_file(tmp_path):
    bad = _write_folder(tmp_path)
    cfg = _cfg(tmp_path, "raise")
    src = D.build_source(cfg, "train")
    bad_idx = [p for p, _ in src.files].index(bad)
    with pytest.raises(D.CorruptImageError, match="dog_bad.jpg") as ei:
        src.load(bad_idx)
    assert ei.value.path == bad
    it = D.build_train_iterator(cfg, start_step=0, process_index=0, process_count=1)
    with pytest.raises(D.CorruptImageError, match="dog_bad.jpg"):
        for _ in range(12):  # 3 steps/epoch; the file is read in the first epochs for this seed
            next(it)
    it.close()


def test_corrupt_skip_counts_file(tmp_path):
    bad = _write_folder(tmp_path)
    cfg = _cfg(tmp_path, "skip")
    src = D.build_source(cfg, "train")
    files = [p for p, _ in src.files]
    bad_idx = files.index(bad)
    img, label = src.load(bad_idx)  # replaced deterministically by the next file
    nxt_path, nxt_label = src.files[(bad_idx + 1) % len(files)]
    assert label == nxt_label and np.array_equal(np.asarray(img), np.asarray(Image.open(nxt_path).convert("RGB")))
    assert src.skip_log.files == {bad: 1} and src.skip_log.count == 1
    it = D.build_train_iterator(cfg, start_step=0, process_index=0, process_count=1)
    batches = [next(it) for _ in range(12)]
    assert it.skipped_files == [bad] and it.num_skipped >= 1
    assert bad in D.skipped_files()
    assert all(np.isfinite(b["image"]).all() and b["image"].shape == (4, 16, 16, 3) for b in batches)
    it.close()


def _eval_pass(root, on_corrupt, worker_processes):
    """The batches of one eval pass over ``root``'s val split in batches of 4, and its iterator."""
    cfg = _cfg(root, on_corrupt)
    cfg.data.worker_processes = worker_processes
    it = D.build_eval_iterator(cfg, process_index=0, process_count=1)
    try:
        return list(it), it
    finally:
        it.close()


def _masked(batches, key):
    """``key``'s values of the examples with mask 1, in order."""
    return np.concatenate([b[key][b["mask"] == 1] for b in batches])


@pytest.mark.parametrize("worker_processes", [0, 2])
def test_eval_leaves_a_corrupt_file_out_and_counts_it(tmp_path, caplog, worker_processes):
    """Substituting the next file (as training does) counted that image twice and lost the corrupt file's label."""
    _write_folder(tmp_path / "clean", corrupt=False)
    bad = _write_folder(tmp_path / "bad", corrupt_split="val")
    clean, _ = _eval_pass(tmp_path / "clean", "skip", worker_processes)
    with caplog.at_level("WARNING"):
        batches, it = _eval_pass(tmp_path / "bad", "skip", worker_processes)
    assert len(batches) == 2 and all(b["image"].shape == (4, 16, 16, 3) for b in batches)  # 7 files: 1 padded
    masks = np.concatenate([b["mask"] for b in batches])
    assert masks.tolist() == [1, 1, 1, 1, 0, 1, 1, 0]  # dog_bad.jpg is the 5th file
    for key in ("image", "label"):  # the decodable files' examples, each once: those of the clean split
        np.testing.assert_array_equal(_masked(batches, key), _masked(clean, key), err_msg=key)
    assert it.skipped_files == [bad] and it.num_skipped == 1
    assert sum("dog_bad.jpg" in r.getMessage() for r in caplog.records) == 1
    assert any("1 corrupt image file(s) of split 'val' left out" in r.getMessage() for r in caplog.records)
    with pytest.raises(D.CorruptImageError, match="dog_bad.jpg"):
        _eval_pass(tmp_path / "bad", "raise", worker_processes)


def test_folder_errors(tmp_path):
    with pytest.raises(D.DatasetNotFoundError, match="does not exist"):
        D.build_source(_cfg(tmp_path / "nope", "raise"), "train")
    _write_folder(tmp_path, corrupt=False)
    os.makedirs(tmp_path / "train" / "fox")
    with pytest.raises(D.DatasetNotFoundError, match="fox"):
        D.build_source(_cfg(tmp_path, "raise"), "train")
    with pytest.raises(D.DatasetNotFoundError, match="split 'test'"):
        D.build_source(_cfg(tmp_path, "raise"), "test")


def _take(iterator, n):
    try:
        return [next(iterator) for _ in range(n)]
    finally:
        iterator.close()


def test_worker_processes_give_the_threads_batches_and_report_skips(tmp_path):
    bad = _write_folder(tmp_path)
    cfg = _cfg(tmp_path, "skip")
    threads = D.build_train_iterator(cfg, start_step=2, process_index=0, process_count=1)
    expected = _take(threads, 7)  # steps 2-8: past the first epoch's end (3 steps an epoch), the bad file read
    assert threads.skipped_files == [bad]
    cfg.data.worker_processes = 2
    processes = D.build_train_iterator(cfg, start_step=2, process_index=0, process_count=1)
    got = _take(processes, 7)
    assert [sorted(b) for b in got] == [sorted(b) for b in expected] and "erase" in got[0]
    for a, b in zip(got, expected):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    # Reported with the batches that were delivered (threads also count what they read ahead).
    assert processes.skipped_files == [bad] and processes.num_skipped >= 1

    eval_threads = list(D.build_eval_iterator(_cfg(tmp_path, "skip", bs=5), process_index=0, process_count=1))
    eval_cfg = _cfg(tmp_path, "skip", bs=5)
    eval_cfg.data.worker_processes = 2
    eval_processes = list(D.build_eval_iterator(eval_cfg, process_index=0, process_count=1))
    assert len(eval_processes) == len(eval_threads) == 2  # 6 images in batches of 5: the second one padded
    for a, b in zip(eval_processes, eval_threads):
        for key in b:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.parametrize("value", [-2, 1.5, True, "4"])
def test_worker_processes_must_be_a_count(tmp_path, value):
    _write_folder(tmp_path, corrupt=False)
    cfg = _cfg(tmp_path, "raise")
    cfg.data.worker_processes = value
    with pytest.raises(ValueError, match="worker_processes"):
        D.build_train_iterator(cfg, start_step=0, process_index=0, process_count=1)


MB = 2**20


@pytest.mark.parametrize(
    "cores, free_shm, expected",
    [
        (16, None, 15),  # a process a core but one
        (16, 64 * 1024 * MB, 15),
        (16, 8 * 19 * MB, 2),  # /dev/shm holds 4 batches a process of 19 MB: room for 2
        (16, 64 * MB, 0),  # Docker's default: not even 2 processes, so threads
        (2, None, 0),  # one process would lose to two threads
        (3, None, 2),
    ],
)
def test_auto_worker_processes_follow_the_cores_and_dev_shm(cores, free_shm, expected):
    assert D.pipeline.auto_worker_processes(19 * MB, cores, free_shm) == expected


@pytest.fixture
def no_launcher(monkeypatch):
    """No launcher's count of training processes on this host in the environment."""
    for name in D.pipeline._LOCAL_PROCESS_VARS:
        monkeypatch.delenv(name, raising=False)


def test_auto_worker_processes_from_the_config(tmp_path, monkeypatch, caplog, no_launcher):
    cfg = _cfg(tmp_path, "raise")  # 16x16 images: 768 bytes each, 3,072 a batch of 4
    cfg.data.worker_processes = -1
    monkeypatch.setattr(D.pipeline, "_usable_cores", lambda: 8)
    monkeypatch.setattr(D.pipeline, "_free_shm_bytes", lambda: 10**9)
    assert D.worker_process_count(cfg, 4) == 7
    assert D.worker_process_count(cfg, 2) == 7
    monkeypatch.setattr(D.pipeline, "_free_shm_bytes", lambda: 3 * 4 * 3072)  # room for 3 processes' batches of 4
    with caplog.at_level("WARNING"):
        assert D.worker_process_count(cfg, 4) == 3
    assert "/dev/shm" in caplog.text and "--shm-size" in caplog.text
    cfg.data.worker_processes = 0
    assert D.worker_process_count(cfg, 4) == 0


@pytest.mark.parametrize(
    "env, bound_cores, expected",
    [
        ({"SLURM_TASKS_PER_NODE": "4(x2)"}, 32, 7),  # 4 training processes share 32 unbound cores: 8 each
        ({"OMPI_COMM_WORLD_LOCAL_SIZE": "8"}, 32, 3),
        ({"LOCAL_WORLD_SIZE": "4"}, 8, 7),  # bound by the launcher to 8 of the 32: those are this process's
        ({}, 32, 31),
    ],
)
def test_auto_worker_processes_share_the_host_with_other_training_processes(
    tmp_path, monkeypatch, no_launcher, env, bound_cores, expected
):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(D.pipeline, "_usable_cores", lambda: bound_cores)
    monkeypatch.setattr(D.pipeline.os, "cpu_count", lambda: 32)
    monkeypatch.setattr(D.pipeline, "_free_shm_bytes", lambda: 10**9)
    cfg = _cfg(tmp_path, "raise")
    cfg.data.worker_processes = -1
    assert D.worker_process_count(cfg, 4) == expected


def _running(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (an orphan's zombie may wait for a reaper)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return not any(line.startswith("State:") and "Z" in line.split()[1] for line in f)
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc")
def test_worker_processes_exit_when_the_main_process_is_killed(tmp_path):
    _write_folder(tmp_path, corrupt=False)
    script = f"""
import multiprocessing, sys, time
sys.path.insert(0, {os.path.dirname(__file__)!r})
from mvj_data_helpers import make_config
from mambavision_jax import data as D
if __name__ == "__main__":
    cfg = make_config("folder", size=16, bs=4, num_classes=3, data_dir={str(tmp_path)!r}, eval_split="val")
    cfg.data.worker_processes = 2
    it = D.build_train_iterator(cfg, start_step=0, process_index=0, process_count=1)
    next(it)
    print(*[p.pid for p in multiprocessing.active_children() if "resource_tracker" not in p.name], flush=True)
    time.sleep(600)
"""
    main = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        workers = [int(p) for p in main.stdout.readline().split()]
        assert len(workers) == 2 and all(_running(p) for p in workers)
    finally:
        main.kill()  # SIGKILL: no cleanup in the main process
        main.wait()
    deadline = time.monotonic() + 20
    while any(_running(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_running(p) for p in workers), "worker processes outlived the killed main process"


def test_worker_processes_raise_the_corrupt_file_error_by_name(tmp_path):
    bad = _write_folder(tmp_path)
    cfg = _cfg(tmp_path, "raise")
    cfg.data.worker_processes = 2
    it = D.build_train_iterator(cfg, start_step=0, process_index=0, process_count=1)
    with pytest.raises(D.CorruptImageError, match="dog_bad.jpg") as error:
        _take(it, 12)  # 3 steps an epoch; the file is read in the first epochs for this seed
    assert error.value.path == bad


def test_a_class_s_images_in_subdirectories_are_read_as_torchvision_lists_them(tmp_path):
    """torchvision's ImageFolder walks each class directory; a flat listing dropped the nested images unseen."""
    _write_folder(tmp_path, corrupt=False)
    cat = tmp_path / "train" / "cat"
    for sub in ("b", "a", ".thumbs"):
        os.makedirs(cat / sub)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(cat / sub / "x.jpg")
    os.makedirs(cat / "a" / "deeper")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(cat / "a" / "deeper" / "y.JPEG")
    src = D.build_source(_cfg(tmp_path, "raise"), "train")
    cat_files = [os.path.relpath(p, cat) for p, label in src.files if label == 0]
    assert cat_files == ["cat0.jpg", "cat1.png", "cat2.jpg", "cat3.jpg", "a/x.jpg", "a/deeper/y.JPEG", "b/x.jpg"]
    assert len(src) == 3 * 4 + 3


def test_errors_name_the_directory_they_read(tmp_path):
    """Without a train/ directory the classes come from the split's; the errors named train/ all the same."""
    os.makedirs(tmp_path / "val")
    with pytest.raises(D.DatasetNotFoundError, match=r"no class directories in '.*/val'"):
        D.build_source(_cfg(tmp_path, "raise"), "val")
    os.makedirs(tmp_path / "val" / "cat")
    (tmp_path / "val" / "cat" / "bad.jpg").write_bytes(b"not an image")
    src = D.build_source(_cfg(tmp_path, "skip"), "validation")
    with pytest.raises(D.CorruptImageError, match=r"/val \(every file is corrupt\)"):
        src.load(0)

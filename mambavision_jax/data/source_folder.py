"""Image-folder source: ``<root>/<split>/<class>/**/*.{jpg,jpeg,png}`` (split 'val' also found as 'validation').

Class index = position in the sorted class-directory names of ``<root>/train`` (or of the split itself when there
is no train dir), so train and val share one mapping. A class's files are those of its directory and its
subdirectories (hidden ones left out), in torchvision ``ImageFolder`` order. Corrupt files are named:
``on_corrupt='raise'`` raises ``CorruptImageError(path)``; ``'skip'`` records the path in ``skip_log`` (also logged
once per file at WARNING) and ``load`` substitutes the next decodable index (deterministic), while ``load_or_none``
(the eval pass) gives None for the image.
"""

from __future__ import annotations

import logging
import os
import threading

from .decode import load_image_file
from .errors import CorruptImageError, DatasetNotFoundError

log = logging.getLogger(__name__)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
_SPLIT_ALIASES = {"val": ("val", "validation"), "validation": ("validation", "val"), "test": ("test",)}
_ALL_SKIP_LOGS: list["SkipLog"] = []


class SkipLog:
    """Thread-safe record of skipped corrupt files: ``files`` maps path -> times skipped; ``count`` = total."""

    def __init__(self):
        self._lock = threading.Lock()
        self.files: dict[str, int] = {}
        _ALL_SKIP_LOGS.append(self)

    def add(self, path: str, err: BaseException):
        with self._lock:
            first = path not in self.files
            self.files[path] = self.files.get(path, 0) + 1
        if first:
            log.warning("skipping corrupt image %s (%s: %s)", path, type(err).__name__, err)

    def merge(self, skipped: dict[str, int]):
        """Adds the skips a worker process reported (``{path: times}``), warning once for each new file."""
        with self._lock:
            new = [p for p in skipped if p not in self.files]
            for path, times in skipped.items():
                self.files[path] = self.files.get(path, 0) + int(times)
        for path in new:
            log.warning("skipping corrupt image %s (in a worker process)", path)

    def __getstate__(self):
        with self._lock:
            return {"files": dict(self.files)}

    def __setstate__(self, state):
        self.__init__()
        self.files = dict(state["files"])

    @property
    def count(self) -> int:
        with self._lock:
            return sum(self.files.values())


def all_skipped_files() -> list[str]:
    """Sorted paths of every corrupt file skipped so far in this process (all folder sources)."""
    out = set()
    for s in _ALL_SKIP_LOGS:
        out.update(s.files)
    return sorted(out)


def _list_classes(path: str) -> list[str]:
    return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))


def _image_files(class_dir: str) -> list[str]:
    """Paths of the image files in ``class_dir`` and its subdirectories, as torchvision's ``make_dataset`` lists
    them: directories in sorted order, names sorted within each."""
    walk = []
    for dirpath, dirnames, names in os.walk(class_dir, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        walk.append((dirpath, sorted(n for n in names if n.lower().endswith(IMAGE_EXTENSIONS))))
    return [os.path.join(dirpath, n) for dirpath, names in sorted(walk) for n in names]


def _split_dir(root: str, split: str) -> str:
    for cand in _SPLIT_ALIASES.get(split, (split,)):
        p = os.path.join(root, cand)
        if os.path.isdir(p):
            return p
    raise DatasetNotFoundError(
        f"folder dataset: no directory for split {split!r} under {root!r} (expected {root}/{split}/<class>/*.jpg)"
    )


class FolderSource:
    """``load(i) -> (PIL RGB image, label)``; ``files`` is the sorted list of (path, label)."""

    skip_augmentation = False

    def __init__(self, root: str | None, split: str, on_corrupt: str = "raise"):
        if not root:
            raise DatasetNotFoundError("folder dataset needs config.data.data_dir = <root> with train/ and val/")
        if not os.path.isdir(root):
            raise DatasetNotFoundError(f"folder dataset root does not exist: {root!r}")
        if on_corrupt not in ("raise", "skip"):
            raise ValueError(f"config.data.on_corrupt must be 'raise' or 'skip', got {on_corrupt!r}")
        self.root, self.split, self.on_corrupt = root, split, on_corrupt
        self.split_dir = split_dir = _split_dir(root, split)
        train_dir = os.path.join(root, "train")
        classes_dir = train_dir if os.path.isdir(train_dir) else split_dir
        classes = _list_classes(classes_dir)
        if not classes:
            raise DatasetNotFoundError(f"folder dataset: no class directories in {classes_dir!r}")
        self.classes = classes
        self.num_classes = len(classes)
        index = {c: i for i, c in enumerate(classes)}
        files = []
        for c in _list_classes(split_dir):
            if c not in index:
                raise DatasetNotFoundError(
                    f"folder dataset: class dir {os.path.join(split_dir, c)!r} is not among the train classes"
                )
            cdir = os.path.join(split_dir, c)
            paths = _image_files(cdir)
            if not paths:
                raise DatasetNotFoundError(
                    f"folder dataset: class directory {cdir!r} has no {'/'.join(IMAGE_EXTENSIONS)} files"
                )
            files.extend((path, index[c]) for path in paths)
        if not files:
            raise DatasetNotFoundError(f"folder dataset: no images under {split_dir!r}")
        self.files = files
        self.skip_log = SkipLog()

    def __len__(self) -> int:
        return len(self.files)

    def _decode(self, path: str):
        """The RGB image in ``path``; for a corrupt file, ``CorruptImageError`` (``on_corrupt='raise'``) or None with
        the path recorded in ``skip_log`` (``'skip'``)."""
        try:
            return load_image_file(path)
        except Exception as e:  # PIL raises OSError/SyntaxError/ValueError/... on corrupt data
            if self.on_corrupt == "raise":
                raise CorruptImageError(path, e) from e
            self.skip_log.add(path, e)
            return None

    def load(self, index: int):
        """(image, label) of record ``index``, a corrupt file's replaced by the next decodable one (training)."""
        n = len(self.files)
        for k in range(n):
            path, label = self.files[(int(index) + k) % n]
            image = self._decode(path)
            if image is not None:
                return image, label
        raise CorruptImageError(f"{self.split_dir} (every file is corrupt)")

    def load_or_none(self, index: int):
        """(image, label) of record ``index`` itself, image None where its file is corrupt and skipped: the eval pass
        leaves the example out rather than count a substitute twice and lose the corrupt file's label."""
        path, label = self.files[int(index)]
        return self._decode(path), label

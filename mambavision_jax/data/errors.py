"""Exception types raised by the input pipeline (all subclass ``DataError``, itself a ``ValueError``)."""


class DataError(ValueError):
    """Base class of every error raised by ``mambavision_jax.data``."""


class UnknownDatasetError(DataError):
    """``config.data.name`` names no known source."""


class DatasetNotFoundError(DataError):
    """A data directory, split directory or class directory is missing or empty."""


class DatasetNotPreparedError(DataError):
    """A TFDS dataset has not been prepared (as array_record) under the given ``data_dir``."""


class CorruptImageError(DataError):
    """An image file could not be decoded. ``path`` names the file."""

    def __init__(self, path: str, cause: BaseException | None = None):
        self.path = str(path)
        msg = f"corrupt or unreadable image file: {self.path}"
        if cause is not None:
            msg += f" ({type(cause).__name__}: {cause})"
        super().__init__(msg)

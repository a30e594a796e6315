"""Where mamba_ssm's CUDA extension (``selective_scan_cuda``) is built, and the lock a killed build leaves there.

``torch.utils.cpp_extension.load`` holds ``<build dir>/lock`` while it builds and, finding one, waits until it is
gone. A build killed midway (a device command's timeout, say) leaves its lock behind, and every later build in
that directory then waits for ever. The benchmarks build the extension in one process at a time, so a lock that
exists before they start is such a leftover.
"""

import os

DEFAULT_BUILD_DIR = "/tmp/ssbuild"


def build_dir() -> str:
    """The build directory: ``$SS_BUILD``, else /tmp/ssbuild (the anchor script's default)."""
    return os.environ.get("SS_BUILD", DEFAULT_BUILD_DIR)


def clear_stale_lock(directory: str | None = None) -> bool:
    """Removes ``directory``'s (default :func:`build_dir`) leftover build lock and says so; returns whether there
    was one. Call it only where no other process can be building there."""
    lock = os.path.join(directory or build_dir(), "lock")
    if not os.path.exists(lock):
        return False
    os.remove(lock)
    print(f"removed {lock}, left by a build that was killed midway", flush=True)
    return True

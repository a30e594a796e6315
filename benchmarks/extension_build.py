"""The official side's timing script (the anchor), where mamba_ssm's CUDA extension (``selective_scan_cuda``) is
built, and the lock a killed build leaves there.

``torch.utils.cpp_extension.load`` holds ``<build dir>/lock`` while it builds and, finding one, waits until it is
gone. A build killed midway (a device command's timeout, say) leaves its lock behind, and every later build in
that directory then waits for ever. The benchmarks build the extension in one process at a time, so a lock that
exists before they start is such a leftover.
"""

import os

DEFAULT_BUILD_DIR = "/tmp/ssbuild"
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def anchor_script() -> str:
    """The path of ``.anchor/official_torch.py``, the script that builds mamba_ssm's kernel and times the official
    model; it is kept outside this repository. Exits with what is missing where it is not there."""
    path = os.path.normpath(os.path.join(ROOT, ".anchor", "official_torch.py"))
    if not os.path.exists(path):
        raise SystemExit(
            f"{path} is missing: the official model's GPU timings run the anchor script, which is not part of this "
            "repository (the README's Benchmarks section says what it is); ours alone run without the "
            "--compare-official/--official-json flags"
        )
    return path


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

"""Compile the CPU kernels with the system C compiler, once per machine, and load them.

The shared object is cached under `cache_dir`, keyed by the source, the flags and the
CPU's feature flags (the code is built with -march=native), so a second start, and every
test after the first, only loads it. Loading needs no compiler.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

SOURCE_DIR = Path(__file__).parent / "cpu"
CFLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp", "-shared", "-fPIC"]


class KernelBuildError(RuntimeError):
    """The C kernels could not be built or loaded (no compiler, or it failed)."""


def default_cache_dir() -> Path:
    return Path(os.environ.get("LORAMUX_HOME", Path.home() / ".cache" / "loramux")) / "kernels"


def _cpu_signature() -> str:
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = line
                break
    except OSError:
        pass
    return f"{platform.machine()}|{flags}"


def load_kernel_library(
    source_name: str, cache_dir: Path | None = None, extra_cflags: tuple[str, ...] = ()
) -> ctypes.CDLL:
    """Build (if needed) and load loramux_kernels/cpu/<source_name>.c as a shared library.

    `extra_cflags` (e.g. "-mno-avx512bf16") builds another variant beside the native one:
    tests and benchmarks use it to run the fallback paths of machines without a feature."""
    import torch  # noqa: F401  (loads torch's OpenMP runtime first; the kernel shares it)

    source = SOURCE_DIR / f"{source_name}.c"
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    digest = hashlib.sha256()
    digest.update(source.read_bytes())
    for header in sorted(SOURCE_DIR.glob("*.h")):  # what the sources include (bf16.h)
        digest.update(header.read_bytes())
    flags = [*CFLAGS, *extra_cflags]
    digest.update(" ".join(flags).encode())
    digest.update(_cpu_signature().encode())
    cache = cache_dir or default_cache_dir()
    target = cache / f"{source_name}-{digest.hexdigest()[:16]}.so"
    if not target.exists():
        if compiler is None:
            raise KernelBuildError("no C compiler found (set CC or install gcc)")
        cache.mkdir(parents=True, exist_ok=True)
        # Build beside the target and rename, so concurrent builders never see half a file.
        fd, tmp = tempfile.mkstemp(dir=cache, suffix=".so.tmp")
        os.close(fd)
        try:
            result = subprocess.run(
                [compiler, *flags, f"-I{SOURCE_DIR}", str(source), "-o", tmp], capture_output=True, text=True
            )
            if result.returncode != 0:
                raise KernelBuildError(f"{compiler} failed on {source.name}:\n{result.stderr}")
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    try:
        return ctypes.CDLL(str(target))
    except OSError as exc:
        raise KernelBuildError(f"cannot load {target}: {exc}") from exc

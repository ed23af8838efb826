"""Fused CPU kernels (kernels/csrc/*.cpp), compiled at first use as one torch C++ extension.

`--cpu-kernels auto` (the default) uses them on a CPU device in float32 when a C++ compiler
is present, and otherwise falls back to the pure-torch path with one log line; `native`
makes a failed build an error; `torch` never builds them. The build (~30 s on 2 cores) is
cached under `$LORAPLEX_CACHE/cpu-kernels/`, in a directory keyed by torch version, Python,
CPU and a hash of the C++ sources and flags: a changed source builds into a new directory and
never over a copy another process (or worktree) has loaded. `make model` builds it ahead of
the first serve. The sources are built from copies inside that directory, so that every install
of the same source shares one build.

Every kernel has a pure-torch twin `<kernel>_ref` with the same signature; registry.py lists
the pairs and tests/unit/test_kernel_registry.py compares each of them.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import sys
import threading
from pathlib import Path
from types import ModuleType
from typing import Callable

import torch

from ..cache_dirs import cache_root
from .choices import CPU_KERNEL_CHOICES

SOURCE_DIR = Path(__file__).with_name("csrc")
SOURCES = tuple(sorted(SOURCE_DIR.glob("*.cpp")))     # one file per kernel family + bindings
_CFLAGS = ("-O3", "-march=native", "-fopenmp",   # at::parallel_for is OpenMP in torch
           "-fno-trapping-math", "-fno-math-errno")   # lets exp/silu loops vectorize; no FP traps used
_LDFLAGS = ("-fopenmp",)     # libgomp.so.1: the copy torch already loaded
_build_lock = threading.Lock()

Log = Callable[[str], None]


def _cpu_tag() -> str:
    """Short hash of this CPU's model and flags: -march=native code must not move between CPUs."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags"))][:2]
    except OSError:
        lines = [platform.processor()]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:12]


def source_tag() -> str:
    """Short hash of every C++ source and header and the compiler flags."""
    digest = hashlib.sha256(" ".join(_CFLAGS + _LDFLAGS).encode())
    for path in sorted(SOURCE_DIR.glob("*.*")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def _torch_tag() -> str:
    """Short hash of where this torch is installed: ninja's build file names torch's and Python's
    include directories, so two virtual environments writing one cache directory would each
    rebuild the extension whenever the other had built last (seen: ~50 s per server start)."""
    return hashlib.sha256(str(Path(torch.__file__).resolve().parent).encode()).hexdigest()[:6]


def build_dir(root: Path | None = None, timing: bool = False) -> Path:
    """Where the compiled extension lives for this torch (version and install), Python, CPU and source."""
    version = f"torch{torch.__version__}-{_torch_tag()}-py{sys.version_info.major}{sys.version_info.minor}"
    suffix = "-timing" if timing else ""
    return (root or cache_root()) / "cpu-kernels" / f"{version}-{_cpu_tag()}-src{source_tag()}{suffix}"


def _already_built(directory: Path) -> bool:
    return any(directory.glob("loraplex_cpu_kernels*.so"))


def _staged_sources(directory: Path) -> list[Path]:
    """The C++ sources copied into `directory/src`, the paths the build uses.

    ninja's build file names its sources by path: built from this package's own directory, two
    installs of the same source in one environment (git worktrees, a wheel and a checkout; other
    environments get their own directory, _torch_tag) would write different build files into the
    one cache directory their source hash picks, and
    each would rebuild the extension (~30-150 s) whenever the other had built last. The copies
    are the same for every install (the directory is keyed by their content), are written once
    (a file that exists is never rewritten: a newer mtime would make ninja rebuild) and atomically.
    """
    staged = directory / "src"
    staged.mkdir(parents=True, exist_ok=True)
    for path in sorted(SOURCE_DIR.glob("*.*")):
        target = staged / path.name
        if not target.exists():
            partial = staged / f".{path.name}.{os.getpid()}.part"
            shutil.copyfile(path, partial)
            os.replace(partial, target)
    return [staged / path.name for path in SOURCES]


_loaded: dict[Path, ModuleType] = {}


def load(log: Log = print, root: Path | None = None, timing: bool = False) -> ModuleType:
    """Compile (first time) and import the extension; raises when no compiler can build it.
    timing: a separate bench build whose decode_stack times its op classes (`stack_timings()`,
    bench/step_ops_bench.py); never used for serving."""
    from torch.utils import cpp_extension

    directory = build_dir(root, timing)
    with _build_lock:
        if directory in _loaded:
            return _loaded[directory]
        directory.mkdir(parents=True, exist_ok=True)
        if not _already_built(directory):
            log(f"[loraplex] compiling fused CPU kernels into {directory} (first use, ~30 s)")
        name = "loraplex_cpu_kernels_timing" if timing else "loraplex_cpu_kernels"
        cflags = list(_CFLAGS) + (["-DLORAPLEX_STACK_TIMING"] if timing else [])
        module = cpp_extension.load(name=name, sources=[str(p) for p in _staged_sources(directory)],
                                    extra_cflags=cflags, extra_ldflags=list(_LDFLAGS),   # load() appends to them
                                    build_directory=str(directory),
                                    verbose=False)
        _loaded[directory] = module
        return module


def supported(dtype: torch.dtype, device: str | torch.device) -> bool:
    """The kernels exist for float32 on CPU only."""
    return torch.device(device).type == "cpu" and dtype == torch.float32


def resolve(choice: str, dtype: torch.dtype, device: str | torch.device,
            log: Log = print) -> ModuleType | None:
    """The kernel module for a --cpu-kernels choice, or None for the pure-torch path."""
    if choice not in CPU_KERNEL_CHOICES:
        raise ValueError(f"cpu kernels {choice!r}; choose one of {', '.join(CPU_KERNEL_CHOICES)}")
    if choice == "torch":
        return None
    if not supported(dtype, device):
        if choice == "native":
            raise ValueError(f"--cpu-kernels native needs a CPU device and dtype float32 (got "
                             f"device={device}, dtype={dtype}); use auto or torch")
        return None
    try:
        return load(log)
    except Exception as exc:  # noqa: BLE001 - any build failure means: fall back or report
        if choice == "native":
            raise RuntimeError(f"--cpu-kernels native: building kernels/csrc failed: {exc}") from exc
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        log(f"[loraplex] fused CPU kernels unavailable ({first_line}); using the pure-torch path")
        return None


def main() -> int:
    """`python -m loraplex.server.kernels.native`: build the kernels now (make model runs it)."""
    try:
        load()
    except Exception as exc:  # noqa: BLE001 - report and let the server fall back at start
        print(f"[loraplex] fused CPU kernels could not be built ({exc}); the server will use "
              "the pure-torch path (--cpu-kernels auto)")
        return 0
    print(f"[loraplex] fused CPU kernels ready in {build_dir()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

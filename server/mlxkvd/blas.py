"""Run MLX's CPU backend at optimized-BLAS speed on Linux, with no user action.

The ``mlx[cpu]`` wheel links the reference netlib BLAS; libmlx calls ``cblas_sgemm`` by name,
so an OpenBLAS preloaded into the process interposes it (about 37x faster matmuls). The
loader reads LD_PRELOAD only at process start, hence a re-exec of the same command line.

``cmeel-openblas`` (PyPI) ships a plain-named ``libopenblas.so.0`` that needs
``libgfortran.so.5``; when the system has none, the copy bundled in the ``mlx[cpu]`` wheel is
exposed under that name in a private directory put on LD_LIBRARY_PATH.

Some builds of that wheel target one CPU family only (0.3.31: AVX-512, which kills the
process with SIGILL elsewhere), so the library is tried once in a child process on this
machine before it is preloaded; the verdict is kept beside the shim.
"""

from __future__ import annotations

import ctypes.util
import glob
import hashlib
import logging
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

log = logging.getLogger(__name__)

_MARKER = "MLXKV_BLAS_PRELOADED"
_DISABLE = "MLXKV_NO_BLAS_PRELOAD"


def _site_dirs() -> list[Path]:
    paths = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    paths.update(p for p in sys.path if p.endswith("site-packages"))
    return [Path(p) for p in paths if Path(p).is_dir()]


def openblas_path() -> Path | None:
    """The plain-named OpenBLAS from the ``cmeel-openblas`` package, if installed."""
    for site in _site_dirs():
        candidate = site / "cmeel.prefix" / "lib" / "libopenblas.so.0"
        if candidate.is_file():
            return candidate
    return None


def _gfortran_shim_dir(cache_root: Path) -> Path | None:
    """A directory holding ``libgfortran.so.5`` if the system lacks it, else None."""
    if ctypes.util.find_library("gfortran"):
        return None
    for site in _site_dirs():
        libs = site / "mlx_cpu.libs"
        gfortran = sorted(glob.glob(str(libs / "libgfortran-*.so.5*")))
        if not gfortran:
            continue
        shim = cache_root / "blas-shim"
        shim.mkdir(parents=True, exist_ok=True)
        # The bundled libgfortran finds its libquadmath through $ORIGIN, i.e. this directory.
        links = {"libgfortran.so.5": Path(gfortran[0])}
        links.update({Path(p).name: Path(p) for p in glob.glob(str(libs / "*.so*"))})
        for name, target in links.items():
            link = shim / name
            if link.is_symlink() and Path(os.readlink(link)) == target:
                continue
            tmp = shim / f".{name}.{os.getpid()}"
            tmp.unlink(missing_ok=True)
            tmp.symlink_to(target)
            os.replace(tmp, link)
        return shim
    return None


def preload_env(cache_root: Path, environ: dict[str, str] | None = None) -> dict[str, str] | None:
    """The environment that preloads OpenBLAS, or None when not applicable here."""
    environ = dict(os.environ if environ is None else environ)
    if not sys.platform.startswith("linux") or environ.get(_DISABLE):
        return None
    blas = openblas_path()
    if blas is None:
        return None
    try:
        shim = _gfortran_shim_dir(cache_root)
    except OSError as e:  # a full or read-only cache dir: serve, only slower
        log.warning("cannot prepare the optimized BLAS under %s: %s", cache_root, e)
        return None
    if not _runs_here(blas, shim, cache_root):
        return None
    preload = environ.get("LD_PRELOAD", "")
    if str(blas) not in preload.split():
        environ["LD_PRELOAD"] = f"{blas} {preload}".strip()
    if shim is not None:
        paths = environ.get("LD_LIBRARY_PATH", "")
        if str(shim) not in paths.split(":"):
            environ["LD_LIBRARY_PATH"] = f"{shim}:{paths}".rstrip(":")
    environ[_MARKER] = "1"
    return environ


# One single-precision matmul through the library, large enough for its blocked kernels.
_PROBE = """
import ctypes, sys
lib = ctypes.CDLL(sys.argv[1])
n = 256
F = ctypes.c_float * (n * n)
a, b, c = F(*([1.0] * (n * n))), F(*([1.0] * (n * n))), F()
lib.cblas_sgemm.argtypes = [ctypes.c_int] * 6 + [ctypes.c_float, F, ctypes.c_int, F, ctypes.c_int,
                                                ctypes.c_float, F, ctypes.c_int]
lib.cblas_sgemm(101, 111, 111, n, n, n, 1.0, a, n, b, n, 0.0, c, n)
sys.exit(0 if c[0] == n else 1)
"""


def _runs_here(blas: Path, shim: Path | None, cache_root: Path) -> bool:
    """Whether ``blas`` runs on this CPU: tried once in a child process, the verdict cached."""
    st = blas.stat()
    key = hashlib.sha256(f"{blas}:{st.st_size}:{st.st_mtime_ns}:{os.uname().machine}".encode())
    verdict = cache_root / "blas-shim" / f"probe-{key.hexdigest()[:16]}"
    if verdict.is_file():
        return verdict.read_text().strip() == "ok"
    env = dict(os.environ)
    if shim is not None:
        env["LD_LIBRARY_PATH"] = f"{shim}:{env.get('LD_LIBRARY_PATH', '')}".rstrip(":")
    try:
        proc = subprocess.run([sys.executable, "-c", _PROBE, str(blas)], env=env, timeout=60,
                              capture_output=True)
        ok = proc.returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    if not ok:
        log.warning("%s does not run on this CPU; MLX uses its reference BLAS", blas)
    try:
        verdict.parent.mkdir(parents=True, exist_ok=True)
        verdict.write_text("ok\n" if ok else "fails\n")
    except OSError:
        pass
    return ok


def ensure_preloaded(cache_root: Path) -> None:
    """Re-exec the current command with OpenBLAS preloaded, once; a no-op elsewhere.

    Must run before ``mlx`` is imported; the marker variable prevents a loop.
    """
    if os.environ.get(_MARKER) or is_preloaded():
        return
    env = preload_env(cache_root)
    if env is None:
        return
    log.debug("re-executing with %s preloaded", env["LD_PRELOAD"])
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def is_preloaded() -> bool:
    """True when this process runs with the optimized BLAS interposed."""
    blas = openblas_path()
    return blas is not None and str(blas) in os.environ.get("LD_PRELOAD", "").split()


def main() -> None:
    """``python -m mlxkvd.blas``: print shell ``export`` lines for scripts and test runs."""
    import platformdirs

    env = preload_env(Path(platformdirs.user_cache_dir("mlxkv", appauthor=False)))
    if env is None:
        return
    for key in ("LD_PRELOAD", "LD_LIBRARY_PATH"):
        if env.get(key):
            print(f"export {key}='{env[key]}'")


if __name__ == "__main__":
    main()

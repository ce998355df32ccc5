"""Run MLX's CPU backend at optimized-BLAS speed on Linux, with no user action.

The ``mlx[cpu]`` wheel links the reference netlib BLAS; libmlx calls ``cblas_sgemm`` by name,
so an OpenBLAS preloaded into the process interposes it (about 37x faster matmuls). The
loader reads LD_PRELOAD only at process start, hence a re-exec of the same command line.

``cmeel-openblas`` (PyPI) ships a plain-named ``libopenblas.so.0`` that needs
``libgfortran.so.5``; when the system has none, the copy bundled in the ``mlx[cpu]`` wheel is
exposed under that name in a private directory put on LD_LIBRARY_PATH.
"""

from __future__ import annotations

import ctypes.util
import glob
import logging
import os
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
    preload = environ.get("LD_PRELOAD", "")
    if str(blas) not in preload.split():
        environ["LD_PRELOAD"] = f"{blas} {preload}".strip()
    shim = _gfortran_shim_dir(cache_root)
    if shim is not None:
        paths = environ.get("LD_LIBRARY_PATH", "")
        if str(shim) not in paths.split(":"):
            environ["LD_LIBRARY_PATH"] = f"{shim}:{paths}".rstrip(":")
    environ[_MARKER] = "1"
    return environ


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

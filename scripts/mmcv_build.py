#!/usr/bin/env python3
"""Build mmcv 2.1.0 with its CUDA ops against the installed (CUDA) torch, once, and cache the wheel.

Used by ``scripts/setup.sh`` when ``torch.version.cuda`` is not None; the CPU path of setup.sh does
not come here. Standard library only at import time (torch is imported by :func:`detect_torch`).

What it does (``python scripts/mmcv_build.py build``; the wheel's path is the only line on stdout,
progress goes to stderr):

1. the cache: ``$SSFLCTL_WHEEL_CACHE`` or ``${XDG_CACHE_HOME:-~/.cache}/ssflctl/wheels``, one folder
   per key (mmcv version, Python, torch version, CUDA version, arch list -- :func:`cache_key`). A
   wheel already there is reused: the next venv installs it in seconds;
2. the sdist: ``$SSFLCTL_MMCV_SDIST`` (a local ``mmcv-2.1.0.tar.gz``, for nodes without internet) or
   ``pip download --no-deps --no-binary :all: mmcv==2.1.0`` into a fresh temporary folder;
3. extracted into that temporary folder (a copy; nothing installed is touched), plus one file, the
   THC shim (:data:`THC_SHIM_RELPATH`, :data:`THC_SHIM_TEXT`): current torch (2.11, 2.13) no longer
   ships
   ``THC/THCAtomics.cuh``, which mmcv 2.1.0's ``pytorch_cuda_helper.hpp`` and
   ``ms_deform_attn_cuda.cu`` include, so every ``.cu`` fails to compile without it; setup.py's
   include dir ``mmcv/ops/csrc/common`` finds the shim (measured on torch 2.11+cu130 / CUDA 13.0,
   H200, ``../shared/gpu-notes.md``);
4. ``pip wheel --no-build-isolation --no-deps`` of that copy with ``MMCV_WITH_OPS=1 FORCE_CUDA=1``,
   ``TORCH_CUDA_ARCH_LIST`` (the user's, else the visible GPU's compute capability), ``MAX_JOBS``
   (the user's, else the CPU count) and ``MMCV_CUDA_ARGS=-D__NV_NO_VECTOR_DEPRECATION_DIAG`` (unless
   set: silences CUDA 13's deprecation warnings for the ``double4``/``longlong4`` that
   ``filtered_lrelu.cu`` uses) -- :func:`build_command`, :func:`build_env`;
5. the wheel is moved into the cache folder; the temporary folder is removed
   (``SSFLCTL_KEEP_BUILD=1`` keeps it).

``python scripts/mmcv_build.py check`` runs ``mmcv.ops.nms`` on a CUDA tensor and compares it with
mmcv's CPU op (exit 1 on a mismatch; it says so and exits 0 when no GPU is visible).
``python scripts/mmcv_build.py plan`` prints what ``build`` would do (JSON) without doing it.

Time: 285 s on 16 cores (136 objects, H200 machine, nice 19 beside other work); the compile work
is about 285 * 16 s of CPU, so roughly that divided by ``MAX_JOBS``, and never much under 5 minutes
(``filtered_lrelu.cu`` alone takes minutes) -- :func:`estimate_seconds`.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

MMCV_VERSION = "2.1.0"
#: where the shim goes, relative to the extracted sdist's root (setup.py's include dir csrc/common)
THC_SHIM_RELPATH = "mmcv/ops/csrc/common/THC/THCAtomics.cuh"
#: the shim: mmcv 2.1.0 needs only the atomicAdd overloads, which ATen's Atomic.cuh declares
THC_SHIM_TEXT = ("// ssflctl shim: PyTorch removed THC; mmcv 2.1.0 only needs the atomicAdd overloads\n"
                 "#pragma once\n"
                 "#include <ATen/cuda/Atomic.cuh>\n")
#: measured: full mmcv 2.1.0 CUDA build on 16 cores of the H200 machine (gpu-notes.md)
MEASURED_BUILD_S, MEASURED_BUILD_JOBS = 285, 16
#: CUDA 13 deprecates double4/longlong4 (filtered_lrelu.cu): silence only those warnings
DEFAULT_MMCV_CUDA_ARGS = "-D__NV_NO_VECTOR_DEPRECATION_DIAG"


class BuildError(RuntimeError):
    """Something the user has to fix (message says what)."""


def _log(msg: str) -> None:
    print(f"[mmcv_build] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------- pure helpers
def arch_list(env: Mapping[str, str], capability: Optional[Tuple[int, int]]) -> str:
    """``TORCH_CUDA_ARCH_LIST`` to build for: the user's (``env``) if set, else the visible GPU's.

    ``capability`` is ``torch.cuda.get_device_capability()`` of the visible GPU, e.g. ``(9, 0)``
    (H100/H200) -> ``"9.0"``, or None when no GPU is visible. Raises :class:`BuildError` when
    neither is given (a login node without a GPU must name the cluster's arch).
    """
    user = (env.get("TORCH_CUDA_ARCH_LIST") or "").strip()
    if user:
        return user
    if capability is None:
        raise BuildError("no GPU is visible here and TORCH_CUDA_ARCH_LIST is not set: name the "
                         "compute capability of the cluster's GPUs, e.g. TORCH_CUDA_ARCH_LIST=9.0 "
                         "(H100/H200), 8.0 (A100), 8.6 (A40/RTX 30xx), '8.0;9.0' for both")
    major, minor = capability
    return f"{int(major)}.{int(minor)}"


def max_jobs(env: Mapping[str, str], cpus: Optional[int] = None) -> int:
    """``MAX_JOBS`` (parallel compiler jobs): the user's if set, else the CPU count."""
    raw = (env.get("MAX_JOBS") or "").strip()
    if raw:
        if not raw.isdigit() or int(raw) < 1:
            raise BuildError(f"MAX_JOBS={raw!r}: must be a whole number >= 1")
        return int(raw)
    return max(1, cpus if cpus is not None else (os.cpu_count() or 1))


def estimate_seconds(jobs: int) -> int:
    """Rough wall time of the CUDA build with ``jobs`` compiler jobs (see the module docstring)."""
    return max(MEASURED_BUILD_S, MEASURED_BUILD_S * MEASURED_BUILD_JOBS // max(1, jobs))


def cache_key(*, torch_version: str, cuda_version: str, arch: str, python: str,
              mmcv_version: str = MMCV_VERSION) -> str:
    """Folder name under the wheel cache: one per mmcv/Python/torch/CUDA/arch combination.

    Example: ``mmcv-2.1.0_py3.12_torch-2.13.0+cu130_cuda-13.0_arch-9.0``. Characters outside
    ``[A-Za-z0-9.+-]`` become ``_`` (``'8.0;9.0+PTX'`` -> ``8.0_9.0+PTX``).
    """
    def clean(s: str) -> str:
        return re.sub(r"[^A-Za-z0-9.+-]+", "_", s.strip()).strip("_")
    return "_".join([f"mmcv-{clean(mmcv_version)}", f"py{clean(python)}", f"torch-{clean(torch_version)}",
                     f"cuda-{clean(cuda_version)}", f"arch-{clean(arch)}"])


def wheel_cache_root(env: Mapping[str, str]) -> Path:
    """``$SSFLCTL_WHEEL_CACHE``, else ``${XDG_CACHE_HOME:-~/.cache}/ssflctl/wheels``."""
    if env.get("SSFLCTL_WHEEL_CACHE"):
        return Path(env["SSFLCTL_WHEEL_CACHE"]).expanduser()
    base = env.get("XDG_CACHE_HOME") or str(Path(env.get("HOME") or Path.home()) / ".cache")
    return Path(base).expanduser() / "ssflctl" / "wheels"


def cached_wheel(folder: Path) -> Optional[Path]:
    """The mmcv wheel in a cache folder, or None."""
    wheels = sorted(folder.glob(f"mmcv-{MMCV_VERSION}-*.whl")) if folder.is_dir() else []
    return wheels[-1] if wheels else None


def build_env(base: Mapping[str, str], *, arch: str, jobs: int) -> Dict[str, str]:
    """The environment of the wheel build: a new dict (``base`` is not modified)."""
    env = dict(base)
    env.update(MMCV_WITH_OPS="1", FORCE_CUDA="1", TORCH_CUDA_ARCH_LIST=arch, MAX_JOBS=str(jobs))
    env.setdefault("MMCV_CUDA_ARGS", DEFAULT_MMCV_CUDA_ARGS)
    return env


def build_command(python: str, src_dir: Path, wheel_dir: Path) -> List[str]:
    """argv that builds the wheel of the (shimmed) source copy against the torch already installed.

    ``--no-build-isolation``: mmcv's setup.py must see this venv's torch (and its setuptools < 70,
    which still has the ``pkg_resources`` setup.py imports); ``--no-deps``: setup.sh installs the
    rest.
    """
    return [python, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps",
            "--disable-pip-version-check", "-w", str(wheel_dir), str(src_dir)]


def download_command(python: str, dest: Path) -> List[str]:
    """argv that downloads mmcv's sdist (never a wheel) into ``dest``."""
    return [python, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
            "--disable-pip-version-check", "-d", str(dest), f"mmcv=={MMCV_VERSION}"]


def _installed_roots() -> List[Path]:
    """Folders of installed Python code (never written to by this script)."""
    roots = {sys.prefix, sys.base_prefix, sys.exec_prefix}
    for key in ("purelib", "platlib", "stdlib", "platstdlib"):
        p = sysconfig.get_paths().get(key)
        if p:
            roots.add(p)
    return [Path(r).resolve() for r in roots]


def add_thc_shim(src_root: Path) -> Path:
    """Write the THC shim into an extracted mmcv source copy; returns the shim's path.

    ``src_root`` is the sdist's top folder (with ``setup.py`` and ``mmcv/ops/csrc/common``).
    Idempotent. Raises :class:`BuildError` if ``src_root`` is not an extracted mmcv source tree,
    lies inside an installed Python prefix or site-packages (the shim goes into copies only), or
    already has a different ``THC/THCAtomics.cuh``.
    """
    src_root = Path(src_root).resolve()
    for root in _installed_roots():
        if src_root == root or root in src_root.parents:
            raise BuildError(f"{src_root} is inside the installed Python at {root}: the shim goes "
                             "into an extracted copy of the sdist only")
    common = src_root / "mmcv" / "ops" / "csrc" / "common"
    if not (src_root / "setup.py").is_file() or not common.is_dir():
        raise BuildError(f"{src_root} is not an extracted mmcv source tree (no setup.py or "
                         "mmcv/ops/csrc/common)")
    shim = src_root / THC_SHIM_RELPATH
    if shim.exists():
        if shim.read_text() == THC_SHIM_TEXT:
            return shim
        raise BuildError(f"{shim} exists with other content; this mmcv needs no shim?")
    shim.parent.mkdir(parents=True, exist_ok=True)
    shim.write_text(THC_SHIM_TEXT)
    return shim


def extract_sdist(sdist: Path, workdir: Path) -> Path:
    """Extract ``sdist`` (.tar.gz) into ``workdir`` (not modifying the archive); returns its root."""
    with tarfile.open(sdist) as tar:
        names = tar.getnames()
        tops = {n.split("/", 1)[0] for n in names if n}
        if len(tops) != 1:
            raise BuildError(f"{sdist}: expected one top folder, found {sorted(tops)[:5]}")
        if hasattr(tarfile, "data_filter"):
            tar.extractall(workdir, filter="data")
        else:  # pragma: no cover - Python < 3.11.4
            tar.extractall(workdir)
    return Path(workdir) / tops.pop()


def prepare_source(sdist: Path, workdir: Path) -> Path:
    """Extracted copy of ``sdist`` in ``workdir`` with the THC shim added; returns the source root."""
    root = extract_sdist(sdist, workdir)
    add_thc_shim(root)
    return root


# ---------------------------------------------------------------------------------- with torch
def detect_torch() -> Dict[str, object]:
    """Facts about the installed torch: version, CUDA version, visible GPU's capability, CUDA_HOME."""
    import torch
    from torch.utils import cpp_extension

    cap = None
    if torch.version.cuda and torch.cuda.is_available():
        cap = tuple(torch.cuda.get_device_capability(0))
    return {"torch": torch.__version__, "cuda": torch.version.cuda, "capability": cap,
            "gpu": torch.cuda.get_device_name(0) if cap else None,
            "cuda_home": cpp_extension.CUDA_HOME,
            "python": f"{sys.version_info.major}.{sys.version_info.minor}"}


def plan(env: Mapping[str, str], facts: Mapping[str, object]) -> Dict[str, object]:
    """What ``build`` would do for these torch ``facts`` (see :func:`detect_torch`) and ``env``."""
    if not facts.get("cuda"):
        raise BuildError(f"torch {facts.get('torch')} has no CUDA: nothing to build here "
                         "(setup.sh builds the CPU ops itself)")
    arch = arch_list(env, facts.get("capability"))  # type: ignore[arg-type]
    jobs = max_jobs(env)
    key = cache_key(torch_version=str(facts["torch"]), cuda_version=str(facts["cuda"]), arch=arch,
                    python=str(facts["python"]))
    folder = wheel_cache_root(env) / key
    return {"arch": arch, "max_jobs": jobs, "cache_dir": str(folder),
            "cached_wheel": str(cached_wheel(folder) or "") or None,
            "estimate_s": estimate_seconds(jobs), "cuda_home": facts.get("cuda_home")}


def build(env: Mapping[str, str], python: str = sys.executable) -> Path:
    """Build (or reuse) the CUDA mmcv wheel; returns its path in the cache. See the module doc."""
    facts = detect_torch()
    p = plan(env, facts)
    folder = Path(str(p["cache_dir"]))
    if p["cached_wheel"]:
        _log(f"reusing the cached wheel {p['cached_wheel']}")
        return Path(str(p["cached_wheel"]))
    if not facts.get("cuda_home"):
        raise BuildError("no CUDA toolkit found (nvcc; torch's CUDA_HOME is unset): load the "
                         "cluster's CUDA module (e.g. `module load cuda`) or set CUDA_HOME, then "
                         "run setup.sh again")
    where = f"GPU {facts['gpu']}" if facts.get("gpu") else "no GPU visible"
    _log(f"building mmcv {MMCV_VERSION} with CUDA ops for TORCH_CUDA_ARCH_LIST={p['arch']} "
         f"({where}), torch {facts['torch']}, CUDA {facts['cuda']}, MAX_JOBS={p['max_jobs']}: "
         f"about {round(int(p['estimate_s']) / 60)} min (measured 285 s on 16 cores), once; "
         f"the wheel is cached in {folder}")
    work = Path(tempfile.mkdtemp(prefix="ssflctl-mmcv-"))
    try:
        sdist_env = env.get("SSFLCTL_MMCV_SDIST")
        if sdist_env:
            sdist = Path(sdist_env).expanduser()
            if not sdist.is_file():
                raise BuildError(f"SSFLCTL_MMCV_SDIST={sdist_env}: no such file")
        else:
            subprocess.run(download_command(python, work / "sdist"), check=True,
                           stdout=sys.stderr)
            found = sorted((work / "sdist").glob(f"mmcv-{MMCV_VERSION}.tar.gz"))
            if not found:
                raise BuildError(f"pip download gave no mmcv-{MMCV_VERSION}.tar.gz in {work / 'sdist'}")
            sdist = found[0]
        src = prepare_source(sdist, work / "src")
        _log(f"sources in {src} (THC shim added: {THC_SHIM_RELPATH})")
        out = work / "wheel"
        subprocess.run(build_command(python, src, out), check=True, stdout=sys.stderr,
                       env=build_env(env, arch=str(p["arch"]), jobs=int(p["max_jobs"])))
        wheel = cached_wheel(out)
        if wheel is None:
            raise BuildError(f"pip wheel finished but left no mmcv wheel in {out}")
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / (wheel.name + ".part")
        shutil.copy2(wheel, tmp)
        final = folder / wheel.name
        os.replace(tmp, final)          # atomic: a concurrent setup never sees half a wheel
        _log(f"cached {final}")
        return final
    finally:
        if env.get("SSFLCTL_KEEP_BUILD") == "1":
            _log(f"kept the build folder {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def check_cuda_nms() -> str:
    """Run ``mmcv.ops.nms`` on CUDA tensors and compare with mmcv's CPU op; returns a summary line.

    Raises :class:`BuildError` on a mismatch or when the CUDA op is missing. Without a visible GPU
    it returns a line saying the check was skipped.
    """
    import torch
    from mmcv.ops import nms

    if not torch.cuda.is_available():
        return "no GPU visible: mmcv's CUDA ops were not run here (they run on the compute nodes)"
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60], [0, 0, 9, 10]],
                         dtype=torch.float32)
    scores = torch.tensor([0.9, 0.8, 0.7, 0.95])
    _, keep_cpu = nms(boxes, scores, 0.5)
    try:
        _, keep_gpu = nms(boxes.cuda(), scores.cuda(), 0.5)
    except (RuntimeError, NotImplementedError) as exc:
        raise BuildError(f"mmcv.ops.nms failed on CUDA ({exc}): mmcv was built without CUDA ops; "
                         "remove it (pip uninstall mmcv) and run setup.sh again") from None
    if keep_gpu.cpu().tolist() != keep_cpu.tolist() or keep_cpu.tolist() != [3, 2]:
        raise BuildError(f"mmcv.ops.nms on CUDA kept {keep_gpu.tolist()}, on the CPU "
                         f"{keep_cpu.tolist()}; expected [3, 2]")
    return f"mmcv.ops.nms on {torch.cuda.get_device_name(0)} equals the CPU op"


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    cmd = args[0] if args else ""
    try:
        if cmd == "build":
            print(build(os.environ))
        elif cmd == "plan":
            print(json.dumps(plan(os.environ, detect_torch()), indent=1))
        elif cmd == "check":
            print(check_cuda_nms())
        else:
            print("usage: mmcv_build.py build|plan|check", file=sys.stderr)
            return 2
    except BuildError as exc:
        _log(f"error: {exc}")
        return 1
    except subprocess.CalledProcessError as exc:
        _log(f"error: {' '.join(map(str, exc.cmd))} exited with {exc.returncode} (output above)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

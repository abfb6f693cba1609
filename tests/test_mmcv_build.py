"""scripts/mmcv_build.py (mmcv's CUDA ops on a current torch) and the branch of setup.sh that uses it.

No torch, no GPU and no network here: the shim, the command line, the environment and the cache key
are checked for given torch/CUDA/arch facts, and setup.sh is run against a stand-in interpreter that
records every call, so the CPU path can be compared with what it always did. The real CUDA build is
checked only on a GPU machine (issue 19).
"""
from __future__ import annotations

import hashlib
import importlib.util
import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mb():
    spec = importlib.util.spec_from_file_location("mmcv_build", REPO / "scripts" / "mmcv_build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _fake_sdist(tmp_path: Path) -> Path:
    """A tar.gz shaped like mmcv-2.1.0's sdist (the folders setup.py uses, a few files)."""
    files = {
        "mmcv-2.1.0/setup.py": "print('setup')\n",
        "mmcv-2.1.0/mmcv/ops/csrc/common/pytorch_cuda_helper.hpp": "#include <THC/THCAtomics.cuh>\n",
        "mmcv-2.1.0/mmcv/ops/csrc/pytorch/cuda/nms_cuda.cu": "// nms\n",
    }
    path = tmp_path / "mmcv-2.1.0.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _tree(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------ the shim
def test_shim_is_one_include_at_the_path_setup_py_finds(mb, tmp_path):
    src = mb.prepare_source(_fake_sdist(tmp_path), tmp_path / "work")
    shim = src / "mmcv" / "ops" / "csrc" / "common" / "THC" / "THCAtomics.cuh"
    assert mb.THC_SHIM_RELPATH == "mmcv/ops/csrc/common/THC/THCAtomics.cuh"
    assert shim.is_file()
    lines = [l for l in shim.read_text().splitlines() if l and not l.startswith("//")]
    assert lines == ["#pragma once", "#include <ATen/cuda/Atomic.cuh>"]
    # <THC/THCAtomics.cuh> resolves against setup.py's include dir mmcv/ops/csrc/common
    helper = src / "mmcv/ops/csrc/common/pytorch_cuda_helper.hpp"
    included = helper.read_text().split("<")[1].split(">")[0]
    assert (helper.parent / included) == shim
    # idempotent
    assert mb.add_thc_shim(src) == shim and shim.read_text() == mb.THC_SHIM_TEXT


def test_the_copy_differs_from_the_sdist_by_the_shim_only_and_the_sdist_is_untouched(mb, tmp_path):
    sdist = _fake_sdist(tmp_path)
    before = hashlib.sha256(sdist.read_bytes()).hexdigest()
    listing_before = sorted(p.name for p in tmp_path.iterdir())
    pristine = mb.extract_sdist(sdist, tmp_path / "pristine")
    src = mb.prepare_source(sdist, tmp_path / "work")
    assert hashlib.sha256(sdist.read_bytes()).hexdigest() == before
    a, b = _tree(pristine), _tree(src)
    assert set(b) - set(a) == {mb.THC_SHIM_RELPATH}
    assert all(a[k] == b[k] for k in a)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(listing_before + ["pristine", "work"])


def test_shim_refuses_installed_python_and_foreign_trees(mb, tmp_path):
    import sysconfig
    site = Path(sysconfig.get_paths()["purelib"])
    with pytest.raises(mb.BuildError, match="installed Python"):
        mb.add_thc_shim(site / "mmcv")
    with pytest.raises(mb.BuildError, match="installed Python"):
        mb.add_thc_shim(Path(sys.prefix))
    assert not (site / "mmcv" / mb.THC_SHIM_RELPATH).exists() or \
        (site / "mmcv" / mb.THC_SHIM_RELPATH).read_text() != mb.THC_SHIM_TEXT
    (tmp_path / "notmmcv").mkdir()
    with pytest.raises(mb.BuildError, match="not an extracted mmcv source tree"):
        mb.add_thc_shim(tmp_path / "notmmcv")
    src = mb.extract_sdist(_fake_sdist(tmp_path), tmp_path / "w")
    other = src / mb.THC_SHIM_RELPATH
    other.parent.mkdir(parents=True)
    other.write_text("// someone else's header\n")
    with pytest.raises(mb.BuildError, match="other content"):
        mb.add_thc_shim(src)
    assert other.read_text() == "// someone else's header\n"


# ------------------------------------------------------------------------------ arch, jobs, env
def test_arch_list_from_the_user_or_the_visible_gpu(mb):
    assert mb.arch_list({}, (9, 0)) == "9.0"
    assert mb.arch_list({}, (8, 6)) == "8.6"
    assert mb.arch_list({"TORCH_CUDA_ARCH_LIST": "8.0;9.0+PTX"}, (9, 0)) == "8.0;9.0+PTX"
    assert mb.arch_list({"TORCH_CUDA_ARCH_LIST": "9.0"}, None) == "9.0"   # login node, no GPU
    with pytest.raises(mb.BuildError, match="TORCH_CUDA_ARCH_LIST=9.0"):
        mb.arch_list({}, None)
    with pytest.raises(mb.BuildError):
        mb.arch_list({"TORCH_CUDA_ARCH_LIST": "  "}, None)


def test_max_jobs_and_time_estimate(mb):
    assert mb.max_jobs({}, cpus=16) == 16
    assert mb.max_jobs({"MAX_JOBS": "4"}, cpus=16) == 4
    with pytest.raises(mb.BuildError, match="MAX_JOBS"):
        mb.max_jobs({"MAX_JOBS": "zero"})
    assert mb.estimate_seconds(16) == 285                      # the measured H200-machine build
    assert mb.estimate_seconds(2) == 285 * 8
    assert mb.estimate_seconds(64) == 285                      # never below the measured floor


def test_build_command_and_environment_for_torch_2_13_cu130_on_h200(mb, tmp_path):
    base = {"PATH": "/usr/bin", "HOME": "/home/u", "MAX_JOBS": "16"}
    frozen = dict(base)
    facts = {"torch": "2.13.0+cu130", "cuda": "13.0", "capability": (9, 0), "python": "3.12",
             "cuda_home": "/usr/local/cuda"}
    p = mb.plan(base, facts)
    assert p["arch"] == "9.0" and p["max_jobs"] == 16 and p["estimate_s"] == 285
    assert p["cache_dir"] == "/home/u/.cache/ssflctl/wheels/mmcv-2.1.0_py3.12_torch-2.13.0+cu130_cuda-13.0_arch-9.0"
    assert p["cached_wheel"] is None
    env = mb.build_env(base, arch=p["arch"], jobs=p["max_jobs"])
    assert base == frozen                                      # the caller's env is not modified
    assert {k: env[k] for k in ("MMCV_WITH_OPS", "FORCE_CUDA", "TORCH_CUDA_ARCH_LIST", "MAX_JOBS",
                                "MMCV_CUDA_ARGS")} == {
        "MMCV_WITH_OPS": "1", "FORCE_CUDA": "1", "TORCH_CUDA_ARCH_LIST": "9.0", "MAX_JOBS": "16",
        "MMCV_CUDA_ARGS": "-D__NV_NO_VECTOR_DEPRECATION_DIAG"}
    assert env["PATH"] == "/usr/bin"
    assert mb.build_env({"MMCV_CUDA_ARGS": "-lineinfo"}, arch="8.0", jobs=2)["MMCV_CUDA_ARGS"] == "-lineinfo"
    cmd = mb.build_command("/v/bin/python", tmp_path / "src", tmp_path / "whl")
    assert cmd == ["/v/bin/python", "-m", "pip", "wheel", "--no-build-isolation", "--no-deps",
                   "--disable-pip-version-check", "-w", str(tmp_path / "whl"), str(tmp_path / "src")]
    assert mb.download_command("/v/bin/python", tmp_path) == [
        "/v/bin/python", "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
        "--disable-pip-version-check", "-d", str(tmp_path), "mmcv==2.1.0"]


def test_plan_without_gpu_needs_the_arch_and_cpu_torch_has_nothing_to_build(mb):
    facts = {"torch": "2.13.0+cu130", "cuda": "13.0", "capability": None, "python": "3.11"}
    with pytest.raises(mb.BuildError, match="no GPU is visible"):
        mb.plan({"HOME": "/h"}, facts)
    p = mb.plan({"HOME": "/h", "TORCH_CUDA_ARCH_LIST": "8.0;9.0", "XDG_CACHE_HOME": "/c"}, facts)
    assert p["cache_dir"] == "/c/ssflctl/wheels/mmcv-2.1.0_py3.11_torch-2.13.0+cu130_cuda-13.0_arch-8.0_9.0"
    with pytest.raises(mb.BuildError, match="has no CUDA"):
        mb.plan({}, {"torch": "2.13.0+cpu", "cuda": None, "capability": None, "python": "3.11"})


def test_cache_key_separates_every_axis_and_a_cached_wheel_is_found(mb, tmp_path):
    base = dict(torch_version="2.13.0+cu130", cuda_version="13.0", arch="9.0", python="3.12")
    keys = {mb.cache_key(**base)}
    for k, v in (("torch_version", "2.11.0+cu130"), ("cuda_version", "12.8"), ("arch", "8.0"),
                 ("python", "3.11")):
        keys.add(mb.cache_key(**{**base, k: v}))
    assert len(keys) == 5 and all("/" not in k and ";" not in k for k in keys)
    facts = {"torch": "2.13.0+cu130", "cuda": "13.0", "capability": (9, 0), "python": "3.12"}
    env = {"SSFLCTL_WHEEL_CACHE": str(tmp_path / "cache")}
    folder = Path(mb.plan(env, facts)["cache_dir"])
    assert folder.parent == tmp_path / "cache"
    folder.mkdir(parents=True)
    (folder / "mmcv-2.1.0-cp312-cp312-linux_x86_64.whl.part").write_text("half")
    assert mb.plan(env, facts)["cached_wheel"] is None           # a half-copied wheel is not used
    (folder / "mmcv-2.1.0-cp312-cp312-linux_x86_64.whl").write_text("wheel")
    assert mb.plan(env, facts)["cached_wheel"] == str(folder / "mmcv-2.1.0-cp312-cp312-linux_x86_64.whl")


# ------------------------------------------------------------------------------ setup.sh's branches
_FAKE_PY = r'''#!/usr/bin/env bash
# stands in for the venv's python: records each call, answers the probes setup.sh makes
printf '%s' "$*" | tr '\n' ' ' >> "$CALLS"
[ "${1:-}" = "-m" ] && [ "${2:-}" = "pip" ] && printf ' |MMCV_WITH_OPS=%s FORCE_CUDA=%s' "${MMCV_WITH_OPS:-}" "${FORCE_CUDA:-}" >> "$CALLS"
echo >> "$CALLS"
case "$*" in
  *"torch.version.cuda or"*) printf '%s\n' "$FAKE_TORCH_CUDA" ;;
  "-c import torch") exit 0 ;;
  "-c from mmcv.ops import nms") [ -f "$STATE/mmcv" ] ;;
  *"mmcv_build.py build") echo "$STATE/mmcv-2.1.0-cp312-cp312-linux_x86_64.whl" ;;
  "-m pip -q --disable-pip-version-check install --no-warn-conflicts --no-build-isolation mmcv==2.1.0") touch "$STATE/mmcv" ;;
  *"install --no-deps $STATE/mmcv-2.1.0-cp312-cp312-linux_x86_64.whl") touch "$STATE/mmcv" ;;
  "-") cat > /dev/null; echo "[setup] ok: fake" ;;
esac
'''


def _run_setup(tmp_path: Path, torch_cuda: str) -> list:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    fake = venv / "bin" / "python"
    fake.write_text(_FAKE_PY)
    fake.chmod(0o755)
    state = tmp_path / "state"
    state.mkdir()
    calls = tmp_path / "calls.txt"
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "VENV": str(venv),
           "SSFLCTL_NO_APT": "1", "CALLS": str(calls), "STATE": str(state),
           "FAKE_TORCH_CUDA": torch_cuda, "MAX_JOBS": "3"}
    proc = subprocess.run(["bash", str(REPO / "scripts" / "setup.sh")], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[setup] ok" in proc.stdout
    return [l.replace(str(state), "$STATE").replace(str(REPO), "$REPO")
            for l in calls.read_text().splitlines()]


def test_setup_sh_cpu_torch_takes_the_unchanged_source_build(tmp_path):
    calls = _run_setup(tmp_path, torch_cuda="")
    pip = [c for c in calls if c.startswith("-m pip")]
    # the pip calls setup.sh made before the CUDA branch existed (the temporary setuptools<70 and the
    # build with --no-warn-conflicts: torch's setuptools>=77 comes back right after)
    assert pip == [
        '-m pip -q --disable-pip-version-check install --no-warn-conflicts setuptools<70 wheel ninja |MMCV_WITH_OPS= FORCE_CUDA=',
        '-m pip -q --disable-pip-version-check install --no-warn-conflicts --no-build-isolation mmcv==2.1.0 |MMCV_WITH_OPS=1 FORCE_CUDA=',
        '-m pip -q --disable-pip-version-check install setuptools>=77.0.3,<81 |MMCV_WITH_OPS= FORCE_CUDA=',
        '-m pip -q --disable-pip-version-check install -e .[train,test] |MMCV_WITH_OPS= FORCE_CUDA=',
    ]
    assert not any("mmcv_build.py" in c for c in calls)


def test_setup_sh_cuda_torch_installs_the_wheel_mmcv_build_py_made(tmp_path):
    calls = _run_setup(tmp_path, torch_cuda="13.0")
    assert "$REPO/scripts/mmcv_build.py build" in calls
    pip = [c for c in calls if c.startswith("-m pip")]
    assert pip == [
        '-m pip -q --disable-pip-version-check install --no-warn-conflicts setuptools<70 wheel ninja |MMCV_WITH_OPS= FORCE_CUDA=',
        '-m pip -q --disable-pip-version-check install --no-deps $STATE/mmcv-2.1.0-cp312-cp312-linux_x86_64.whl |MMCV_WITH_OPS= FORCE_CUDA=',
        '-m pip -q --disable-pip-version-check install setuptools>=77.0.3,<81 |MMCV_WITH_OPS= FORCE_CUDA=',
        '-m pip -q --disable-pip-version-check install -e .[train,test] |MMCV_WITH_OPS= FORCE_CUDA=',
    ]
    # the source build of the CPU path did not run as well
    assert not any("--no-build-isolation mmcv==2.1.0" in c for c in calls)

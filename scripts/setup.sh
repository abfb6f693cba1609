#!/usr/bin/env bash
# One-time set-up on a fresh Debian/Ubuntu machine (or a cluster login node):
#   system packages (when run as root: the local Slurm cluster for tests, Chromium for HTML-report tests),
#   a virtual environment in .venv, torch, mmcv 2.1.0 built with its ops, mmengine, mmdet, ssflctl.
# Idempotent: a second run only checks. Environment knobs:
#   TORCH_SPEC   pip requirement for torch (default torch==2.13.0; on a GPU cluster e.g.
#                "torch==2.13.0 --index-url <your CUDA wheel index>")
#   SSFLCTL_NO_APT=1  skip system packages (no root, or a cluster where Slurm already runs)
#   VENV         where to create the environment (default .venv in the repository)
# With a CUDA torch (torch.version.cuda set) mmcv's CUDA ops are built by scripts/mmcv_build.py
# (about 5 min on 16 cores, once; the wheel is cached under ${XDG_CACHE_HOME:-~/.cache}/ssflctl/wheels):
#   TORCH_CUDA_ARCH_LIST  GPU arch to build for (default: the visible GPU's; required without a GPU,
#                e.g. 9.0 for H100/H200, 8.0 for A100)
#   MAX_JOBS     parallel compiler jobs (default: all CPUs)
#   SSFLCTL_MMCV_SDIST    a local mmcv-2.1.0.tar.gz instead of `pip download` (offline nodes)
#   SSFLCTL_WHEEL_CACHE   wheel cache folder
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${VENV:-$ROOT/.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
log() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }

APT_PACKAGES=(python3-venv python3-dev build-essential git
  slurm-wlm slurmdbd munge mariadb-server
  chromium chromium-driver fonts-dejavu-core)
if [ "${SSFLCTL_NO_APT:-0}" != 1 ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  missing=()
  for p in "${APT_PACKAGES[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  if [ ${#missing[@]} -gt 0 ]; then
    log "apt-get install ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
fi

if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV"
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip -q --disable-pip-version-check)

if ! "$PY" -c "import torch" 2>/dev/null; then
  log "installing $TORCH_SPEC"
  # shellcheck disable=SC2086
  "${PIP[@]}" install $TORCH_SPEC numpy  # numpy now: torch warns on import without it (mmcv needs it anyway)
fi

TORCH_CUDA=$("$PY" -c "import torch; print(torch.version.cuda or '')")
if [ -n "$TORCH_CUDA" ] && ! "$PY" -c "from mmcv.ops import nms" 2>/dev/null; then
  # torch has CUDA: mmcv's CUDA ops, built from a copy of the sdist with the THC shim current torch
  # needs, cached per torch/CUDA/arch (scripts/mmcv_build.py says how long it will take)
  log "torch has CUDA $TORCH_CUDA: building (or reusing) mmcv 2.1.0 with CUDA ops"
  "${PIP[@]}" install --no-warn-conflicts "setuptools<70" wheel ninja  # torch's >=77 comes back below
  MMCV_WHEEL=$("$PY" "$ROOT/scripts/mmcv_build.py" build)
  "${PIP[@]}" install --no-deps "$MMCV_WHEEL"
  "${PIP[@]}" install "setuptools>=77.0.3,<81"
fi
if ! "$PY" -c "from mmcv.ops import nms" 2>/dev/null; then
  # mmcv 2.1.0 has no wheel for recent torch: build it with its compiled ops against the torch
  # just installed (--no-build-isolation), with setuptools<70 because its setup.py imports
  # pkg_resources. About 15 minutes on 2 cores, once: pip's wheel cache keeps the result.
  log "building mmcv 2.1.0 with ops (about 15 min on 2 cores the first time; cached afterwards)"
  "${PIP[@]}" install --no-warn-conflicts "setuptools<70" wheel ninja  # torch's >=77 comes back below
  MMCV_WITH_OPS=1 MAX_JOBS=${MAX_JOBS:-$(nproc)} "${PIP[@]}" install --no-warn-conflicts --no-build-isolation mmcv==2.1.0
  # torch itself wants a recent setuptools back; <81 keeps pkg_resources, which mmengine 0.10.7
  # imports to resolve `mmdet::` config inheritance (the templates use it)
  "${PIP[@]}" install "setuptools>=77.0.3,<81"
fi

log "installing ssflctl[train,test] (editable)"
"${PIP[@]}" install -e ".[train,test]"

"$PY" - <<'PY'
import torch, mmcv, mmengine, mmdet
from mmcv.ops import nms  # noqa: F401  (compiled ops present)
if torch.version.cuda:  # mmcv's CUDA ops on a CUDA tensor when a GPU is visible
    import runpy
    print("[setup]", runpy.run_path("scripts/mmcv_build.py")["check_cuda_nms"]())
print(f"[setup] ok: torch {torch.__version__}, mmcv {mmcv.__version__}, mmengine {mmengine.__version__}, mmdet {mmdet.__version__}")
PY
log "done. Activate with: source $VENV/bin/activate"

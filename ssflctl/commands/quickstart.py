"""`ssflctl quickstart`: the whole study in miniature, a newcomer's first command.

Each step is the code path a real study takes; nothing here is special-cased downstream:

1. data     ``synth_cityscapes.generate`` writes a small dataset in the Cityscapes layout under
            ``<ws>/data/cityscapes`` (skipped when it is there; a marker records the parameters);
2. convert  ``convert.cityscapes.main`` — the body of ``ssflctl convert cityscapes`` — writes the
            COCO JSON of the splits that have none yet;
3. submit   ``experiments/quickstart.yaml`` with its dataset roots resolved against the workspace is
            written to ``<ws>/quickstart.yaml`` and submitted by ``submit.main`` (runs that are done,
            queued or running are skipped, so a second quickstart submits nothing new);
4. wait     the live ``ssflctl status`` table until no run is queued or running; Ctrl-C stops the
            waiting, never the jobs (they run in their own sessions, or on Slurm);
5. report   ``report.write_report`` writes ``<ws>/report/quickstart.md`` with its PNG figures beside
            it (the quickstart's own report is regenerated each time) and the markdown is printed.

Executor: the file says ``auto``: Slurm when a controller answers ``sinfo``, else local processes
(``spec.executor_kind``). Threads: the local executor gives each run ``resources.cpus`` threads
(``OMP_NUM_THREADS``, unless already set), so ``max_parallel`` runs share the cores without
oversubscription.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from ssflctl.errors import UserError

REPO = Path(__file__).resolve().parents[2]
SPEC = REPO / "experiments" / "quickstart.yaml"
EXPERIMENT = "quickstart"
SPLITS = ("train", "val", "test")
MARKER = ".ssflctl_quickstart.json"
#: the generated dataset (synth_cityscapes.generate): 512x256 images hold small, medium and large
#: objects (all 12 COCO numbers exist); the tiny template trains them at 192x96
DATA: Dict[str, Any] = {"n_train": 160, "n_val": 48, "n_test": 8, "size": [512, 256], "seed": 0}
ACTIVE = ("queued", "running", "submitting")


@dataclass
class QuickstartResult:
    workspace: Path
    data_root: Path
    spec: Path
    generated: bool = False
    converted: List[str] = field(default_factory=list)
    submit: Any = None                 # submit.SubmitResult
    items: List[Dict[str, Any]] = field(default_factory=list)   # status.view() rows after waiting
    interrupted: bool = False
    report_path: Optional[Path] = None
    report_files: List[Path] = field(default_factory=list)
    report_text: str = ""

    @property
    def done(self) -> bool:
        return bool(self.items) and all(i["state"] == "done" for i in self.items)


def _consoles(console=None, err=None):
    from rich.console import Console

    return (console or Console(highlight=False, soft_wrap=True),
            err or Console(stderr=True, highlight=False, soft_wrap=True))


def data_root(ws) -> Path:
    return Path(ws) / "data" / "cityscapes"


# ------------------------------------------------------------------------------------------
# 1. data
# ------------------------------------------------------------------------------------------

def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def ensure_data(ws, data: Optional[Dict[str, Any]] = None, err=None) -> tuple:
    """Generate the synthetic Cityscapes dataset unless it is there; returns (root, generated)."""
    from ssflctl.atomic import write_json
    from ssflctl.convert import synth_cityscapes

    _, err = _consoles(None, err)
    want = dict(DATA, **(data or {}))
    want["size"] = [int(x) for x in want["size"]]
    root = data_root(ws)
    marker = root / MARKER
    if marker.is_file():
        try:
            have = json.loads(marker.read_text())
        except (OSError, ValueError):
            have = None
        if have == want:
            err.print(f"data: {root} is there (synthetic Cityscapes, {_describe(want)}); kept", markup=False)
            return root, False
        raise UserError(f"{marker}: this workspace holds a synthetic dataset made with other parameters "
                        f"({have}); remove {root} (or use another --workspace) to make the quickstart's")
    if root.exists():
        raise UserError(f"{root}: exists but was not made by ssflctl quickstart (no {MARKER}); "
                        "move it away or use another --workspace")
    parent = root.parent
    parent.mkdir(parents=True, exist_ok=True)
    for stale in parent.glob(f".{root.name}.partial-*"):  # an interrupted earlier quickstart
        pid = stale.name.rsplit("-", 1)[-1]
        if not (pid.isdigit() and _pid_alive(int(pid))):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = parent / f".{root.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.perf_counter()
    with err.status(f"data: generating synthetic Cityscapes ({_describe(want)}) in {root} ..."):
        synth_cityscapes.generate(tmp, want["n_train"], want["n_val"], want["n_test"], tuple(want["size"]),
                                  want["seed"], fast=True, nproc=1)
    write_json(tmp / MARKER, want)
    os.replace(tmp, root)
    err.print(f"data: generated {_describe(want)} in {root} ({time.perf_counter() - t0:.1f}s)", markup=False)
    return root, True


def _describe(d: Dict[str, Any]) -> str:
    return (f"{d['n_train']} train / {d['n_val']} val / {d['n_test']} test images, "
            f"{d['size'][0]}x{d['size'][1]}, seed {d['seed']}")


# ------------------------------------------------------------------------------------------
# 2. convert
# ------------------------------------------------------------------------------------------

def ensure_annotations(root, err=None) -> List[str]:
    """Convert the splits that have no COCO JSON yet (`ssflctl convert cityscapes`); returns them."""
    from ssflctl.convert import cityscapes

    _, err = _consoles(None, err)
    root = Path(root)
    missing = [s for s in SPLITS if not (root / "annotations" / cityscapes.JSON_NAME.format(split=s)).is_file()]
    if not missing:
        err.print(f"convert: {root / 'annotations'} has the COCO JSON of {', '.join(SPLITS)}; kept", markup=False)
        return []
    err.print(f"convert: ssflctl convert cityscapes {root} --splits {','.join(missing)}", markup=False)
    cityscapes.main(root, None, 1, missing, False)
    return missing


# ------------------------------------------------------------------------------------------
# 3. submit
# ------------------------------------------------------------------------------------------

def resolved_spec(ws, spec=SPEC, params: Optional[Dict[str, Any]] = None) -> Path:
    """Write ``<ws>/quickstart.yaml``: ``spec`` with relative dataset roots made absolute against
    the workspace (and ``params`` merged into its params); rewritten only when it changes."""
    import yaml

    from ssflctl.plan import spec as spec_mod
    from ssflctl.plan import yamlio
    from ssflctl.atomic import write_text

    ws = Path(ws).resolve()
    spec = Path(spec)
    spec_mod.load(spec)  # the file's own errors, with its own line numbers
    raw = yamlio.plain(yamlio.load_yaml(spec))  # as submit reads it: YAML 1.2 numbers (1e-4), 24:00:00 a string
    for name, ds in list((raw.get("datasets") or {}).items()):
        if isinstance(ds, str):
            ds = raw["datasets"][name] = {"root": ds}
        root = (ds or {}).get("root")
        if root and not Path(root).expanduser().is_absolute():
            ds["root"] = str(ws / root)
    if params:
        raw["params"] = dict(raw.get("params") or {}, **params)
    out = ws / "quickstart.yaml"
    text = (f"# Written by `ssflctl quickstart` from {spec.resolve()}\n"
            f"# with the dataset roots resolved against the workspace. Submit it again with:\n"
            f"#   ssflctl submit {out} --workspace {ws}\n"
            + yaml.safe_dump(raw, sort_keys=False, default_flow_style=None, width=110))
    if not out.is_file() or out.read_text(encoding="utf-8") != text:
        write_text(out, text)
    return out


# ------------------------------------------------------------------------------------------
# 4. wait
# ------------------------------------------------------------------------------------------

def wait(ws, console=None, err=None, interval: float = 2.0) -> List[Dict[str, Any]]:
    """Until no run of the quickstart is queued or running: the live status table on a terminal,
    one line per change otherwise. KeyboardInterrupt propagates (the jobs go on)."""
    from ssflctl.commands import status as status_mod
    from ssflctl.registry.store import Registry

    console, err = _consoles(console, err)
    if console.is_terminal:
        return status_mod.main(ws, EXPERIMENT, watch=True, interval=interval)
    seen: Dict[str, tuple] = {}
    with Registry(ws) as reg:
        while True:
            items = status_mod.view(reg, ws, EXPERIMENT)
            for it in items:
                key = (it["state"], it["attempt"], it["lr"])
                if seen.get(it["run"]) != key:
                    seen[it["run"]] = key
                    lr = it["lr"]
                    what = it["note"] or (f"attempt {it['attempt']} · lr {lr:g}" if isinstance(lr, (int, float))
                                          else f"attempt {it['attempt']}")
                    err.print(f"{time.strftime('%H:%M:%S')} {it['run']}: {it['state']} · {what}", markup=False)
            if not any(i["state"] in ACTIVE for i in items):
                return items
            time.sleep(max(0.2, interval))


# ------------------------------------------------------------------------------------------
# the whole thing
# ------------------------------------------------------------------------------------------

def run(ws, *, data: Optional[Dict[str, Any]] = None, params: Optional[Dict[str, Any]] = None,
        executor: Optional[str] = None, spec=SPEC, interval: float = 2.0, console=None, err=None) -> QuickstartResult:
    """Generate, convert, submit, wait, report. ``data`` overrides generator parameters (`DATA`),
    ``params`` the experiment's params (tests shrink both; the code path is the same)."""
    from ssflctl import report as report_mod
    from ssflctl.plan import spec as spec_mod
    from ssflctl.commands import submit as submit_mod

    console, err = _consoles(console, err)
    ws = Path(ws)
    ws.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    root, generated = ensure_data(ws, data, err=err)
    res = QuickstartResult(workspace=ws, data_root=root, spec=Path(spec), generated=generated)
    res.converted = ensure_annotations(root, err=err)

    res.spec = resolved_spec(ws, spec, params)
    exp = spec_mod.load(res.spec)
    kind = spec_mod.executor_kind(exp, executor)  # asked once: sinfo takes 9 s to fail where no controller runs
    err.print(f"executor: {kind}", markup=False)
    err.print(f"submit: ssflctl submit {res.spec} --workspace {ws}" + (f" --executor {executor}" if executor else ""),
              markup=False)
    res.submit = submit_mod.main(res.spec, ws, executor=kind)

    try:
        res.items = wait(ws, console=console, err=err, interval=interval)
    except KeyboardInterrupt:
        res.interrupted = True
        err.print("\nstopped waiting; the runs go on. Continue with:\n"
                  f"  ssflctl status {EXPERIMENT} --watch --workspace {ws}\n"
                  f"  ssflctl report {EXPERIMENT} --workspace {ws} --out {ws / 'report' / 'quickstart.md'} --force\n"
                  f"  (or run ssflctl quickstart again: it reuses what is done)", markup=False)
        return res

    out = ws / "report" / f"{EXPERIMENT}.md"
    rep = report_mod.make_report(ws, [EXPERIMENT])
    res.report_files = report_mod.write_report(rep, "markdown", out, force=True, progress=err.is_terminal)
    res.report_path = out
    res.report_text = out.read_text(encoding="utf-8")
    console.file.write(res.report_text)
    console.file.flush()
    n_fig = len(res.report_files) - 1
    states = {}
    for it in res.items:
        states[it["state"]] = states.get(it["state"], 0) + 1
    err.print(f"\nquickstart: {len(res.items)} runs ({', '.join(f'{v} {k}' for k, v in sorted(states.items()))}) "
              f"in {time.time() - t0:.0f}s; report: {out}" + (f" with {n_fig} figure(s) beside it" if n_fig else ""),
              markup=False)
    w = "" if Path(ws) == Path(".ssflctl") else f" -w {ws}"  # the default workspace needs no flag
    err.print(f"next: ssflctl status {EXPERIMENT}{w} · ssflctl logs <run>{w} · "
              f"ssflctl report {EXPERIMENT}{w} --format html --out {ws / 'report' / 'index.html'}", markup=False)
    return res


def main(workspace, executor: Optional[str] = None, interval: float = 2.0) -> int:
    """CLI body: 0 when every run is done, 1 when some failed, 130 when the waiting was interrupted."""
    res = run(workspace, executor=executor, interval=interval)
    if res.interrupted:
        return 130
    return 0 if res.done else 1

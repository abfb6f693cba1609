"""`ssflctl report`: COCO AP comparison tables over seeds, deltas, per-class AP, attempts, plots.

    collect (run records: registry + run dirs + outside work dirs; plain JSON reads)
      -> aggregate (pandas: long frame, mean ± sample std over seeds, tables of Cells)
      -> writers (markdown, latex, html, csv, json) + plots (matplotlib Agg)

pandas and matplotlib are imported inside functions only (`ssflctl --help` stays light).
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Iterable, Optional

from ssflctl import gcpause
from ssflctl.errors import UserError

FORMATS = ("markdown", "csv", "latex", "html", "json")
_ALIASES = {"md": "markdown", "tex": "latex", "htm": "html"}
_SUFFIX_FORMAT = {".html": "html", ".htm": "html", ".tex": "latex", ".csv": "csv", ".json": "json"}


def normalize_format(fmt: str) -> str:
    f = _ALIASES.get(str(fmt).lower(), str(fmt).lower())
    if f not in FORMATS:
        raise UserError(f"--format {fmt!r}: unknown format; choose one of {', '.join(FORMATS)}")
    return f


def make_report(ws, experiments: Iterable[str] = (), *, baseline: Optional[str] = "loss=focal", metrics=None,
                by: Iterable[str] = (), workdirs: Iterable = (), pick: Optional[str] = None, iou_type=None,
                all_versions: bool = False):
    """Collect and aggregate: a `aggregate.Report`. pick: test|last|best for outside work dirs;
    iou_type: bbox|segm|both (None: what the runs have); all_versions: include the runs made by
    older versions of the experiment files (left out by default, with a note)."""
    from ssflctl.report import aggregate, collect

    experiments = list(experiments or [])
    workdirs = list(workdirs or [])
    ws = Path(ws)
    if pick is not None and pick not in ("test", "last", "best"):
        raise UserError(f"--pick {pick!r}: choose one of test, last, best")
    if workdirs:
        experiments, workdirs = _workdirs_from_args(ws, experiments, workdirs)
    records = collect.collect(ws, experiments, workdirs, pick=pick)
    if experiments:
        found = {r["experiment"] for r in records}
        absent = [e for e in experiments if e not in found]
        if absent:
            import difflib

            known = sorted({r["experiment"] for r in collect.collect_workspace(ws, [])} - {""})
            close = [m for a in absent for m in difflib.get_close_matches(a, known, n=1)]
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise UserError(f"{ws}: no runs of experiment(s) {', '.join(absent)}; "
                            f"known experiments: {', '.join(known) or 'none'}{hint}")
    if not records:
        raise UserError(f"{ws}: no runs in this workspace; submit an experiment first, pass --workspace, "
                        "or report on mmdet work dirs with --workdirs")
    return aggregate.build(records, metrics=metrics, by=list(by or []), baseline=baseline, iou_type=iou_type,
                           all_versions=all_versions)


def _workdirs_from_args(ws: Path, experiments: list, workdirs: list) -> tuple:
    """`--workdirs a b c` (a shell glob): the command line parser gives the flag its first path and
    the rest as experiment names; names that are no experiment of the workspace but existing paths
    are work dirs, in their order after the flag's."""
    from ssflctl.report import collect

    if not experiments:
        return experiments, workdirs
    paths = [e for e in experiments if Path(e).exists()]
    if not paths:
        return experiments, workdirs
    known = {r["experiment"] for r in collect.collect_workspace(ws, [])} if (ws / "runs").is_dir() or (
        ws / "registry.sqlite").exists() else set()
    moved = [e for e in paths if e not in known]
    return [e for e in experiments if e not in moved], workdirs + [Path(e) for e in moved]


def _check_gallery(fmt: str, gallery: int) -> int:
    gallery = int(gallery or 0)
    if gallery < 0:
        raise UserError(f"--gallery {gallery}: give a number of images per configuration (0: none)")
    if gallery and fmt != "html":
        raise UserError(f"--gallery {gallery}: only the HTML report has a gallery; add --format html "
                        "(or --out report.html)")
    return gallery


def _gallery(rep, gallery: int, progress: bool = False) -> list:
    if not gallery:
        return []
    from ssflctl.report import gallery as gallery_mod

    return gallery_mod.draw(rep, gallery, progress=progress)


def render(rep, fmt: str, images: list = (), gallery: list = ()) -> str:
    from ssflctl.report import writers

    fmt = normalize_format(fmt)
    if fmt == "markdown":
        return writers.markdown(rep, [(c, Path(p).name) for c, p in images])
    if fmt == "html":
        return writers.html_page(rep, images, gallery)
    if fmt == "latex":
        return writers.latex(rep)
    if fmt == "csv":
        return writers.csv(rep)
    return writers.json_text(rep)


def build_report(ws, experiments: Iterable[str] = (), fmt: str = "markdown", *, baseline="loss=focal",
                 metrics=None, by=(), workdirs=(), plots: bool = False, gallery: int = 0, pick=None,
                 iou_type=None, all_versions: bool = False) -> str:
    """The report as text. With plots=True (or for html) figures are drawn into a temporary
    directory and embedded (html) or referenced by file name (markdown). gallery=N (html only):
    N pictures of test-set detections for one run of each configuration."""
    fmt = normalize_format(fmt)
    gallery = _check_gallery(fmt, gallery)
    rep = make_report(ws, experiments, baseline=baseline, metrics=metrics, by=by, workdirs=workdirs, pick=pick,
                      iou_type=iou_type, all_versions=all_versions)
    if fmt == "html" or (plots and fmt == "markdown"):
        from ssflctl.report import plots as plots_mod

        with tempfile.TemporaryDirectory(prefix="ssflctl-report-") as tmp:
            images = plots_mod.draw(rep, tmp)
            return render(rep, fmt, images, _gallery(rep, gallery))
    return render(rep, fmt)


def write_report(rep, fmt: str, out, *, force: bool = False, progress: bool = False, gallery: int = 0) -> list:
    """Write the report to `out` (atomically), figures beside it for markdown; returns the paths."""
    from ssflctl.atomic import write_text
    from ssflctl.report import plots as plots_mod

    fmt = normalize_format(fmt)
    gallery = _check_gallery(fmt, gallery)
    out = Path(out)
    if out.is_dir():
        raise UserError(f"{out}: --out is a directory; give a file name such as {out / 'index.md'}")
    if out.exists() and not force:
        raise UserError(f"{out}: already exists; pass --force to overwrite it")
    written = []
    if fmt == "markdown":
        plan = plots_mod.planned_files(rep)
        clash = [out.parent / name for _, _, name, _ in plan if (out.parent / name).exists()]
        if clash and not force:
            raise UserError(f"{clash[0]}: figure already exists; pass --force to overwrite it "
                            "(or choose another --out directory)")
        images = plots_mod.draw(rep, out.parent, plan, progress=progress)
        written += [p for _, p in images]
        text = render(rep, fmt, images)
    elif fmt == "html":
        with tempfile.TemporaryDirectory(prefix="ssflctl-report-") as tmp:
            text = render(rep, fmt, plots_mod.draw(rep, tmp, progress=progress), _gallery(rep, gallery, progress))
    else:
        text = render(rep, fmt)
    write_text(out, text)
    written.insert(0, out)
    return written


def main(ws, experiments, *, fmt="markdown", out=None, baseline="loss=focal", metrics=None, by=(),
         workdirs=(), strict=False, force=False, gallery: int = 0, pick=None, iou_type=None,
         all_versions: bool = False) -> int:
    """CLI body of `ssflctl report`: returns the exit code (1 with --strict and missing cells,
    unfinished or unreadable work dirs).
    With --out and the default format, the file's suffix picks the format (.html, .tex, .csv, .json)."""
    fmt = normalize_format(fmt)
    if out is not None and fmt == "markdown":
        fmt = _SUFFIX_FORMAT.get(Path(out).suffix.lower(), fmt)
    gallery = _check_gallery(fmt, gallery)
    if out is not None and Path(out).exists() and not force and not Path(out).is_dir():
        raise UserError(f"{out}: already exists; pass --force to overwrite it")
    with gcpause.paused():  # thousands of run records: nothing for the cyclic collector (not the figures)
        rep = make_report(ws, experiments, baseline=baseline, metrics=metrics, by=by, workdirs=workdirs, pick=pick,
                          iou_type=iou_type, all_versions=all_versions)
    if out is None:
        if fmt == "html":
            from ssflctl.report import plots as plots_mod

            with tempfile.TemporaryDirectory(prefix="ssflctl-report-") as tmp:
                text = render(rep, fmt, plots_mod.draw(rep, tmp, progress=sys.stderr.isatty()),
                              _gallery(rep, gallery, sys.stderr.isatty()))
        else:
            text = render(rep, fmt)
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        paths = write_report(rep, fmt, out, force=force, progress=sys.stderr.isatty(), gallery=gallery)
        extra = f" and {len(paths) - 1} figure(s) beside it" if len(paths) > 1 else ""
        print(f"wrote {paths[0]}{extra}", file=sys.stderr)
    if strict and rep.missing:
        shown = "; ".join(rep.missing[:5]) + (f"; ... ({len(rep.missing) - 5} more)" if len(rep.missing) > 5 else "")
        print(f"--strict: {len(rep.missing)} missing cell(s): {shown}", file=sys.stderr)
        return 1
    return 0

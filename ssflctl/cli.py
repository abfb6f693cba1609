"""The command line: parse, call one function, print.

Only light modules are imported at module level: `ssflctl --help` must not import torch, mmdet,
mmengine, pandas or submitit. Each command imports what it needs inside its body.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import List, Optional

import typer

from ssflctl import __version__
from ssflctl.errors import UserError

app = typer.Typer(
    name="ssflctl",
    help="Run Focal-Loss-family detection studies (MMDetection 3.x) on Slurm or local processes.\n\n"
    "Example: ssflctl submit experiments/ssfl_vs_fl.yaml --dry-run",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
)
convert_app = typer.Typer(
    help="Convert datasets to COCO JSON.\n\nExample: ssflctl convert cityscapes data/cityscapes",
    no_args_is_help=True,
)
app.add_typer(convert_app, name="convert")

WORKSPACE_HELP = "Workspace directory (registry and run dirs). Default: ./.ssflctl"
WorkspaceOpt = typer.Option(None, "--workspace", "-w", envvar="SSFLCTL_WORKSPACE", help=WORKSPACE_HELP)


def workspace_path(ws: Optional[Path]) -> Path:
    return Path(ws) if ws else Path(".ssflctl")


def _err(message: str) -> None:
    from rich.console import Console

    Console(stderr=True, highlight=False, soft_wrap=True).print(f"[bold red]error:[/] {message}", markup=True)


def user_errors(fn):
    """Turn UserError into one line on stderr and its exit code; Ctrl-C into exit 130."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as err:
            _err(str(err))
            raise typer.Exit(err.exit_code)
        except KeyboardInterrupt:
            _err("interrupted")
            raise typer.Exit(130)
        except PermissionError as err:  # a write needed but refused: one line naming the path
            from rich.markup import escape

            _err(escape(f"{err.filename or 'a file'}: {err.strerror or 'permission denied'}; this needs write "
                        "access there (ask the workspace's owner, or work on a copy)"))
            raise typer.Exit(1)

    return wrapper


def _version(value: bool):
    if value:
        typer.echo(f"ssflctl {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
):
    """Run Focal-Loss-family detection studies (MMDetection 3.x) on Slurm or local processes."""


@convert_app.command("cityscapes")
@user_errors
def convert_cityscapes(
    root: Path = typer.Argument(..., help="Cityscapes root holding leftImg8bit/ and gtFine/."),
    out_dir: Optional[Path] = typer.Option(None, "--out-dir", "-o", help="Default: ROOT/annotations"),
    nproc: int = typer.Option(1, "--nproc", "-n", min=1, help="Worker processes."),
    splits: str = typer.Option("train,val,test", "--splits", help="Comma-separated splits to convert."),
    force: bool = typer.Option(False, "--force", help="Overwrite existing JSON files."),
):
    """Convert Cityscapes gtFine to COCO instance JSON (MMDetection-compatible).

    Example: ssflctl convert cityscapes data/cityscapes --nproc 8 --out-dir data/cityscapes/annotations
    """
    from ssflctl.convert import cityscapes

    cityscapes.main(root, out_dir, nproc, [s for s in splits.split(",") if s], force)


@app.command()
@user_errors
def submit(
    experiment: Path = typer.Argument(..., help="Experiment YAML file."),
    workspace: Optional[Path] = WorkspaceOpt,
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate and print the plan; submit nothing."),
    executor: Optional[str] = typer.Option(None, "--executor", help="Override the file's executor: slurm or local."),
):
    """Submit an experiment matrix: one train (and test) job per run that is not done or queued.

    Example: ssflctl submit experiments/ssfl_vs_fl.yaml --dry-run
    """
    from ssflctl.commands import submit as submit_mod

    submit_mod.main(experiment, workspace_path(workspace), dry_run=dry_run, executor=executor)


@app.command()
@user_errors
def status(
    experiment: Optional[str] = typer.Argument(None, help="Experiment name (default: all)."),
    workspace: Optional[Path] = WorkspaceOpt,
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    watch: bool = typer.Option(False, "--watch", help="Refresh live until Ctrl-C or all runs end."),
    interval: float = typer.Option(5.0, "--interval", help="Seconds between refreshes with --watch."),
    show_all: bool = typer.Option(False, "--all", help="In a terminal, list every run (default: counts by "
                                  "experiment and state, and the runs that need a look; piped output lists all)."),
):
    """Show runs: state, attempt lineage, job id, progress, last loss.

    In a terminal: counts by experiment and state, then every failed, unknown, running, retried or
    held run in full (--all: every run). Piped: every run, tab-separated.

    Example: ssflctl status ssfl_vs_fl --watch
    """
    from ssflctl.commands import status as status_mod

    status_mod.main(workspace_path(workspace), experiment, as_json=as_json, watch=watch, interval=interval,
                    show_all=show_all)


@app.command()
@user_errors
def cancel(
    target: str = typer.Argument(..., help="Experiment name or run id."),
    workspace: Optional[Path] = WorkspaceOpt,
):
    """Cancel the jobs of an experiment or a run, and of their test cells (scancel or kill); recorded as cancelled.

    Example: ssflctl cancel ssfl_vs_fl
    """
    from ssflctl.commands import cancel as cancel_mod

    cancel_mod.main(workspace_path(workspace), target)


@app.command()
@user_errors
def logs(
    run: str = typer.Argument(..., help="Run id (or a unique prefix)."),
    workspace: Optional[Path] = WorkspaceOpt,
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing as the log grows; stops once the run "
                                "(or the --test cell) has ended."),
    attempt: Optional[int] = typer.Option(None, "--attempt", help="Attempt number (default: latest)."),
    rank: int = typer.Option(0, "--rank", min=0, help="Rank of a multi-GPU run (default 0: mmengine's log)."),
    test: Optional[str] = typer.Option(None, "--test", metavar="TEST_ID",
                                       help="A test cell of the run (test_matrix; its id, name or id prefix): "
                                            "that test job's log instead."),
):
    """Print the training log of a run's attempt, or of one of its test cells.

    Example: ssflctl logs ssfl-cityscapes-s3407 -f;  ssflctl logs RUN --rank 1;  ssflctl logs RUN --test score_thr0.3
    """
    from ssflctl.commands import logs as logs_mod

    logs_mod.main(workspace_path(workspace), run, follow=follow, attempt=attempt, rank=rank, test=test)


@app.command()
@user_errors
def report(
    experiments: Optional[List[str]] = typer.Argument(None, help="Experiment names (default: all)."),
    workspace: Optional[Path] = WorkspaceOpt,
    fmt: str = typer.Option("markdown", "--format", "-f", help="markdown, csv, latex, html or json."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write here (plots beside it) instead of stdout."),
    baseline: str = typer.Option("loss=focal", "--baseline", help="AXIS=VALUE of the baseline configuration."),
    metrics: Optional[str] = typer.Option(None, "--metrics", help="Comma-separated, e.g. AP,AP50,AP75 (VOC: Pascal VOC mAP@0.5)."),
    by: Optional[List[str]] = typer.Option(None, "--by", help="Axes that define a configuration (repeatable)."),
    workdirs: Optional[List[Path]] = typer.Option(None, "--workdirs", help="Plain MMDetection work dirs (3.x or 2.x) to include: --workdirs work_dirs/* (or a folder of work dirs)."),
    pick: Optional[str] = typer.Option(None, "--pick", help="Work dirs: test, last (validation) or best (mmdet's save_best); default: test if any, else last."),
    iou_type: Optional[str] = typer.Option(None, "--iou-type", help="bbox, segm or both (default: what the runs have)."),
    strict: bool = typer.Option(False, "--strict", help="Exit non-zero if any cell is missing."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing --out file."),
    missrate: Optional[str] = typer.Option(None, "--missrate", help="Also print the log-average miss rate MR⁻² of this class (Caltech protocol)."),
    subset_field: Optional[str] = typer.Option(None, "--subset-field", help="With --missrate: MR⁻² per value of this image field too (e.g. daytime)."),
    subset_list: Optional[List[str]] = typer.Option(None, "--subset-list", help="With --missrate: NAME=FILE, MR⁻² on the images listed in FILE (ids or file names, one a line; repeatable)."),
    min_height: Optional[float] = typer.Option(None, "--min-height", help="With --missrate: boxes lower than this are ignored (Caltech 'reasonable': 50)."),
    gallery: int = typer.Option(0, "--gallery", help="HTML only: N test images (GT | predictions) of one run per configuration."),
    all_versions: bool = typer.Option(False, "--all-versions", help="Include runs made by older versions of the experiment file (left out by default; settings that differ become columns)."),
):
    """COCO AP comparison tables: mean ± std over seeds, deltas vs the baseline, per-class AP, plots.

    Example: ssflctl report ssfl_vs_fl --format html --out report/index.html
    """
    from ssflctl import report as report_mod
    from ssflctl.commands.status import read_only_note

    read_only_note(workspace_path(workspace))

    if (subset_field or subset_list or min_height) and not missrate:
        raise UserError("--subset-field/--subset-list need --missrate CLASS (e.g. --missrate person)")
    code = report_mod.main(
        workspace_path(workspace), experiments or [], fmt=fmt, out=out, baseline=baseline,
        metrics=metrics, by=by or [], workdirs=workdirs or [], strict=strict, force=force, gallery=gallery,
        pick=pick, iou_type=iou_type, all_versions=all_versions,
    )
    if missrate:
        from ssflctl.evaluation import missrate as missrate_mod

        typer.echo(missrate_mod.report_main(workspace_path(workspace), experiments or [], missrate, subset_field,
                                            workdirs or [], plot_dir=Path(out).parent if out else None,
                                            subset_lists=missrate_mod.read_subset_lists(subset_list or []),
                                            force=force, min_height=min_height))
    raise typer.Exit(code or 0)


@app.command()
@user_errors
def show(
    run: str = typer.Argument(..., help="Run id, name or id prefix (or a run / attempt directory)."),
    workspace: Optional[Path] = WorkspaceOpt,
    n: int = typer.Option(8, "--n", help="Number of test images to draw."),
    score_thr: float = typer.Option(0.3, "--score-thr", help="Draw predictions with at least this score."),
    attempt: Optional[int] = typer.Option(None, "--attempt", help="Attempt number (default: latest tested)."),
    out_dir: Optional[Path] = typer.Option(None, "--out-dir", "-o", help="Default: <attempt dir>/show/"),
    force: bool = typer.Option(False, "--force", help="Overwrite existing pictures."),
):
    """Draw a run's test-set predictions beside the ground truth (PNG per image).

    Example: ssflctl show <run>
    """
    from ssflctl.report import show as show_mod

    show_mod.main(run, workspace_path(workspace), n=n, score_thr=score_thr, attempt=attempt, out_dir=out_dir,
                  force=force)


@app.command()
@user_errors
def quickstart(
    workspace: Optional[Path] = WorkspaceOpt,
    executor: Optional[str] = typer.Option(None, "--executor", help="slurm or local (default: the file's auto)."),
):
    """The study in miniature: synthetic Cityscapes, Focal Loss vs SSFL* (NaN, retry), report.

    Generates WORKSPACE/data/cityscapes, converts it, submits experiments/quickstart.yaml, waits, reports.

    Ctrl-C stops the waiting, not the runs. Safe to run again: it reuses what is done.

    Example: ssflctl quickstart
    """
    from ssflctl.commands import quickstart as quickstart_mod

    raise typer.Exit(quickstart_mod.main(workspace_path(workspace), executor=executor))


def main() -> None:
    import warnings

    # mmengine 0.10.7 imports pkg_resources (setuptools < 81 keeps it, with a deprecation notice on
    # every import of the training stack): a notice about our dependencies' packaging, not for users
    warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
    app()


if __name__ == "__main__":
    main()

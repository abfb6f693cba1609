"""Figures (matplotlib, headless Agg): AP per configuration with its seed spread, and training-loss
curves per configuration with every run and attempt (its lr in the legend, NaN points marked)."""
from __future__ import annotations

import math
import re
from pathlib import Path

from ssflctl.report.collect import loss_curves

SEED_AXIS = "seed"


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def slug(s: str) -> str:
    s = re.sub(r"[^A-Za-z0-9.=+-]+", "-", s).strip("-")
    return s or "all"


def planned_files(rep) -> list:
    """[(kind, caption, filename, payload)] of every figure the report will draw."""
    out = []
    if any(v for v in rep.seedvals.values()):
        out.append(("ap", "AP per configuration: mean ± std over seeds (dots: seeds)", "ap_by_config.png", None))
    seen = set()
    for key, label in zip(rep.cfg_keys, [c[0] for c in rep.configs]):
        for ds in rep.datasets:
            recs = [r for r in rep.records if r["_cfg"] == key and r["_ds"] == ds and r["attempts"]
                    and any(a.get("dir") for a in r["attempts"])]
            if not recs:
                continue
            name = f"loss_{slug(label)}{'_' + slug(ds) if ds else ''}.png"
            k = 2
            while name in seen:
                name = f"loss_{slug(label)}{'_' + slug(ds) if ds else ''}-{k}.png"
                k += 1
            seen.add(name)
            cap = f"Training loss: {label}{' on ' + ds if ds else ''} (every attempt, its lr; x: NaN)"
            out.append(("loss", cap, name, recs))
    return out


def draw(rep, out_dir, plan=None, progress: bool = False) -> list:
    """Draw every planned figure into out_dir; returns [(caption, path)].
    progress=True shows a rich progress bar on stderr (many configurations take a while)."""
    plt = _plt()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plan = plan if plan is not None else planned_files(rep)
    drawn = []
    bar = None
    if progress and len(plan) > 3:
        from rich.console import Console
        from rich.progress import Progress

        bar = Progress(console=Console(stderr=True), transient=True)
        bar.start()
        task = bar.add_task("drawing figures", total=len(plan))
    try:
        for kind, cap, name, payload in plan:
            path = out_dir / name
            fig = ap_figure(plt, rep) if kind == "ap" else loss_figure(plt, payload)
            if bar is not None:
                bar.advance(task)
            if fig is None:
                continue
            _save(fig, path)
            plt.close(fig)
            drawn.append((cap, path))
    finally:
        if bar is not None:
            bar.stop()
    return drawn


def _save(fig, path: Path) -> None:
    import io

    from ssflctl.atomic import write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    write_bytes(path, buf.getvalue())


def ap_figure(plt, rep):
    cfgs = rep.cfg_keys
    labels = [c[0] for c in rep.configs]
    dss = rep.datasets
    fig, axes = plt.subplots(1, len(dss), figsize=(max(4.5, 1.1 * len(cfgs) + 2) * len(dss) ** 0.5 + 1, 3.6),
                             squeeze=False)
    for ax, ds in zip(axes[0], dss):
        for i, key in enumerate(cfgs):
            vals = [v * 100 for v in rep.seedvals.get((key, ds), [])]
            if not vals:
                continue
            ax.scatter([i] * len(vals), vals, s=14, color="#888", zorder=2)
            mean = sum(vals) / len(vals)
            std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
            ax.errorbar([i], [mean], yerr=[std], fmt="o", color="C0", capsize=4, zorder=3)
        ax.set_xticks(range(len(cfgs)))
        ax.set_xticklabels(labels, rotation=30 if len(cfgs) > 4 else 0, ha="right" if len(cfgs) > 4 else "center")
        ax.set_title(ds or "AP")
        ax.set_ylabel("AP (%)")
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def loss_figure(plt, recs):
    fig, ax = plt.subplots(figsize=(9, 3.8))
    any_line = False
    top = None
    nan_marks = []
    for ri, r in enumerate(sorted(recs, key=lambda r: str(r["axes"].get(SEED_AXIS, r["name"])))):
        seed = r["axes"].get(SEED_AXIS)
        who = f"seed {seed}" if seed is not None else r["name"]
        curves = loss_curves(r)
        shown = r.get("final") or max((c[0] for c in curves), default=None)  # solid: the attempt that counts
        for att, lr, pts, nan_iter in curves:
            finite = [(x, y) for x, y in pts if math.isfinite(y)]
            bad = [x for x, y in pts if not math.isfinite(y)]
            lbl = f"{who} · attempt {att} · lr {lr:g}" if lr is not None else f"{who} · attempt {att}"
            style = "-" if att == shown else "--"
            color = f"C{ri % 10}"
            if finite:
                ax.plot([p[0] for p in finite], [p[1] for p in finite], style, color=color, lw=1.2, label=lbl)
                any_line = True
                mx = max(p[1] for p in finite)
                top = mx if top is None else max(top, mx)
            if nan_iter is not None and nan_iter not in bad:
                bad.append(nan_iter)
            last = finite[-1][1] if finite else None
            nan_marks += [(x, last, color) for x in bad]
    if not any_line and not nan_marks:
        plt.close(fig)
        return None
    for x, y, color in nan_marks:
        y = y if y is not None else (top if top is not None else 1.0)
        ax.scatter([x], [y], marker="x", s=70, linewidths=2, color="red", zorder=4)
    if nan_marks:
        ax.scatter([], [], marker="x", color="red", label="NaN loss")
    handles, labels = ax.get_legend_handles_labels()
    if len(handles) > 14:  # dozens of seeds: keep the legend to the attempts that matter
        keep = [i for i, lb in enumerate(labels) if "attempt 1 " not in lb + " " or lb == "NaN loss"]
        handles, labels = [handles[i] for i in keep], [labels[i] for i in keep]
        ax.set_title(f"{len(recs)} runs; legend lists retried attempts only", fontsize=8)
    ax.set_xlabel("iteration")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    if handles:
        ax.legend(handles[:14], labels[:14], fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0),
                  borderaxespad=0)
    fig.tight_layout()
    return fig

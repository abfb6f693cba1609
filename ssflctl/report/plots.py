"""Figures (matplotlib, headless Agg): AP per configuration with its seed spread, and training-loss
curves per configuration with every run and attempt (its lr in the legend, NaN points marked).

Bounded at any number of configurations: one AP figure (a panel per dataset that has numbers) shows
at most TOP_N configurations by mean AP plus up to MAX_BASELINES baselines per dataset and is at most
MAX_WIDTH_IN inches wide; loss curves are drawn for those configurations only. Panel titles and
captions say how many were left out. No figure is created for a dataset or configuration without
numbers or curves. (Before: the AP figure grew 1.1 inch per configuration and a figure was created
per (configuration, dataset); 5000 configurations took 5 min 45 s and 2 GB for an HTML report.)"""
from __future__ import annotations

import math
import re
from pathlib import Path

from ssflctl.report.collect import loss_curves, lr_text

SEED_AXIS = "seed"


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def slug(s: str) -> str:
    s = re.sub(r"[^A-Za-z0-9.=+-]+", "-", s).strip("-")
    return s or "all"


TOP_N = 25            # configurations per dataset in the AP figure: the best by mean AP ...
MAX_BASELINES = 5     # ... plus up to this many baseline configurations
DPI = 100             # PNG pixels per inch
PANEL_W_IN = 5.4      # width of one dataset's AP panel (inches)
MAX_COLS = 3          # AP panels side by side; more datasets wrap into rows
MAX_WIDTH_IN = 16.0   # every figure is at most this wide (inches): 1600 px at DPI
ROW_IN = 0.3          # height of one configuration's row in the AP figure (inches)
LABEL_CHARS = 40      # configuration labels are cut to this many characters
LOSS_TOP = 5          # when the AP figure leaves configurations out: loss curves of the baseline and this many best


def _baselines(rep) -> set:
    """Configuration keys of the baseline: the main table marks their delta cells "baseline"
    (rows are in ``rep.cfg_keys`` order)."""
    out = set()
    for key, (_, cells) in zip(rep.cfg_keys, getattr(rep.main, "rows", []) or []):
        if any(getattr(c, "text", None) == "baseline" for c in cells):
            out.add(key)
    return out


def _mean(vals) -> float:
    return sum(vals) / len(vals)


def ap_selection(rep, top_n: int = TOP_N) -> dict:
    """{dataset: (shown cfg keys, number of configurations with AP on it, baseline keys)} for every
    dataset with at least one AP value (none: no panel). At most ``top_n`` configurations by mean AP
    plus ``MAX_BASELINES`` baselines are shown; when all fit, every one in table order."""
    base = _baselines(rep)
    sel = {}
    for ds in rep.datasets:
        keys = [k for k in rep.cfg_keys if rep.seedvals.get((k, ds))]
        if not keys:
            continue
        bkeys = [k for k in keys if k in base]
        if len(keys) <= top_n + min(len(bkeys), MAX_BASELINES):
            shown = keys
        else:
            order = {k: i for i, k in enumerate(keys)}
            ranked = sorted(keys, key=lambda k: (-_mean(rep.seedvals[(k, ds)]), order[k]))
            bshown = sorted(bkeys, key=lambda k: (-_mean(rep.seedvals[(k, ds)]), order[k]))[:MAX_BASELINES]
            best = [k for k in ranked if k not in bshown][:top_n]
            shown = bshown + best
        sel[ds] = (shown, len(keys), set(bkeys))
    return sel


def _left_out_note(sel: dict) -> str:
    parts = []
    for ds, (shown, total, bkeys) in sel.items():
        if len(shown) < total:
            nb = len([k for k in shown if k in bkeys])
            parts.append(f"{ds + ': ' if ds else ''}the best {len(shown) - nb} of {total} configurations by mean AP"
                         f"{' and the baseline' if nb else ''}; {total - len(shown)} left out")
    return ("; ".join(parts) + " (all are in the tables)") if parts else ""


def planned_files(rep) -> list:
    """[(kind, caption, filename, payload)] of every figure the report will draw: one AP figure
    (a panel per dataset with numbers, at most TOP_N configurations + baselines each) and a loss
    figure per (configuration, dataset) with runs that have attempt dirs: every configuration when
    they fit in the AP figure (up to TOP_N), else the baselines and the LOSS_TOP best of the AP
    figure (no AP on the dataset: the first LOSS_TOP in table order)."""
    out = []
    sel = ap_selection(rep)
    if sel:
        note = _left_out_note(sel)
        cap = "AP per configuration: mean ± std over seeds (dots: seeds)" + (f". {note}" if note else "")
        out.append(("ap", cap, "ap_by_config.png", sel))
    groups = {}
    for r in rep.records:
        if r["attempts"] and any(a.get("dir") for a in r["attempts"]):
            groups.setdefault((r["_cfg"], r["_ds"]), []).append(r)
    labels = dict(zip(rep.cfg_keys, [c[0] for c in rep.configs]))
    seen = set()
    for ds in rep.datasets:
        cands = [k for k in rep.cfg_keys if (k, ds) in groups]
        if not cands:
            continue
        if ds in sel and len(sel[ds][0]) < sel[ds][1]:  # AP figure trimmed: its baseline and best few
            shown, _, bkeys = sel[ds]
            keys = [k for k in shown if k in bkeys] + [k for k in shown if k not in bkeys][:LOSS_TOP]
            keys = [k for k in keys if (k, ds) in groups]
            why = f"the baseline and the best {LOSS_TOP} by mean AP" if bkeys else f"the best {LOSS_TOP} by mean AP"
        elif len(cands) <= TOP_N + MAX_BASELINES:
            keys, why = cands, ""
        elif ds in sel:  # every configuration with AP fits: those
            shown = set(sel[ds][0])
            keys, why = [k for k in cands if k in shown], "those with AP"
        else:  # many configurations, no AP figure to pick from: the first in table order
            keys, why = cands[:LOSS_TOP], "the first in table order"
        left = len(cands) - len(keys)
        note = ""
        if left:
            note = (f"Loss curves{' on ' + ds if ds else ''} for {len(keys)} of {len(cands)} configurations "
                    f"({why}); {left} left out")
        for key in keys:
            label = labels[key]
            name = f"loss_{slug(label)}{'_' + slug(ds) if ds else ''}.png"
            k = 2
            while name in seen:
                name = f"loss_{slug(label)}{'_' + slug(ds) if ds else ''}-{k}.png"
                k += 1
            seen.add(name)
            cap = f"Training loss: {label}{' on ' + ds if ds else ''} (every attempt, its lr; x: NaN)"
            out.append(("loss", cap, name, {"recs": groups[(key, ds)], "ds": ds, "note": note}))
    return out


def draw(rep, out_dir, plan=None, progress: bool = False) -> list:
    """Draw every planned figure into out_dir; returns [(caption, path)]. A loss figure without
    any curve is not drawn (nor created); the note of what was left out goes to the first loss
    figure drawn for its dataset. progress=True shows a rich progress bar on stderr. From
    FORKED_FIGURES figures on they are drawn in forked workers (report.fanout; matplotlib is
    imported here first, so they inherit it)."""
    from ssflctl.report import fanout

    _plt()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plan = plan if plan is not None else planned_files(rep)
    bar, advance = None, None
    if progress and len(plan) > 3:
        from rich.console import Console
        from rich.progress import Progress

        # refreshed by hand: no refresh thread may hold a lock when the workers are forked
        bar = Progress(console=Console(stderr=True), transient=True, auto_refresh=False)
        bar.start()
        task = bar.add_task("drawing figures", total=len(plan))

        def advance(k: int) -> None:
            bar.advance(task, k)
            bar.refresh()
    try:
        made = fanout.fork_map(_draw_one, range(len(plan)), shared=(rep, plan, out_dir), min_items=FORKED_FIGURES,
                               on_done=advance)
    finally:
        if bar is not None:
            bar.stop()
    drawn, noted = [], set()
    for (kind, cap, _name, payload), path in zip(plan, made):
        if path is None:
            continue
        if kind == "loss" and isinstance(payload, dict) and payload["note"] and payload["ds"] not in noted:
            noted.add(payload["ds"])
            cap = f"{cap}. {payload['note']}"
        drawn.append((cap, Path(path)))
    return drawn


#: from this many planned figures on, draw() spreads them over forked workers (~0.1 s a figure)
FORKED_FIGURES = 6


def _draw_one(i: int):
    """Figure ``i`` of the plan in ``fanout.shared()`` = (report, plan, out_dir), saved: its path,
    or None when it has nothing to show (no file is created)."""
    from ssflctl.report import fanout

    rep, plan, out_dir = fanout.shared()
    kind, _cap, name, payload = plan[i]
    plt = _plt()
    if kind == "ap":
        fig = ap_figure(plt, rep, payload)
    else:
        fig = loss_figure(plt, payload["recs"] if isinstance(payload, dict) else payload)
    if fig is None:
        return None
    path = out_dir / name
    try:
        _save(fig, path)
    finally:
        plt.close(fig)
    return str(path)


def _save(fig, path: Path) -> None:
    import io

    from ssflctl.atomic import write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    write_bytes(path, buf.getvalue())


def _short(label: str, n: int = LABEL_CHARS) -> str:
    return label if len(label) <= n else label[: n - 1] + "…"


def ap_figure(plt, rep, sel=None):
    """One panel per dataset with AP numbers (none: None): configurations as rows (seeds as dots,
    mean ± sample std as a bar, the baseline in orange with a dashed line at its mean). Size:
    at most MAX_WIDTH_IN wide and ROW_IN per shown configuration high, whatever the number of
    configurations (``ap_selection`` caps them)."""
    sel = ap_selection(rep) if sel is None else sel
    if not sel:
        return None
    labels = dict(zip(rep.cfg_keys, [c[0] for c in rep.configs]))
    dss = list(sel)
    ncols = min(len(dss), MAX_COLS)
    nrows = math.ceil(len(dss) / ncols)
    heights = []
    for r in range(nrows):
        rows = max(len(sel[ds][0]) for ds in dss[r * ncols:(r + 1) * ncols])
        heights.append(max(2.4, ROW_IN * rows + 1.3))
    width = min(MAX_WIDTH_IN, max(5.0, PANEL_W_IN * ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(width, sum(heights)), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    for i, ax in enumerate(axes.flat):
        if i >= len(dss):
            ax.set_visible(False)
            continue
        ds = dss[i]
        shown, total, bkeys = sel[ds]
        base_means = []
        dots_x, dots_y = [], []                      # every seed: one scatter per panel
        bars = {"C0": ([], [], []), "C1": ([], [], [])}  # mean, row, std: one errorbar per colour
        for y, key in enumerate(shown):
            vals = [v * 100 for v in rep.seedvals.get((key, ds), [])]
            mean = sum(vals) / len(vals)
            std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
            dots_x += vals
            dots_y += [y] * len(vals)
            for col, v in zip(bars["C1" if key in bkeys else "C0"], (mean, y, std)):
                col.append(v)
            if key in bkeys:
                base_means.append(mean)
        # a few artists per panel, not three per configuration (26 rows x 2 panels: 0.7 s -> 0.2 s)
        ax.scatter(dots_x, dots_y, s=12, color="#888", zorder=2)
        for color, (means, ys, stds) in bars.items():
            if means:
                ax.errorbar(means, ys, xerr=stds, fmt="o", color=color, capsize=3, zorder=3)
        for m in base_means[:1]:
            ax.axvline(m, color="C1", ls="--", lw=0.8, zorder=1)
        ax.set_yticks(range(len(shown)))
        ax.set_yticklabels([_short(labels[k]) + (" (baseline)" if k in bkeys else "") for k in shown], fontsize=8)
        ax.set_ylim(len(shown) - 0.5, -0.5)  # first row on top
        title = ds or "AP"
        if len(shown) < total:
            title += f": best {len(shown) - len([k for k in shown if k in bkeys])} of {total} configurations" \
                     f" ({total - len(shown)} left out)"
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("AP (%)")
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


def loss_figure(plt, recs):
    """Loss curves of one configuration's runs on one dataset; None (no figure created) when no
    run has a loss point or a NaN mark."""
    series = []  # (label, style, color, finite points, NaN x positions, last finite y)
    for ri, r in enumerate(sorted(recs, key=lambda r: str(r["axes"].get(SEED_AXIS, r["name"])))):
        seed = r["axes"].get(SEED_AXIS)
        who = f"seed {seed}" if seed is not None else r["name"]
        curves = loss_curves(r)
        shown = r.get("final") or max((c[0] for c in curves), default=None)  # solid: the attempt that counts
        for att, lr, pts, nan_iter in curves:
            finite = [(x, y) for x, y in pts if math.isfinite(y)]
            bad = [x for x, y in pts if not math.isfinite(y)]
            if nan_iter is not None and nan_iter not in bad:
                bad.append(nan_iter)
            if not finite and not bad:
                continue
            a = next((x for x in r.get("attempts") or [] if x.get("attempt") == att), None)
            lbl = f"{who} · attempt {att} · lr {lr_text(a) if a else f'{lr:g}'}" if lr is not None \
                else f"{who} · attempt {att}"
            series.append((lbl, "-" if att == shown else "--", f"C{ri % 10}", finite, bad,
                           finite[-1][1] if finite else None))
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(9, 3.8))
    top = max((max(p[1] for p in s[3]) for s in series if s[3]), default=None)
    nan_marks = []
    for lbl, style, color, finite, bad, last in series:
        if finite:
            ax.plot([p[0] for p in finite], [p[1] for p in finite], style, color=color, lw=1.2, label=lbl)
        nan_marks += [(x, last, color) for x in bad]
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

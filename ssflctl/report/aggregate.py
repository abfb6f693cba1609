"""Run records -> long DataFrame -> the report's tables (pandas does the numbers).

Nothing here formats for a particular output: tables are lists of `Cell`s that the writers render
(bold for the best value, a dagger for runs that needed a lower lr, text for gaps).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from ssflctl.errors import UserError
from ssflctl.report.collect import COCO_METRICS, VOC_METRIC, lr_text
from ssflctl.workdir.records import lr_differs

SEED_AXIS = "seed"
NO_VOC = "n/a (no VOCMetric)"
NO_SEGM = "n/a (box only)"
DATASET_AXIS = "dataset"
EXPERIMENT_AXIS = "experiment"
NOT_DONE_ORDER = ("unfinished", "failed", "cancelled", "unreadable", "unknown", "running", "submitting", "queued",
                  "pending", "missing")
UNFINISHED = "unfinished"   # an outside work dir stopped before its config's max_epochs/max_iters
WITH_RESULTS = ("done", UNFINISHED)
# where an outside work dir's numbers come from (columns of the long frame when there are work dirs)
PROVENANCE_COLS = ("result_split", "result_timestamp", "result_epoch", "result_iter", "result_checkpoint",
                   "result_pick", "result_file", "config_file", "optimizer", "batch_size", "max_epochs",
                   "max_iters")
LONG_FIXED = ("experiment", "run_id", "name", "source", "state", "reason", "attempts", "attempt", "lr",
              "lr_effective", "lr_scale", "metric", "class", "value", "evaluator", "note", "cfg", "retried") + PROVENANCE_COLS
#: the long frame's columns after "lr" when some attempt trained at another base lr (auto_scale_lr)
EFFECTIVE_LR_COLS = ("lr_effective", "lr_scale")
SEGM = "segm "  # prefix of the COCO segm metric names ("segm AP", ...); bbox names are bare
SEGM_METRICS = tuple(SEGM + m for m in COCO_METRICS)
IOU_TYPES = ("bbox", "segm", "both")


@dataclass
class Cell:
    text: str
    best: bool = False
    mark: bool = False  # a run behind this cell needed a lower lr (dagger + footnote)
    value: Optional[float] = None
    foot: str = ""      # footnote numbers ("1" or "1,2"): where an outside work dir's numbers come from


@dataclass
class Table:
    title: str
    stub: list            # names of the row-header columns
    groups: list          # [(group label, [column names])]; one group with label "" when flat
    rows: list            # [([stub texts], [Cell per column])]
    notes: list = field(default_factory=list)
    numeric: bool = True  # right-align the value columns

    def flat_columns(self) -> list:
        multi = len(self.groups) > 1 or (self.groups and self.groups[0][0])
        cols = []
        for label, names in self.groups:
            cols += [f"{label} {n}" if multi and label else n for n in names]
        return cols


@dataclass
class Report:
    title: str
    summary: list                     # lines of text
    main: Table
    per_class: list                   # [Table]
    retries: list                     # lines: runs that needed a lower lr
    gaps: Table                       # runs that are not done
    notes: list                       # other lines
    long: Any                         # pandas DataFrame, one row per run and metric
    missing: list                     # descriptions of missing cells (for --strict)
    configs: list = field(default_factory=list)   # [(cfg label, {axis: value})]
    datasets: list = field(default_factory=list)
    by: list = field(default_factory=list)
    records: list = field(default_factory=list)
    seedvals: dict = field(default_factory=dict)  # {(cfg key, dataset): [AP of each seed]} for plots
    cfg_keys: list = field(default_factory=list)  # configuration keys in table order
    footnotes: list = field(default_factory=list)  # ["1 name: source..."] for Cell.foot


# ------------------------------------------------------------------------------------------------


# --metrics spellings of the VOC metric (lower case, without spaces, '_', '-', '@', '.')
VOC_ALIASES = ("voc", "vocmap", "vocmap50", "vocmap05", "vocap50")


def parse_metrics(metrics, voc: bool = False, iou_type: str = "bbox") -> list:
    """--metrics as metric names; the default is the 12 COCO numbers, led by VOC mAP@0.5 when
    ``voc`` (some run has it). iou_type segm: the same names of the segm evaluation ("segm AP", ...);
    both: bbox's, then segm's. A name given as "segm AP" is segm whatever the iou_type."""
    prefixes = {"bbox": [""], "segm": [SEGM], "both": ["", SEGM]}[iou_type]
    if metrics is None or metrics == "" or metrics == []:
        return ([VOC_METRIC] if voc else []) + [p + m for p in prefixes for m in COCO_METRICS]
    names = metrics.split(",") if isinstance(metrics, str) else list(metrics)
    out = []
    lookup = {m.lower(): m for m in COCO_METRICS}
    lookup.update({a: VOC_METRIC for a in VOC_ALIASES})
    choices = ",".join(COCO_METRICS) + ",VOC (Pascal VOC mAP@0.5), segm AP..segm ARl"
    for n in names:
        n = n.strip()
        if not n:
            continue
        seg = n.lower().startswith(("segm ", "segm_", "segm/", "segm-"))
        bare = n[5:] if seg else n
        m = lookup.get(bare.lower()) or lookup.get("".join(ch for ch in bare.lower() if ch not in " _-@."))
        if m is None:
            raise UserError(f"--metrics: unknown metric {n!r}; choose from {choices}")
        for p in ([SEGM] if seg else prefixes if m != VOC_METRIC else [""]):
            if p + m not in out:
                out.append(p + m)
    out = [m for m in out if not m.startswith(SEGM)] + [m for m in out if m.startswith(SEGM)]  # bbox's, then segm's
    if not out:
        raise UserError(f"--metrics: no metric given; choose from {choices}")
    return out


def parse_baseline(baseline) -> Optional[tuple]:
    if baseline is None or str(baseline).strip().lower() in ("", "none", "-"):
        return None
    if "=" not in baseline:
        raise UserError(f"--baseline {baseline!r}: expected AXIS=VALUE, e.g. --baseline loss=focal")
    axis, value = baseline.split("=", 1)
    axis, value = axis.strip(), value.strip()
    if not axis:
        raise UserError(f"--baseline {baseline!r}: expected AXIS=VALUE, e.g. --baseline loss=focal")
    return axis, value


def _sort_key(v):
    """Mixed-type ordering: None last, numbers numerically, then strings."""
    if v is None:
        return (2, 0, "")
    if isinstance(v, bool):
        return (1, 0, str(v))
    if isinstance(v, (int, float)):
        return (0, float(v), "")
    return (1, 0, str(v))


def _axis_value(rec: dict, axis: str):
    if axis == EXPERIMENT_AXIS:
        return rec.get("experiment") or None
    if axis in rec["axes"]:
        return rec["axes"][axis]
    return (rec.get("_flat") or {}).get(axis)  # a setting outside the matrix that differs (issue 15.6)


# ------------------------------------------------------------------------------------------------
# settings outside the matrix and versions of the experiment file (issue 15.6)

#: params that never define a configuration: the seed is folded into mean ± std, and data_root is
#: the dataset's place on disk (resolved against the directory submit ran in), not its content
_NOT_A_SETTING = (SEED_AXIS, "data_root")


def flat_settings(rec: dict) -> Optional[dict]:
    """What defines the run besides its axes, as ``{"template", "params.K", "overrides.K",
    "resources.gpus": value}`` from run.json; None when the record has no run.json (registry-only
    runs, outside work dirs). Resources other than the GPU count (total batch under DDP) do not
    change results."""
    st = rec.get("settings")
    if not st:
        return None
    axes = rec.get("axes") or {}
    out = {}
    if st.get("template"):
        out["template"] = str(st["template"]).replace("\\", "/").rsplit("/", 1)[-1].removesuffix(".py")
    for k, v in (st.get("params") or {}).items():
        if k not in axes and k not in _NOT_A_SETTING:
            out[f"params.{k}"] = v
    for k, v in (st.get("overrides") or {}).items():
        if k not in axes:
            out[f"overrides.{k}"] = v
    res = st.get("resources") or {}
    if "gpus" in res:
        out["resources.gpus"] = res["gpus"]
    return out


def _cell_key(r: dict) -> tuple:
    return (r.get("experiment"), _fmt_value(r["axes"].get(DATASET_AXIS)),
            tuple(sorted((k, _fmt_value(v)) for k, v in r["axes"].items() if k != SEED_AXIS)))


def differing_settings(records: list) -> list:
    """Settings outside the matrix that differ between runs of the same matrix cell (seeds
    folded): each makes its own configuration, else runs of different settings would be averaged
    as if they were seeds."""
    cells = {}
    for r in records:
        if r.get("_flat") is not None:
            cells.setdefault(_cell_key(r), []).append(r["_flat"])
    keys = []
    for flats in cells.values():
        if len(flats) < 2:
            continue
        for k in sorted(set().union(*flats)):
            if k not in keys and len({_fmt_value(f.get(k)) for f in flats}) > 1:
                keys.append(k)
    return keys


def _values(recs: list, key: str) -> str:
    vals = sorted({_fmt_value(r["_flat"].get(key)) or "unset" for r in recs if r.get("_flat") is not None})
    return ", ".join(vals)


def select_versions(records: list, all_versions: bool) -> tuple:
    """(records, notes): runs of older versions of their experiment file (collect's ``version``)
    are left out unless ``all_versions``, with a line saying how many, what differs and how to
    include them."""
    older = [r for r in records if r.get("version") == "older"]
    if not older:
        return records, []
    current = [r for r in records if r.get("version") != "older"]
    exps = sorted({r["experiment"] for r in older})
    keys = differing_settings(older + current)
    cur_cells = {_cell_key(r) for r in current}
    if keys:
        what = "; ".join(f"{k} {_values(older, k)} (now {_values(current, k)})" for k in keys)
        what = f"they differ from the current runs in {what}"
    else:
        gone = sum(1 for r in older if _cell_key(r) not in cur_cells)
        what = f"{gone} of them are matrix cells the file no longer has" if gone else "their settings differ"
    n = len(older)
    runs = f"{n} run{'s' if n != 1 else ''}"
    if all_versions:
        return records, [f"--all-versions: {runs} made by an older version of the experiment file "
                         f"({', '.join(exps)}) are included; {what}."]
    if not current:
        raise UserError(f"every run of {', '.join(exps)} was made by an older version of the experiment file "
                        f"({runs}); submit the current file, or pass --all-versions to report the old runs")
    return current, [f"Left out {runs} made by an older version of the experiment file ({', '.join(exps)}): "
                     f"{what}. Pass --all-versions to include them (each setting that differs becomes a column)."]


def _fmt_value(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (dict, list)):
        import json

        return json.dumps(v, sort_keys=True)
    return str(v)


def pct(x: float) -> str:
    return f"{x * 100:.1f}"


# ------------------------------------------------------------------------------------------------


def choose_axes(records: list, by: list) -> list:
    """The axes that define a configuration: `by` (validated) or those that vary, seeds folded."""
    order = []
    for r in records:
        for k in r["axes"]:
            if k not in order:
                order.append(k)
    known = order + ([EXPERIMENT_AXIS] if EXPERIMENT_AXIS not in order else [])
    if by:
        out = []
        for b in by:
            for a in str(b).split(","):
                a = a.strip()
                if not a:
                    continue
                if a not in known:
                    raise UserError(f"--by {a!r}: no run has this axis; known axes: {', '.join(known)}")
                if a not in out:
                    out.append(a)
        return out
    out = []
    if len({r.get("experiment") for r in records}) > 1:
        out.append(EXPERIMENT_AXIS)
    if any(r.get("source") == "workdir" for r in records) and "workdir" in order:
        out.append("workdir")  # an outside work dir is its own configuration
    for a in order:
        if a in (SEED_AXIS, DATASET_AXIS) or a in out:
            continue
        vals = {_fmt_value(r["axes"][a]) for r in records if r["axes"].get(a) is not None}
        if len(vals) > 1:  # an axis that only some runs have (outside work dirs) does not vary by that
            out.append(a)
    return out


def complete_seed_grid(records: list, extra: tuple = ()) -> list:
    """Add a `missing` record for each seed that other runs of the same experiment and dataset
    have but a configuration lacks (a run nobody submitted still shows up as a gap). ``extra``:
    settings outside the matrix that also tell configurations apart (differing_settings)."""
    groups = {}
    for r in records:
        if r["source"] != "ssflctl" or SEED_AXIS not in r["axes"]:
            continue
        key = (r["experiment"], _fmt_value(r["axes"].get(DATASET_AXIS)))
        groups.setdefault(key, []).append(r)
    extra = []
    for (exp, _ds), recs in groups.items():
        seeds = {}
        for r in recs:
            seeds.setdefault(_fmt_value(r["axes"][SEED_AXIS]), r["axes"][SEED_AXIS])
        by_cfg = {}
        for r in recs:
            cfg = tuple(sorted((k, _fmt_value(v)) for k, v in r["axes"].items() if k != SEED_AXIS)) + \
                tuple((k, _fmt_value((r.get("_flat") or {}).get(k))) for k in extra)
            by_cfg.setdefault(cfg, (r, set()))[1].add(_fmt_value(r["axes"][SEED_AXIS]))
        for cfg, (proto, have) in by_cfg.items():
            for s in sorted(set(seeds) - have, key=lambda s: _sort_key(seeds[s])):
                axes = dict(proto["axes"])
                axes[SEED_AXIS] = seeds[s]
                name = " ".join(f"{k}={_fmt_value(v)}" for k, v in axes.items())
                extra.append({
                    "run_id": "", "experiment": exp, "name": name, "axes": axes, "source": "ssflctl",
                    "state": "missing", "reason": "no run in the workspace", "run_dir": None,
                    "attempts": [], "final": None, "metrics": None, "unavailable": {}, "retry": {},
                    "_flat": proto.get("_flat"), "version": proto.get("version"),
                })
    return records + extra


def long_frame(records: list, metrics: list, by: list):
    """One row per run and metric (bbox metrics, then per-class AP as metric 'class_AP').
    Runs without numbers get one row per metric with an empty value, so nothing disappears.

    ``lr`` is the config lr of the attempt the numbers come from (else the last one). When some
    such attempt trained at another base lr (mmengine's auto_scale_lr, as the job recorded it), the
    columns ``lr_effective`` (that base lr; NaN where not recorded) and ``lr_scale`` (the factor;
    NaN when off or not recorded) follow ``lr``; without one the frame has neither (the CSV and
    JSON of runs without auto_scale_lr are unchanged).

    Built as a frame of one row per run (its columns typed once, on a row per run) repeated by
    ``DataFrame.take`` for its rows, beside the four columns that vary per row (metric, class,
    value, note): at 5000 runs x 56 rows, typing the per-run columns row by row cost 0.3 s."""
    import numpy as np
    import pandas as pd

    axes = []
    for r in records:
        for k in r["axes"]:
            if k not in axes:
                axes.append(k)
    # the dataset axis is the "dataset" column ("" when a run has none); other axes keep their names
    axis_cols = {a: (a if a not in LONG_FIXED else f"axis_{a}") for a in axes if a != DATASET_AXIS}
    prov = any(r.get("source") == "workdir" for r in records)  # outside work dirs: say where numbers come from
    shown = [_shown_attempt(r) for r in records]
    scaled = any(a is not None and lr_differs(a.get("lr"), a.get("lr_effective")) for a in shown)
    order = ("experiment", "run_id", "name", "source", "dataset", *axis_cols.values(), "cfg", "state", "reason",
             "attempts", "attempt", "lr", *(EFFECTIVE_LR_COLS if scaled else ()), "retried", "metric", "class",
             "value", "evaluator", "note", *(PROVENANCE_COLS if prov else ()))
    per_row = ("metric", "class", "value", "note")
    cols = {c: [] for c in order if c not in per_row}   # one entry per run
    rows_of = {c: [] for c in per_row}                   # one entry per row
    counts = []
    for r, att in zip(records, shown):
        fin = r.get("final")
        lr = att["lr"] if att else None
        retried = bool(fin and fin > 1 and any(a.get("state") == "nan" for a in r["attempts"]))
        base = {
            "experiment": r["experiment"], "run_id": r["run_id"], "name": r["name"], "source": r["source"],
            "cfg": r["_cfg"], "dataset": r["_ds"], "state": r["state"], "reason": r["reason"],
            "attempts": len(r["attempts"]), "attempt": fin, "lr": lr, "retried": retried,
        }
        if scaled:
            base["lr_effective"] = att.get("lr_effective") if att else None
            base["lr_scale"] = att.get("lr_scale") if att else None
        for a, c in axis_cols.items():
            base[c] = r["axes"].get(a)
        if prov:
            base.update(provenance_fields(r))
        m = r.get("metrics")
        base["evaluator"] = m["evaluator"] if m else None
        rows = _metric_rows(r, m, metrics)
        if not rows:
            continue
        for c, val in base.items():
            cols[c].append(val)
        counts.append(len(rows))
        for c, vals in zip(per_row, zip(*rows)):
            rows_of[c].extend(vals)
    runs = pd.DataFrame({c: pd.Series(v, dtype="object") if c == "cfg" else v for c, v in cols.items()})
    for c in ("lr", *(EFFECTIVE_LR_COLS if scaled else ())):
        runs[c] = runs[c].astype("float64")
    for c in [*axis_cols.values(), "attempts", "attempt"]:
        types = set(map(type, cols[c])) - {type(None)}
        if types == {int}:
            runs[c] = runs[c].astype("Int64")
    df = runs.take(np.repeat(np.arange(len(counts)), counts)).reset_index(drop=True)
    for c in per_row:
        df[c] = rows_of[c]
    df["value"] = df["value"].astype("float64")
    return df[list(order)]


def _shown_attempt(r: dict) -> Optional[dict]:
    """The attempt record whose lr a run's rows show: the one its numbers come from, else the last."""
    fin = r.get("final")
    att = next((a for a in r["attempts"] if a["attempt"] == fin), None)
    return att if att is not None else (r["attempts"][-1] if r["attempts"] else None)


def _metric_rows(r: dict, m: Optional[dict], metrics: list) -> list:
    """(metric, class, value, note) rows of one run: each asked metric (an empty value with the
    reason when there is none), then its per-class APs."""
    rows = []
    for k in metrics:
        if m is None:
            rows.append((k, "", None, r["state"] if r["state"] != "done" else "no metrics"))
        elif k in (r.get("unavailable") or {}):
            rows.append((k, "", None, r["unavailable"][k]))
        else:
            v = metric_value(m, k)
            if v is None and k == VOC_METRIC and k not in m["bbox"]:
                rows.append((k, "", None, "no VOC metric (not tested with VOCMetric)"))
                continue
            if v is None and k.startswith(SEGM) and k[len(SEGM):] not in (m.get("segm") or {}):
                rows.append((k, "", None, "no segm metrics (a box-only evaluation)"))
                continue
            rows.append((k, "", v, "" if v is not None else "no value (-1: no ground truth)"))
    if m:
        rows.extend(("class_AP", cls, v, "" if v is not None else "no ground truth")
                    for cls, v in m["per_class"].items())
    return rows


def _state_text(recs: list) -> str:
    """'failed: NaN after 3 attempts' or '1 failed, 1 running' for the runs behind an empty cell."""
    states = {}
    for r in recs:
        states.setdefault(r["state"], []).append(r)
    parts = []
    for st in sorted(states, key=lambda s: NOT_DONE_ORDER.index(s) if s in NOT_DONE_ORDER else 99):
        rs = states[st]
        reasons = sorted({r["reason"] for r in rs if r["reason"]})
        head = st if len(rs) == 1 else f"{len(rs)} {st}"
        parts.append(f"{head}: {reasons[0]}" if len(reasons) == 1 else head)
    return "; ".join(parts)


@dataclass
class _Ctx:
    """What every part of the report is computed from (see :func:`_prepare`)."""
    records: list
    metrics: list
    by: list
    base: Optional[tuple]
    base_idx: Optional[int]
    cfg_vals: dict
    cfgs: list
    datasets: list
    df: Any
    stats: dict
    seedvals: dict
    by_cell: dict
    exp_ds: dict
    cfg_exps: dict
    iou_type: str
    delta_keys: list = field(default_factory=list)
    unfinished: set = field(default_factory=set)
    feet: dict = field(default_factory=dict)
    footnotes: list = field(default_factory=list)
    version_notes: list = field(default_factory=list)
    extra: list = field(default_factory=list)    # settings outside the matrix that tell configurations apart


def build(records: list, *, metrics=None, by=(), baseline="loss=focal", title: str = "", iou_type=None,
          all_versions: bool = False) -> Report:
    """The report's content from run records (see collect). iou_type: bbox|segm|both (None: what
    the runs have). Runs made by an older version of their experiment file are left out unless
    ``all_versions``. Raises UserError when there is nothing to report or an option is malformed."""
    ctx = _prepare(records, metrics, by, baseline, iou_type, all_versions)
    main, rows, missing = _main_table(ctx)
    summary, notes = _summary_and_notes(ctx, rows)
    exps = sorted({r["experiment"] for r in ctx.records if r["experiment"]})
    rep = Report(title or _title(exps), summary, main, [], _retried_runs(ctx), _gaps_table(ctx),
                 notes, ctx.df, missing,
                 configs=[(" ".join(x for x in c if x) or "(all)", dict(zip(ctx.by, ctx.cfg_vals[c])))
                          for c in ctx.cfgs],
                 datasets=ctx.datasets, by=ctx.by, records=ctx.records, seedvals=ctx.seedvals, cfg_keys=ctx.cfgs,
                 footnotes=ctx.footnotes)
    rep.per_class = _per_class_tables(ctx, per_class_columns(ctx, rep))
    return rep


def _prepare(records: list, metrics, by, baseline, iou_type, all_versions: bool = False) -> _Ctx:
    """Configurations (the ``by`` axes, then any setting outside the matrix that differs within a
    matrix cell), datasets, the long frame and its mean/std/n per cell."""
    if not records:
        raise UserError("no runs to report; check the experiment names and --workspace, or pass --workdirs")
    records = [dict(r) for r in records]
    for r in records:
        r["_flat"] = flat_settings(r)
    records, version_notes = select_versions(records, all_versions)
    iou_type = resolve_iou_type(records, iou_type)
    metrics = parse_metrics(metrics, voc=any(VOC_METRIC in (r.get("metrics") or {}).get("bbox", {})
                                             for r in records), iou_type=iou_type)
    base = parse_baseline(baseline)
    by = choose_axes(records, list(by or []))
    extra = [k for k in differing_settings(records) if k not in by]
    by = by + extra
    records = complete_seed_grid(records, tuple(extra))
    # configuration and dataset of every record
    cfg_vals = {}
    for r in records:
        vals = tuple(_axis_value(r, a) for a in by)
        key = tuple(_fmt_value(v) for v in vals)
        cfg_vals.setdefault(key, vals)
        r["_cfg"] = key
        # datasets are column groups, unless --by made them rows
        r["_ds"] = "" if DATASET_AXIS in by else _fmt_value(r["axes"].get(DATASET_AXIS))
    base_idx = by.index(base[0]) if base and base[0] in by else None
    if base_idx is not None and not any(k[base_idx] == base[1] for k in cfg_vals):
        base_idx = None  # nothing to compare against: say so in the notes

    def cfg_order(key):
        vals = cfg_vals[key]
        is_base = base_idx is not None and key[base_idx] == base[1]
        return (0 if is_base else 1, tuple(_sort_key(v) for v in vals))

    cfgs = sorted(cfg_vals, key=cfg_order)
    datasets = sorted({r["_ds"] for r in records}, key=lambda d: (d == "", d))
    df = long_frame(records, metrics, by)

    # ---- pandas: mean, sample std (ddof=1), n over seeds
    # numbers of runs still in flight stay out of the means; an outside work dir that stopped early
    # keeps its numbers, marked (footnote) and never bold
    ok = df["state"].isin(WITH_RESULTS) & df["value"].notna()
    bb = df[(df["metric"] != "class_AP") & ok]
    agg = bb.groupby(["cfg", "dataset", "metric"], sort=False)["value"].agg(["mean", "std", "count"])
    # plain dicts from the columns (DataFrame.to_dict and groupby.apply(list) build a Series per
    # group: 0.5 s at 5000 configurations)
    stats = {key: {"mean": m, "std": sd, "count": n} for key, m, sd, n in
             zip(agg.index, agg["mean"].tolist(), agg["std"].tolist(), agg["count"].tolist())}
    ap = bb[bb["metric"] == "AP"]
    seedvals = {}
    for key, v in zip(zip(ap["cfg"].tolist(), ap["dataset"].tolist()), ap["value"].tolist()):
        seedvals.setdefault(key, []).append(v)

    by_cell, exp_ds, cfg_exps = {}, {}, {}
    for r in records:
        by_cell.setdefault((r["_cfg"], r["_ds"]), []).append(r)
        exp_ds.setdefault(r["experiment"], set()).add(r["_ds"])
        cfg_exps.setdefault(r["_cfg"], set()).add(r["experiment"])

    ctx = _Ctx(records, metrics, by, base, base_idx, cfg_vals, cfgs, datasets, df, stats, seedvals, by_cell, exp_ds,
               cfg_exps, iou_type)
    # deltas against the baseline: COCO AP, and VOC mAP@0.5 when the table has it (a VOC study's
    # headline number)
    ctx.delta_keys = [k for k in (VOC_METRIC, "AP") if k in metrics] if base_idx is not None else []
    ctx.unfinished = {(r["_cfg"], r["_ds"]) for r in records if r["state"] == UNFINISHED}
    ctx.feet, ctx.footnotes = footnote_numbers(records)
    ctx.version_notes, ctx.extra = version_notes, extra
    return ctx


def _best_values(ctx: _Ctx, shown: dict) -> dict:
    """(dataset, metric) -> the best displayed mean (only where configurations differ); ``shown``:
    the displayed mean of each (configuration, dataset, metric), as a number."""
    best = {}
    for ds in ctx.datasets:
        for k in ctx.metrics:
            disp = [shown[(c, ds, k)] for c in ctx.cfgs if (c, ds, k) in shown and (c, ds) not in ctx.unfinished]
            if len(disp) >= 2 and len(set(disp)) > 1:  # all equal: nothing to single out
                best[(ds, k)] = max(disp)
    return best


def _main_table(ctx: _Ctx) -> tuple:
    """(Table, its rows, the list of gaps) of the main results."""
    metrics, by, delta_keys = ctx.metrics, ctx.by, ctx.delta_keys
    missing = []
    columns = list(metrics) + [_delta_name(k) for k in delta_keys] + ["n"]
    groups = [(ds, list(columns)) for ds in ctx.datasets]
    rows = []
    shown = {key: float(pct(s["mean"])) for key, s in ctx.stats.items()}  # once per cell, not per comparison
    best = _best_values(ctx, shown)
    for c in ctx.cfgs:
        label = " ".join(x for x in c if x) or "(all)"
        cells = []
        for ds in ctx.datasets:
            cells += _main_cells(ctx, c, ds, label, len(columns), shown, best, missing)
        rows.append(([_fmt_value(v) for v in ctx.cfg_vals[c]], cells))
    stub = list(by) if by else ["configuration"]
    if not by:
        rows = [(["(all)"], cells) for _, cells in rows]
    coco = {"bbox": "COCO bbox", "segm": "COCO segm", "both": "COCO bbox and segm"}[ctx.iou_type]
    main = Table(f"Main results (VOC mAP@0.5 and {coco}, %)" if VOC_METRIC in metrics
                 else f"Main results ({coco}, %)", stub, groups, rows)
    return main, rows, missing


def _main_cells(ctx: _Ctx, c: tuple, ds: str, label: str, width: int, shown: dict, best: dict,
                missing: list) -> list:
    """The main table's cells of configuration ``c`` on dataset ``ds`` (``width`` of them): each
    metric's mean ± std or why there is none, the deltas against the baseline, and n; the gaps
    are added to ``missing``."""
    metrics, stats = ctx.metrics, ctx.stats
    recs = ctx.by_cell.get((c, ds), [])
    if not recs and not any(ds in ctx.exp_ds[e] for e in ctx.cfg_exps[c]):
        # this configuration's experiment never ran on this dataset (e.g. an outside work dir
        # beside a study): not applicable, not a gap
        return [Cell("") for _ in range(width)]
    done = [r for r in recs if r["state"] in WITH_RESULTS and r.get("metrics")]
    others = [r for r in recs if not (r["state"] in WITH_RESULTS and r.get("metrics"))]
    cells = []
    if not recs:  # no run at all (5000 configurations on one dataset each: half the cells)
        cells = [Cell("—, missing" if j == 0 else "—") for j in range(len(metrics))]
        missing.extend(f"{label} / {ds or '-'} / {k}: {cell.text}" for k, cell in zip(metrics, cells))
    else:
        for k in metrics:
            cell, gap = _metric_cell(ctx, c, ds, k, done, others, shown, best)
            cells.append(cell)
            if gap:
                missing.append(f"{label} / {ds or '-'} / {k}: {cell.text}")
    foot = ",".join(str(ctx.feet[id(r)]) for r in recs if id(r) in ctx.feet)
    if foot and metrics:
        cells[-len(metrics)].foot = foot
    for r in recs:
        if r["state"] == UNFINISHED:
            missing.append(f"{label} / {ds or '-'}: {r['name']} unfinished ({r['reason']})")
    for k in ctx.delta_keys:
        cells.append(_delta_cell(c, ds, ctx.base_idx, ctx.base[1], stats, k))
    nd, ne = len(done), len(recs)
    cells.append(Cell(f"{nd}/{ne}" if nd != ne else f"{nd}", mark=any(_lowered_lr(r) for r in done)))
    if done and others:
        missing.append(f"{label} / {ds or '-'}: {nd} of {ne} runs done ({_state_text(others)})")
    return cells


def _metric_cell(ctx: _Ctx, c: tuple, ds: str, k: str, done: list, others: list, shown: dict,
                 best: dict) -> tuple:
    """(Cell, whether it is a gap) of one metric: mean ± sample std over seeds (bold when best),
    else why there is none."""
    s = ctx.stats.get((c, ds, k))
    if s is not None:
        n = int(s["count"])
        txt = pct(s["mean"]) if n == 1 else f"{pct(s['mean'])} ± {pct(s['std'])}"
        isbest = (ds, k) in best and shown[(c, ds, k)] == best[(ds, k)] and (c, ds) not in ctx.unfinished
        return Cell(txt, best=isbest, value=s["mean"]), False
    why = sorted({(r.get("unavailable") or {}).get(k) for r in done} - {None})
    if done and why:
        return Cell(why[0]), True
    if done and k == VOC_METRIC and not any(k in r["metrics"]["bbox"] for r in done):
        return Cell(NO_VOC), False  # not a gap: these runs were not tested with VOCMetric
    if done and k.startswith(SEGM) and not any(r["metrics"].get("segm") for r in done):
        return Cell(NO_SEGM), False  # not a gap: a box-only evaluation beside mask runs
    if done and any(has_metric(r["metrics"], k) for r in done):
        return Cell("n/a (no GT)"), False  # COCOeval -1: no ground truth of this size, a real value
    if done:
        return Cell("—"), True
    return Cell(f"—, {_state_text(others)}" if k == ctx.metrics[0] else "—"), True


def per_class_columns(ctx: _Ctx, rep: Report) -> dict:
    """{dataset: (configuration keys, note)} where a per-class table leaves configurations out
    (none: every configuration is a column). Up to TOP_N + MAX_BASELINES configurations (the AP
    figure's bound, see report.plots) every one is a column; beyond, the table of a dataset has the
    columns the AP figure shows (the best TOP_N by mean AP and the baselines), in table order, and
    a note of what was left out: 88 classes x 5000 configurations would be 440k cells."""
    from ssflctl.report import plots

    if len(ctx.cfgs) <= plots.TOP_N + plots.MAX_BASELINES:
        return {}
    sel = plots.ap_selection(rep)
    out = {}
    for ds in ctx.datasets:
        on = f" on {ds}" if ds else ""
        if ds in sel:
            shown, total, bkeys = sel[ds]
            keep = set(shown)
            keys = [c for c in ctx.cfgs if c in keep]
            left = len(ctx.cfgs) - len(keys)
            if len(shown) < total:
                nb = len([k for k in shown if k in bkeys])
                note = (f"Columns: the best {len(shown) - nb} of the {total} configurations with AP{on} by mean AP"
                        f"{' and the baseline' if nb else ''}, as in the AP figure; {left} configurations left out "
                        "(every one is in the main table).")
            else:
                note = (f"Columns: the {len(keys)} configurations with AP{on}; {left} without numbers{on} left out "
                        "(every one is in the main table).")
        else:
            keys = ctx.cfgs[:plots.TOP_N]
            note = (f"Columns: the first {len(keys)} configurations in table order (none has AP{on}); "
                    f"{len(ctx.cfgs) - len(keys)} left out (every one is in the main table).")
        out[ds] = (keys, note)
    return out


def _per_class_tables(ctx: _Ctx, columns: Optional[dict] = None) -> list:
    """One table per dataset: rows = classes, columns = configurations (``columns``: {dataset:
    (configuration keys, note)} for a dataset whose table leaves some out, see per_class_columns)."""
    df, cfgs, datasets = ctx.df, ctx.cfgs, ctx.datasets
    columns = columns or {}
    per_class = []
    pc = df[(df["metric"] == "class_AP") & df["state"].isin(WITH_RESULTS)]
    if len(pc) and columns:  # only the cells that are shown: the groupby below is per (class, configuration)
        keep = {(ds, c) for ds, (keys, _) in columns.items() for c in keys}
        every = {ds for ds in datasets if ds not in columns}
        pc = pc[[d in every or (d, c) in keep for d, c in zip(pc["dataset"].tolist(), pc["cfg"].tolist())]]
    if len(pc):
        pcagg = pc.groupby(["dataset", "class", "cfg"], sort=False)["value"].agg(["mean", "std", "count"])
        pcstats = pcagg.to_dict("index")
        for ds in datasets:
            # first-seen order; a dict, not `cls not in classes` per (class, configuration) key
            classes = list(dict.fromkeys(cls for (d, cls, _c) in pcstats if d == ds))
            if not classes:
                continue
            ds_cfgs, notes = (columns[ds][0], [columns[ds][1]]) if ds in columns else (cfgs, [])
            cfg_labels = [" ".join(x for x in c if x) or "(all)" for c in ds_cfgs]
            prow = []
            for cls in classes:
                cells, vals = [], []
                for c in ds_cfgs:
                    s = pcstats.get((ds, cls, c))
                    if s is None or not s["count"]:
                        has = (ds, cls, c) in pcstats
                        cells.append(Cell("n/a (no GT)" if has else "—"))
                        continue
                    n = int(s["count"])
                    txt = pct(s["mean"]) if n == 1 else f"{pct(s['mean'])} ± {pct(s['std'])}"
                    cells.append(Cell(txt, value=s["mean"]))
                    vals.append(float(pct(s["mean"])))
                if len(vals) >= 2 and len(set(vals)) > 1:
                    top = max(vals)  # once per row, not per cell (quadratic in configurations)
                    for cell in cells:
                        if cell.value is not None and float(pct(cell.value)) == top:
                            cell.best = True
                prow.append(([cls], cells))
            per_class.append(Table(f"Per-class AP{' — ' + ds if ds else ''} (%)", ["class"], [("", cfg_labels)], prow,
                                   notes=notes))
    return per_class


def _retried_runs(ctx: _Ctx) -> list:
    """One line per run that needed more than one attempt (or went NaN)."""
    records, cfgs = ctx.records, ctx.cfgs
    retries, seen = [], set()
    cfg_pos = {c: i for i, c in enumerate(cfgs)}  # not cfgs.index per record (quadratic)
    for r in sorted(records, key=lambda r: (cfg_pos[r["_cfg"]], r["_ds"], _sort_key(r["axes"].get(SEED_AXIS)))):
        if r.get("test_id"):  # test cells share their training run's attempts: listed once per run
            if r["run_id"] in seen:
                continue
            seen.add(r["run_id"])
        atts = r["attempts"]
        if len(atts) < 2 and not any(a.get("state") == "nan" for a in atts):
            continue
        steps = []
        for a in atts:
            st = a.get("state") or "?"
            why = a.get("reason") or ""
            steps.append(f"attempt {a['attempt']} lr {lr_text(a)}: {st}{' (' + why + ')' if why and st != 'done' else ''}")
        retries.append(f"{r['run_id'] or r['name']}: " + " → ".join(steps))
    return retries


def _gaps_table(ctx: _Ctx):
    """Every run without results, with its state and reason."""
    records, cfgs = ctx.records, ctx.cfgs
    grow = []
    cfg_pos = {c: i for i, c in enumerate(cfgs)}
    for r in sorted(records, key=lambda r: (cfg_pos[r["_cfg"]], r["_ds"], _sort_key(r["axes"].get(SEED_AXIS)), r["name"])):
        if r["state"] in WITH_RESULTS and r.get("metrics"):
            continue
        seed = r["axes"].get(SEED_AXIS)
        label = (r["run_id"] or "—") + (f" [test {r['test_name']}]" if r.get("test_id") else "")
        grow.append(([label], [Cell(" ".join(x for x in r["_cfg"] if x) or "(all)"),
                                             Cell(r["_ds"] or "—"), Cell(_fmt_value(seed) or "—"),
                                             Cell(r["state"]), Cell(r["reason"] or "—")]))
    gaps = Table("Runs without results", ["run"], [("", ["configuration", "dataset", "seed", "state", "reason"])], grow,
                 numeric=False)
    return gaps


def _summary_and_notes(ctx: _Ctx, rows: list) -> tuple:
    """(summary lines, notes) under the tables."""
    records, metrics, by, base, delta_keys = ctx.records, ctx.metrics, ctx.by, ctx.base, ctx.delta_keys
    footnotes, unfinished = ctx.footnotes, ctx.unfinished
    show_delta = bool(delta_keys)
    counts = {}
    for r in records:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    order = ["done"] + list(NOT_DONE_ORDER)
    parts = [f"{counts[s]} {s}" for s in sorted(counts, key=lambda s: order.index(s) if s in order else 99)]
    exps = sorted({r["experiment"] for r in records if r["experiment"]})
    summary = [
        f"Experiments: {', '.join(exps) or '—'}. Runs: {len(records)} ({', '.join(parts)}).",
        "COCO bbox metrics in %: mean ± sample std (ddof=1) over seeds; n = runs with results / runs.",
    ]
    if VOC_METRIC in metrics:
        summary.append(f"{VOC_METRIC}: Pascal VOC mAP at IoU 0.5 (mmdet VOCMetric), in % likewise.")
    notes = list(ctx.version_notes)
    if ctx.extra:
        notes.append(f"Runs of the same matrix cell differ in {', '.join(ctx.extra)} (settings outside the matrix, "
                     "e.g. from an edited experiment file): each value is its own configuration, never averaged "
                     "with the others as if they were seeds.")
    if show_delta:
        what = " and ".join(f"{_delta_name(k)}: {k} points" for k in delta_keys)
        summary.append(f"{what} against the baseline {base[0]}={base[1]} with the other axes equal. "
                       "Bold: the best value of each column.")
    elif base:
        notes.append(no_baseline(records, by, base))
        summary.append("Bold: the best value of each column.")
    else:
        summary.append("Bold: the best value of each column.")
    if any(cell.mark for _, cells in rows for cell in cells):
        notes.append("†: at least one run of this cell finished only after its learning rate was lowered "
                     "(see the list of retried runs).")
    for r in records:
        if r["state"] == "done" and r.get("metrics") and "NaN" in (r.get("reason") or "") and r["source"] == "workdir":
            notes.append(f"{r['name']}: {r['reason']}.")
    if footnotes:
        notes.append(f"{', '.join(f'[{n}]' for n in range(1, len(footnotes) + 1))}: where an outside work dir's "
                     "numbers come from and its training run's config (--pick: test|last|best; default: the test "
                     "result, else the last validation).")
    if unfinished:
        notes.append("unfinished: the work dir stopped before its config's max_epochs/max_iters; its numbers are "
                     "shown, never bold, and --strict fails.")
    if any(c.text == "n/a (no GT)" for _, cells in rows for c in cells):
        notes.append("n/a (no GT): COCOeval reports -1 because the test set has no ground truth of that size.")
    if any(c.text == NO_SEGM for _, cells in rows for c in cells):
        notes.append(f"{NO_SEGM}: these runs have no segm evaluation (box-only detectors).")
    if any(c.text == NO_VOC for _, cells in rows for c in cells):
        notes.append(f"{NO_VOC}: these runs were not tested with mmdet's VOCMetric (no {VOC_METRIC}).")
    if any("n/a (VOCMetric)" in (r.get("unavailable") or {}).values() for r in records):
        notes.append("n/a (VOCMetric): the work dir has only mmdet VOCMetric's mAP@0.5 (no COCO numbers).")
    if any("n/a (CocoMetric)" in (r.get("unavailable") or {}).values() for r in records):
        notes.append("n/a (CocoMetric): the work dir has only mmdet CocoMetric numbers (AP, AP50, AP75, APs, APm, "
                     "APl); the AR numbers need a pycocotools summary in its log.")
    return summary, notes


#: values of an axis a note names before it says how many there are in all
NAMED_VALUES = 20


def no_baseline(records: list, by: list, base: tuple) -> str:
    """Why there is no ΔAP column, saying what is really missing."""
    axis, value = base
    seen = {}  # first-seen order; a dict, not a list scan per record (quadratic in configurations)
    for r in records:
        v = r["axes"].get(axis) if axis in r["axes"] else ((r.get("settings") or {}).get("params") or {}).get(axis)
        if v is not None:
            seen.setdefault(_fmt_value(v), None)
    vals = list(seen)
    varying = ", ".join(by) or "none"
    if not vals:
        return (f"No baseline: no run has a {axis} axis or param, so there is nothing to compare against "
                f"{axis}={value}; pass --baseline AXIS=VALUE for an axis that varies (varying: {varying}).")
    if axis not in by and len(vals) == 1:
        if vals[0] == value:
            return (f"No baseline comparison: every run has {axis}={value}, so there is no other configuration to "
                    f"compare with; the baseline needs a {axis} axis with another value (e.g. {axis}: [{value}, ...] "
                    f"in the matrix), or pass --baseline AXIS=VALUE for an axis that varies (varying: {varying}).")
        return (f"No baseline: every run has {axis}={vals[0]}, none {axis}={value}; add {value} to the {axis} axis "
                f"or pass --baseline AXIS=VALUE for an axis that varies (varying: {varying}).")
    listed = ", ".join(vals[:NAMED_VALUES]) + (f", … ({len(vals)} in all)" if len(vals) > NAMED_VALUES else "")
    return (f"No baseline: no configuration has {axis}={value} ({axis} values: {listed}); "
            f"pass --baseline {axis}=<one of them>.")


def _lowered_lr(r: dict) -> bool:
    """The run's results come from an attempt at a lower lr than its first attempt."""
    atts = {a["attempt"]: a for a in r["attempts"]}
    first, fin = atts.get(1), atts.get(r.get("final"))
    if not first or not fin or fin is first:
        return False
    if first.get("lr") is not None and fin.get("lr") is not None:
        return fin["lr"] < first["lr"]
    return any(a.get("state") == "nan" for a in r["attempts"])


def _delta_name(metric: str) -> str:
    return "ΔAP" if metric == "AP" else f"Δ{metric}"


def _delta_cell(c, ds, base_idx, base_value, stats, metric: str = "AP") -> Cell:
    if c[base_idx] == base_value:
        return Cell("baseline" if (c, ds, metric) in stats else "—")
    bc = list(c)
    bc[base_idx] = base_value
    b = stats.get((tuple(bc), ds, metric))
    s = stats.get((c, ds, metric))
    if b is None or s is None:
        return Cell("—")
    d = (s["mean"] - b["mean"]) * 100
    d = 0.0 if abs(d) < 0.05 else d
    return Cell(f"{d:+.1f}", value=d / 100)


def _title(exps: list) -> str:
    return "ssflctl report" + (": " + ", ".join(exps) if exps else "")


# ------------------------------------------------------------------------------------------------
# outside work dirs: segm metrics, provenance, footnotes (records of report/mmdet_workdir.py)


def resolve_iou_type(records: list, iou_type=None) -> str:
    """--iou-type: bbox|segm|both as asked, else what the runs have (segm and bbox: both)."""
    if iou_type is not None:
        t = str(iou_type).lower()
        if t not in IOU_TYPES:
            raise UserError(f"--iou-type {iou_type!r}: choose one of {', '.join(IOU_TYPES)}")
        return t
    ms = [r["metrics"] for r in records if r.get("metrics")]
    if not any(m.get("segm") for m in ms):
        return "bbox"
    return "both" if any(any(k != VOC_METRIC for k in m.get("bbox", {})) for m in ms) else "segm"


def metric_value(m: dict, k: str):
    """The value of metric name `k` ("AP", "segm AP", "VOC mAP@0.5") in a record's metrics."""
    if k.startswith(SEGM):
        return (m.get("segm") or {}).get(k[len(SEGM):])
    return m["bbox"].get(k)


def has_metric(m: dict, k: str) -> bool:
    return k[len(SEGM):] in (m.get("segm") or {}) if k.startswith(SEGM) else k in m["bbox"]


def provenance_fields(r: dict) -> dict:
    """The PROVENANCE_COLS of one record (None where unknown or not a work dir)."""
    p, c = r.get("provenance") or {}, r.get("config") or {}
    return {"result_split": p.get("split"), "result_timestamp": p.get("timestamp"), "result_epoch": p.get("epoch"),
            "result_iter": p.get("iter"), "result_checkpoint": p.get("checkpoint"), "result_pick": p.get("pick"),
            "result_file": p.get("file"), "config_file": c.get("file"), "optimizer": c.get("optimizer"),
            "batch_size": c.get("batch_size"), "max_epochs": c.get("max_epochs"), "max_iters": c.get("max_iters")}


def footnote_numbers(records: list) -> tuple:
    """({id(record): n}, ["line n"]) for the outside work dirs (mmdet_workdir.describe)."""
    from ssflctl.report.mmdet_workdir import describe

    feet, lines = {}, []
    for r in records:
        if r.get("source") != "workdir" or not (r.get("provenance") or r.get("config") or r.get("state") == "unreadable"):
            continue
        lines.append(describe(r))
        feet[id(r)] = len(lines)
    return feet, lines

"""`ssflctl report`: the "VOC mAP@0.5" column (runs tested with VOCMetric) and the HTML gallery
(`--gallery N`: GT | predictions pictures of one run per configuration, embedded as JPEG data).

A hand-made workspace (no training): experiment ssd_voc_focal, gamma {1, 2} x seed {1, 2}, each
run tested (metrics.json with "voc": {"mAP50"}, detections.bbox.json, config.py over a few grey
images), and gamma 0.5 finished but without a detections dump.
"""
from __future__ import annotations

import base64
import io
import json
import re
import statistics

import numpy as np
import pytest

from conftest import run_cli

pytestmark = pytest.mark.unit

W, H = 120, 90
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
MAP50 = {(1.0, 1): 0.512345678901, (1.0, 2): 0.498765432109, (2.0, 1): 0.6012, (2.0, 2): 0.5871,
         (0.5, 1): 0.45}
GT = [{"image_id": 1, "category_id": 1, "bbox": [10, 20, 40, 50]},
      {"image_id": 2, "category_id": 2, "bbox": [60, 10, 30, 30]},
      {"image_id": 3, "category_id": 1, "bbox": [30, 30, 50, 40]}]


def _dets(seed: int) -> list:
    # seed 1 finds the objects; seed 2 puts its boxes elsewhere (a picture of the wrong run differs)
    if seed == 1:
        return [{**g, "bbox": [v + 2 for v in g["bbox"]], "score": 0.9} for g in GT]
    return [{"image_id": g["image_id"], "category_id": g["category_id"], "bbox": [70, 50, 30, 30], "score": 0.8}
            for g in GT]


def _run(ws, data, exp, gamma, seed, voc=True, dets=True, rid=None):
    rid = rid or f"{exp}-g{gamma:g}-s{seed}-0000000{seed}"
    rdir = ws / "runs" / rid
    adir = rdir / "attempt-1"
    adir.mkdir(parents=True)
    (rdir / "run.json").write_text(json.dumps({
        "run_id": rid, "name": rid[:-9], "experiment": exp, "axes": {"gamma": gamma, "seed": seed}, "retry": {}}))
    (adir / "attempt.json").write_text(json.dumps({"run_id": rid, "attempt": 1, "lr": 0.001, "reason": "first"}))
    (adir / "outcome.json").write_text(json.dumps({"outcome": "done", "reason": ""}))
    ann = str(data / "test.json")
    m = {"bbox": {k: 0.3 + 0.01 * seed + 0.1 * gamma for k in METRICS}, "per_class": {"person": 0.3, "car": 0.2},
         "num_images": 3, "num_detections": 3, "evaluator": "pycocotools", "ann_file": ann, "checkpoint": "epoch_1.pth"}
    if voc:
        m["voc"] = {"mAP50": MAP50[(gamma, seed)], "eval_mode": "11points", "evaluator": "mmdet.VOCMetric"}
    (adir / "metrics.json").write_text(json.dumps(m))
    (adir / "config.py").write_text(
        "test_dataloader = dict(batch_size=1, dataset=dict(type='CocoDataset', "
        f"data_root={str(data) + '/'!r}, ann_file='test.json', data_prefix=dict(img='images/')))\n")
    if dets:
        (adir / "detections.bbox.json").write_text(json.dumps(_dets(seed)))
    return adir


@pytest.fixture
def ws(tmp_path):
    from PIL import Image

    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    rng = np.random.RandomState(0)
    images = []
    for i in (1, 2, 3):
        arr = np.clip(128 + rng.randint(-20, 21, (H, W, 1)), 0, 255).repeat(3, axis=2).astype(np.uint8)
        Image.fromarray(arr).save(data / "images" / f"img{i}.png")
        images.append({"id": i, "file_name": f"img{i}.png", "width": W, "height": H})
    anns = [{**a, "id": k + 1, "area": a["bbox"][2] * a["bbox"][3], "iscrowd": 0} for k, a in enumerate(GT)]
    (data / "test.json").write_text(json.dumps({
        "images": images, "annotations": anns, "categories": [{"id": 1, "name": "person"}, {"id": 2, "name": "car"}]}))
    ws = tmp_path / "ws"
    dirs = {(g, s): _run(ws, data, "ssd_voc_focal", g, s) for g in (1.0, 2.0) for s in (1, 2)}
    dirs[(0.5, 1)] = _run(ws, data, "ssd_voc_focal", 0.5, 1, dets=False)
    return ws, data, dirs


# ------------------------------------------------------------------------------- VOC column


def test_voc_column_is_reported_with_seed_statistics(ws):
    from ssflctl.report import build_report, make_report
    from ssflctl.report.aggregate import pct

    ws, _data, _dirs = ws
    rep = make_report(ws, baseline="gamma=1")
    cols = rep.main.flat_columns()
    assert cols[:2] == ["VOC mAP@0.5", "AP"] and cols[-3:] == ["ΔVOC mAP@0.5", "ΔAP", "n"] and len(cols) == 1 + 12 + 3
    rows = {stub[0]: cells for stub, cells in rep.main.rows}
    for g in (1.0, 2.0):
        vals = [MAP50[(g, 1)], MAP50[(g, 2)]]
        assert rows[f"{g:g}"][0].text == f"{pct(statistics.mean(vals))} ± {pct(statistics.stdev(vals))}"
    assert rows["0.5"][0].text == pct(0.45)
    assert rows["2"][0].best and not rows["1"][0].best
    # the VOC study's own delta against the baseline gamma=1, beside ΔAP
    d = 100 * (statistics.mean([MAP50[(2.0, 1)], MAP50[(2.0, 2)]]) - statistics.mean([MAP50[(1.0, 1)], MAP50[(1.0, 2)]]))
    assert rows["1"][13].text == "baseline" and rows["2"][13].text == f"{d:+.1f}"
    assert "Main results (VOC mAP@0.5 and COCO bbox, %)" == rep.main.title
    md = build_report(ws, baseline="gamma=1")
    assert "VOC mAP@0.5: Pascal VOC mAP at IoU 0.5" in md and "| VOC mAP@0.5 | AP |" in md
    # CSV/JSON: the raw fraction, full precision
    rows_json = json.loads(build_report(ws, fmt="json"))
    v = [r for r in rows_json if r["metric"] == "VOC mAP@0.5" and r["run_id"].endswith("g1-s1-00000001")]
    assert len(v) == 1 and v[0]["value"] == MAP50[(1.0, 1)]
    assert "VOC mAP@0.5" in build_report(ws, fmt="csv")


def test_metrics_option_spells_voc(ws):
    from ssflctl.errors import UserError
    from ssflctl.report import make_report

    ws, _data, _dirs = ws
    for spelling in ("voc,AP", "VOC mAP@0.5,ap", "voc_map50,AP", "VOC-mAP50,AP"):
        rep = make_report(ws, baseline="gamma=1", metrics=spelling)
        assert rep.main.flat_columns() == ["VOC mAP@0.5", "AP", "ΔVOC mAP@0.5", "ΔAP", "n"], spelling
    rep = make_report(ws, baseline="gamma=1", metrics="AP")
    assert rep.main.flat_columns() == ["AP", "ΔAP", "n"]
    for bad in ("mAP", "voc2"):
        with pytest.raises(UserError, match="VOC"):
            make_report(ws, metrics=bad)
    proc = run_cli("report", "-w", ws, "--metrics", "VOC,AP50", "--baseline", "gamma=1")
    assert proc.returncode == 0, proc.stderr
    assert "| VOC mAP@0.5 | AP50 |" in proc.stdout


def test_runs_without_voc_metric_say_so_and_are_not_gaps(ws):
    from ssflctl.report import build_report, make_report

    ws, data, _dirs = ws
    _run(ws, data, "coco_runs", 1.0, 1, voc=False, rid="coco-g1-s1-00000001")
    rep = make_report(ws, baseline="gamma=1")
    rows = {tuple(stub): cells for stub, cells in rep.main.rows}
    assert rows[("coco_runs", "1")][0].text == "n/a (no VOCMetric)"
    assert rows[("coco_runs", "1")][1].text == pct_of(0.3 + 0.01 + 0.1)
    assert rows[("ssd_voc_focal", "1")][0].text.startswith("50.6 ±")
    # not a gap (--strict): only gamma 0.5's seed 2, which nobody ran, is missing
    assert rep.missing == ["ssd_voc_focal 0.5 / -: 1 of 2 runs done (missing: no run in the workspace)"]
    assert any("n/a (no VOCMetric)" in n for n in rep.notes)
    long = json.loads(build_report(ws, fmt="json"))
    row = [r for r in long if r["run_id"] == "coco-g1-s1-00000001" and r["metric"] == "VOC mAP@0.5"]
    assert row[0]["value"] is None and "no VOC metric" in row[0]["note"]
    # without any VOC run, the report is as before: no VOC column
    rep = make_report(ws, ["coco_runs"])
    assert "VOC mAP@0.5" not in rep.main.flat_columns() and rep.main.title == "Main results (COCO bbox, %)"


def test_outside_workdir_with_vocmetric_only(ws, tmp_path):
    from ssflctl.report import build_report, make_report
    from ssflctl.report.collect import read_workdir

    ws, _data, _dirs = ws
    wd = tmp_path / "ssd300_voc0712"
    vis = wd / "20260101_120000" / "vis_data"
    vis.mkdir(parents=True)
    (vis / "scalars.json").write_text(
        '{"lr": 0.001, "loss": 5.1, "iter": 50, "epoch": 1, "step": 50}\n'
        '{"pascal_voc/mAP": 0.7012345, "pascal_voc/AP50": 0.701, "step": 1}\n')
    rec = read_workdir(wd)
    assert rec["state"] == "done" and rec["metrics"]["bbox"] == {"VOC mAP@0.5": 0.7012345}
    assert rec["unavailable"]["AP"] == "n/a (VOCMetric)"
    rep = make_report(ws, baseline="gamma=1", metrics="voc,AP", workdirs=[wd])
    rows = {tuple(stub): [c.text for c in cells] for stub, cells in rep.main.rows}
    assert rows[("workdirs", "ssd300_voc0712", "")][:2] == ["70.1", "n/a (VOCMetric)"]
    assert any(n.startswith("n/a (VOCMetric)") for n in rep.notes)
    assert not any("CocoMetric" in n for n in rep.notes)
    # with other IoU thresholds too, mAP is their mean: AP50 is the VOC number then
    (vis / "scalars.json").write_text(
        '{"pascal_voc/mAP": 0.5, "pascal_voc/AP50": 0.7, "pascal_voc/AP75": 0.3, "step": 1}\n')
    assert read_workdir(wd)["metrics"]["bbox"] == {"VOC mAP@0.5": 0.7}
    assert "70.0" in build_report(ws, ["workdirs"], metrics="voc", workdirs=[wd])


def pct_of(x):
    from ssflctl.report.aggregate import pct

    return pct(x)


# ------------------------------------------------------------------------------- gallery


def _jpegs(page: str, gallery_id: str) -> list:
    from PIL import Image

    m = re.search(rf'<div class="gallery" id="{gallery_id}">(.*?)</div>', page, re.S)
    assert m, gallery_id
    out = []
    for b64 in re.findall(r'src="data:image/jpeg;base64,([A-Za-z0-9+/=]+)"', m.group(1)):
        with Image.open(io.BytesIO(base64.b64decode(b64))) as im:
            out.append(np.asarray(im.convert("RGB")).astype(int))
    return out


def test_html_gallery_shows_one_run_per_configuration(ws, tmp_path):
    from PIL import Image

    from ssflctl.report import show
    from ssflctl.report import build_report

    ws, _data, dirs = ws
    page = build_report(ws, fmt="html", baseline="gamma=1", gallery=2)
    assert "<h2>Detections (ground truth | predictions)</h2>" in page
    assert page.count("data:image/jpeg;base64,") == 4  # 2 pictures x gamma 1 and 2; none for gamma 0.5
    caps = re.findall(r"<h3>(.*?)</h3>", page)
    assert caps == ["gamma=1: ssd_voc_focal-g1-s1-00000001 (attempt-1)", "gamma=0.5",
                    "gamma=2: ssd_voc_focal-g2-s1-00000001 (attempt-1)"]  # baseline first
    assert "no pictures: no detections.bbox.json" in page
    # the pictures are those `ssflctl show` draws for the lowest seed's run (JPEG: close, not equal;
    # the other seed's boxes are elsewhere)
    pics = _jpegs(page, "gallery-1")
    own = show.show(dirs[(1.0, 1)], n=2, out_dir=tmp_path / "s1")
    other = show.show(dirs[(1.0, 2)], n=2, out_dir=tmp_path / "s2")
    for pic, mine, theirs in zip(pics, own, other):
        a = np.asarray(Image.open(mine).convert("RGB")).astype(int)
        b = np.asarray(Image.open(theirs).convert("RGB")).astype(int)
        assert pic.shape == a.shape
        strong = lambda x, y: int((np.abs(x - y).max(axis=2) > 60).sum())  # noqa: E731  (box edges, labels)
        assert np.abs(pic - a).mean() < np.abs(pic - b).mean() and 3 * strong(pic, a) < strong(pic, b)
    assert "data:image/jpeg" not in build_report(ws, fmt="html", baseline="gamma=1")  # default: no gallery


def test_gallery_option_on_the_cli(ws, tmp_path):
    ws, _data, _dirs = ws
    out = tmp_path / "site" / "index.html"
    proc = run_cli("report", "-w", ws, "--out", out, "--gallery", "1", "--baseline", "gamma=1")
    assert proc.returncode == 0, proc.stderr
    page = out.read_text()
    assert page.count("data:image/jpeg;base64,") == 2 and "http" not in page.lower()
    assert sorted(p.name for p in out.parent.iterdir()) == ["index.html"]  # self-contained
    bad = run_cli("report", "-w", ws, "--gallery", "2")
    assert bad.returncode == 2 and "only the HTML report has a gallery" in bad.stderr
    assert "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_gallery_shrinks_wide_pictures(tmp_path):
    from PIL import Image

    from ssflctl.report.gallery import MAX_WIDTH, _shrink

    Image.new("RGB", (MAX_WIDTH * 2, 300), (200, 10, 10)).save(tmp_path / "wide.png")
    with Image.open(io.BytesIO(_shrink(tmp_path / "wide.png"))) as im:
        assert im.format == "JPEG" and im.size == (MAX_WIDTH, 150)
    Image.new("RGB", (100, 50), (0, 0, 0)).save(tmp_path / "small.png")
    with Image.open(io.BytesIO(_shrink(tmp_path / "small.png"))) as im:
        assert im.size == (100, 50)


_PROBE = """<script>window.addEventListener('load', function () {
  var d = document.createElement('pre'); d.id = 'probe';
  d.textContent = JSON.stringify(Array.from(document.querySelectorAll('.gallery img')).map(function (i) {
    return i.complete ? [i.naturalWidth, i.naturalHeight] : [0, 0]; }));
  document.body.appendChild(d); });</script></body>"""


@pytest.mark.browser
def test_gallery_pictures_load_in_headless_chromium(ws, tmp_path):
    import shutil
    import subprocess

    from ssflctl.report import build_report
    from ssflctl.report.show import GAP, HEADER

    ws, _data, _dirs = ws
    page = build_report(ws, fmt="html", baseline="gamma=1", gallery=2)
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", _PROBE, 1))
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    dom = subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                          "--disable-background-networking", "--disable-component-update", "--disable-sync",
                          f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000", "--dump-dom",
                          probe.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    start = dom.stdout.index('<pre id="probe">') + len('<pre id="probe">')
    sizes = json.loads(dom.stdout[start: dom.stdout.index("</pre>", start)])
    assert sizes == [[2 * W + GAP, H + HEADER]] * 4  # every picture decoded at its own size

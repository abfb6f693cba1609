"""An edited experiment file (issue 15.6): runs of the old and the new version are never averaged as
if they were seeds; the report leaves the old ones out (saying how many, what differs and how to
include them) or, with --all-versions, shows them as their own configurations. And a baseline
that cannot exist says what is really missing.

Submission through the fake scheduler and the light renderer; the node is played by writing the
run directory through ssflctl.workdir.
"""
import pytest

import submit_light_job as light
from ssflctl import backends
from ssflctl.backends import JobKind
from ssflctl.control import submit as submit_mod
from ssflctl.errors import UserError
from ssflctl.workdir.layout import RunDir
from ssflctl.workdir.records import Outcome

pytestmark = pytest.mark.unit

EXP = """\
name: edited
template: retinanet_tiny
datasets:
  synth: {{root: {root}}}
matrix:
  loss: [{losses}]
  seed: [0, 1]
params: {{max_epochs: {epochs}}}
resources: {{cpus: 1, mem: 1G, time: "00:10:00"}}
executor: {{type: local}}
"""


@pytest.fixture
def fake():
    backends.register("local", "ssflctl.backends.fake:FakeBackend")
    yield backends.get("local")
    backends.register("local", "ssflctl.backends.local:LocalBackend")


def submit_and_finish(tmp_path, fake, epochs, ap, losses="focal, ssfl"):
    (tmp_path / "data").mkdir(exist_ok=True)
    path = tmp_path / "edited.yaml"
    path.write_text(EXP.format(root=tmp_path / "data", epochs=epochs, losses=losses))
    res = submit_mod.submit(path, tmp_path / "ws", fns=light.FNS, render=light.light_render)
    for item in res.submitted:
        a = RunDir.of(tmp_path / "ws", item.run.run_id).attempt(item.attempt)
        a.write_outcome(Outcome.from_json({"outcome": "done", "reason": "trained"}))
        bonus = 0.1 if item.run.axes["loss"] == "ssfl" else 0.0
        a.write_metrics({"bbox": {"AP": ap + bonus + 0.01 * item.run.axes["seed"]}})
        fake.set(item.job_id, JobKind.COMPLETED)
        fake.set(item.test_job_id, JobKind.COMPLETED)
    return res


def test_an_edited_file_does_not_mix_old_and_new_runs(tmp_path, fake):
    from ssflctl.report import make_report
    from ssflctl.report.writers import markdown

    ws = tmp_path / "ws"
    old = submit_and_finish(tmp_path, fake, epochs=1, ap=0.1)
    new = submit_and_finish(tmp_path, fake, epochs=2, ap=0.5)
    assert len(old.submitted) == len(new.submitted) == 4  # new settings, new run ids
    assert not {p.run.run_id for p in old.submitted} & {p.run.run_id for p in new.submitted}

    rep = make_report(ws, ["edited"], metrics="AP")
    assert [(r[0], [c.text for c in r[1]]) for r in rep.main.rows] == [
        (["focal"], ["50.5 ± 0.7", "baseline", "2"]), (["ssfl"], ["60.5 ± 0.7", "+10.0", "2"])]
    note = next(n for n in rep.notes if n.startswith("Left out"))
    assert note == ("Left out 4 runs made by an older version of the experiment file (edited): they differ from "
                    "the current runs in params.max_epochs 1 (now 2). Pass --all-versions to include them (each "
                    "setting that differs becomes a column).")
    assert note in markdown(rep)

    rep = make_report(ws, ["edited"], metrics="AP", all_versions=True)
    assert rep.main.stub == ["loss", "params.max_epochs"]
    assert [(r[0], r[1][0].text, r[1][-1].text) for r in rep.main.rows] == [
        (["focal", "1"], "10.5 ± 0.7", "2"), (["focal", "2"], "50.5 ± 0.7", "2"),
        (["ssfl", "1"], "20.5 ± 0.7", "2"), (["ssfl", "2"], "60.5 ± 0.7", "2")]
    assert any(n.startswith("--all-versions: 4 runs made by an older version") for n in rep.notes)
    assert any("differ in params.max_epochs" in n for n in rep.notes)


def test_without_a_version_record_differing_settings_are_still_apart(tmp_path, fake):
    """Workspaces from before the version record: every run counts, but settings outside the matrix
    that differ within a cell still make their own configurations."""
    from ssflctl.report import make_report
    from ssflctl.workdir import versions

    submit_and_finish(tmp_path, fake, epochs=1, ap=0.1)
    submit_and_finish(tmp_path, fake, epochs=2, ap=0.5)
    versions.version_path(tmp_path / "ws", "edited").unlink()
    rep = make_report(tmp_path / "ws", ["edited"], metrics="AP")
    assert [r[0] for r in rep.main.rows] == [["focal", "1"], ["focal", "2"], ["ssfl", "1"], ["ssfl", "2"]]
    assert all(r[1][-1].text == "2" for r in rep.main.rows)  # never n 4 (two versions averaged as seeds)
    assert not any(n.startswith("Left out") for n in rep.notes)


def test_only_old_runs_is_one_line(tmp_path, fake):
    from ssflctl.report import make_report
    from ssflctl.workdir import versions

    submit_and_finish(tmp_path, fake, epochs=1, ap=0.1)
    versions.record(tmp_path / "ws", "edited", tmp_path / "edited.yaml", ["something-else-00000000"])
    with pytest.raises(UserError, match="every run of edited was made by an older version.*--all-versions"):
        make_report(tmp_path / "ws", ["edited"], metrics="AP")


def test_no_baseline_says_what_is_missing(tmp_path, fake):
    from ssflctl.report import make_report
    from ssflctl.report.writers import markdown

    submit_and_finish(tmp_path, fake, epochs=1, ap=0.1, losses="focal")
    rep = make_report(tmp_path / "ws", ["edited"], metrics="AP")
    text = markdown(rep)
    assert "no configuration has loss=focal" not in text
    assert ("No baseline comparison: every run has loss=focal, so there is no other configuration to compare with; "
            "the baseline needs a loss axis with another value (e.g. loss: [focal, ...] in the matrix)") in text
    rep = make_report(tmp_path / "ws", ["edited"], metrics="AP", baseline="loss=ssfl")
    assert "No baseline: every run has loss=focal, none loss=ssfl; add ssfl to the loss axis" in markdown(rep)
    rep = make_report(tmp_path / "ws", ["edited"], metrics="AP", baseline="depth=50")
    assert "No baseline: no run has a depth axis or param" in markdown(rep)

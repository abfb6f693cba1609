"""Fuzz the experiment loader (issue 20, "Done when"): every generated YAML document ends in a plan or
in one UserError line (exit 2 at the CLI) within a time bound — never another exception.

Two populations: experiment files built from the schema's own vocabulary with random values and
keys (most are close to valid, so validation goes deep: matrix, include/exclude, datasets, params,
overrides, executor, retry), and text mutations of them and of YAML punctuation (garbage). About
2500 documents in ~40-60 s on 2 shared cores; a fixed derandomised seed keeps CI reproducible.
"""
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings, strategies as st

from ssflctl.errors import UserError
from ssflctl.plan import spec

pytestmark = pytest.mark.unit

BOUND_S = 2.0
_DIR = Path(tempfile.mkdtemp(prefix="ssflctl-fuzz-"))

WORDS = ["name", "template", "datasets", "matrix", "params", "overrides", "resources", "executor", "retry",
         "test", "description", "loss", "dataset", "seed", "lr", "include", "exclude", "root", "gpus", "cpus",
         "mem", "time", "type", "slurm", "local", "partition", "max_parallel", "factor", "max_attempts",
         "on_nan", "from", "max_epochs", "batch_size", "classes", "focal", "ssfl", "fcal", "gamma", "gama",
         "model.bbox_head.loss_cls.gamma", "optim_wrapper.optimizer.weight_decay", "synth", "coco",
         "retinanet_tiny", "tiny", "<<", "sbatch", "setup", "array_parallelism", "img_scale", "load_from"]
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-10, 2 ** 33), st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(WORDS), st.text(max_size=8),
    st.sampled_from(["1e-3", "5E-4", ".5", "1_000", "+1e3", ".inf", ".nan", "24:00:00", "32G", "0", "-1"]),
)
keys = st.one_of(st.sampled_from(WORDS), st.text(max_size=6))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                      st.dictionaries(keys, inner, max_size=4)), max_leaves=12)


VALID = {
    "name": "fz", "template": "retinanet_tiny",
    "datasets": {"synth": {"root": "data/synth", "params": {"batch_size": 2}}},
    "matrix": {"loss": ["focal", "ssfl"], "dataset": ["synth"], "seed": [0, 1], "lr": [0.01, 1e-3],
               "exclude": [{"loss": "ssfl", "seed": 1}], "include": [{"loss": "gfl", "seed": 0}]},
    "params": {"max_epochs": 2, "img_scale": [96, 96]},
    "overrides": {"model.bbox_head.loss_cls.gamma": 1.5, "optim_wrapper.optimizer.weight_decay": 5e-4},
    "resources": {"gpus": 0, "cpus": 1, "mem": "4G", "time": "00:30:00"},
    "executor": {"type": "local", "local": {"max_parallel": 2}, "slurm": {"partition": "p", "setup": ["true"]}},
    "retry": {"on_nan": "lower_lr", "factor": 0.1, "max_attempts": 2},
    "test": True,
}
OPTIONAL = [k for k in VALID if k not in ("name", "template", "matrix")]


def _paths(doc, prefix=()):
    """Every (path) into a document, to replace or delete what is there."""
    yield prefix
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _paths(v, prefix + (i,))


@st.composite
def experiments(draw):
    """A valid experiment with optional sections left out, then 0-3 random edits deep inside it."""
    import copy

    doc = copy.deepcopy(VALID)
    for k in OPTIONAL:
        if draw(st.integers(0, 3)) == 0:
            del doc[k]
    for _ in range(draw(st.integers(0, 3))):
        path = draw(st.sampled_from([p for p in _paths(doc) if p]))
        parent = doc
        for step in path[:-1]:
            parent = parent[step]
        action = draw(st.sampled_from(["value", "value", "key", "delete"]))
        if action == "value":
            parent[path[-1]] = draw(values)
        elif action == "delete":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[draw(keys)] = parent.pop(path[-1])
    return doc


def _text_of(doc) -> str:
    return yaml.safe_dump(doc, sort_keys=False, allow_unicode=True)


@st.composite
def documents(draw):
    kind = draw(st.sampled_from(["experiment", "experiment", "mutated", "garbage"]))
    if kind == "garbage":
        return draw(st.text(alphabet=st.sampled_from(list("abc: -[]{}&*!|>'\"#%@`,?\n\t01.e<\\~")), max_size=120))
    text = _text_of(draw(experiments()))
    if kind == "mutated":
        for _ in range(draw(st.integers(1, 3))):
            i = draw(st.integers(0, len(text)))
            text = text[:i] + draw(st.sampled_from(["", ":", "- ", "&a ", "*a", "<<: *a\n", "\n  ", "[", "{", "'",
                                                    "!!int ", "!!python/none ", "\x00", "é"])) + text[i + 1:]
    return text


def _check(text: str) -> None:
    p = _DIR / "exp.yaml"
    p.write_text(text, encoding="utf-8", errors="surrogatepass")
    t0 = time.monotonic()
    try:
        runs = spec.expand(spec.load(p), check_paths=False)
        assert runs and all(r.run_id for r in runs)
    except UserError as exc:
        msg = str(exc)
        assert "\n" not in msg and msg.startswith(str(p)), repr(msg)
        assert exc.exit_code == 2
    took = time.monotonic() - t0
    assert took < BOUND_S, f"{took:.2f} s for {text[:200]!r}"


@settings(max_examples=2500, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(documents())
def test_every_document_is_a_plan_or_one_line(text):
    _check(text)


def test_the_fuzzer_reaches_plans():
    """The generator is not all garbage: a near-valid draw plans (guards against a useless fuzzer)."""
    _check(_text_of({"name": "fz", "template": "retinanet_tiny", "matrix": {"loss": ["focal"], "seed": [1]}}))
    p = _DIR / "exp.yaml"
    assert len(spec.expand(spec.load(p), check_paths=False)) == 1

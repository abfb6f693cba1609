"""`ssflctl convert cityscapes`: equivalence with MMDetection's converter, bad input, safety.

Tests marked ``unit`` need only the light stack plus cityscapesscripts (the ``test`` extra): they
compare against an in-test re-implementation of the reference's per-instance algorithm. The test
marked ``training`` runs the reference script itself from the installed mmdet package (it needs
mmcv and mmengine).
"""
from __future__ import annotations

import errno
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import IN_CI, REPO, run_cli

unit = pytest.mark.unit
training = pytest.mark.training

SIZE = (320, 160)  # (width, height): small, but every case of the generator is present


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    from ssflctl.convert.synth_cityscapes import generate

    root = tmp_path_factory.mktemp("cs") / "cityscapes"
    # train: image 0 has every special case, image 2 has no instances; 8 images over two cities
    generate(root, n_train=8, n_val=3, n_test=2, size=SIZE, seed=3, fast=True)
    return root


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("annotations"))
    return dst


def _load(path):
    with open(path) as fh:
        return json.load(fh)


def reference_annotations(inst: np.ndarray):
    """The reference's algorithm, verbatim except for mmcv: one full Fortran-order mask per instance."""
    import cityscapesscripts.helpers.labels as CSLabels
    import pycocotools.mask as maskUtils

    out = []
    for inst_id in np.unique(inst[inst >= 24]):
        label_id = inst_id // 1000 if inst_id >= 1000 else inst_id
        label = CSLabels.id2label[label_id]
        if not label.hasInstances or label.ignoreInEval:
            continue
        mask = np.asarray(inst == inst_id, dtype=np.uint8, order="F")
        rle = maskUtils.encode(mask[:, :, None])[0]
        rle["counts"] = rle["counts"].decode()
        out.append(dict(iscrowd=int(inst_id < 1000), category_id=label.id, bbox=maskUtils.toBbox(rle).tolist(),
                        area=int(maskUtils.area(rle)), segmentation=rle))
    return out


def _decode(seg):
    import pycocotools.mask as maskUtils

    return maskUtils.decode({"size": seg["size"], "counts": seg["counts"].encode()})


def assert_same_dataset(ours: dict, ref: dict):
    """Every image and annotation field equal (ids aside), decoded masks included."""
    assert ours["categories"] == ref["categories"]
    ref_imgs = {im["file_name"]: im for im in ref["images"]}
    our_imgs = {im["file_name"]: im for im in ours["images"]}
    assert sorted(ref_imgs) == sorted(our_imgs)
    ref_anns, our_anns = {}, {}
    for anns, imgs, dst in ((ref.get("annotations", []), ref["images"], ref_anns),
                            (ours["annotations"], ours["images"], our_anns)):
        by_id = {im["id"]: im["file_name"] for im in imgs}
        for a in anns:
            dst.setdefault(by_id[a["image_id"]], []).append(a)
    n = 0
    for name, rim in ref_imgs.items():
        oim = our_imgs[name]
        for key in ("file_name", "height", "width", "segm_file"):
            assert oim[key] == rim[key], (name, key)
        ra, oa = ref_anns.get(name, []), our_anns.get(name, [])
        assert len(oa) == len(ra), name
        for r, o in zip(ra, oa):
            for key in ("iscrowd", "category_id", "bbox", "area", "segmentation"):
                assert o[key] == r[key], (name, key)
            assert np.array_equal(_decode(o["segmentation"]), _decode(r["segmentation"]))
            n += 1
    return n


# ---------------------------------------------------------------------------------------------
# pure pieces


@unit
def test_label_table_matches_cityscapesscripts():
    import cityscapesscripts.helpers.labels as CSLabels

    from ssflctl.convert import cityscapes_labels as L

    assert [tuple(x) for x in L.LABELS] == [tuple(x) for x in CSLabels.labels]
    assert [c["id"] for c in L.CATEGORIES] == [24, 25, 26, 27, 28, 31, 32, 33]
    assert [c["name"] for c in L.CATEGORIES] == ["person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle"]


@unit
def test_rle_equals_pycocotools_on_random_maps():
    import pycocotools.mask as maskUtils

    from ssflctl.convert.cityscapes import annotate, encode_instances

    rng = np.random.default_rng(0)
    values = [0, 7, 23, 24, 26, 33, 24000, 24005, 26000, 26001, 29000, 30001, 33000, 11000]
    shapes = [(1, 1), (1, 9), (9, 1), (2, 2), (7, 13), (13, 7), (31, 64)]
    for k in range(400):
        h, w = shapes[k % len(shapes)]
        inst = rng.choice(values, size=(h, w)).astype(np.uint16 if k % 2 else np.int32)
        if k % 7 == 0:
            inst[:] = 26000  # one instance covering everything (no leading zeros, no tail)
        if k % 11 == 0:
            inst[:, : w // 2] = 0
        ids, counts = encode_instances(inst)
        assert sorted(set(ids.tolist())) == sorted(set(int(v) for v in np.unique(inst) if v >= 24))
        for iid, cnt in zip(ids.tolist(), counts):
            rle = maskUtils.frPyObjects({"counts": cnt, "size": [h, w]}, h, w)
            assert np.array_equal(maskUtils.decode(rle), (inst == iid).astype(np.uint8))
            assert rle["counts"] == maskUtils.encode(np.asfortranarray((inst == iid).astype(np.uint8)))["counts"]
        anns, problems = annotate(inst)
        assert problems == []
        assert anns == reference_annotations(inst)


@unit
def test_unknown_label_value_is_reported():
    from ssflctl.convert.cityscapes import annotate

    inst = np.zeros((4, 4), np.uint16)
    inst[1, 1] = 40001  # label 40 does not exist
    inst[2, 2] = 26000
    anns, problems = annotate(inst)
    assert len(anns) == 1 and anns[0]["category_id"] == 26
    assert problems and "40001" in problems[0] and "label id 40" in problems[0]


# ---------------------------------------------------------------------------------------------
# the generator


@unit
def test_generator_layout_and_cases(synth):
    from PIL import Image

    from ssflctl.convert.synth_cityscapes import RGB_COLORS

    imgs = sorted((synth / "leftImg8bit").glob("*/*/*_leftImg8bit.png"))
    assert len(imgs) == 13
    assert {p.parent.parent.name for p in imgs} == {"train", "val", "test"}
    for img in imgs:
        stem = img.name[: -len("_leftImg8bit.png")]
        gt = synth / "gtFine" / img.parent.parent.name / img.parent.name
        for suffix in ("_gtFine_polygons.json", "_gtFine_instanceIds.png", "_gtFine_labelIds.png"):
            assert (gt / f"{stem}{suffix}").is_file()
        poly = _load(gt / f"{stem}_gtFine_polygons.json")
        assert (poly["imgWidth"], poly["imgHeight"]) == SIZE
        assert Image.open(img).size == SIZE
    gt0 = synth / "gtFine" / "train" / "aachen"
    inst = np.asarray(Image.open(gt0 / "aachen_000000_000019_gtFine_instanceIds.png"))
    labels = np.asarray(Image.open(gt0 / "aachen_000000_000019_gtFine_labelIds.png"))
    ids = set(np.unique(inst).tolist())
    assert {26, 24} <= ids  # crowd groups (cargroup, persongroup)
    assert any(i // 1000 == 29 for i in ids) and any(i // 1000 == 30 for i in ids)  # caravan, trailer
    assert np.array_equal(np.where(inst >= 1000, inst // 1000, inst), labels)  # consistent label images
    poly = _load(gt0 / "aachen_000000_000019_gtFine_polygons.json")
    names = [o["label"] for o in poly["objects"]]
    assert "license plate" in names and any(o.get("deleted") for o in poly["objects"])
    # the hidden car got an instance number but no pixels: ids are not contiguous
    cars = sorted(i for i in ids if i // 1000 == 26)
    assert len(cars) < names.count("car")
    # an image without instances
    empty = np.asarray(Image.open(gt0 / "aachen_000002_000019_gtFine_instanceIds.png"))
    assert empty.max() < 24
    # the RGB image shows the objects in their class colour (the same drawing order as the labels)
    rgb = np.asarray(Image.open(synth / "leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png")).astype(int)
    for iid in (i for i in ids if i >= 1000 and (inst == i).sum() > 200):
        label = {24: "person", 25: "rider", 26: "car", 27: "truck", 28: "bus", 29: "caravan", 30: "trailer",
                 31: "train", 32: "motorcycle", 33: "bicycle"}[iid // 1000]
        pix = rgb[inst == iid]
        close = np.abs(pix - np.array(RGB_COLORS[label])).max(axis=1) < 60
        assert close.mean() > 0.3, (iid, label)


@unit
def test_generator_is_deterministic(tmp_path):
    from ssflctl.convert.synth_cityscapes import generate

    # the non-fast path: cityscapesscripts' json2instanceImg / json2labelImg on the JSON files
    a = generate(tmp_path / "a", 2, 0, 0, size=(64, 32), seed=5, color=True)
    b = generate(tmp_path / "b", 2, 0, 0, size=(64, 32), seed=5, color=True)
    files = sorted(a.rglob("*.json")) + sorted(a.rglob("*.png"))
    assert len(files) == 2 * 5
    for f in files:
        assert f.read_bytes() == (b / f.relative_to(a)).read_bytes(), f
    c = generate(tmp_path / "c", 2, 0, 0, size=(64, 32), seed=6)
    assert any(f.read_bytes() != (c / f.relative_to(a)).read_bytes() for f in files if f.suffix == ".json")


# ---------------------------------------------------------------------------------------------
# the converter on generated data


@unit
def test_convert_matches_reference_algorithm(synth, tmp_path):
    from PIL import Image

    from ssflctl.convert.cityscapes import convert

    out = tmp_path / "ann"
    summary = convert(synth, out, nproc=1, progress=False)
    total = 0
    for split in ("train", "val", "test"):
        doc = _load(out / f"instancesonly_filtered_gtFine_{split}.json")
        names = [im["file_name"] for im in doc["images"]]
        assert names == sorted(names)  # deterministic order
        assert [im["id"] for im in doc["images"]] == list(range(1, len(names) + 1))
        assert [a["id"] for a in doc["annotations"]] == list(range(1, len(doc["annotations"]) + 1))
        # build the reference's output for these images with the reference algorithm
        images, anns = [], []
        for im in doc["images"]:
            city, name = im["file_name"].split("/")
            inst_file = synth / "gtFine" / split / city / name.replace("leftImg8bit.png", "gtFine_instanceIds.png")
            inst = np.asarray(Image.open(inst_file))
            images.append(dict(file_name=im["file_name"], height=inst.shape[0], width=inst.shape[1], id=im["id"],
                               segm_file=im["file_name"].replace("leftImg8bit.png", "gtFine_labelIds.png")))
            for a in reference_annotations(inst):
                a["image_id"] = im["id"]
                anns.append(a)
        ref = {"images": images, "categories": doc["categories"], "annotations": anns}
        total += assert_same_dataset(doc, ref)
        s = next(x for x in summary.splits if x.split == split)
        assert s.images == len(names)
        assert s.annotations == len(doc["annotations"])
        assert sum(s.crowd.values()) == sum(a["iscrowd"] for a in doc["annotations"])
        with_anns = {a["image_id"] for a in doc["annotations"]}
        assert s.empty_images == len(names) - len(with_anns)
        cats = {a["category_id"] for a in doc["annotations"]}
        assert not cats & {29, 30}  # caravan, trailer are ignored
    train = _load(out / "instancesonly_filtered_gtFine_train.json")
    assert any(a["iscrowd"] for a in train["annotations"])
    assert any(a["area"] <= 4 for a in train["annotations"])  # tiny objects kept
    assert next(s for s in summary.splits if s.split == "train").empty_images >= 1
    assert total > 30


@unit
def test_nproc_2_gives_identical_files(synth, tmp_path):
    from ssflctl.convert.cityscapes import convert

    convert(synth, tmp_path / "a", nproc=1, splits=["train", "val"], progress=False)
    convert(synth, tmp_path / "b", nproc=2, splits=["train", "val"], progress=False)
    for split in ("train", "val"):
        name = f"instancesonly_filtered_gtFine_{split}.json"
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert not (tmp_path / "a" / "instancesonly_filtered_gtFine_test.json").exists()


DECODER_MODULES = {"imagecodecs": "imagecodecs", "opencv": "cv2", "pillow": "PIL"}


@unit
@pytest.mark.parametrize("decoder", ["imagecodecs", "opencv", "pillow"])
def test_every_decoder_gives_identical_arrays_and_files(synth, tmp_path, monkeypatch, decoder):
    """Each decoder against Pillow (the core dependency) and OpenCV (the decoder before imagecodecs):
    the same uint16 arrays, and byte-identical JSON files."""
    from PIL import Image

    from ssflctl.convert import cityscapes

    if importlib.util.find_spec(DECODER_MODULES[decoder]) is None:
        if IN_CI:  # the test extra brings imagecodecs, the train extra OpenCV (via mmcv)
            pytest.fail(f"CI must have the {decoder} decoder installed", pytrace=False)
        pytest.skip(f"{decoder} is not installed")
    name, decode = cityscapes._decoder(decoder)
    assert name == decoder
    files = sorted((synth / "gtFine").glob("*/*/*_gtFine_instanceIds.png"))
    assert len(files) == 13
    top = 0
    for f in files:
        ref = np.asarray(Image.open(f))
        for reuse in (False, True):  # True: into the decoder's reused buffer, as the converter does
            arr = decode(f.read_bytes(), reuse)
            assert arr.dtype == np.uint16 and arr.shape == (SIZE[1], SIZE[0]), f
            assert np.array_equal(arr, ref), (f, reuse)
        top = max(top, int(arr.max()))
    assert top > 32000  # 16-bit instance ids (bicycle #k = 33000 + k) are in the data
    monkeypatch.setattr(cityscapes, "_READ", None)
    monkeypatch.setenv("SSFLCTL_DECODER", "pillow")
    cityscapes.convert(synth, tmp_path / "ref", splits=["train", "val"], progress=False)
    monkeypatch.setattr(cityscapes, "_READ", None)
    monkeypatch.setenv("SSFLCTL_DECODER", decoder)
    s = cityscapes.convert(synth, tmp_path / decoder, splits=["train", "val"], progress=False)
    assert s.decoder == decoder
    for split in ("train", "val"):
        name = f"instancesonly_filtered_gtFine_{split}.json"
        assert (tmp_path / decoder / name).read_bytes() == (tmp_path / "ref" / name).read_bytes()


@unit
def test_decoder_choice(monkeypatch):
    from ssflctl.convert import cityscapes
    from ssflctl.errors import UserError

    monkeypatch.delenv("SSFLCTL_DECODER", raising=False)
    installed = [d for d in cityscapes.DECODERS if importlib.util.find_spec(DECODER_MODULES[d]) is not None]
    assert cityscapes._decoder()[0] == installed[0]  # the fastest installed one
    monkeypatch.setenv("SSFLCTL_DECODER", "libpng")
    with pytest.raises(UserError, match="SSFLCTL_DECODER=libpng: unknown PNG decoder; use one of imagecodecs"):
        cityscapes._decoder()
    monkeypatch.setitem(sys.modules, "imagecodecs", None)  # as if not installed
    monkeypatch.setenv("SSFLCTL_DECODER", "imagecodecs")
    with pytest.raises(UserError, match=r"not installed.*ssflctl\[fast\]"):
        cityscapes._decoder()
    monkeypatch.delenv("SSFLCTL_DECODER")
    assert cityscapes._decoder()[0] != "imagecodecs"


@unit
def test_cli_summary_force_and_no_overwrite(synth, tmp_path, cli_env):
    out = tmp_path / "ann"
    proc = run_cli("convert", "cityscapes", synth, "--out-dir", out, "--splits", "val,test", env=cli_env)
    assert proc.returncode == 0, proc.stderr
    val = out / "instancesonly_filtered_gtFine_val.json"
    doc = _load(val)
    row = next(line for line in proc.stdout.splitlines() if line.startswith("val"))
    assert row.split("\t")[1] == str(len(doc["images"]))
    assert "person" in proc.stdout and "crowd" in proc.stdout
    umask = os.umask(0)
    os.umask(umask)
    assert val.stat().st_mode & 0o777 == 0o666 & ~umask  # readable like any file the user writes
    val.write_text("previous")
    proc = run_cli("convert", "cityscapes", synth, "--out-dir", out, "--splits", "val", env=cli_env)
    assert proc.returncode == 2
    assert "already exists" in proc.stderr and "--force" in proc.stderr and "Traceback" not in proc.stderr
    assert val.read_text() == "previous"
    proc = run_cli("convert", "cityscapes", synth, "--out-dir", out, "--splits", "val", "--force", env=cli_env)
    assert proc.returncode == 0, proc.stderr
    assert _load(val) == doc


# ---------------------------------------------------------------------------------------------
# bad input: every bad file named, exit 2, nothing written, prior outputs untouched


def _to_8bit(inst_png: Path) -> None:
    """Overwrite a 16-bit instanceIds PNG with an 8-bit one (the labelIds values), as a tool that
    "normalises" images would."""
    from PIL import Image

    arr = np.asarray(Image.open(inst_png)).astype(np.int64)
    Image.fromarray(np.where(arr >= 1000, arr // 1000, arr).astype(np.uint8)).save(inst_png)


def _bad_copy(synth, tmp_path):
    root = _copy(synth, tmp_path / "bad")
    tr = root / "gtFine" / "train"
    li = root / "leftImg8bit" / "train"
    (tr / "aachen" / "aachen_000000_000019_gtFine_instanceIds.png").unlink()  # missing gtFine file
    (tr / "bochum" / "bochum_000001_000019_gtFine_labelIds.png").unlink()  # missing labelIds
    trunc = tr / "aachen" / "aachen_000002_000019_gtFine_instanceIds.png"
    trunc.write_bytes(trunc.read_bytes()[:200])  # truncated PNG
    (tr / "bochum" / "bochum_000003_000019_gtFine_instanceIds.png").write_bytes(b"not a png at all")
    from PIL import Image

    small = li / "aachen" / "aachen_000004_000019_leftImg8bit.png"
    Image.new("RGB", (SIZE[0] // 2, SIZE[1] // 2)).save(small)  # size mismatch
    # a Cityscapes image name (MMDetection converts it too) whose gtFine files do not exist
    shutil.copy(li / "bochum" / "bochum_000005_000019_leftImg8bit.png", li / "bochum" / "bochum_5_leftImg8bit.png")
    # not a Cityscapes image: skipped with a warning, never an error
    shutil.copy(li / "bochum" / "bochum_000005_000019_leftImg8bit.png", li / "bochum" / "picture.png")
    (li / "bochum" / ".DS_Store").write_text("ignored")
    _to_8bit(tr / "aachen" / "aachen_000006_000019_gtFine_instanceIds.png")  # 8-bit instanceIds
    img7 = li / "bochum" / "bochum_000007_000019_leftImg8bit.png"
    img7.write_bytes(img7.read_bytes()[:-100])  # truncated image
    (root / "leftImg8bit" / "val" / "frankfurt" / "frankfurt_000001_000019_leftImg8bit.png").unlink()  # gtFine orphan
    for p in (root / "leftImg8bit" / "test").glob("*/*.png"):  # empty split
        p.unlink()
    expected = [
        ("aachen_000000_000019_gtFine_instanceIds.png", "missing"),
        ("bochum_000001_000019_gtFine_labelIds.png", "missing"),
        ("aachen_000002_000019_gtFine_instanceIds.png", "truncated"),
        ("bochum_000003_000019_gtFine_instanceIds.png", "unreadable"),
        ("aachen_000004_000019_gtFine_instanceIds.png", "does not match"),
        ("bochum_5_gtFine_instanceIds.png", "missing"),
        ("bochum_5_gtFine_labelIds.png", "missing"),
        ("aachen_000006_000019_gtFine_instanceIds.png", "8-bit grey PNG, but instanceIds must be 16-bit"),
        ("bochum_000007_000019_leftImg8bit.png", "truncated PNG"),
        ("frankfurt_000001_000019_gtFine_instanceIds.png", "frankfurt_000001_000019_leftImg8bit.png is missing"),
        (str(Path("leftImg8bit") / "test") + ":", "no images"),
    ]
    return root, expected


@unit
@pytest.mark.parametrize("decoder", ["default", "pillow"])
def test_bad_input_reports_every_file(synth, tmp_path, monkeypatch, decoder):
    from ssflctl.convert import cityscapes
    from ssflctl.convert.cityscapes import convert
    from ssflctl.errors import UserError

    if decoder == "pillow":  # the fallback when OpenCV is not installed
        monkeypatch.setenv("SSFLCTL_DECODER", "pillow")
    monkeypatch.setattr(cityscapes, "_READ", None)
    root, expected = _bad_copy(synth, tmp_path)
    out = tmp_path / "ann"
    out.mkdir()
    with pytest.raises(UserError) as err:
        convert(root, out, nproc=1, force=True, progress=False)
    msg = str(err.value)
    lines = msg.splitlines()
    # one line per bad file (the size mismatch shows in both gtFine files of that image)
    assert lines[0].startswith(f"{len(lines) - 1} bad input files") and "nothing written" in lines[0]
    assert len(lines) - 1 == len(expected) + 1
    for name, why in expected:
        hit = [l for l in lines if name in l]
        assert hit and why in hit[0], (name, why, msg)
    assert ".DS_Store" not in msg and "picture.png" not in msg
    assert list(out.iterdir()) == []  # no partial JSON, not even for the good val split


@unit
def test_bad_input_cli_exit_and_prior_outputs_untouched(synth, tmp_path, cli_env):
    root, expected = _bad_copy(synth, tmp_path)
    out = tmp_path / "ann"
    out.mkdir()
    for split in ("train", "val", "test"):
        (out / f"instancesonly_filtered_gtFine_{split}.json").write_text(f"previous {split}")
    proc = run_cli("convert", "cityscapes", root, "--out-dir", out, "--nproc", "2", "--force", env=cli_env)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "WARN" not in proc.stderr  # no decoder noise
    for name, why in expected:
        assert name in proc.stderr, name
    for split in ("train", "val", "test"):
        assert (out / f"instancesonly_filtered_gtFine_{split}.json").read_text() == f"previous {split}"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"instancesonly_filtered_gtFine_{s}.json" for s in ("train", "val", "test"))


@unit
def test_foreign_files_are_skipped_with_one_warning(synth, tmp_path, cli_env):
    """Foggy Cityscapes images and other files next to the Cityscapes images are left out, counted
    in one warning line; the JSON is the one of the clean tree. A matching file that is broken still
    stops the conversion, with its name."""
    clean = tmp_path / "clean"
    assert run_cli("convert", "cityscapes", synth, "--out-dir", clean, env=cli_env).returncode == 0
    root = _copy(synth, tmp_path / "cs")
    li = root / "leftImg8bit"
    foreign = []
    for img in sorted(li.glob("*/*/*_leftImg8bit.png")):
        for beta in ("0.01", "0.02"):
            dst = img.with_name(img.name.replace(".png", f"_foggy_beta_{beta}.png"))
            shutil.copy(img, dst)
            foreign.append(dst)
    (li / "train" / "aachen" / "notes.txt").write_text("my notes")
    (li / "train" / "stray_leftImg8bit.png").write_bytes(b"x")  # outside a city folder
    (li / "train" / "aachen" / ".hidden.png").write_bytes(b"x")  # hidden: ignored, not counted
    out = tmp_path / "out"
    proc = run_cli("convert", "cityscapes", root, "--out-dir", out, env=cli_env)
    assert proc.returncode == 0, proc.stderr
    warn = [line for line in proc.stderr.splitlines() if "warning" in line]
    assert len(warn) == 1, proc.stderr
    assert f"skipped {len(foreign) + 2} files" in warn[0] and "_foggy_beta_" in warn[0] and "not in the JSON" in warn[0]
    for split in ("train", "val", "test"):
        name = f"instancesonly_filtered_gtFine_{split}.json"
        assert (out / name).read_bytes() == (clean / name).read_bytes()
    # a file that matches the Cityscapes names and is broken still stops everything, by name
    bad = root / "gtFine" / "val" / "frankfurt" / "frankfurt_000001_000019_gtFine_instanceIds.png"
    bad.write_bytes(bad.read_bytes()[:300])
    proc = run_cli("convert", "cityscapes", root, "--out-dir", tmp_path / "out2", env=cli_env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"{bad}: truncated PNG" in proc.stderr and "_foggy_beta_" not in proc.stderr
    assert not (tmp_path / "out2").exists()


def _bad_input_case(case: str, root: Path) -> tuple:
    """Break one thing in a copy of the synthetic tree: (the file the message must name, words in it)."""
    gt, li = root / "gtFine" / "val" / "frankfurt", root / "leftImg8bit" / "val" / "frankfurt"
    stem = "frankfurt_000001_000019"
    if case == "8-bit instanceIds":
        _to_8bit(gt / f"{stem}_gtFine_instanceIds.png")
        return gt / f"{stem}_gtFine_instanceIds.png", ["8-bit grey PNG", "crowd region", "json2instanceImg"]
    if case == "image missing":
        (li / f"{stem}_leftImg8bit.png").unlink()
        return gt / f"{stem}_gtFine_instanceIds.png", [f"{li / stem}_leftImg8bit.png is missing",
                                                       "annotations would be missing", "restore the image"]
    if case == "city folder missing":
        shutil.copytree(gt, root / "gtFine" / "val" / "lindau")
        return root / "gtFine" / "val" / "lindau", ["3 annotated images but no", "move this gtFine folder"]
    if case == "truncated image":
        img = li / f"{stem}_leftImg8bit.png"
        img.write_bytes(img.read_bytes()[:-40])
        return img, ["truncated PNG", "re-download or re-extract"]
    if case == "truncated labelIds":
        seg = gt / f"{stem}_gtFine_labelIds.png"
        seg.write_bytes(seg.read_bytes()[: len(seg.read_bytes()) // 2])
        return seg, ["truncated PNG", "re-download or re-extract"]
    raise AssertionError(case)


@unit
@pytest.mark.parametrize("case", ["8-bit instanceIds", "image missing", "city folder missing", "truncated image",
                                  "truncated labelIds"])
def test_bad_input_that_used_to_convert_silently(synth, tmp_path, cli_env, case):
    """Each of these converted with exit 0 and a different JSON before: now one line names the file
    and what to do, exit 2, and the previous outputs are untouched."""
    root = _copy(synth, tmp_path / "cs")
    named, words = _bad_input_case(case, root)
    out = tmp_path / "ann"
    out.mkdir()
    (out / "instancesonly_filtered_gtFine_val.json").write_text("previous")
    proc = run_cli("convert", "cityscapes", root, "--out-dir", out, "--splits", "val", "--force", env=cli_env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert "1 bad input file under" in lines[0] and "nothing written" in lines[0]
    assert len(lines) == 2 and lines[1].strip().startswith(f"{named}:"), proc.stderr
    for w in words:
        assert w in lines[1], (w, lines[1])
    assert [p.name for p in out.iterdir()] == ["instancesonly_filtered_gtFine_val.json"]
    assert (out / "instancesonly_filtered_gtFine_val.json").read_text() == "previous"


@unit
def test_many_bad_files_are_counted_and_listed_up_to_a_limit(synth, tmp_path):
    from ssflctl.convert.cityscapes import MAX_PROBLEM_LINES, convert
    from ssflctl.errors import UserError

    root = _copy(synth, tmp_path / "cs")
    gt = root / "gtFine" / "val" / "frankfurt"
    src = gt / "frankfurt_000000_000019_gtFine_instanceIds.png"
    for k in range(MAX_PROBLEM_LINES + 10):  # annotations of images that are not there
        shutil.copy(src, gt / f"frankfurt_{100 + k:06d}_000019_gtFine_instanceIds.png")
    with pytest.raises(UserError) as err:
        convert(root, tmp_path / "out", splits=["val"], progress=False)
    lines = str(err.value).splitlines()
    assert lines[0].startswith(f"{MAX_PROBLEM_LINES + 10} bad input files")
    assert len(lines) == 1 + MAX_PROBLEM_LINES + 1 and lines[-1].strip() == "... and 10 more"
    assert all("is missing" in line for line in lines[1:-1])
    assert not (tmp_path / "out").exists()


@unit
def test_png_with_bytes_after_iend_is_accepted(synth, tmp_path):
    """Bytes after the IEND chunk are legal (some tools append metadata): not mistaken for truncation."""
    from ssflctl.convert.cityscapes import convert

    root = _copy(synth, tmp_path / "cs")
    ref = convert(synth, tmp_path / "ref", splits=["val"], progress=False)
    for f in (root / "leftImg8bit" / "val").glob("*/*.png"):
        f.write_bytes(f.read_bytes() + b"trailing metadata" * 3)
    for f in (root / "gtFine" / "val").glob("*/*_instanceIds.png"):
        f.write_bytes(f.read_bytes() + b"\0" * 7)
    convert(root, tmp_path / "out", splits=["val"], progress=False)
    name = "instancesonly_filtered_gtFine_val.json"
    assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes()
    assert ref.splits[0].images == 3


# ---------------------------------------------------------------------------------------------
# all splits or none: a failure while writing leaves every previous file as it was


def _previous_outputs(out: Path) -> dict:
    out.mkdir()
    old = {}
    for split in ("train", "val", "test"):
        p = out / f"instancesonly_filtered_gtFine_{split}.json"
        p.write_bytes(f'{{"previous": "{split}"}}'.encode() * 1000)
        old[p.name] = p.read_bytes()
    return old


@unit
def test_full_disk_on_second_split_changes_nothing(synth, tmp_path, monkeypatch):
    from ssflctl.convert import cityscapes
    from ssflctl.errors import UserError

    out = tmp_path / "ann"
    old = _previous_outputs(out)
    calls = []
    real = cityscapes._write_data

    def full_disk(fh, data):
        calls.append(len(data))
        if len(calls) == 2:  # the disk fills up half-way through the second split (val)
            fh.write(data[: len(data) // 2])
            fh.flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fh, data)

    monkeypatch.setattr(cityscapes, "_write_data", full_disk)
    with pytest.raises(UserError) as err:
        cityscapes.convert(synth, out, force=True, progress=False)
    msg = str(err.value)
    assert len(calls) == 2
    assert msg.startswith(f"{out / 'instancesonly_filtered_gtFine_val.json'}: cannot write (No space left on device)")
    assert "no JSON file was changed" in msg and "\n" not in msg
    assert {p.name: p.read_bytes() for p in out.iterdir()} == old  # byte-identical, no temp file left
    # the same run with room to write replaces all three
    # into a folder that did not exist: not even the folder is left behind
    calls.clear()
    with pytest.raises(UserError, match="No space left on device"):
        cityscapes.convert(synth, tmp_path / "new" / "ann", force=True, progress=False)
    assert not (tmp_path / "new" / "ann").exists()
    monkeypatch.setattr(cityscapes, "_write_data", real)
    cityscapes.convert(synth, out, force=True, progress=False)
    assert all(json.loads((out / n).read_text())["images"] for n in old if "test" not in n)


@unit
def test_failed_rename_puts_replaced_files_back(synth, tmp_path, monkeypatch):
    """The last step (renames) failing half-way: the split already replaced is restored, a split
    that did not exist before is removed again."""
    from ssflctl.convert import cityscapes
    from ssflctl.errors import UserError

    out = tmp_path / "ann"
    old = _previous_outputs(out)
    (out / "instancesonly_filtered_gtFine_test.json").unlink()
    del old["instancesonly_filtered_gtFine_test.json"]
    real = os.replace
    renames = []

    def failing(src, dst):
        if str(src).endswith(".tmp"):
            renames.append(Path(dst).name)
            if len(renames) == 3:
                raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real(src, dst)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(UserError) as err:
        cityscapes.convert(synth, out, splits=["test", "train", "val"], force=True, progress=False)
    monkeypatch.setattr(os, "replace", real)
    assert renames == [f"instancesonly_filtered_gtFine_{s}.json" for s in ("test", "train", "val")]
    assert "cannot replace it" in str(err.value) and "no JSON file was changed" in str(err.value)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == old


@unit
def test_missing_root_parts_and_split(synth, tmp_path):
    from ssflctl.convert.cityscapes import convert
    from ssflctl.errors import UserError

    with pytest.raises(UserError, match="leftImg8bit"):
        convert(tmp_path, tmp_path / "o", progress=False)
    with pytest.raises(UserError, match=r"missing split directory.*--splits"):
        convert(synth, tmp_path / "o", splits=["train_extra"], progress=False)
    assert not (tmp_path / "o").exists()
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UserError, match="--out-dir is a file"):
        convert(synth, tmp_path / "afile", splits=["val"], progress=False)
    # images without their gtFine split: one line for the folder, not one per image
    root = tmp_path / "nogt"
    shutil.copytree(synth / "leftImg8bit" / "val", root / "leftImg8bit" / "extra")
    (root / "gtFine").mkdir()
    with pytest.raises(UserError) as err:
        convert(root, tmp_path / "o", splits=["extra"], progress=False)
    assert str(err.value).count("\n") == 1 and "gtFine/extra: missing split directory" in str(err.value)


@unit
def test_progress_bar_and_summary_table(synth, tmp_path):
    import io

    from rich.console import Console

    from ssflctl.convert.cityscapes import convert, print_summary

    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=200)
    summary = convert(synth, tmp_path / "o", splits=["train"], progress=True, console=console)
    assert "images/s" in buf.getvalue() and "train" in buf.getvalue()
    table = io.StringIO()
    print_summary(summary, Console(file=table, force_terminal=True, width=250))
    text = table.getvalue()
    s = summary.splits[0]
    assert s.images == 8 and s.empty_images >= 1 and sum(s.crowd.values()) >= 1
    assert "bicycle" in text and "crowd" in text and str(s.instances["car"]) in text


@unit
def test_interrupted_conversion_leaves_previous_file(synth, tmp_path, monkeypatch):
    from ssflctl.convert import cityscapes

    out = tmp_path / "ann"
    out.mkdir()
    target = out / "instancesonly_filtered_gtFine_train.json"
    target.write_text("previous")
    calls = {"n": 0}
    real = cityscapes.load_image

    def dying(task):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(task)

    monkeypatch.setattr(cityscapes, "load_image", dying)
    with pytest.raises(KeyboardInterrupt):
        cityscapes.convert(synth, out, splits=["train"], force=True, progress=False)
    assert target.read_text() == "previous"
    assert [p.name for p in out.iterdir()] == [target.name]  # no temp files left behind


# ---------------------------------------------------------------------------------------------
# the real reference script


def _reference_script():
    import mmdet

    path = Path(mmdet.__file__).parent / ".mim" / "tools" / "dataset_converters" / "cityscapes.py"
    if not path.is_file():
        pytest.skip(f"{path} is not shipped with this mmdet install")
    return path


@training
def test_equivalent_to_mmdet_reference_script(synth, tmp_path):
    from ssflctl.convert.cityscapes import convert

    script = _reference_script()
    ref_out = tmp_path / "ref"
    proc = subprocess.run([sys.executable, str(script), str(synth), "--nproc", "1", "-o", str(ref_out)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ours = tmp_path / "ours"
    convert(synth, ours, nproc=2, progress=False)
    n = 0
    for split in ("train", "val", "test"):
        name = f"instancesonly_filtered_gtFine_{split}.json"
        ref, doc = _load(ref_out / name), _load(ours / name)
        n += assert_same_dataset(doc, ref)
        assert len(doc["annotations"]) == len(ref.get("annotations", []))
    assert n > 30

"""ssflctl.workdir.checkpoints.latest_checkpoint: the attempt's latest complete checkpoint, even when mmengine's
`last_checkpoint` pointer was emptied by a kill while it was being rewritten."""
import zipfile

import pytest

from ssflctl.workdir import checkpoints

pytestmark = pytest.mark.unit


def _ckpt(path):
    with zipfile.ZipFile(path, "w") as z:   # torch.save writes a zip archive
        z.writestr("archive/data.pkl", b"x" * 100)
    return path


def test_pointer_wins_when_it_names_a_file(tmp_path):
    _ckpt(tmp_path / "epoch_2.pth")
    _ckpt(tmp_path / "epoch_4.pth")
    (tmp_path / "last_checkpoint").write_text(str(tmp_path / "epoch_2.pth"))
    assert checkpoints.latest_checkpoint(tmp_path) == str(tmp_path / "epoch_2.pth")


def test_empty_or_stale_pointer_falls_back_to_the_newest_complete_checkpoint(tmp_path):
    _ckpt(tmp_path / "epoch_2.pth")
    _ckpt(tmp_path / "epoch_10.pth")                                # numbers, not names, order them
    full = (tmp_path / "epoch_10.pth").read_bytes()
    (tmp_path / "epoch_12.pth").write_bytes(full[: len(full) // 2])  # cut short while being written
    _ckpt(tmp_path / "best_coco_bbox_mAP_epoch_1.pth")               # not a resume point of its own
    (tmp_path / "last_checkpoint").write_text("")                    # truncated, then killed
    assert checkpoints.latest_checkpoint(tmp_path) == str(tmp_path / "epoch_10.pth")
    (tmp_path / "last_checkpoint").write_text(str(tmp_path / "epoch_8.pth"))  # names a deleted file
    assert checkpoints.latest_checkpoint(tmp_path) == str(tmp_path / "epoch_10.pth")
    (tmp_path / "last_checkpoint").unlink()
    assert checkpoints.latest_checkpoint(tmp_path) == str(tmp_path / "epoch_10.pth")


def test_nothing_to_resume(tmp_path):
    assert checkpoints.latest_checkpoint(tmp_path) is None
    (tmp_path / "last_checkpoint").write_text("")
    (tmp_path / "epoch_1.pth").write_bytes(b"partial")
    assert checkpoints.latest_checkpoint(tmp_path) is None
    assert checkpoints.latest_checkpoint(tmp_path / "missing") is None

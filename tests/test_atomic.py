"""ssflctl.atomic: deferred fsyncs reach every file written in the block, from a thread pool."""
import os

import pytest

from ssflctl import atomic


def test_deferred_fsync_syncs_every_file_once_the_block_ends(tmp_path, monkeypatch):
    synced, real = [], os.fsync

    def recording(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(os, "fsync", recording)
    with atomic.deferred_fsync():
        paths = [atomic.write_json(tmp_path / f"f{i}.json", {"i": i}) for i in range(40)]
        assert synced == []  # nothing waits for the disk inside the block
    assert sorted(synced) == sorted(str(p) for p in paths)


def test_fsync_paths_skips_removed_files_and_raises_a_real_error(tmp_path, monkeypatch):
    paths = [str(atomic.write_text(tmp_path / f"f{i}", "x")) for i in range(10)]
    os.unlink(paths[3])
    atomic.fsync_paths(paths)  # a file removed since (a refused submission cleaned up): skipped

    def failing(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing)
    with pytest.raises(OSError, match="Input/output error"):
        atomic.fsync_paths(paths)

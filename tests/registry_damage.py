"""Damaging a workspace's registry the way a killed copy or a full disk leaves it (tests of the rebuild)."""
import sqlite3
from pathlib import Path


def fold_wal(path: Path) -> None:
    """Fold SQLite's write-ahead log into the database file and remove the -wal/-shm files, so the
    damage that follows hits every committed row (as a copy of the file alone would lose them)."""
    con = sqlite3.connect(path)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    for suffix in ("-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)

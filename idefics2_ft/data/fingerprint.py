"""What a run's data is, from its content: enough to tell a resume that its data changed.

A file is known by its size and a SHA-256 of its bytes: all of them up to ``WHOLE_BYTES``; above,
``BLOCKS`` blocks of ``BLOCK_BYTES`` spread evenly from the first byte to the last. Either way at
most 4 MiB are read per file, whatever its size. Never by its modification time: the same bytes
staged again (a SLURM requeue that copies the data to local disk anew) are the same data. An edit
that keeps the size and touches no sampled block of a larger file goes unseen; an edit of a file up
to 4 MiB never does.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

WHOLE_BYTES = 4 << 20  # files up to 4 MiB are hashed whole (as many bytes as the sampled blocks)
BLOCK_BYTES = 64 << 10  # above: BLOCKS blocks of 64 KiB, evenly spread, first and last included
BLOCKS = 64


def file_fingerprint(path: str | Path) -> list:
    """``[size, "sha256:<16 hex>"]`` of a file (whole), or ``[size, "sampled-sha256:<16 hex>"]`` above
    ``WHOLE_BYTES`` (``BLOCKS`` blocks)."""
    path = Path(path)
    size = path.stat().st_size
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= WHOLE_BYTES:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
            return [size, "sha256:" + digest.hexdigest()[:16]]
        last = size - BLOCK_BYTES
        for i in range(BLOCKS):
            f.seek(last * i // (BLOCKS - 1))
            digest.update(f.read(BLOCK_BYTES))
    return [size, "sampled-sha256:" + digest.hexdigest()[:16]]


def same_file(recorded: object, now: object) -> bool:
    """Whether two fingerprints of a file agree. One recorded by an older version
    (``[size, mtime_ns, head hash]``) is compared by size alone: it has no hash of the whole file."""
    if isinstance(recorded, list) and len(recorded) == 3 and isinstance(now, list) and len(now) == 2:
        return recorded[0] == now[0]
    return recorded == now

"""One lock per store folder, for the writers (and TileDB's readers) of a store's metadata."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

try:
    import fcntl
except ImportError:  # Windows: no flock; metadata writers there are not serialized
    fcntl = None  # type: ignore[assignment]

__all__ = ["folder_lock"]

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def folder_lock(folder: str | None, *, shared: bool = False) -> Iterator[None]:
    """Hold a ``flock`` on ``folder`` meanwhile (None, for object storage: nothing to lock).

    Exclusive for writers of the store's metadata; ``shared`` for readers that must not see a write half done
    (TileDB writes its metadata files in place). The folder itself is locked, not a lock file in it: zarr warns
    about every file in a group that is not a node of the hierarchy (``anndata.read_zarr`` included), and a
    folder needs no write permission to lock. Where the file system refuses to lock (NFS without write access)
    a warning says so and nothing is locked. Not reentrant: ``flock`` locks belong to the open file, so a
    process that takes it twice waits on itself.
    """
    fd = None
    if folder is not None and fcntl is not None and os.path.isdir(folder):
        try:
            fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
            fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)  # waits for the holder; released on close
        except OSError as exc:
            if fd is not None:
                os.close(fd)
                fd = None
            logger.warning("%s: cannot lock the store (%s); its metadata writers are not serialized", folder, exc)
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)

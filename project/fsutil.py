"""Directories that are either complete or absent: the caches' one write primitive."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_dir(
    target: Path, write: Callable[[Path], object], is_complete: Callable[[Path], bool]
) -> None:
    """Run ``write(tmp)`` on a sibling temp dir, then rename it to ``target``.

    An interrupted write leaves no ``target``; if another process completed the same entry
    first (``is_complete(target)``), theirs is as good as ours and is kept.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name[:16]}-", dir=target.parent))
    # mkdtemp makes the dir private (0700); give it the usual umask-derived mode instead.
    tmp.chmod(0o777 & ~_umask())
    try:
        write(tmp)
        try:
            tmp.rename(target)
        except OSError:
            if not is_complete(target):
                raise
            logger.info("cache entry %s was completed concurrently; keeping that one", target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

"""Folders replaced as a whole: a recipe's output is either the old one or the complete new one.

Used by ``recipes.prepare_data`` (token shards) and ``recipes.export`` (Hugging Face folders): writing
into an existing folder would leave files of the previous output beside the new ones (stale shards
that a reader then picks up), and a crash halfway would leave a mix of both.
"""

from __future__ import annotations

import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def staged(out: Path) -> Iterator[Path]:
    """A new folder that replaces `out` if the block succeeds; a failure leaves `out` as it was.

    The folder lives in a hidden staging folder beside `out` (same file system, so the final move is
    a rename); a replaced `out` is moved into it and deleted with it.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        folder = staging / "new"
        folder.mkdir()  # mkdtemp's folders are private; this one gets the usual permissions
        yield folder
        if out.exists():
            out.rename(staging / "old")
        folder.rename(out)
    finally:
        shutil.rmtree(staging)


def inside(path: Path, folder: Path) -> bool:
    """Whether `path` is `folder` or lies under it (both resolved), i.e. replacing `folder` deletes it."""
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents

"""Result images: files under the data directory, referenced from their task.

Peers deliver a finished image as ``chunk`` bytes or as a ``data:`` URL in ``result.data`` (see
``p2pdiff.rooms.protocol``). The helper stores the bytes here and puts a small reference into the
task's result (``image: {path, sha256, size, contentType, url}``); the task row stays small, and
``GET /api/queue/{room}/{task}/result`` (``p2pdiff.rest.result_files``) serves the file.

Files are named by their SHA-256 (``<sha256>.png``): no name a peer chooses ever reaches the file
system (room and task ids may contain ``..``), identical images are stored once, and a half-written
file is never visible under its final name (written to a temporary name, then renamed). With
``[store] synchronous = "full"`` the file is fsynced before the task that references it commits,
so a committed reference survives a power cut like the task does.

Files no task references any more (their tasks were pruned by retention) are removed by ``gc``,
run on the retention sweep's schedule.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from p2pdiff.config import Config
from p2pdiff.tasks.images import IMAGE_EXTENSIONS, NOT_AN_IMAGE, TOO_LARGE, ImageRejected, sniff_image
from signaling.background import BackgroundTasks, every

log = logging.getLogger(__name__)

# The only names this module ever opens: what save() writes.
FILE_RE = re.compile(r"[0-9a-f]{64}\.(?:png|jpg|webp)")
# gc keeps files younger than this even if nothing references them yet: an image can arrive
# before the result message that attaches it to its task.
GC_MIN_AGE_SECONDS = 3600.0


@dataclass(frozen=True, slots=True)
class StoredImage:
    path: str  # the file's name under the results directory
    sha256: str
    size: int
    content_type: str

    def to_json(self, room_id: str, task_id: str) -> dict[str, Any]:
        return {
            "path": self.path,
            "sha256": self.sha256,
            "size": self.size,
            "contentType": self.content_type,
            "url": f"/api/queue/{room_id}/{task_id}/result",
        }

    @classmethod
    def from_json(cls, data: Any) -> StoredImage | None:
        """The reference in a task's result (None if absent or not one of ours)."""
        if not isinstance(data, dict):
            return None
        path, sha, size, ctype = (data.get(k) for k in ("path", "sha256", "size", "contentType"))
        if not (isinstance(path, str) and FILE_RE.fullmatch(path) and isinstance(sha, str)):
            return None
        if not (isinstance(size, int) and ctype in IMAGE_EXTENSIONS):
            return None
        return cls(path, sha, size, ctype)


def task_image(result: Any) -> StoredImage | None:
    """The stored image a task result references, if any."""
    return StoredImage.from_json(result.get("image")) if isinstance(result, dict) else None


def results_dir(config: Config) -> Path:
    """``[store] results_dir``, or ``results/`` next to the store file when it is empty."""
    if config.store.results_dir:
        return Path(config.store.results_dir)
    store_file = config.store.sqlite_path if config.store.backend == "sqlite" else config.store.path
    return Path(store_file).parent / "results"


class ResultStore:
    def __init__(self, root: str | os.PathLike[str], *, max_bytes: int, fsync: bool = True) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.fsync = fsync
        self.saved = 0
        self.saved_bytes = 0
        self.removed = 0

    def check(self, data: bytes) -> str:
        """The content type of acceptable image bytes; ImageRejected (too_large, not_an_image) else."""
        if len(data) > self.max_bytes:
            raise ImageRejected(
                TOO_LARGE, f"result of {len(data)} bytes is over max_result_bytes ({self.max_bytes})"
            )
        ctype = sniff_image(data)
        if ctype is None:
            raise ImageRejected(NOT_AN_IMAGE, "not PNG, JPEG or WebP")
        return ctype

    def save(self, data: bytes) -> StoredImage:
        """Store image bytes (idempotent for the same bytes). Blocking file I/O, like the SQLite
        store: at most max_bytes, written once per result."""
        ctype = self.check(data)
        digest = hashlib.sha256(data).hexdigest()
        name = f"{digest}.{IMAGE_EXTENSIONS[ctype]}"
        path = self.root / name
        image = StoredImage(name, digest, len(data), ctype)
        with contextlib.suppress(OSError):
            if path.stat().st_size == len(data):
                os.utime(path)  # fresh again for gc's age check
                return image
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{name}.{os.getpid()}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                if self.fsync:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        if self.fsync:
            fd = os.open(self.root, os.O_RDONLY)
            try:
                os.fsync(fd)  # the rename itself
            finally:
                os.close(fd)
        self.saved += 1
        self.saved_bytes += len(data)
        return image

    def resolve(self, name: str) -> Path | None:
        return self.root / name if FILE_RE.fullmatch(name) else None

    def gc(self, keep: Iterable[str], min_age: float = GC_MIN_AGE_SECONDS) -> int:
        """Remove result files (and stale temporary files) that nothing in ``keep`` names."""
        keep = set(keep)
        cutoff = time.time() - min_age
        removed = 0
        try:
            entries = list(os.scandir(self.root))
        except FileNotFoundError:
            return 0
        for entry in entries:
            ours = FILE_RE.fullmatch(entry.name) or (
                entry.name.startswith(".") and entry.name.endswith(".tmp")
            )
            if not ours or entry.name in keep:
                continue
            with contextlib.suppress(OSError):
                if entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)
                    removed += 1
        self.removed += removed
        return removed

    def stats(self) -> dict[str, int]:
        return {"saved": self.saved, "savedBytes": self.saved_bytes, "removed": self.removed}


RESULTS = web.AppKey("results", ResultStore)


def setup(
    app: web.Application,
    store: ResultStore,
    *,
    interval: float,
    referenced: Callable[[], Iterable[str]],
) -> None:
    """Share ``store`` with the handlers (rest/result_files.py serves the files), and run the
    periodic gc of files that ``referenced()`` no longer names."""
    app[RESULTS] = store

    def gc() -> None:
        removed = store.gc(referenced())
        if removed:
            log.info("results: removed %d files no task references", removed)

    async def gc_ctx(app: web.Application) -> AsyncIterator[None]:
        loop = BackgroundTasks(log)
        loop.spawn(every(interval, gc, "result file gc", logger=log), "result file gc", name="results-gc")
        yield
        await loop.close()

    app.cleanup_ctx.append(gc_ctx)

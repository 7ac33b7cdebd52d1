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

Several nodes on PostgreSQL (``SharedImages``, implemented by ``PgStore``): every image is also a row
of the database's ``result_images``, written in the same transaction as the task change that first
references it, so a task never names an image another node cannot serve, ``pg_dump`` backs both up
together, and the nodes (usually separate machines) need no shared file system. Each node's
directory is then a cache: an image it lacks is read from the database once, checked against its
name (content-addressed: a cached copy is never stale) and kept. Rows nobody references are pruned
once per period in the cluster (``prune_images``). On SQLite (one node) the files are all there is.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

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


class SharedImages(Protocol):
    """Where every node finds every image (the PostgreSQL store; see the module docstring)."""

    def stage_image(self, name: str, content_type: str, source: Path) -> None:
        """Write the image in ``source`` with the current (or next) commit, before the task change
        that references it; the bytes are read from ``source`` then, not held until then."""

    async def read_image(self, name: str, max_bytes: int) -> bytes | None:
        """The image's bytes (None if there is no such image of at most ``max_bytes``)."""

    async def claim_job(self, name: str, every_seconds: float) -> bool: ...

    async def prune_images(self, referenced: Callable[[], Iterable[str]], min_age: float) -> int:
        """Delete images older than ``min_age`` that ``referenced()`` (asked once the queue is caught
        up) does not name; returns how many."""


class ResultStore:
    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        max_bytes: int,
        fsync: bool = True,
        shared: SharedImages | None = None,
    ) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.fsync = fsync
        self.shared = shared
        self.saved = 0
        self.saved_bytes = 0
        self.removed = 0
        self.fetched = 0  # images this node read from the shared store into its cache
        self.pruned = 0  # shared images this node deleted (gc)
        self._fetching: dict[str, asyncio.Task[Path | None]] = {}

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
        if not self._renewed(path, len(data)):
            self._write(path, data, fsync=self.fsync)
            self.saved += 1
            self.saved_bytes += len(data)
        if self.shared is not None:
            # Also when the file was here already: its row may have been pruned since.
            self.shared.stage_image(name, ctype, path)
        return image

    @staticmethod
    def _renewed(path: Path, size: int) -> bool:
        """Whether the file is stored already; it is fresh again then, for gc's age check."""
        with contextlib.suppress(OSError):
            if path.stat().st_size == size:
                os.utime(path)
                return True
        return False

    def _write(self, path: Path, data: bytes, *, fsync: bool) -> None:
        """``data`` under ``path``'s name, never visible half-written."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{path.name}.{os.getpid()}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                if fsync:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        if fsync:
            fd = os.open(self.root, os.O_RDONLY)
            try:
                os.fsync(fd)  # the rename itself
            finally:
                os.close(fd)

    async def find(self, image: StoredImage) -> Path | None:
        """The file of ``image``: this node's, or else (several nodes) read from the shared store
        into this node's cache. None if neither has it. Callers asking for one image at once share
        one read, so a cold node holds each image in memory once, whoever asks."""
        path = self.resolve(image.path)
        if path is None or path.is_file():
            return path
        if self.shared is None:
            return None
        fetching = self._fetching.get(image.path)
        if fetching is None:
            fetching = asyncio.get_running_loop().create_task(self._fetch(image, path))
            self._fetching[image.path] = fetching
            fetching.add_done_callback(lambda _: self._fetching.pop(image.path, None))
        return await asyncio.shield(fetching)

    async def _fetch(self, image: StoredImage, path: Path) -> Path | None:
        assert self.shared is not None
        data = await self.shared.read_image(image.path, self.max_bytes)
        if data is None:
            return None
        if hashlib.sha256(data).hexdigest() != image.sha256:
            log.error("results: the stored image %s does not match its name; not served", image.path)
            return None
        # A cache: no fsync, the database has it durably; a copy lost in a crash is read again.
        await asyncio.to_thread(self._write, path, data, fsync=False)
        self.fetched += 1
        return path

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

    async def prune_shared(self, referenced: Callable[[], Iterable[str]], every_seconds: float) -> int:
        """Delete the shared images nothing references: by one node per period in the cluster."""
        if self.shared is None or not await self.shared.claim_job("result image gc", every_seconds):
            return 0
        pruned = await self.shared.prune_images(referenced, GC_MIN_AGE_SECONDS)
        self.pruned += pruned
        return pruned

    def stats(self) -> dict[str, int]:
        return {
            "saved": self.saved,
            "savedBytes": self.saved_bytes,
            "removed": self.removed,
            "fetched": self.fetched,
            "pruned": self.pruned,
        }


RESULTS = web.AppKey("results", ResultStore)


def setup(
    app: web.Application,
    store: ResultStore,
    *,
    interval: float,
    referenced: Callable[[], Iterable[str]],
) -> None:
    """Share ``store`` with the handlers (rest/result_files.py serves the files), and run the
    periodic gc of files (and shared images) that ``referenced()`` no longer names."""
    app[RESULTS] = store

    async def gc() -> None:
        removed = store.gc(referenced())
        if removed:
            log.info("results: removed %d files no task references", removed)
        pruned = await store.prune_shared(referenced, interval)
        if pruned:
            log.info("results: removed %d images no task references from the database", pruned)

    async def gc_ctx(app: web.Application) -> AsyncIterator[None]:
        loop = BackgroundTasks(log)
        loop.spawn(every(interval, gc, "result file gc", logger=log), "result file gc", name="results-gc")
        yield
        await loop.close()

    app.cleanup_ctx.append(gc_ctx)

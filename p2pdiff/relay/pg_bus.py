"""The relay bus of nodes sharing one PostgreSQL database: LISTEN/NOTIFY on ``p2pdiff_relay``.

Every node's relay publishes what its own clients sent; every other node hears it and delivers it
to its own subscribers (bus.py). PostgreSQL carries it, so a cluster needs nothing besides the
database it already shares (p2pdiff/tasks/pg_store.py).

Wire
    One notification per text, payload ``<header>\\n<text>``: the header is the JSON array
    ``[node, seq, channel, key]``. ``node`` is the publishing node's id (a node ignores its own
    notifications: PostgreSQL sends them to every listener, the sender's too); ``seq`` counts the
    node's publishes, so no two payloads of one transaction are identical (PostgreSQL would fold
    those into one); ``key`` is null, or names a row of the unlogged table ``relay_texts`` that
    holds a text too long for a notification (their payloads must stay under 8000 bytes; an SDP
    event with many candidates gets there). The row is written in the same transaction as its
    notification, so it is there when the notification is heard; rows are deleted after
    ``STORED_KEEP_SECONDS`` by whichever node prunes first.

Never in the way of the relay
    ``publish`` only appends to a bounded outbox (``MAX_BACKLOG_BYTES``; past it the oldest texts
    are dropped and counted) and wakes the writer, which sends what accumulated in one statement
    (up to ``BATCH`` texts) on a connection of the store's pool. While the database is away the
    writer drops the batch it could not send, says so once, and tries again after
    ``RETRY_SECONDS``: signaling is worth little once it is seconds old, and every peer announces
    again anyway. Heard notifications wait in a bounded inbox for the reader, which delivers them
    in the order they were sent, reading stored texts on the way.

Listening
    On the store's own listening connection (``PgStore.listen``): the store's watch makes it again
    within ``WATCH_SECONDS`` when it drops, listening on this channel too. What was notified while
    it was down is lost, as events are on a relay socket that drops.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import uuid
from collections import deque
from collections.abc import Iterator
from typing import Final

import asyncpg
import orjson
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from p2pdiff.relay.bus import RelayBus
from p2pdiff.tasks.pg_store import PgStore
from p2pdiff.tasks.store import StoreError
from signaling.background import BackgroundTasks, every

__all__ = ["CHANNEL", "PgRelayBus"]

log = logging.getLogger(__name__)

CHANNEL: Final = "p2pdiff_relay"
# PostgreSQL refuses payloads of 8000 bytes or more; the rest of the margin is for a longer header.
NOTIFY_MAX_BYTES = 7900
# Texts waiting for the writer: a few seconds of a busy relay's events, far more than one batch.
MAX_BACKLOG_BYTES = 8 * 1024 * 1024
# Notifications heard and not yet delivered: the reader only falls behind while it reads stored texts.
MAX_INBOX = 20_000
BATCH = 500
RETRY_SECONDS = 1.0
STORED_KEEP_SECONDS = 60.0
PRUNE_SECONDS = 15.0
# The reader yields to the loop after this many deliveries, so a burst from the cluster cannot
# starve this node's own clients.
YIELD_EVERY = 64

# StoreError: the store is closed (its pool gone), as at the very end of a shutdown;
# InternalClientError: asyncpg on a connection the server terminated mid-statement.
_DATABASE_ERRORS = (
    OSError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    TimeoutError,
    StoreError,
)

# One round trip per batch: the long texts go into relay_texts, then one notification per text, in
# the order published (a set-returning function in the select list runs in array order), all
# delivered at commit, when the rows are visible to the readers they wake.
_SEND = (
    "WITH stored AS (INSERT INTO relay_texts (key, text) SELECT * FROM unnest($2::text[], $3::text[])) "
    "SELECT pg_notify($1, payload) FROM unnest($4::text[]) AS payload"
)


class PgRelayBus(RelayBus, Collector):
    """Relay traffic between the nodes of one PostgreSQL database (see the module docstring); its
    counters and backlog in /metrics (``p2pdiff_relay_bus_*``)."""

    def __init__(self, store: PgStore) -> None:
        self._store = store
        self._node = store.node
        # How this node's own payloads begin: the header's first field (skipped without parsing).
        self._own_prefix = orjson.dumps([store.node]).decode()[:-1] + ","
        self._seq = 0
        self._outbox: deque[tuple[str, str, int]] = deque()  # (channel, text, its UTF-8 bytes)
        self._outbox_bytes = 0
        self._wake_writer = asyncio.Event()
        self._inbox: deque[str] = deque()
        self._wake_reader = asyncio.Event()
        self._tasks = BackgroundTasks(log)
        self._failing = False  # the database refused the last batch: say so once per episode
        #: What happened so far; fixed keys: ``published`` (handed to the bus), ``sent`` (notified),
        #: ``stored`` (of those, through relay_texts), ``delivered`` (others' texts handed on),
        #: ``dropped_backlog``, ``dropped_failed``, ``dropped_unsendable``, ``dropped_inbox``,
        #: ``missing`` (a stored text already pruned), ``malformed``.
        self.counters: collections.Counter[str] = collections.Counter()

    @property
    def backlog(self) -> int:
        """Bytes published and not yet sent."""
        return self._outbox_bytes

    # -------------------------------------------------------------- RelayBus

    def publish(self, channel: str, text: str) -> None:
        try:
            size = len(text.encode())
        except UnicodeEncodeError:  # a lone surrogate: no UTF-8 form, nothing PostgreSQL could take
            self.counters["dropped_unsendable"] += 1
            return
        if "\x00" in text:  # nor a NUL (never in JSON text, which escapes it)
            self.counters["dropped_unsendable"] += 1
            return
        self.counters["published"] += 1
        self._outbox.append((channel, text, size))
        self._outbox_bytes += size
        while self._outbox_bytes > MAX_BACKLOG_BYTES:
            _, _, dropped = self._outbox.popleft()
            self._outbox_bytes -= dropped
            self.counters["dropped_backlog"] += 1
        self._wake_writer.set()

    async def start(self) -> None:
        await self._store.listen(CHANNEL, self._heard)
        self._tasks.spawn(self._write_loop(), "relay bus: writer", name="relay bus writer")
        self._tasks.spawn(self._read_loop(), "relay bus: reader", name="relay bus reader")
        prune = every(PRUNE_SECONDS, self._prune, "relay bus: pruning stored texts", logger=log)
        self._tasks.spawn(prune, "relay bus: prune", name="relay bus prune")
        log.info("relay: events reach the other nodes through %s (channel %s)", self._store.location, CHANNEL)

    async def close(self) -> None:
        await self._tasks.close()
        await self._store.unlisten(CHANNEL)
        if self._outbox:
            log.info("relay bus: closed with %d unsent texts dropped", len(self._outbox))
        self._outbox.clear()
        self._outbox_bytes = 0
        self._inbox.clear()

    def collect(self) -> Iterator[Metric]:
        texts = CounterMetricFamily(
            "p2pdiff_relay_bus_texts",
            "Relay texts this node sent to and heard from the other nodes, by outcome",
            labels=["result"],
        )
        for result, value in sorted(self.counters.items()):
            texts.add_metric([result], value)
        yield texts
        yield GaugeMetricFamily(
            "p2pdiff_relay_bus_backlog_bytes",
            "Relay texts waiting to go to the other nodes",
            value=self.backlog,
        )

    # -------------------------------------------------------------- sending

    async def _write_loop(self) -> None:
        while True:
            await self._wake_writer.wait()
            self._wake_writer.clear()
            while self._outbox:
                batch = [self._outbox.popleft() for _ in range(min(BATCH, len(self._outbox)))]
                self._outbox_bytes -= sum(size for _, _, size in batch)
                if not await self._send(batch):
                    await asyncio.sleep(RETRY_SECONDS)

    async def _send(self, batch: list[tuple[str, str, int]]) -> bool:
        keys: list[str] = []
        stored: list[str] = []
        payloads: list[str] = []
        for channel, text, size in batch:
            self._seq += 1
            header = orjson.dumps([self._node, self._seq, channel, None]).decode()
            if size + len(header.encode()) + 1 < NOTIFY_MAX_BYTES:  # a node id may be non-ASCII
                payloads.append(f"{header}\n{text}")
                continue
            key = uuid.uuid4().hex
            keys.append(key)
            stored.append(text)
            payloads.append(orjson.dumps([self._node, self._seq, channel, key]).decode() + "\n")
        try:
            await self._store.pool.execute(_SEND, CHANNEL, keys, stored, payloads)
        except _DATABASE_ERRORS as exc:
            self.counters["dropped_failed"] += len(batch)
            if not self._failing:
                log.warning("relay bus: cannot reach the other nodes (%d texts dropped): %s", len(batch), exc)
            self._failing = True
            return False
        if self._failing:
            log.info("relay bus: reaching the other nodes again")
            self._failing = False
        self.counters["sent"] += len(batch)
        self.counters["stored"] += len(keys)
        return True

    async def _prune(self) -> None:
        try:
            await self._store.pool.execute(
                "DELETE FROM relay_texts WHERE at < now() - make_interval(secs => $1)", STORED_KEEP_SECONDS
            )
        except _DATABASE_ERRORS as exc:  # the writer reports the database away; try next round
            log.debug("relay bus: pruning stored texts failed: %s", exc)

    # -------------------------------------------------------------- hearing

    def _heard(self, payload: str) -> None:
        if payload.startswith(self._own_prefix):
            return
        if len(self._inbox) >= MAX_INBOX:
            self._inbox.popleft()
            self.counters["dropped_inbox"] += 1
        self._inbox.append(payload)
        self._wake_reader.set()

    async def _read_loop(self) -> None:
        handled = 0
        while True:
            await self._wake_reader.wait()
            self._wake_reader.clear()
            while self._inbox:
                text = await self._open(self._inbox.popleft())
                if text is None:
                    continue
                channel, body = text
                callback = self.on_remote
                if callback is not None:
                    self.counters["delivered"] += 1
                    try:
                        callback(channel, body)
                    except Exception:
                        log.exception("relay bus: delivering a text from another node failed")
                handled += 1
                if handled % YIELD_EVERY == 0:
                    await asyncio.sleep(0)

    async def _open(self, payload: str) -> tuple[str, str] | None:
        """A heard payload's channel and text (read from relay_texts if stored), or None."""
        header, _, text = payload.partition("\n")
        try:
            node, _seq, channel, key = orjson.loads(header)
            if not (
                isinstance(node, str) and isinstance(channel, str) and (key is None or isinstance(key, str))
            ):
                raise ValueError("field types")
        except ValueError:  # orjson.JSONDecodeError is one; another program on our channel
            self.counters["malformed"] += 1
            log.debug("relay bus: ignored a malformed notification %.80r", payload)
            return None
        if key is None:
            return channel, text
        try:
            stored = await self._store.pool.fetchval("SELECT text FROM relay_texts WHERE key = $1", key)
        except _DATABASE_ERRORS as exc:
            stored = None
            log.debug("relay bus: reading a stored text failed: %s", exc)
        if not isinstance(stored, str):
            self.counters["missing"] += 1
            return None
        return channel, stored

"""The helper's rooms shared out among the nodes of a cluster (PostgreSQL store only).

Each room the helper should be in (``helper_joined`` in the shared queue) has its helper on exactly
one node, which holds the room's lease (table ``room_leases``) and renews it every third of
``[cluster] lease_seconds``. Every node runs the same *round* on that period:

- heartbeat its row of ``nodes`` (a node seen within a lease period is live);
- renew its leases; a room its helper is in whose lease it no longer holds is left (another node
  took it after the lease lapsed: two helpers never share a room for long);
- release the rooms nobody wants any more, and hand one room per round to a live node holding
  fewer (rooms move to a node that joins);
- claim free or lapsed leases up to its fair share (rooms / live nodes, rounded up) with an upsert
  that only takes a lease that has expired (two nodes racing for one room: one gets it);
- join the rooms it holds with the wire and dispatch stored for them.

All lease times are the database's clock (``now()``); the nodes' clocks never meet. A node that
stops gracefully leaves its rooms, deletes its leases and NOTIFYs ``p2pdiff_leases``: every node
listens and runs a round at once, so its rooms move without waiting for a lease to lapse. A node
that dies (kill -9) loses its rooms when their leases expire: the others wake for the soonest
expiry, so that is at most ``lease_seconds`` after its last renewal. A node cut off from the
database leaves its rooms by itself before its leases can have lapsed, so the node that takes them
over never meets it there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any, Final

import asyncpg
from aiohttp import web

from p2pdiff.errors import AppError, Unavailable
from p2pdiff.rooms.helper import Helper
from p2pdiff.tasks.pg_store import PgStore
from p2pdiff.tasks.queue import QueueManager

log = logging.getLogger(__name__)

CHANNEL: Final = "p2pdiff_leases"
# Node rows not seen for this long are deleted (default node ids are new at every start).
FORGET_NODES_SECONDS = 24 * 3600
# A round that takes longer than this share of the lease is given up (the database is away).
ROUND_SHARE = 1 / 3
# Woken for another node's lease that expires: this much after it, so the upsert sees it expired.
EXPIRY_MARGIN_SECONDS = 0.05

_HEARTBEAT = """
WITH prior AS (SELECT instance FROM nodes WHERE id = $1)
INSERT INTO nodes (id, started_at, seen_at, instance) VALUES ($1, now(), now(), $2)
ON CONFLICT (id) DO UPDATE SET seen_at = now(), instance = $2,
    started_at = CASE WHEN nodes.instance = $2 THEN nodes.started_at ELSE now() END
RETURNING (SELECT instance FROM prior)
"""
_RENEW = (
    "UPDATE room_leases SET expires_at = now() + make_interval(secs => $2) WHERE node = $1 RETURNING room_id"
)
_CLAIM = """
INSERT INTO room_leases (room_id, node, expires_at)
SELECT room, $1, now() + make_interval(secs => $2) FROM unnest($3::text[]) AS room
ON CONFLICT (room_id) DO UPDATE SET node = EXCLUDED.node, expires_at = EXCLUDED.expires_at
    WHERE room_leases.expires_at < now()
RETURNING room_id
"""
_RELEASE = "DELETE FROM room_leases WHERE node = $1 AND room_id = ANY($2::text[])"
_LIVE_NODES = """
SELECT id, (extract(epoch FROM seen_at) * 1000)::bigint AS seen_ms
FROM nodes WHERE seen_at > now() - make_interval(secs => $1) ORDER BY id
"""
_LEASES = """
SELECT room_id, node, expires_at > now() AS live, extract(epoch FROM expires_at - now()) AS left_seconds
FROM room_leases
"""


@dataclass(frozen=True, slots=True)
class NodeView:
    """A live node as the last round saw it."""

    id: str
    seen_ms: int
    rooms: int

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "seenAt": self.seen_ms, "rooms": self.rooms}


class RoomLeases:
    """This node's part in sharing out the helper's rooms (see the module docstring)."""

    def __init__(
        self,
        store: PgStore,
        queue: QueueManager,
        helper: Helper,
        *,
        dsn: str,
        node: str,
        lease_seconds: float,
        config_rooms: list[str],
    ) -> None:
        self.store = store
        self.queue = queue
        self.helper = helper
        self._dsn = dsn  # with the password: for the driver only
        self.node = node
        self.lease_seconds = lease_seconds
        # Two processes started with one node id would both think they hold its rooms: each
        # process writes its own instance id with its heartbeat, so the other one's shows.
        self.instance = uuid.uuid4().hex
        # [p2p] rooms are recorded as wanted (helper_joined) by the first round that can write.
        self._config_rooms = list(config_rooms)
        self._beats = 0
        self._held: set[str] = set()
        self._dispatch: dict[str, bool | None] = {}  # the dispatch choice applied per held room
        self._handed: dict[str, float] = {}  # rooms handed to another node: not claimed back soon
        self._renew_sent: float | None = None  # monotonic time the last renewal that worked was sent
        self.nodes: list[NodeView] = []
        self.claimed = self.lost = self.released = 0
        self._kick = asyncio.Event()
        self._waiting: list[asyncio.Future[None]] = []  # callers waiting for the next round's end
        self._rounds: asyncio.Task[None] | None = None
        self._listener: asyncpg.Connection | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """The first round before the node serves (a restart with the same node id is back in its
        rooms at once, as on one node), then a round every third of a lease."""
        wait = await self._one_round()
        self._rounds = asyncio.get_running_loop().create_task(self._run(wait), name="room-leases")

    async def stop(self, leave_budget: float) -> None:
        """A graceful stop: leave the rooms (within ``leave_budget`` seconds), give the leases up
        and tell the other nodes, which take the rooms at once."""
        if self._rounds is not None:
            self._rounds.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._rounds
        self._wake_waiters()
        try:
            async with asyncio.timeout(leave_budget):
                for room_id in sorted(self._held):
                    await self.helper.leave(room_id)
        except TimeoutError:
            log.warning("leaving the leased rooms took over %.1f s: handing them over anyway", leave_budget)
        try:
            async with asyncio.timeout(self.lease_seconds), self.store.pool.acquire() as conn:
                async with conn.transaction():
                    await conn.execute("DELETE FROM room_leases WHERE node = $1", self.node)
                    await conn.execute(
                        "DELETE FROM nodes WHERE id = $1 AND instance = $2", self.node, self.instance
                    )
                await conn.execute(f"NOTIFY {CHANNEL}")
            if self._held:
                log.info(
                    "handed %d rooms over to the other nodes: %s",
                    len(self._held),
                    ", ".join(sorted(self._held)),
                )
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            log.warning("could not hand the rooms over (they move when their leases lapse): %s", exc)
        self._held.clear()
        await self._unlisten()

    # -- rounds -------------------------------------------------------------------------------

    def kick(self) -> None:
        """Run a round now (the rooms wanted changed, or another node handed rooms over)."""
        self._kick.set()

    async def settle(self, room_id: str, within: float) -> str | None:
        """Kick this node's round and the others', then wait (up to ``within`` seconds) until a node
        holds ``room_id``; that node's id, or None if none does yet."""
        deadline = time.monotonic() + within
        waiter = asyncio.get_running_loop().create_future()
        self._waiting.append(waiter)
        self.kick()
        try:
            await self._notify_others()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(waiter), within)
            while True:
                holder = await self.holder(room_id)
                if holder is not None or time.monotonic() >= deadline:
                    return holder
                await asyncio.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            raise Unavailable(f"the room leases cannot be read: {exc}", code="store_unavailable") from None

    async def holder(self, room_id: str) -> str | None:
        """The node holding ``room_id``'s lease now (None: nobody)."""
        node: str | None = await self.store.pool.fetchval(
            "SELECT node FROM room_leases WHERE room_id = $1 AND expires_at > now()", room_id
        )
        return node

    async def released_everywhere(self) -> None:
        """The rooms wanted shrank: this node's next round and every other's run now."""
        self.kick()
        with contextlib.suppress(OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
            await self._notify_others()

    async def _notify_others(self) -> None:
        await self.store.pool.execute(f"NOTIFY {CHANNEL}")

    def _wake_waiters(self, waiters: list[asyncio.Future[None]] | None = None) -> None:
        for waiter in self._waiting if waiters is None else waiters:
            if not waiter.done():
                waiter.set_result(None)
        if waiters is None:
            self._waiting.clear()

    async def _run(self, wait: float) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._kick.wait(), wait)
            wait = await self._one_round()

    async def _one_round(self) -> float:
        """A round, whatever fails in it; how long to wait for the next one."""
        period = self.lease_seconds / 3
        self._kick.clear()
        waiters, self._waiting = self._waiting, []
        try:
            async with asyncio.timeout(self.lease_seconds * ROUND_SHARE):
                await self._listen()
                return await self._round(period)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError, Unavailable) as exc:
            log.warning("room leases: round failed (%s: %s)", type(exc).__name__, exc)
            await self._cut_off()
        except Exception:  # a bug in one round must not end the rounds: the leases would lapse
            log.exception("room leases: round failed")
            await self._cut_off()
        finally:
            self._wake_waiters(waiters)
        return period

    async def _cut_off(self) -> None:
        """No renewal worked for long: before the leases can have lapsed (after lease_seconds from
        the last renewal sent, by the database's clock, which runs no slower than the time since
        then here), leave the rooms another node may take."""
        sent = self._renew_sent
        if sent is None or not self._held:
            return
        # The next round comes a third of a lease from now and may take as long: leave now if its
        # renewal could come after the leases lapsed.
        if time.monotonic() - sent + 2 * self.lease_seconds / 3 <= self.lease_seconds:
            return
        log.error(
            "room leases: no renewal for %.1f s (database away): leaving %d rooms another node may take",
            time.monotonic() - sent,
            len(self._held),
        )
        for room_id in sorted(self._held):
            await self._leave(room_id)
            self.lost += 1
        self._held.clear()

    async def _round(self, period: float) -> float:
        """One round; returns how long to wait for the next one."""
        lease = self.lease_seconds
        sent = time.monotonic()
        async with self.store.pool.acquire() as conn:
            prior = await conn.fetchval(_HEARTBEAT, self.node, self.instance)
            held = {row["room_id"] for row in await conn.fetch(_RENEW, self.node, lease)}
        self._renew_sent = sent
        self._check_instance(prior)
        self._beats += 1
        # Rooms whose lease lapsed to another node: leave them before anything else.
        for room_id in sorted(self._in_rooms() - held):
            await self._leave(room_id)
            self.lost += 1
            log.warning("room leases: lost room %s to another node (a lease that lapsed)", room_id)
        self._held = held  # every lease named this node, one an earlier process of it held too

        await self.queue.sync()
        await self._record_config_rooms()
        wanted = set(self.queue.helper_rooms())
        unwanted = sorted(self._held - wanted)
        if unwanted:
            await self._release(unwanted, "nobody wants them any more")

        nodes = await self.store.pool.fetch(_LIVE_NODES, lease)
        leases = await self.store.pool.fetch(_LEASES)
        live_leases = {row["room_id"]: row["node"] for row in leases if row["live"]}
        counts = dict.fromkeys([row["id"] for row in nodes], 0)
        counts.setdefault(self.node, 0)
        for room_id, node in live_leases.items():
            if room_id in wanted and node in counts:
                counts[node] += 1
        share = math.ceil(len(wanted) / len(counts)) if wanted else 0
        mine = len(self._held)
        fewest = min((n for node, n in counts.items() if node != self.node), default=mine)
        now = time.monotonic()
        self._handed = {room: at for room, at in self._handed.items() if now - at < lease}
        if mine > fewest + 1:
            # A node holding fewer rooms (one that just started): hand it one per round.
            room_id = sorted(self._held)[-1]
            await self._release([room_id], "a node holds fewer")
            self._handed[room_id] = now
        elif mine < share:
            free = sorted(r for r in wanted if r not in live_leases and r not in self._handed)
            if free:
                claimed = await self.store.pool.fetch(_CLAIM, self.node, lease, free[: share - mine])
                got = {row["room_id"] for row in claimed}
                self._held |= got
                self.claimed += len(got)
                if got:
                    log.info("room leases: claimed %s", ", ".join(sorted(got)))

        await self._join_held()
        counts[self.node] = len(self._held)
        self.nodes = [NodeView(row["id"], row["seen_ms"], counts.get(row["id"], 0)) for row in nodes]
        # Another node's lease of a wanted room that lapses before the next round: wake for it.
        lapsing = [
            float(row["left_seconds"])
            for row in leases
            if row["room_id"] in wanted and row["node"] != self.node and row["live"]
        ]
        soonest = min(lapsing, default=period) + EXPIRY_MARGIN_SECONDS
        if self._beats % 60 == 0:
            await self.store.pool.execute(
                "DELETE FROM nodes WHERE seen_at < now() - make_interval(secs => $1)", FORGET_NODES_SECONDS
            )
        return max(0.0, min(period, soonest))

    def _check_instance(self, prior: str | None) -> None:
        if prior is None or prior == self.instance:
            return
        if self._beats:
            log.error(
                "room leases: another live process uses node id %s (instance %s): give each node its own "
                "[cluster] node_id, or both run the same rooms' helpers",
                self.node,
                prior,
            )
        else:
            log.info("room leases: node id %s was used by an earlier process; taking its leases", self.node)

    def _in_rooms(self) -> set[str]:
        return {room.room_id for room in self.helper.rooms()}

    async def _record_config_rooms(self) -> None:
        if not self._config_rooms:
            return
        async with self.queue.writing():
            for room_id in self._config_rooms:
                self.queue.set_helper_joined(room_id, True)
        await self.queue.flush()
        log.info("room leases: [p2p] rooms recorded as wanted: %s", ", ".join(self._config_rooms))
        self._config_rooms = []

    async def _release(self, rooms: list[str], why: str) -> None:
        for room_id in rooms:
            await self._leave(room_id)
        await self.store.pool.execute(_RELEASE, self.node, rooms)
        self._held -= set(rooms)
        self.released += len(rooms)
        log.info("room leases: released %s (%s)", ", ".join(rooms), why)
        await self._notify_others()

    async def _leave(self, room_id: str) -> None:
        self._dispatch.pop(room_id, None)
        await self.helper.leave(room_id)

    async def _join_held(self) -> None:
        """The helper joins the rooms this node holds, as they were asked for over REST."""
        in_rooms = self._in_rooms()
        for room_id in sorted(self._held):
            stored = self.queue.get_room(room_id)
            dispatch = stored.helper_dispatch if stored is not None else None
            if room_id not in in_rooms:
                try:
                    # A wire chosen over REST sticks (NULL: follow [p2p]).
                    await self.helper.join(room_id, stored.helper_wire if stored is not None else None)
                except AppError as exc:  # a wire this helper cannot speak: the next round tries again
                    log.warning("helper cannot join room %s: %s", room_id, exc.message)
                    continue
                log.info("helper (%s) joined room %s: this node holds its lease", self.helper.mode, room_id)
            if dispatch is not None and self._dispatch.get(room_id) != dispatch:
                self.helper.set_dispatch(room_id, dispatch)
            self._dispatch[room_id] = dispatch

    # -- notifications from the other nodes ----------------------------------------------------

    async def _listen(self) -> None:
        """A connection of its own LISTENs on CHANNEL (made again when it broke)."""
        if self._listener is not None and not self._listener.is_closed():
            return
        self._listener = None
        listener = await asyncpg.connect(self._dsn, command_timeout=self.lease_seconds)
        await listener.add_listener(CHANNEL, self._notified)
        self._listener = listener

    def _notified(self, *_: object) -> None:
        self.kick()

    async def _unlisten(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None and not listener.is_closed():
            try:
                await listener.close(timeout=2)
            except Exception:  # closing a broken connection: nothing to save
                listener.terminate()

    # -- views --------------------------------------------------------------------------------

    @property
    def rooms(self) -> list[str]:
        """The rooms this node holds (as of the last round)."""
        return sorted(self._held)

    def to_json(self) -> dict[str, Any]:
        return {"nodes": [node.to_json() for node in self.nodes], "rooms": self.rooms}


LEASES = web.AppKey("room_leases", RoomLeases)

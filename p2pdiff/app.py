"""Application factory: wires config, store, queue and helper into one aiohttp app."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

from aiohttp import web

from p2pdiff.appkeys import CONFIG, EVENTS, HELPER, QUEUE, SHUTDOWN, STARTED_AT, STORE
from p2pdiff.config import Config, mask_url
from p2pdiff.errors import Unavailable
from p2pdiff.ops import logs, metrics
from p2pdiff.ops.cluster import LEASES, RoomLeases
from p2pdiff.ops.shutdown import Shutdown
from p2pdiff.relay import RELAY, LocalEndpoint, RelayServer
from p2pdiff.relay.nostr_hub import NOSTR
from p2pdiff.relay.pg_bus import PgRelayBus
from p2pdiff.relay.ws_relay import WS_RELAY
from p2pdiff.rest import api, appfiles, dashboard, middleware, openapi, result_files, security, sse
from p2pdiff.rooms.helper import Helper, make_helper
from p2pdiff.tasks import results
from p2pdiff.tasks.events import EventBus, Publish
from p2pdiff.tasks.pg_store import PgStore
from p2pdiff.tasks.queue import QueueManager
from p2pdiff.tasks.sqlite_store import SqliteStore
from p2pdiff.tasks.store import TaskStore
from signaling.background import BackgroundTasks, every
from signaling.relays import local as local_relays

log = logging.getLogger(__name__)


async def _store_ctx(app: web.Application) -> AsyncIterator[None]:
    store = app[STORE]
    await store.open()
    await app[QUEUE].load()
    rooms = app[QUEUE].rooms
    log.info(
        "store %s open: %d rooms, %d tasks",
        store.location,
        len(rooms),
        sum(len(r.tasks) for r in rooms.values()),
    )
    yield
    await store.close()


async def _helper_ctx(app: web.Application) -> AsyncIterator[None]:
    if LEASES not in app:  # several nodes: each room is joined by the node holding its lease
        await _join_at_start(app)
    yield
    # Bounded (p2pdiff/ops/shutdown.py): a relay that does not answer must not hold up the exit.
    budget = app[SHUTDOWN].leave_budget()
    try:
        async with asyncio.timeout(budget):
            await app[HELPER].close()
    except TimeoutError:
        log.warning("leaving the rooms took over %.1f s: exiting without the remaining goodbyes", budget)


async def _relay_in_process_ctx(app: web.Application) -> AsyncIterator[None]:
    """The room relay's endpoints under the URLs that name them ([relay] public_urls, and this
    server's own), for this process's clients (signaling.relays.local): the helper, in a room whose
    [p2p] relay_urls name this relay, takes part without a socket to itself. Registered before the
    helper joins, unregistered after it left."""
    config, relay = app[CONFIG], app[RELAY]
    registered: list[tuple[str, LocalEndpoint]] = []
    for protocol in (NOSTR, WS_RELAY):
        endpoint = relay.endpoint(protocol)
        for url in relay.local_urls(config.server.port, protocol):
            try:
                local_relays.register(url, endpoint)
            except ValueError as exc:  # another app of this process holds it (tests run several)
                log.warning("relay: %s", exc)
                continue
            registered.append((url, endpoint))
    ours = {endpoint for _, endpoint in registered}
    own = [url for url in config.p2p.relay_urls if local_relays.lookup(url) in ours]
    if config.p2p.enabled and own:
        log.info(
            "helper: uses this server's relay in process, without a socket (%s)",
            ", ".join(map(mask_url, own)),
        )
    yield
    for url, endpoint in registered:
        local_relays.unregister(url, endpoint)


async def _join_at_start(app: web.Application) -> None:
    config, queue, helper = app[CONFIG], app[QUEUE], app[HELPER]
    # Rooms from the config plus those joined over REST before the last restart, in that order.
    wanted = dict.fromkeys([*config.p2p.rooms, *queue.helper_rooms()])
    for room_id in wanted:
        # A wire or dispatch chosen over REST sticks (NULL: follow [p2p], which may have changed).
        stored = queue.get_room(room_id)
        await helper.join(room_id, stored.helper_wire if stored is not None else None)
        if stored is not None and stored.helper_dispatch is not None:
            helper.set_dispatch(room_id, stored.helper_dispatch)
    try:
        async with queue.writing():
            for room_id in wanted:
                queue.set_helper_joined(room_id, True)
        await queue.flush()
    except Unavailable as exc:  # a store failing at start (a held lock): serve anyway, reads work
        log.warning("store: the rooms joined at start are not recorded (%s): %s", exc.code, exc.message)
    if wanted:
        log.info("helper (%s) joined %d rooms at start: %s", helper.mode, len(wanted), ", ".join(wanted))


async def _leases_ctx(app: web.Application) -> AsyncIterator[None]:
    """Several nodes: the rounds that share the helper's rooms out; a stop hands them over."""
    leases = app[LEASES]
    await leases.start()
    yield
    await leases.stop(app[SHUTDOWN].leave_budget())


async def _background_ctx(app: web.Application) -> AsyncIterator[None]:
    config, queue, store = app[CONFIG], app[QUEUE], app[STORE]

    async def expire() -> None:
        # Nothing can expire: no write turn for nothing. Several nodes: one checks per round.
        if not queue.has_processing() or not await store.claim_job("lease expiry", lease_check):
            return
        async with queue.writing():
            expired = queue.expire_leases()
        if expired:
            await queue.flush()
            for task in expired:
                log.warning("lease expired: task %s in room %s is pending again", task.id, task.room_id)

    async def sweep() -> None:
        # Several nodes: one of them sweeps per period, not each.
        if not await store.claim_job("retention", config.queue.sweep_interval_seconds):
            return
        async with queue.writing():
            removed = queue.sweep(config.queue.retention_hours)
        await queue.flush()
        if removed:
            log.info("retention: pruned %d finished tasks of idle rooms", removed)
        pruned = await store.prune_log() if isinstance(store, PgStore) else 0
        if pruned:
            log.info("retention: pruned %d rows of the change log and events", pruned)

    async def report_repeats() -> None:
        # A flood of one warning that stopped is reported even if nothing else is logged after it.
        for repeats in logs.repeat_filters():
            repeats.close_due()

    lease_check = max(0.05, min(1.0, config.queue.lease_seconds / 4))
    # A store failure (Unavailable) is logged by the queue already; the next round tries again.
    loops = BackgroundTasks(log)
    for seconds, work, what in [
        (lease_check, expire, "lease check"),
        (config.queue.sweep_interval_seconds, sweep, "retention sweep"),
        (logs.REPEAT_WINDOW_SECONDS, report_repeats, "log repeat summaries"),
    ]:
        loops.spawn(every(seconds, work, what, logger=log, expected=(Unavailable,)), what)
    yield
    await loops.close()


async def _log_shutdown(app: web.Application) -> None:
    # on_shutdown runs once the listening sockets are closed, before open requests are waited for.
    log.info("shutting down: no new connections; finishing open requests, then leaving rooms")


def _referenced_results(app: web.Application) -> set[str]:
    """Result files still in use: named by a task, or held by the helper for a running one."""
    names = app[HELPER].referenced_results()
    for room in app[QUEUE].rooms.values():
        for task in room.tasks.values():
            image = results.task_image(task.result)
            if image is not None:
                names.add(image.path)
            if isinstance(task.result, dict) and isinstance(task.result.get("chunks"), list):
                for chunk in task.result["chunks"]:
                    chunk_image = results.task_image(chunk)
                    if chunk_image is not None:
                        names.add(chunk_image.path)
    return names


def _make_store(config: Config, bus: EventBus) -> tuple[TaskStore, Publish]:
    """The configured store, and where events go: straight to the bus (SQLite, this process
    alone), or through the database, which numbers them for every node (PostgreSQL)."""
    if config.store.backend == "postgresql":
        shared = PgStore(
            config.store.dsn(), display=config.store.display_url, node=config.cluster.node_name(), bus=bus
        )
        return shared, shared.publish
    return SqliteStore(config.store.sqlite_path, synchronous=config.store.synchronous), bus.publish


def create_app(config: Config, *, helper: Helper | None = None) -> web.Application:
    guard = security.Guard(config.server)
    http_metrics = metrics.HttpMetrics()
    cors = api.Cors(config.server.cors_origins)
    shutdown = Shutdown(config.server.shutdown_timeout_seconds)
    app = web.Application(
        client_max_size=api.MAX_BODY_BYTES,
        middlewares=[middleware.request_middleware(http_metrics, guard, cors, shutdown)],
    )
    app[SHUTDOWN] = shutdown
    app.on_shutdown.append(shutdown.begin)  # first: the clock starts when listening stops
    bus = EventBus(
        backlog=config.server.sse_backlog,
        max_subscribers=config.server.sse_max_clients,
        max_per_owner=config.server.sse_max_clients_per_address,
    )
    store, publish = _make_store(config, bus)
    app[CONFIG] = config
    app[api.CORS] = cors
    app[STORE] = store
    app[EVENTS] = bus
    app[QUEUE] = QueueManager(
        store,
        lease_seconds=config.queue.lease_seconds,
        publish=publish,
        default_room=config.server.default_room,
    )
    app[HELPER] = helper if helper is not None else make_helper(config.p2p)
    app[HELPER].attach(publish)
    # Result images from peers: files next to the store, served at /api/queue/{room}/{task}/result.
    # On PostgreSQL also rows of the database, so every node serves them (the files are its cache).
    result_store = results.ResultStore(
        results.results_dir(config),
        max_bytes=config.p2p.max_result_bytes,
        fsync=config.store.synchronous == "full",
        shared=store if isinstance(store, PgStore) else None,
    )
    app[HELPER].connect(app[QUEUE], result_store)
    bus.add_listener(app[HELPER].on_event)
    app[STARTED_AT] = time.time()
    # Cleanup runs in reverse: background work stops, the helper leaves, the room relay closes, the
    # store closes, and the shutdown's cut timer goes last.
    app.cleanup_ctx.extend([shutdown.ctx, _store_ctx])
    # Several nodes: what a client sends to this node's relay reaches the others' clients too.
    relay_bus = PgRelayBus(store) if config.relay.enabled and isinstance(store, PgStore) else None
    if config.relay.enabled:
        app[RELAY] = RelayServer(config.relay, proxy_header=config.server.trusted_proxy_header, bus=relay_bus)
        # Up before the helper joins, down after it left; the helper reaches it in process.
        app.cleanup_ctx.extend([app[RELAY].ctx, _relay_in_process_ctx])
        app[RELAY].add_routes(app)
    app.cleanup_ctx.append(_helper_ctx)
    if isinstance(store, PgStore):
        app[LEASES] = RoomLeases(
            store,
            app[QUEUE],
            app[HELPER],
            dsn=config.store.dsn(),
            node=store.node,
            lease_seconds=config.cluster.lease_seconds,
            config_rooms=config.p2p.rooms,
        )
        app.cleanup_ctx.append(_leases_ctx)  # stops before the helper closes: rooms handed over first
    app.cleanup_ctx.append(_background_ctx)
    api.add_routes(app)
    result_files.add_routes(app)
    results.setup(
        app,
        result_store,
        interval=config.queue.sweep_interval_seconds,
        referenced=lambda: _referenced_results(app),
    )
    sse.setup(app)
    dashboard.setup(app)
    openapi.add_routes(app)
    app_metrics = metrics.Metrics(
        app[QUEUE], app[HELPER], guard, http_metrics, node=app[api.NODE], leases=app.get(LEASES)
    )
    if RELAY in app:
        app_metrics.registry.register(app[RELAY].metrics)
    if relay_bus is not None:
        app_metrics.registry.register(relay_bus)
    metrics.add_routes(app, app_metrics)
    appfiles.setup(app, config.server)  # last: under its own prefix, and it shadows nothing above
    app.on_shutdown.append(_log_shutdown)
    return app

"""Relays shared per URL within one session, with topic routing.

Trystero keeps one client per broker URL for all rooms (spec §3); so do we. A relay has a single
``on_message`` and ``on_state`` callback; :class:`RelayHub` owns those and fans them out: inbound
messages by exact topic to the room that subscribed it, state changes to every room using the
relay. Relays are reference-counted and closed when the last room releases them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from signaling.background import BackgroundTasks
from signaling.relays import Relay, RelayState

__all__ = ["RelayFactory", "RelayHub"]

log = logging.getLogger(__name__)

#: Makes the relay client of one URL (a strategy's relay class, or a signaller's own factory).
RelayFactory = Callable[[str], Relay]
TopicHandler = Callable[[str, str, str], None]  # (relay url, topic, text)
StateHandler = Callable[[str, RelayState], None]  # (relay url, state)


@dataclass(eq=False, slots=True)
class _Entry:
    relay: Relay
    users: int = 0
    routes: dict[str, TopicHandler] = field(default_factory=dict)
    watchers: list[StateHandler] = field(default_factory=list)


class RelayHub:
    """Shared relays of one session, keyed by (strategy, URL)."""

    def __init__(self) -> None:
        self._entries: dict[tuple[str, str], _Entry] = {}
        self._by_relay: dict[Relay, _Entry] = {}
        self._tasks = BackgroundTasks(log)

    def acquire(self, strategy: str, url: str, factory: RelayFactory) -> Relay:
        """The relay for ``url`` (made by ``factory`` and started in the background on first use;
        later callers with the same (strategy, URL) share it)."""
        key = (strategy, url)
        entry = self._entries.get(key)
        if entry is None:
            relay = factory(url)
            entry = self._entries[key] = self._by_relay[relay] = _Entry(relay)
            relay.on_message = lambda topic, text, e=entry: self._dispatch(e, topic, text)
            relay.on_state = lambda state, e=entry: self._state(e, state)
            self._spawn(relay.start(), f"start {relay.name}")
        entry.users += 1
        return entry.relay

    def release(self, strategy: str, url: str) -> None:
        key = (strategy, url)
        entry = self._entries.get(key)
        if entry is None:
            return
        entry.users -= 1
        if entry.users <= 0:
            del self._entries[key]
            self._by_relay.pop(entry.relay, None)
            self._spawn(entry.relay.close(), f"close {entry.relay.name}")

    def route(self, relay: Relay, topic: str, handler: TopicHandler) -> asyncio.Future[None]:
        """Subscribe ``topic`` and send its messages to ``handler``; returns the subscribe ack."""
        entry = self._entry(relay)
        entry.routes[topic] = handler
        return relay.subscribe(topic)

    def unroute(self, relay: Relay, topic: str) -> None:
        entry = self._by_relay.get(relay)
        if entry is not None and entry.routes.pop(topic, None) is not None:
            relay.unsubscribe(topic)

    def watch(self, relay: Relay, handler: StateHandler) -> Callable[[], None]:
        """Call ``handler(url, state)`` on every state change of ``relay``; returns an unwatch."""
        entry = self._entry(relay)
        entry.watchers.append(handler)

        def unwatch() -> None:
            if handler in entry.watchers:
                entry.watchers.remove(handler)

        return unwatch

    def relays(self) -> list[Relay]:
        return [e.relay for e in self._entries.values()]

    async def close(self) -> None:
        entries, self._entries = list(self._entries.values()), {}
        self._by_relay.clear()
        for entry in entries:
            self._spawn(entry.relay.close(), f"close {entry.relay.name}")
        await self._tasks.wait(timeout=5)

    # ------------------------------------------------------------------ internals

    def _entry(self, relay: Relay) -> _Entry:
        entry = self._by_relay.get(relay)
        if entry is None:
            raise LookupError(f"{relay!r} is not held by this hub")
        return entry

    def _dispatch(self, entry: _Entry, topic: str, text: str) -> None:
        handler = entry.routes.get(topic)
        if handler is not None:
            handler(entry.relay.url, topic, text)

    def _state(self, entry: _Entry, state: RelayState) -> None:
        for handler in list(entry.watchers):
            try:
                handler(entry.relay.url, state)
            except Exception:
                log.exception("%s: relay state handler failed", entry.relay.name)

    def _spawn(self, coro: Coroutine[Any, Any, None], what: str) -> None:
        name = f"relay-hub {what}"
        self._tasks.spawn(coro, "relay task %s", name, name=name)

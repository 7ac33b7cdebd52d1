"""The topic relays whose protocol is JSON text frames over one :class:`~signaling.relays.base.Link`
(the nostr relay, the ws-relay): :class:`LinkRelay` holds what they do alike, so each of them keeps
only its frames.

Alike are: the link itself (:func:`~signaling.relays.local.make_link`: a WebSocket, or no socket
to a server in this process), opening it, waiting for it to go and dropping it, the goodbye
(flush what ``close()`` queued, then close), back-pressure (above ``OUTBOX_HIGH_WATER`` characters
in the outbox, publishes wait in the base class's bounded queue, which the link's ``on_drained``
flushes again), the checks of a topic (non-empty, at most ``MAX_TOPIC_LENGTH`` characters, at
most ``max_topics`` subscribed), and dropping an incoming message with a counter and one warning
per reason and connection.
"""

from __future__ import annotations

import collections
import functools
import logging
import ssl
from abc import abstractmethod
from typing import ClassVar

from .base import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_QUEUE_LIMIT,
    Backoff,
    Relay,
    check_websocket_url,
)
from .local import make_link

__all__ = [
    "DEFAULT_HEARTBEAT_S",
    "DEFAULT_MAX_TOPICS",
    "MAX_TOPIC_LENGTH",
    "NOSTR_BACKOFF",
    "OUTBOX_HIGH_WATER",
    "LinkRelay",
]

# Trystero's topics are ~40-char hashes; anything much longer is a caller bug.
MAX_TOPIC_LENGTH = 256
DEFAULT_HEARTBEAT_S = 30.0
# A room needs two topics; 4000 is 2000 rooms on one relay, far beyond what one helper joins.
DEFAULT_MAX_TOPICS = 4000
# Characters handed to the socket but not yet written; above this, publishes wait in the base
# class's bounded queue (only a stalled link gets there). Subscription frames bypass the check,
# and are bounded by max_topics.
OUTBOX_HIGH_WATER = 1024 * 1024

#: Trystero's makeSocket retry: random(0..p), p = 3333 ms doubling, capped (JS stops there). Its
#: nostr and ws-relay strategies share that socket, so it is the default of both relays here.
NOSTR_BACKOFF = Backoff(initial=3.333, factor=2.0, cap=60.0, jitter=1.0)


class LinkRelay(Relay):
    """A topic relay over one :class:`~signaling.relays.base.Link` (see the module docstring).

    A subclass sets the class attributes (a constructor is only needed for settings of its own),
    parses what the server sends in ``_on_text`` and
    implements the remaining transport hooks (``_request_subscribe``, ``_request_unsubscribe``,
    ``_send``). It may extend ``_abort_connection`` to forget more of the connection: the link
    calls it when the connection is lost.
    """

    #: The protocol's name: first word of the link's task names, and of the topic errors.
    _protocol: ClassVar[str]
    #: What the server is called in URL errors.
    _server_kind: ClassVar[str]
    #: Incoming messages above this many bytes drop the connection.
    _max_message_bytes: ClassVar[int]
    #: The protocol module's logger: the link's lines and the relay's own go there.
    _relay_log: ClassVar[logging.Logger]

    def __init__(
        self,
        url: str,
        *,
        heartbeat: float | None = DEFAULT_HEARTBEAT_S,
        max_topics: int = DEFAULT_MAX_TOPICS,
        ssl_context: ssl.SSLContext | None = None,
        queue_limit: int = DEFAULT_QUEUE_LIMIT,
        backoff: Backoff | None = None,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    ) -> None:
        check_websocket_url(url, self._server_kind)
        if max_topics < 1:
            raise ValueError("max_topics must be >= 1")
        super().__init__(
            url, queue_limit=queue_limit, backoff=backoff or NOSTR_BACKOFF, connect_timeout=connect_timeout
        )
        self._max_topics = max_topics
        self._link = make_link(
            url,
            label=self._protocol,
            peer="relay",
            logger=self._relay_log,
            heartbeat=heartbeat,
            max_msg_size=self._max_message_bytes,
            ssl_context=ssl_context,
            on_text=self._on_text,
            on_binary=functools.partial(self._drop, "malformed", "binary frame"),
            on_lost=self._abort_connection,
            on_drained=self._on_outbox_drained,
        )
        # Fixed names only (the subclass's, plus dropped:<reason>); nothing keyed by remote input.
        self._counters: collections.Counter[str] = collections.Counter()

    @property
    def counters(self) -> dict[str, int]:
        """What happened so far: ``published``, ``received``, ``delivered``, ``dropped:<reason>``,
        and the protocol's own (see its module docstring)."""
        return dict(self._counters)

    # -------------------------------------------------------------- transport hooks

    async def _open(self) -> None:
        await self._link.open()

    def _ready_to_send(self) -> bool:
        return self._link.backlog < OUTBOX_HIGH_WATER

    async def _wait_disconnected(self) -> None:
        await self._link.wait_closed()

    def _abort_connection(self) -> None:
        self._link.drop()

    async def _disconnect(self) -> None:
        if not await self._link.drain():  # what close() flushed goes out first
            self._relay_log.info(
                "%s: relay did not take our last messages in time; closing anyway", self.name
            )
        self._abort_connection()  # the goodbye (a WebSocket close frame) goes out in the background
        await self._link.release()

    def _validate_topic(self, topic: str, *, is_filter: bool) -> None:
        if not isinstance(topic, str) or not topic:
            raise ValueError(f"{self._protocol} topic must be a non-empty string")
        if len(topic) > MAX_TOPIC_LENGTH:
            raise ValueError(f"{self._protocol} topic longer than {MAX_TOPIC_LENGTH} characters")
        if is_filter and topic not in self._topics and len(self._topics) >= self._max_topics:
            raise ValueError(f"{self.name}: already subscribed to {self._max_topics} topics")

    # -------------------------------------------------------------- connection internals

    def _on_outbox_drained(self) -> None:
        if self._queue and self.state == "connected":
            self._flush_queue()  # the base queue held messages while we were backed up

    @abstractmethod
    def _on_text(self, data: str) -> None:
        """One text frame from the server (never called from inside one of our own calls)."""

    def _drop(self, reason: str, detail: str = "") -> None:
        self._counters[f"dropped:{reason}"] += 1
        self._link.warn_once(
            f"dropped:{reason}", "%s: dropped an incoming message (%s) %.200s", self.name, reason, detail
        )

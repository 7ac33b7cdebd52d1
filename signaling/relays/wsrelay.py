"""Trystero's self-hosted ws-relay: one WebSocket connection (aiohttp client) to a relay that
forwards JSON messages between topics, spoken as ``@trystero-p2p/ws-relay`` 0.25 speaks it.

Wire (JSON text frames, compact, keys in this order)
----------------------------------------------------
* ``{"type":"subscribe","topic":T}`` / ``{"type":"unsubscribe","topic":T}``: one frame per topic.
* ``{"type":"publish","topic":T,"payload":P}``: ``P`` is the message text as a JSON string (the
  topic strategy above hands us text, as Trystero's topic strategy hands its adapter).
* Relay -> us: ``{"topic":T,"payload":P}`` for every publish on a topic we subscribed to, our own
  included. ``P`` may be a JSON string or a JSON object (Trystero treats an object as the
  message itself); an object is delivered as its compact JSON text.

The protocol has no acknowledgement and no error message. A subscription counts as acknowledged
once its frame is queued on the socket: the socket keeps order, so the relay has it before
anything we publish afterwards. A relay that refuses us can only close the connection.

Receiving (Trystero drops anything that is not ``{topic: string, payload: string|object}``; we
drop it too and count why, see ``counters``): ``malformed`` (not JSON, not that shape, a binary
frame) -> ``unsubscribed`` (a topic we are not, or no longer, subscribed to) -> delivered as
``on_message(topic, text)``.

Reconnects and liveness
-----------------------
Trystero's ``makeSocket`` retries after ``random(0..p)``, p = 3.333 s doubling to 60 s (the same
socket as its nostr strategy: :data:`~signaling.relays.nostr.NOSTR_BACKOFF`), and never sends its
subscriptions again after a reconnect: a JS peer stays deaf on that relay until it rejoins. We
re-send ours on every connection (base class). aiohttp's WebSocket heartbeat finds a hung relay
or a dead path (the protocol itself has nothing to wait an answer for). A relay hosted in this
process is reached without a socket (:mod:`signaling.relays.local`), and behaves the same.

Bounded
-------
The send queue (base class), the outbox (high-water mark, then the base queue holds messages;
like the link, :class:`~signaling.relays.link_relay.LinkRelay`'s, shared with nostr),
incoming messages (``MAX_MESSAGE_BYTES``; a larger one drops the connection), topics
(``max_topics``; beyond it ``subscribe`` raises), topic length, and the counters (fixed keys).
The link's reader yields to the loop every few dozen frames, so a flooding relay cannot starve
the loop; a relay sending garbage costs one parse per frame and is logged once per connection.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, ClassVar

import orjson

from .link_relay import MAX_TOPIC_LENGTH, LinkRelay

__all__ = ["MAX_TOPIC_LENGTH", "WsRelay", "publish_frame", "subscription_frame"]

log = logging.getLogger(__name__)

# A signal (an encrypted SDP) is a few KiB. Larger frames are abuse.
MAX_MESSAGE_BYTES = 1024 * 1024


def subscription_frame(kind: str, topic: str) -> str:
    """``{"type":kind,"topic":topic}`` for ``kind`` ``"subscribe"`` or ``"unsubscribe"``."""
    return orjson.dumps({"type": kind, "topic": topic}).decode()


def publish_frame(topic: str, text: str) -> str:
    """``{"type":"publish","topic":topic,"payload":text}`` as ``JSON.stringify`` writes it."""
    return orjson.dumps({"type": "publish", "topic": topic, "payload": text}).decode()


class WsRelay(LinkRelay):
    """A Trystero-compatible connection to one ws-relay (see the module docstring)."""

    _protocol: ClassVar[str] = "ws-relay"
    _server_kind: ClassVar[str] = "ws-relay"
    _max_message_bytes: ClassVar[int] = MAX_MESSAGE_BYTES
    _relay_log: ClassVar[logging.Logger] = log

    # -------------------------------------------------------------- transport hooks

    def _request_subscribe(self, topics: list[str]) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if not self._link.connected:
            fut.set_exception(ConnectionError(f"{self.name}: not connected"))
            return fut
        for topic in topics:
            self._link.send(subscription_frame("subscribe", topic))
        self._counters["subscribed"] += len(topics)
        fut.set_result(None)  # no acknowledgement in this protocol: queued in order is enough
        return fut

    def _request_unsubscribe(self, topic: str) -> None:
        if self._link.connected:
            self._link.send(subscription_frame("unsubscribe", topic))

    def _send(self, topic: str, text: str) -> bool:
        if not self._link.connected:
            return False
        self._link.send(publish_frame(topic, text))
        self._counters["published"] += 1
        return True

    # -------------------------------------------------------------- inbound messages

    def _on_text(self, data: str) -> None:
        self._counters["received"] += 1
        try:
            msg: Any = orjson.loads(data)
        except orjson.JSONDecodeError:
            self._drop("malformed", "not JSON")
            return
        if not isinstance(msg, dict):
            self._drop("malformed", "not an object")
            return
        topic, payload = msg.get("topic"), msg.get("payload")
        if not isinstance(topic, str):
            self._drop("malformed", "no topic")
            return
        if not isinstance(payload, str | dict):
            self._drop("malformed", "payload is neither a string nor an object")
            return
        if topic not in self._topics:
            self._drop("unsubscribed", topic[:MAX_TOPIC_LENGTH])  # e.g. just after an unsubscribe
            return
        if isinstance(payload, str):
            text = payload
        else:
            try:
                text = orjson.dumps(payload).decode()
            except orjson.JSONEncodeError:  # nested deeper than orjson writes
                self._drop("malformed", "payload nested too deeply")
                return
        self._counters["delivered"] += 1
        self._deliver(topic, text.encode())  # orjson refused lone surrogates: always UTF-8

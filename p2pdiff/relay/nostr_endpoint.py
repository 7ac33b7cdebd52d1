"""One client's Nostr conversation (:class:`NostrSession`): its subscriptions, its event rate, and
the NIP-01 answer to each of its frames; plus the relay information document (NIP-11).

Answers (machine-readable prefixes of NIP-01):
- ``EVENT``: ``["OK",id,true,""]``; ``["OK",id,true,"duplicate: ..."]`` for an event relayed lately
  (it reaches nobody again); ``["OK",id,false,"invalid: ..."]`` (shape, size, id, signature);
  ``["OK",id,false,"blocked: ..."]`` (a kind that is not ephemeral: nothing is stored here);
  ``["OK",id,false,"rate-limited: ..."]`` past ``events_per_second`` (with ``events_burst``).
  Trystero 0.25 gives a relay up for good on any ``OK false`` but ``rate-limited:``, so only that one
  may ever reach a well-behaved client: the limits are sized so.
- ``REQ``: ``["EOSE",subId]`` at once (nothing is stored, so nothing comes first), then live events;
  a REQ for a subscription id in use replaces it. Past ``max_subscriptions``, ``max_filters``,
  ``max_filter_values`` or ``max_values_per_connection`` (all values of the socket's subscriptions:
  what its REQs make the relay hold), past :data:`UNINDEXED_SUBSCRIPTIONS` subscriptions that
  every event must be checked against, or with a malformed filter:
  ``["CLOSED",subId,"error: ..."|"invalid: ..."]``.
- ``CLOSE``: no answer (Trystero 0.25 would give the relay up on any ``CLOSED``, even for its own
  CLOSE).
- Anything else: ``["NOTICE","error: ..."|"invalid: ..."]``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import orjson

from p2pdiff.config import RelayConfig
from p2pdiff.relay.link import ClientLink
from p2pdiff.relay.metrics import RelayMetrics
from p2pdiff.relay.nip01 import (
    CloseMsg,
    Event,
    EventMsg,
    EventRefused,
    Garbage,
    ReqMsg,
    ReqRefused,
    parse_frame,
    signature_ok,
)
from p2pdiff.relay.nostr_hub import NOSTR, NostrHub, Subscription
from signaling.bounded import TokenBucket

__all__ = ["NostrSession", "relay_information"]


# A subscription with a filter that names no #x is checked against every event the relay handles
# (nostr_hub's scan list), so each socket may hold only a few; Trystero's filters all name #x.
UNINDEXED_SUBSCRIPTIONS = 4


def _dumps(message: list[Any]) -> str:
    return orjson.dumps(message).decode()


class NostrSession:
    """The Nostr side of one client link (see the module docstring)."""

    def __init__(
        self,
        hub: NostrHub,
        link: ClientLink,
        limits: RelayConfig,
        metrics: RelayMetrics,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._hub = hub
        self._link = link
        self._limits = limits
        self._metrics = metrics
        self._subs: dict[str, Subscription] = {}
        self._values = 0  # of all filters in self._subs
        self._events = TokenBucket(limits.events_per_second, limits.events_burst, clock)

    def handle(self, text: str) -> None:
        """One text frame from the client."""
        if len(text) > self._limits.max_message_bytes:  # sockets are capped by aiohttp already
            self._refuse("too_large", f"error: a message is at most {self._limits.max_message_bytes} bytes")
            return
        try:
            message = parse_frame(text, self._limits)
        except Garbage as exc:
            self._refuse("garbage", str(exc))
            return
        except EventRefused as exc:
            self._metrics.events[NOSTR, exc.result] += 1
            self._link.send(_dumps(["OK", exc.event_id, False, str(exc)]))
            return
        except ReqRefused as exc:
            self._close_subscription(exc.sub_id)
            self._metrics.refused[NOSTR, exc.reason] += 1
            self._link.send(_dumps(["CLOSED", exc.sub_id, str(exc)]))
            return
        if isinstance(message, EventMsg):
            self._event(message.event)
        elif isinstance(message, ReqMsg):
            self._req(message)
        else:
            self._close(message)

    def binary(self) -> None:
        """A binary frame: refused with a NOTICE."""
        self._refuse("binary", "error: this relay takes text frames only")

    def end(self) -> None:
        """The client is gone: its subscriptions end. Idempotent."""
        for sub in self._subs.values():
            self._hub.unsubscribe(sub)
        self._subs.clear()
        self._values = 0

    def _refuse(self, reason: str, notice: str) -> None:
        self._metrics.refused[NOSTR, reason] += 1
        self._link.send(_dumps(["NOTICE", notice]))

    def _event(self, event: Event) -> None:
        events, link = self._metrics.events, self._link
        if not self._events.take():
            events[NOSTR, "rate_limited"] += 1
            rate = self._limits.events_per_second
            link.send(_dumps(["OK", event.id, False, f"rate-limited: at most {rate:g} events per second"]))
            return
        if self._hub.seen(event.id):
            events[NOSTR, "duplicate"] += 1
            link.send(_dumps(["OK", event.id, True, "duplicate: already relayed"]))
            return
        if not signature_ok(event):
            events[NOSTR, "bad_signature"] += 1
            link.send(_dumps(["OK", event.id, False, "invalid: bad signature"]))
            return
        events[NOSTR, "accepted"] += 1
        link.send('["OK","' + event.id + '",true,""]')  # before the fan-out: OK precedes the echo
        self._hub.publish(event)

    def _req(self, message: ReqMsg) -> None:
        sub_id, limits = message.sub_id, self._limits
        values = sum(f.values for f in message.filters)
        old = self._subs.get(sub_id)
        if old is None and len(self._subs) >= limits.max_subscriptions:
            self._refuse_req(sub_id, "subscriptions", f"at most {limits.max_subscriptions} subscriptions")
            return
        held = self._values - (old.values if old is not None else 0)
        if held + values > limits.max_values_per_connection:
            self._close_subscription(sub_id)  # a refused REQ ends the subscription it would replace
            text = f"at most {limits.max_values_per_connection} filter values in all subscriptions"
            self._refuse_req(sub_id, "connection_values", text)
            return
        sub = Subscription(self._link, sub_id, message.filters, values)
        if sub.topics is None and self._unindexed(besides=sub_id) >= UNINDEXED_SUBSCRIPTIONS:
            self._close_subscription(sub_id)
            text = f"at most {UNINDEXED_SUBSCRIPTIONS} subscriptions with a filter naming no #x"
            self._refuse_req(sub_id, "unindexed_subscriptions", text)
            return
        self._close_subscription(sub_id)
        self._subs[sub_id] = sub
        self._values += values
        self._hub.subscribe(sub)
        self._link.send(_dumps(["EOSE", sub_id]))

    def _unindexed(self, *, besides: str) -> int:
        return sum(1 for sub_id, sub in self._subs.items() if sub.topics is None and sub_id != besides)

    def _refuse_req(self, sub_id: str, reason: str, text: str) -> None:
        self._metrics.refused[NOSTR, reason] += 1
        self._link.send(_dumps(["CLOSED", sub_id, f"error: {text} per connection"]))

    def _close(self, message: CloseMsg) -> None:
        self._close_subscription(message.sub_id)

    def _close_subscription(self, sub_id: str) -> None:
        sub = self._subs.pop(sub_id, None)
        if sub is not None:
            self._values -= sub.values
            self._hub.unsubscribe(sub)


def relay_information(limits: RelayConfig) -> dict[str, Any]:
    """The NIP-11 document, for ``GET <path>`` with ``Accept: application/nostr+json``."""
    return {
        "name": "p2pdiff room relay",
        "description": "Signaling for the rooms of this p2pdiff server: ephemeral events only",
        "software": "p2pdiff",
        "supported_nips": [1, 11],
        "limitation": {
            "max_message_length": limits.max_message_bytes,
            "max_subscriptions": limits.max_subscriptions,
            "max_filters": limits.max_filters,
            "max_content_length": limits.max_event_bytes,
            "auth_required": False,
            "payment_required": False,
        },
    }

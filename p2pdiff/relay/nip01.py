"""NIP-01, the part a Trystero client uses, as pure functions: parse a client frame, check an event,
match filters. No I/O and no state; :mod:`p2pdiff.relay.nostr_endpoint` answers what these raise.

Client frames: ``["EVENT",event]``, ``["REQ",subId,filter...]``, ``["CLOSE",subId]``. Anything else
raises :class:`Garbage` (answered ``NOTICE``). An event that cannot be relayed raises
:class:`EventRefused` (answered ``OK false`` with a NIP-01 prefix); a subscription that cannot be
served raises :class:`ReqRefused` (answered ``CLOSED``). Limits come from ``[relay]``
(:class:`~p2pdiff.config.RelayConfig`).

Events (checked in this order, cheapest first): the seven fields with their JSON types and hex
shapes -> size (``max_event_bytes`` of canonical JSON) -> ephemeral kind (20000-29999: this relay
stores nothing, so it relays only events meant not to be stored) -> id (the NIP-01 hash). The
BIP-340 signature is checked by the caller (:func:`signature_ok`) after its dedupe, since a copy of
an event already relayed needs no second check.

Filters: ``ids``, ``authors`` (64 lower-case hex characters each), ``kinds``, ``#<letter>`` (tag
values), ``since``, ``until`` (apply to live events, as relays do) and ``limit`` (bounds stored
events, of which there are none: accepted and ignored). An unknown field refuses the REQ rather
than match more than the client asked for.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, TypeGuard

import orjson

from p2pdiff.config import RelayConfig
from signaling.crypto import nostr_event_id
from signaling.relays.nostr import MAX_SAFE_INTEGER, verify_signature

__all__ = [
    "CloseMsg",
    "Event",
    "EventMsg",
    "EventRefused",
    "Filter",
    "Garbage",
    "ReqMsg",
    "ReqRefused",
    "parse_frame",
    "signature_ok",
]

EPHEMERAL_KINDS = range(20000, 30000)
MAX_KIND = 65535
# NIP-01: a subscription id is a non-empty string of at most 64 characters.
MAX_SUB_ID_CHARS = 64
_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX128 = re.compile(r"[0-9a-f]{128}")
_TAG_FILTER = re.compile(r"#[A-Za-z]")
_FILTER_FIELDS = frozenset({"ids", "authors", "kinds", "since", "until", "limit"})


class Garbage(ValueError):
    """A frame that is no NIP-01 client message (answered with a NOTICE)."""


class EventRefused(ValueError):
    """An event the relay will not relay: ``["OK",event_id,false,"<prefix>: <text>"]``."""

    def __init__(self, event_id: str, prefix: str, text: str, result: str) -> None:
        super().__init__(f"{prefix}: {text}")
        self.event_id = event_id
        #: The metrics label (p2pdiff_relay_events_total{result}).
        self.result = result


class ReqRefused(ValueError):
    """A subscription the relay will not serve: ``["CLOSED",sub_id,"<prefix>: <text>"]``."""

    def __init__(self, sub_id: str, prefix: str, text: str, reason: str) -> None:
        super().__init__(f"{prefix}: {text}")
        self.sub_id = sub_id
        #: The metrics label (p2pdiff_relay_refused_total{reason}).
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Event:
    """A checked event; ``json`` is its canonical JSON (Trystero's field order), made once."""

    id: str
    pubkey: str
    created_at: int
    kind: int
    tags: tuple[tuple[str, ...], ...]
    content: str
    sig: str
    json: str

    def tag_values(self, letter: str) -> list[str]:
        """The values of this event's ``letter`` tags (their second items)."""
        return [tag[1] for tag in self.tags if len(tag) >= 2 and tag[0] == letter]


@dataclass(frozen=True, slots=True)
class Filter:
    ids: frozenset[str] | None = None
    authors: frozenset[str] | None = None
    kinds: frozenset[int] | None = None
    #: (letter, values) per ``#<letter>`` field.
    tags: tuple[tuple[str, frozenset[str]], ...] = ()
    since: int | None = None
    until: int | None = None

    @property
    def values(self) -> int:
        """How many values the filter holds (what it costs to keep)."""
        held = sum(len(values) for _, values in self.tags)
        return held + sum(len(field) for field in (self.ids, self.authors, self.kinds) if field is not None)

    def matches(self, event: Event) -> bool:
        if self.kinds is not None and event.kind not in self.kinds:
            return False
        if self.since is not None and event.created_at < self.since:
            return False
        if self.until is not None and event.created_at > self.until:
            return False
        if self.ids is not None and event.id not in self.ids:
            return False
        if self.authors is not None and event.pubkey not in self.authors:
            return False
        for letter, values in self.tags:
            if not any(len(t) >= 2 and t[0] == letter and t[1] in values for t in event.tags):
                return False
        return True

    def tag(self, letter: str) -> frozenset[str] | None:
        """The values this filter requires of ``letter`` tags, if it names that tag."""
        return next((values for name, values in self.tags if name == letter), None)


@dataclass(frozen=True, slots=True)
class EventMsg:
    event: Event


@dataclass(frozen=True, slots=True)
class ReqMsg:
    sub_id: str
    filters: tuple[Filter, ...]


@dataclass(frozen=True, slots=True)
class CloseMsg:
    sub_id: str


def parse_frame(text: str, limits: RelayConfig) -> EventMsg | ReqMsg | CloseMsg:
    """One client frame, checked (see the module docstring for what each refusal means)."""
    try:
        message = orjson.loads(text)
    except orjson.JSONDecodeError:
        raise Garbage("error: could not parse the message as JSON") from None
    if not isinstance(message, list) or not message or not isinstance(message[0], str):
        raise Garbage('error: a message is a JSON array starting with "EVENT", "REQ" or "CLOSE"')
    match message[0]:
        case "EVENT":
            if len(message) != 2:
                raise Garbage('invalid: an EVENT message is ["EVENT",<event>]')
            return EventMsg(parse_event(message[1], limits))
        case "REQ":
            sub_id = _sub_id(message)
            return ReqMsg(sub_id, parse_filters(sub_id, message[2:], limits))
        case "CLOSE":
            if len(message) != 2:
                raise Garbage('invalid: a CLOSE message is ["CLOSE",<subscription id>]')
            return CloseMsg(_sub_id(message))
        case other:
            raise Garbage(f"error: unknown message type {other[:32]!r}")


def _sub_id(message: list[Any]) -> str:
    sub_id = message[1] if len(message) > 1 else None
    if not isinstance(sub_id, str) or not 0 < len(sub_id) <= MAX_SUB_ID_CHARS:
        raise Garbage(f"invalid: a subscription id is a string of 1 to {MAX_SUB_ID_CHARS} characters")
    return sub_id


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_event(raw: object, limits: RelayConfig) -> Event:
    """Check an event's shape, size, kind and id (not its signature: :func:`signature_ok`)."""
    if not isinstance(raw, dict):
        raise Garbage("invalid: an event is a JSON object")
    event_id = raw.get("id")
    if not isinstance(event_id, str) or not _HEX64.fullmatch(event_id):
        raise Garbage("invalid: the event has no id of 64 lower-case hex characters")
    kind, created_at, tags = raw.get("kind"), raw.get("created_at"), raw.get("tags")
    content, pubkey, sig = raw.get("content"), raw.get("pubkey"), raw.get("sig")
    if not (_is_int(kind) and 0 <= kind <= MAX_KIND):
        raise EventRefused(event_id, "invalid", f"kind must be an integer from 0 to {MAX_KIND}", "invalid")
    if not (_is_int(created_at) and 0 <= created_at <= MAX_SAFE_INTEGER):
        raise EventRefused(event_id, "invalid", "created_at must be unix seconds", "invalid")
    if not isinstance(content, str):
        raise EventRefused(event_id, "invalid", "content must be a string", "invalid")
    if not isinstance(tags, list) or not all(
        isinstance(tag, list) and all(isinstance(v, str) for v in tag) for tag in tags
    ):
        raise EventRefused(event_id, "invalid", "tags must be a list of lists of strings", "invalid")
    if not (isinstance(pubkey, str) and _HEX64.fullmatch(pubkey)):
        raise EventRefused(event_id, "invalid", "pubkey must be 64 lower-case hex characters", "invalid")
    if not (isinstance(sig, str) and _HEX128.fullmatch(sig)):
        raise EventRefused(event_id, "invalid", "sig must be 128 lower-case hex characters", "invalid")
    try:
        serial = orjson.dumps(
            {
                "kind": kind,
                "tags": tags,
                "created_at": created_at,
                "content": content,
                "pubkey": pubkey,
                "id": event_id,
                "sig": sig,
            }
        )
        expected = nostr_event_id(pubkey, created_at, kind, tags, content)
    except (TypeError, ValueError):  # a lone surrogate: no UTF-8 form, so no id
        raise EventRefused(event_id, "invalid", "the event is not valid UTF-8", "invalid") from None
    if len(serial) > limits.max_event_bytes:
        raise EventRefused(
            event_id, "invalid", f"the event is over {limits.max_event_bytes} bytes", "too_large"
        )
    if kind not in EPHEMERAL_KINDS:
        raise EventRefused(
            event_id,
            "blocked",
            "this relay stores nothing: only ephemeral kinds 20000-29999",
            "not_ephemeral",
        )
    if expected != event_id:
        raise EventRefused(event_id, "invalid", "the id is not the hash of the event", "invalid")
    return Event(
        id=event_id,
        pubkey=pubkey,
        created_at=created_at,
        kind=kind,
        tags=tuple(tuple(tag) for tag in tags),
        content=content,
        sig=sig,
        json=serial.decode(),
    )


def event_from_json(text: str) -> Event:
    """An event another node of the cluster checked already (its ``json``): parsed, not checked."""
    raw = orjson.loads(text)
    return Event(
        id=raw["id"],
        pubkey=raw["pubkey"],
        created_at=raw["created_at"],
        kind=raw["kind"],
        tags=tuple(tuple(tag) for tag in raw["tags"]),
        content=raw["content"],
        sig=raw["sig"],
        json=text,
    )


def signature_ok(event: Event) -> bool:
    """The BIP-340 signature of ``sig`` over ``id`` by ``pubkey``."""
    return verify_signature({"pubkey": event.pubkey, "sig": event.sig, "id": event.id})


def parse_filters(sub_id: str, raws: list[Any], limits: RelayConfig) -> tuple[Filter, ...]:
    if not raws:
        raise ReqRefused(sub_id, "invalid", "a REQ needs at least one filter", "filters")
    if len(raws) > limits.max_filters:
        raise ReqRefused(sub_id, "error", f"at most {limits.max_filters} filters per REQ", "filters")
    return tuple(_parse_filter(sub_id, raw, limits) for raw in raws)


def _parse_filter(sub_id: str, raw: object, limits: RelayConfig) -> Filter:
    if not isinstance(raw, dict):
        raise ReqRefused(sub_id, "invalid", "a filter is a JSON object", "filters")
    tags: list[tuple[str, frozenset[str]]] = []
    for key in raw:
        if key not in _FILTER_FIELDS and not _TAG_FILTER.fullmatch(key):
            raise ReqRefused(sub_id, "invalid", f"unsupported filter field {key[:32]!r}", "filters")
    for key, value in raw.items():
        if key.startswith("#"):
            tags.append((key[1:], _values(sub_id, key, value, str, limits)))
    since, until = raw.get("since"), raw.get("until")
    # limit bounds the stored events sent before EOSE; there are none, so it is checked, not kept.
    for name, number in (("since", since), ("until", until), ("limit", raw.get("limit"))):
        if number is not None and not (_is_int(number) and 0 <= number <= MAX_SAFE_INTEGER):
            raise ReqRefused(sub_id, "invalid", f"{name} must be a non-negative integer", "filters")
    ids = _hex_values(sub_id, "ids", raw.get("ids"), limits)
    authors = _hex_values(sub_id, "authors", raw.get("authors"), limits)
    kinds = raw.get("kinds")
    return Filter(
        ids=ids,
        authors=authors,
        kinds=None if kinds is None else _values(sub_id, "kinds", kinds, int, limits),
        tags=tuple(tags),
        since=since,
        until=until,
    )


def _values(sub_id: str, key: str, value: object, kind: type, limits: RelayConfig) -> frozenset[Any]:
    if not isinstance(value, list):
        raise ReqRefused(sub_id, "invalid", f"{key} must be a list", "filters")
    if len(value) > limits.max_filter_values:
        raise ReqRefused(
            sub_id, "error", f"at most {limits.max_filter_values} values in {key}", "filter_values"
        )
    if not all(isinstance(v, kind) and not isinstance(v, bool) for v in value):
        raise ReqRefused(sub_id, "invalid", f"{key} must hold {kind.__name__} values", "filters")
    return frozenset(value)


def _hex_values(sub_id: str, key: str, value: object, limits: RelayConfig) -> frozenset[str] | None:
    if value is None:
        return None
    values: frozenset[str] = _values(sub_id, key, value, str, limits)
    if not all(_HEX64.fullmatch(v) for v in values):
        raise ReqRefused(sub_id, "invalid", f"{key} must be 64 lower-case hex characters each", "filters")
    return values

"""Hypothesis against the NIP-01 layer: hostile frames, filters and events."""

from __future__ import annotations

import contextlib
import json
import random
import time
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2pdiff.config import RelayConfig
from p2pdiff.relay.bus import LocalBus
from p2pdiff.relay.link import ClientLink
from p2pdiff.relay.metrics import RelayMetrics
from p2pdiff.relay.nip01 import (
    Event,
    EventRefused,
    Filter,
    Garbage,
    ReqRefused,
    parse_event,
    parse_frame,
    signature_ok,
)
from p2pdiff.relay.nostr_endpoint import NostrSession
from p2pdiff.relay.nostr_hub import NostrHub, Subscription
from signaling.crypto import nostr_event_id
from signaling.relays.nostr import NostrKeys, make_event
from tests.relay.nostr_client import NostrClient, signed, topic_filter

LIMITS = RelayConfig()
KEYS = [NostrKeys(bytes([i + 1]) * 32) for i in range(3)]
TOPICS = ["t0", "t1", "t2", "t3"]
REFUSALS = (Garbage, EventRefused, ReqRefused)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


@given(st.text(max_size=300))
def test_any_text_is_parsed_or_refused(text: str) -> None:
    with contextlib.suppress(*REFUSALS):
        parse_frame(text, LIMITS)


@given(st.sampled_from(["EVENT", "REQ", "CLOSE", "OK"]), st.lists(json_values, max_size=4))
def test_any_json_message_is_parsed_or_refused(kind: str, rest: list[Any]) -> None:
    with contextlib.suppress(*REFUSALS):
        parse_frame(json.dumps([kind, *rest]), LIMITS)  # json: it writes integers of any size


@given(
    st.sampled_from(KEYS),
    st.sampled_from(TOPICS),
    st.text(max_size=200),
    st.lists(st.lists(st.text(max_size=6), max_size=3), max_size=3),
    st.integers(0, 2**40),
)
def test_signed_events_pass_and_any_change_is_caught(
    keys: NostrKeys, topic: str, content: str, extra_tags: list[list[str]], created_at: int
) -> None:
    event = make_event(keys, topic, content, created_at)
    event["tags"] = [*event["tags"], *extra_tags]
    event["id"] = nostr_event_id(keys.pubkey, created_at, event["kind"], event["tags"], content)
    event["sig"] = keys.sign(event["id"])
    checked = parse_event(event, LIMITS)
    assert signature_ok(checked) and orjson.loads(checked.json) == event
    tampered = dict(event, content=content + "!")
    with pytest.raises(EventRefused, match="invalid: the id is not the hash"):
        parse_event(tampered, LIMITS)
    other_sig = dict(event, sig=KEYS[(KEYS.index(keys) + 1) % 3].sign(event["id"]))
    assert not signature_ok(parse_event(other_sig, LIMITS))


@given(
    st.dictionaries(st.sampled_from(["kind", "tags", "created_at", "content", "pubkey", "sig"]), json_values)
)
def test_mangled_event_fields_are_refused(changes: dict[str, Any]) -> None:
    event = make_event(KEYS[0], "t0", "c", 1_700_000_000)
    mangled = event | changes
    try:
        checked = parse_event(mangled, LIMITS)
    except REFUSALS:
        return
    assert mangled == event or not signature_ok(checked) or checked.json == parse_event(event, LIMITS).json


# ---------------------------------------------------------------- filters and the hub's index

events = st.builds(
    lambda keys, topics, created_at: _event(keys, topics, created_at),
    st.sampled_from(KEYS),
    st.lists(st.sampled_from(TOPICS), min_size=0, max_size=3),
    st.integers(100, 200),
)
filters = st.builds(
    Filter,
    ids=st.none(),
    authors=st.none() | st.frozensets(st.sampled_from([k.pubkey for k in KEYS]), max_size=2),
    kinds=st.none() | st.frozensets(st.integers(20000, 20010), max_size=3),
    tags=st.lists(
        st.tuples(st.sampled_from(["x", "y"]), st.frozensets(st.sampled_from(TOPICS), max_size=3)), max_size=2
    ).map(tuple),
    since=st.none() | st.integers(90, 210),
    until=st.none() | st.integers(90, 210),
)


def _event(keys: NostrKeys, topics: list[str], created_at: int) -> Event:
    kind = 20000 + created_at % 11
    tags = [["x", t] for t in topics] + [["y", "t1"]]
    event_id = nostr_event_id(keys.pubkey, created_at, kind, tags, "")
    raw = {"kind": kind, "tags": tags, "created_at": created_at, "content": "", "pubkey": keys.pubkey}
    return parse_event(raw | {"id": event_id, "sig": "0" * 128}, LIMITS)


def reference_match(f: Filter, event: Event) -> bool:
    """NIP-01, written out plainly."""
    return (
        (f.kinds is None or event.kind in f.kinds)
        and (f.authors is None or event.pubkey in f.authors)
        and (f.since is None or event.created_at >= f.since)
        and (f.until is None or event.created_at <= f.until)
        and all(any(t[0] == letter and t[1] in values for t in event.tags) for letter, values in f.tags)
    )


class RecordingLink(ClientLink):
    def __init__(self) -> None:
        super().__init__("test", "nostr", 1 << 30, RelayMetrics())
        self.frames: list[str] = []

    @property
    def backlog(self) -> int:
        return 0

    def _enqueue(self, frame: str) -> None:
        self.frames.append(frame)

    def _shut(self, code: int, reason: str) -> None:
        pass


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.lists(filters, min_size=1, max_size=3), max_size=6), st.lists(events, max_size=6))
async def test_fan_out_reaches_exactly_the_matching_subscriptions(
    subscriptions: list[list[Filter]], published: list[Event]
) -> None:
    hub = NostrHub(RelayMetrics(), LocalBus())
    links = [RecordingLink() for _ in subscriptions]
    subs = [
        Subscription(link, f"s{i}", tuple(fs))
        for i, (link, fs) in enumerate(zip(links, subscriptions, strict=True))
    ]
    for sub in subs:
        hub.subscribe(sub)
    for event in published:
        if hub.seen(event.id):
            continue
        expected = [i for i, fs in enumerate(subscriptions) if any(reference_match(f, event) for f in fs)]
        before = [len(link.frames) for link in links]
        assert hub.publish(event) == len(expected)
        got = [i for i, link in enumerate(links) if len(link.frames) > before[i]]
        assert got == expected
        for i in got:
            assert orjson.loads(links[i].frames[-1]) == ["EVENT", f"s{i}", orjson.loads(event.json)]
    for sub in subs:
        hub.unsubscribe(sub)
    assert len(hub) == 0


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=200)
@given(st.lists(st.text(max_size=60) | json_values.map(json.dumps), max_size=10))
async def test_a_session_answers_each_frame_at_most_once(frames: list[str]) -> None:
    link = RecordingLink()
    session = NostrSession(NostrHub(RelayMetrics(), LocalBus()), link, LIMITS, RelayMetrics())
    for frame in frames:
        before = len(link.frames)
        session.handle(frame)
        answers = [orjson.loads(f) for f in link.frames[before:]]
        assert len(answers) <= 1
        assert all(a[0] in ("OK", "NOTICE", "CLOSED", "EOSE") for a in answers)
    session.end()


# ---------------------------------------------------------------- over a socket


def mutations(rng: random.Random, keys: NostrKeys) -> list[str]:
    """Valid frames, each broken in a random way (a seeded corpus: the same every run)."""
    good = [
        orjson.dumps(["EVENT", signed(keys, "fuzz-topic", "c" * rng.randrange(50))]).decode(),
        orjson.dumps(["REQ", "sub", topic_filter("fuzz-topic")]).decode(),
        '["CLOSE","sub"]',
    ]
    corpus = []
    for _ in range(300):
        frame = bytearray(rng.choice(good).encode())
        for _ in range(rng.randrange(1, 4)):
            at = rng.randrange(len(frame))
            match rng.randrange(3):
                case 0:
                    frame[at] = rng.randrange(32, 127)
                case 1:
                    del frame[at : at + rng.randrange(1, 20)]
                case _:
                    frame[at:at] = rng.choice(
                        [b'"', b"[", b"{", b"}", b"]", b",", b"0", b"\\u0000", b"-1e999"]
                    )
        corpus.append(frame.decode("utf-8", "replace"))
    return corpus


async def test_broken_frames_over_a_socket_leave_the_relay_serving(relay_client: TestClient) -> None:
    fuzzer = await NostrClient.connect(relay_client)
    for frame in mutations(random.Random(15), NostrKeys()):
        await fuzzer.ws.send_str(frame)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # drain the answers; the socket must stay open
        try:
            answer = await fuzzer.recv(0.3)
        except TimeoutError:
            break
        assert answer[0] in ("OK", "NOTICE", "CLOSED", "EOSE", "EVENT")
    listener = await NostrClient.connect(relay_client)
    await listener.req("ok", topic_filter("after"))
    event = signed(NostrKeys(), "after")
    assert (await fuzzer.publish(event))[2] is True
    assert await listener.recv() == ["EVENT", "ok", event]

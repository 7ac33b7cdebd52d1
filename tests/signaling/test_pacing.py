"""Announce pacing (signaling.pacing), strategy defaults (RoomConfig) and the torrent offer pool,
without relays or peers."""

from __future__ import annotations

import asyncio
import sys
from collections import Counter
from pathlib import Path

import pytest

from signaling import RoomConfig, Timeouts, strategies
from signaling.pacing import AnnouncePacer
from signaling.peer import PeerError
from signaling.strategies.nostr import DEFAULT_RELAY_URLS as NOSTR_URLS
from signaling.strategies.torrent import OfferPool, TorrentRoomSignaller, TorrentRoomSignaller022

WARMUP = (0.233, 0.533, 1.333)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def pacer(**kwargs: object) -> tuple[AnnouncePacer, Clock, Counter[str]]:
    clock, counters = Clock(), Counter[str]()
    settings: dict[str, object] = {"warmup": WARMUP, "interval": 60.0, "counters": counters, "clock": clock}
    settings.update(kwargs)
    return AnnouncePacer(**settings), clock, counters  # type: ignore[arg-type]


def run(p: AnnouncePacer, clock: Clock, until: float) -> list[float]:
    """Announce whenever due (sleeping exactly as told) until ``until``; the send times."""
    sent = []
    while clock.now < until:
        delay = p.due_in()
        if delay <= 0:
            p.sent()
            sent.append(round(clock.now - 1000.0, 3))
        else:
            clock.now += delay
    return sent


def test_warmup_then_steady_like_trystero() -> None:
    p, clock, counters = pacer()
    assert run(p, clock, 1000 + 200) == [0.0, 0.233, 0.766, 2.099, 62.099, 122.099, 182.099]
    assert not counters


def test_warmup_delays_are_capped_by_the_interval() -> None:
    p, clock, _ = pacer(interval=0.5, stable_interval=0.5)
    assert run(p, clock, 1000 + 2) == [0.0, 0.233, 0.733, 1.233, 1.733]


def test_stable_room_stretches_the_steady_interval() -> None:
    stable = [True]
    p, clock, counters = pacer(stable=lambda: stable[0])
    # The warm-up is never stretched; after it, every 120 s instead of 60 s.
    assert run(p, clock, 1000 + 250) == [0.0, 0.233, 0.766, 2.099, 122.099, 242.099]
    assert counters["announces_stretched"] == 2


def test_room_that_stops_being_stable_announces_within_the_recheck() -> None:
    stable = [True]
    p, clock, _ = pacer(stable=lambda: stable[0])
    run(p, clock, 1000 + 3)  # warm-up done, last announce at 2.099
    clock.now = 1000 + 62.099
    assert p.due_in() == pytest.approx(10.0)  # stretched: look again in 10 s
    clock.now += 5
    stable[0] = False  # the peer left
    clock.now += 5
    assert p.due_in() == 0.0


def test_rate_limit_pause_defers_like_trystero() -> None:
    pause = [0.0]
    p, clock, counters = pacer(backoff=lambda: pause[0])
    run(p, clock, 1000 + 3)
    clock.now = 1000 + 62.099
    pause[0] = 30.0  # the relay said rate-limited 30 s ago
    assert p.due_in() == pytest.approx(60.0)  # skipped: max(interval, remaining pause)
    assert counters["announces_deferred"] == 1
    clock.now += 20
    assert p.due_in() == pytest.approx(40.0)  # still deferred, not re-counted
    pause[0] = 0.0
    clock.now += 40
    assert p.due_in() == 0.0
    pause[0] = 200.0  # escalated
    assert p.due_in() == pytest.approx(200.0)
    assert counters["announces_deferred"] == 2


def test_restart_runs_the_warmup_again() -> None:
    p, clock, _ = pacer()
    run(p, clock, 1000 + 100)
    p.restart()
    start = clock.now - 1000
    assert [round(t - start, 3) for t in run(p, clock, clock.now + 3)] == [0.0, 0.233, 0.766, 2.099]


def test_pacer_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        AnnouncePacer(warmup=WARMUP, interval=60.0, stable_interval=30.0)
    with pytest.raises(ValueError):
        AnnouncePacer(warmup=(-1.0,), interval=60.0)


# --------------------------------------------------------------------------- strategy defaults


def test_strategies_are_registered() -> None:
    assert {"mqtt", "nostr", "torrent"} <= set(strategies.names())
    # trackers need the session's peer id: the torrent signallers make them (no URL-only factory)
    assert dict(strategies.get("torrent").signallers) == {
        "0.25": TorrentRoomSignaller,
        "0.22": TorrentRoomSignaller022,
    }
    with pytest.raises(ValueError, match="not available"):
        strategies.get("firebase")  # a Trystero strategy we do not have (ws-relay now is one)


def test_a_module_in_the_strategies_package_is_a_strategy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # docs/architecture.md, "Adding a strategy": the module is all there is to add.
    (tmp_path / "wsdemo.py").write_text(
        "from signaling.relays.mqtt import MqttRelay\n"
        "from signaling.strategies.base import Strategy, topic_signallers\n"
        "STRATEGY = Strategy(name='ws-demo', signallers=topic_signallers(MqttRelay),\n"
        "                    default_relays=lambda app_id, wire: ())\n"
        "NOT_A_STRATEGY = 1\n"
    )
    (tmp_path / "helpers.py").write_text("X = 1  # a module without STRATEGY is skipped\n")
    monkeypatch.setattr(strategies, "__path__", [*strategies.__path__, str(tmp_path)])
    monkeypatch.setattr(strategies, "_registry", {})
    for name in ("wsdemo", "helpers"):
        monkeypatch.delitem(sys.modules, f"signaling.strategies.{name}", raising=False)
    try:
        strategies._register_package()
        assert set(strategies.names()) == {"mqtt", "nostr", "torrent", "ws-relay", "ws-demo"}
        config = RoomConfig(app_id="a", strategy="ws-demo", relay_urls=("ws://127.0.0.1:1",))
        assert config.strategy == "ws-demo"
    finally:
        for name in ("wsdemo", "helpers"):
            sys.modules.pop(f"signaling.strategies.{name}", None)


def test_nostr_default_relays_follow_the_app_id() -> None:
    # spec §10 and §9.4: Trystero 0.25.4's pick for these app ids
    assert RoomConfig(app_id="harness-app", strategy="nostr").effective_relay_urls == tuple(
        "wss://" + h
        for h in ("relay.artio.inf.unibe.ch", "purplerelay.com", "chorus.pjv.me", "basspistol.org",
                  "nostr.tegila.com.br")
    )
    app = RoomConfig(app_id="p2p-webgpu-diffusion-v1", strategy="nostr").effective_relay_urls
    assert app == tuple(
        "wss://" + h
        for h in ("strfry.shock.network", "relay02.lnfi.network", "relay.mostr.pub", "nostr-01.yakihonne.com",
                  "schnorr.me")
    )
    assert set(app) <= set(NOSTR_URLS)


def test_explicit_relay_urls_are_used_as_given() -> None:
    # Trystero's getRelays: relayConfig.urls || defaults.slice(0, redundancy): no trimming.
    urls = [f"ws://127.0.0.1:{port}/" for port in range(7000, 7007)]
    assert RoomConfig(app_id="a", strategy="nostr", relay_urls=urls).effective_relay_urls == tuple(urls)


def test_torrent_defaults_and_wire() -> None:
    assert RoomConfig(app_id="a", strategy="torrent").effective_relay_urls == (
        "wss://open.ftorrent.com",
        "wss://tracker.webtorrent.dev",
        "wss://tracker.openwebtorrent.com",
    )
    assert RoomConfig(app_id="a", strategy="torrent", wire="0.22").effective_relay_urls == (
        "wss://tracker.webtorrent.dev",
        "wss://tracker.openwebtorrent.com",
        "wss://tracker.btorrent.xyz",
    )


def test_stable_interval_is_a_timeout() -> None:
    assert Timeouts().announce_interval_stable == 120.0
    with pytest.raises(ValueError):
        Timeouts(announce_interval_stable=0)


# --------------------------------------------------------------------------- torrent offer pool


class FakePeer:
    def __init__(self, *, fail: bool = False, delay: float = 0.0) -> None:
        self.fail, self.delay = fail, delay
        self.closed = ""

    async def create_offer(self) -> str:
        await asyncio.sleep(self.delay)
        if self.fail:
            raise PeerError("no offer")
        return f"v=0 offer {id(self)}"

    async def close(self, reason: str = "") -> None:
        self.closed = reason or "closed"


def make_pool(**kwargs: object) -> tuple[OfferPool, list[FakePeer]]:
    peers: list[FakePeer] = []
    peer_kwargs = kwargs.pop("peer_kwargs", {})

    def make() -> FakePeer:
        peers.append(FakePeer(**peer_kwargs))  # type: ignore[arg-type]
        return peers[-1]

    settings: dict[str, object] = {"make_peer": make, "seal": lambda sdp: f"sealed({sdp})"}
    settings.update(kwargs)
    return OfferPool(**settings), peers  # type: ignore[arg-type]


async def test_pool_is_shared_by_concurrent_announces_and_reused() -> None:
    pool, peers = make_pool(peer_kwargs={"delay": 0.01})
    first, second = await asyncio.gather(pool.current(), pool.current())  # two trackers at once
    assert first == second and len(first) == 3 and len(peers) == 3
    assert all(o.sdp.startswith("sealed(v=0") and len(o.offer_id) == 20 for o in first)
    assert await pool.current() == first  # re-announced with the same ids
    taken = pool.claim(first[1].offer_id)
    assert taken is peers[1] and first[1].offer_id not in pool and pool.claim(first[1].offer_id) is None
    again = await pool.current()
    assert len(again) == 3 and len(peers) == 4 and first[1] not in again
    await pool.close()
    assert all(p.closed for p in peers if p is not taken) and not taken.closed
    assert await pool.current() == []


async def test_pool_replaces_expired_offers() -> None:
    pool, peers = make_pool(retention=0.05)
    first = await pool.current()
    await asyncio.sleep(0.1)
    second = await pool.current()
    assert not {o.offer_id for o in first} & {o.offer_id for o in second}
    await asyncio.sleep(0)
    assert all(p.closed == "offer expired unanswered" for p in peers[:3])
    await pool.close()


async def test_pool_survives_failed_and_abandoned_offers() -> None:
    pool, peers = make_pool(peer_kwargs={"fail": True})
    assert await pool.current() == [] and len(peers) == 3
    slow, slow_peers = make_pool(peer_kwargs={"delay": 10})
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):  # the tracker relay's offers timeout
            await slow.current()
    await asyncio.sleep(0)
    assert len(slow_peers) == 3 and all(p.closed == "offer abandoned" for p in slow_peers)
    assert slow.outstanding == 0

"""The nostr strategy's default relays: Trystero's per-appId pick of each wire's public list."""

from __future__ import annotations

import json
import random

import pytest

from signaling import strategies
from signaling.crypto import ID_CHARSET
from signaling.strategies.nostr import (
    DEFAULT_RELAY_URLS,
    DEFAULT_RELAY_URLS_022,
    default_relays,
    default_relays_022,
    trystero_shuffle,
)

from .wire_helpers import run_node


def test_default_relays_match_the_spec_vectors() -> None:
    assert default_relays("harness-app") == [
        "wss://relay.artio.inf.unibe.ch",
        "wss://purplerelay.com",
        "wss://chorus.pjv.me",
        "wss://basspistol.org",
        "wss://nostr.tegila.com.br",
    ]
    assert default_relays("p2p-webgpu-diffusion-v1") == [
        "wss://strfry.shock.network",
        "wss://relay02.lnfi.network",
        "wss://relay.mostr.pub",
        "wss://nostr-01.yakihonne.com",
        "wss://schnorr.me",
    ]
    assert default_relays_022("p2p-webgpu-diffusion-v1") == [
        "wss://ftp.halifax.rwth-aachen.de/nostr",
        "wss://relay.binaryrobot.com",
        "wss://nostr.cool110.xyz",
        "wss://relay.nostromo.social",
        "wss://nos.lol",
    ]
    assert default_relays("harness-app", wire="0.22") == [
        "wss://relay.binaryrobot.com",
        "wss://black.nostrcity.club",
        "wss://ftp.halifax.rwth-aachen.de/nostr",
        "wss://relay.fountain.fm",
        "wss://yabu.me/v2",
    ]
    assert len(DEFAULT_RELAY_URLS) == 28 and len(DEFAULT_RELAY_URLS_022) == 18
    assert default_relays("harness-app", 2) == default_relays("harness-app")[:2]
    assert sorted(default_relays("x", 100)) == sorted(DEFAULT_RELAY_URLS)  # a permutation
    assert default_relays("x", 0) == []
    with pytest.raises(ValueError):
        default_relays("x", wire="0.24")
    with pytest.raises(ValueError):
        default_relays("x", -1)
    assert trystero_shuffle([], 5) == []


def test_default_relays_match_trystero_js_for_many_app_ids() -> None:
    rng = random.Random(7)
    app_ids = ["harness-app", "p2p-webgpu-diffusion-v1", "a", "日本語のアプリ", "emoji-🚀", "x" * 2000]
    app_ids += [
        "".join(rng.choice(ID_CHARSET + "-_.") for _ in range(rng.randint(1, 60))) for _ in range(300)
    ]
    script = """
        import { readFileSync } from "node:fs";
        import { defaultRelayUrls } from "@trystero-p2p/nostr";
        import { getRelays } from "@trystero-p2p/core";
        import { defaultRelayUrls as urls022 } from "./node_modules/trystero022/src/nostr.js";
        import { getRelays as getRelays022 } from "./node_modules/trystero022/src/utils.js";
        const out = JSON.parse(readFileSync(0, "utf8")).map((appId) => [
          getRelays({ appId, relayConfig: { redundancy: 28 } }, defaultRelayUrls, 5, true),
          getRelays022({ appId, relayRedundancy: 18 }, urls022, 5, true),
        ]);
        console.log(JSON.stringify(out));
    """
    js = json.loads(run_node(script, json.dumps(app_ids, ensure_ascii=False)))
    for app_id, (js025, js022) in zip(app_ids, js, strict=True):
        assert default_relays(app_id, 28) == js025, app_id
        assert default_relays_022(app_id, 18) == js022, app_id


def test_strategy_defaults_are_the_pick_of_each_wire() -> None:
    nostr = strategies.get("nostr")
    assert nostr.wires == ("0.25", "0.22")
    assert nostr.default_relays("harness-app", "0.22") == tuple(default_relays_022("harness-app"))

"""The ws-relay strategy: registered, wire 0.25 only, no default relays."""

from __future__ import annotations

import functools

import pytest

from signaling import strategies
from signaling.config import RoomConfig
from signaling.relays.wsrelay import WsRelay
from signaling.signaller import RoomSignaller


def test_registered_for_wire_0_25_only() -> None:
    strategy = strategies.get("ws-relay")
    assert "ws-relay" in strategies.names()
    assert strategy.wires == ("0.25",)
    signaller = strategy.signaller("0.25")
    assert isinstance(signaller, functools.partial)
    assert (signaller.func, signaller.keywords) == (RoomSignaller, {"relay_factory": WsRelay})
    with pytest.raises(ValueError, match=r"does not support wire 0\.22"):
        RoomConfig(app_id="a", strategy="ws-relay", relay_urls=["ws://127.0.0.1:1/"], wire="0.22")


def test_relay_urls_are_required() -> None:
    assert strategies.get("ws-relay").default_relays("a", "0.25") == ()
    with pytest.raises(ValueError, match="no default relays: relay_urls"):
        RoomConfig(app_id="a", strategy="ws-relay")
    config = RoomConfig(
        app_id="a", strategy="ws-relay", relay_urls=["ws://127.0.0.1:1/", "ws://127.0.0.1:1/"]
    )
    assert config.effective_relay_urls == ("ws://127.0.0.1:1/",)

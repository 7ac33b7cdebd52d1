from __future__ import annotations

import subprocess
import sys

import pytest

from p2pdiff.config import P2PConfig
from p2pdiff.errors import BadRequest, Conflict
from p2pdiff.rooms.helper import ApiOnlyHelper, P2PHelper, make_helper


def test_disabled_p2p_runs_api_only() -> None:
    assert isinstance(make_helper(P2PConfig(enabled=False)), ApiOnlyHelper)


def test_enabled_p2p_runs_the_peer() -> None:
    # No api-only fallback when aiortc is missing: it is a dependency, and a broken install should
    # fail at start rather than serve without its helper peer.
    helper = make_helper(P2PConfig(enabled=True))
    assert isinstance(helper, P2PHelper) and helper.mode == "p2p"


def test_an_api_only_server_never_imports_aiortc() -> None:
    # The app uses signaling's leaf modules (bounded, background); the package loads the rest
    # on first use, so a server that never joins a room never pays for (or needs) WebRTC.
    code = (
        "import sys; from p2pdiff.app import create_app; from p2pdiff.config import Config; "
        "config = Config(); config.p2p.enabled = False; create_app(config); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'aiortc'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


async def test_api_only_helper_remembers_rooms() -> None:
    helper = ApiOnlyHelper()
    first = await helper.join("r1")
    assert await helper.join("r1") is first
    assert [r.room_id for r in helper.rooms()] == ["r1"]
    assert helper.peer_count() == 0
    assert await helper.leave("r1") is True
    assert await helper.leave("r1") is False


async def test_api_only_helper_keeps_a_room_on_its_wire() -> None:
    helper = ApiOnlyHelper(default_wire="0.22")
    assert (await helper.join("r1")).wire == "0.22"
    assert (await helper.join("r2", "0.25")).to_json()["wire"] == "0.25"
    assert await helper.join("r2") is helper.room("r2")  # no wire: whatever it runs
    with pytest.raises(Conflict) as err:
        await helper.join("r2", "0.22")
    assert err.value.code == "wire_mismatch"


async def test_p2p_helper_joins_torrent_rooms_on_either_wire() -> None:
    """Every strategy speaks both wires; a wire the library does not know is a 400, not a crash
    (the REST layer validates it first, this is the helper's own guard)."""
    helper = make_helper(P2PConfig(strategy="torrent", relay_urls=["ws://127.0.0.1:9"]))
    try:
        old = await helper.join("old", "0.22")
        new = await helper.join("new", "0.25")
        assert (old.wire, new.wire) == ("0.22", "0.25")
        # one selfId for both, sorting low so that tracker browsers answer our offers at once
        assert old.handle.self_id == new.handle.self_id and old.handle.self_id.startswith("0")
        assert len(old.handle.self_id) == 20
        assert {r.room_id: r.to_json()["wire"] for r in helper.rooms()} == {"old": "0.22", "new": "0.25"}
        with pytest.raises(BadRequest) as err:
            await helper.join("r", "0.23")
        assert err.value.code == "invalid_wire" and "0.23" in err.value.message
        assert {r.room_id for r in helper.rooms()} == {"old", "new"}
    finally:
        await helper.close()

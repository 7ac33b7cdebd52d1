from __future__ import annotations

import pytest

from p2pdiff import helper as helper_module
from p2pdiff.config import P2PConfig
from p2pdiff.helper import ApiOnlyHelper, make_helper


def test_disabled_p2p_runs_api_only() -> None:
    assert isinstance(make_helper(P2PConfig(enabled=False)), ApiOnlyHelper)


def test_missing_aiortc_runs_api_only(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(helper_module, "p2p_available", lambda: False)
    helper = make_helper(P2PConfig(enabled=True))
    assert helper.mode == "api-only"
    assert "aiortc is not importable" in caplog.text


async def test_api_only_helper_remembers_rooms() -> None:
    helper = ApiOnlyHelper()
    first = await helper.join("r1")
    assert await helper.join("r1") is first
    assert [r.room_id for r in helper.rooms()] == ["r1"]
    assert helper.peer_count() == 0
    assert await helper.leave("r1") is True
    assert await helper.leave("r1") is False

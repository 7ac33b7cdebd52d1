"""Delayed SCTP acknowledgements (signaling.sctp_ack) on a stand-in for aiortc's transport; the
interop suites run every data channel through it against node-datachannel and Chromium."""

from __future__ import annotations

import asyncio

import pytest
from aiortc.rtcsctptransport import RTCSctpTransport

from signaling import sctp_ack
from signaling.peer import Peer


class Transport:
    """The fields of RTCSctpTransport the delayed SACK reads."""

    def __init__(self) -> None:
        self._sack_misordered: set[int] = set()
        self._sack_duplicates: list[int] = []
        self._sack_needed = True
        self._association_state = RTCSctpTransport.State.ESTABLISHED


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[Transport]:
    """The SACKs aiortc would have sent (its method replaced by a recorder)."""
    sent: list[Transport] = []

    async def record(transport: Transport) -> None:
        sent.append(transport)
        transport._sack_needed = False

    monkeypatch.setattr(sctp_ack, "_AIORTC_SEND_SACK", record)
    return sent


async def packet(transport: Transport) -> None:
    """What aiortc does after a packet with data: SACK needed, so it calls _send_sack."""
    transport._sack_needed = True
    await sctp_ack._send_sack_delayed(transport)  # type: ignore[arg-type]


async def test_every_second_packet_is_acknowledged(sent: list[Transport]) -> None:
    t = Transport()
    for _ in range(10):
        await packet(t)
    assert len(sent) == 5
    await asyncio.sleep(sctp_ack.ACK_DELAY_S * 3)
    assert len(sent) == 5  # nothing held: the timer has nothing to send


async def test_a_lone_packet_is_acknowledged_by_the_timer(sent: list[Transport]) -> None:
    t = Transport()
    await packet(t)
    assert sent == []
    await asyncio.sleep(sctp_ack.ACK_DELAY_S * 3)
    assert sent == [t] and not t._sack_needed
    await packet(t)  # held again, and the next packet sends it
    await packet(t)
    assert len(sent) == 2


async def test_loss_or_duplicates_are_acknowledged_at_once(sent: list[Transport]) -> None:
    t = Transport()
    t._sack_misordered = {7}
    await packet(t)
    assert len(sent) == 1
    t._sack_misordered = set()
    t._sack_duplicates = [3]
    await packet(t)
    assert len(sent) == 2


async def test_a_closed_association_sends_nothing_late(sent: list[Transport]) -> None:
    t = Transport()
    await packet(t)
    t._association_state = RTCSctpTransport.State.CLOSED
    await asyncio.sleep(sctp_ack.ACK_DELAY_S * 3)
    assert sent == []
    t._association_state = RTCSctpTransport.State.ESTABLISHED
    await packet(t)  # nothing held any more: a fresh hold
    assert sent == []


async def test_peers_install_it_and_it_can_be_removed() -> None:
    peer = Peer(True)
    try:
        assert sctp_ack.installed()
        sctp_ack.uninstall()
        assert not sctp_ack.installed() and RTCSctpTransport._send_sack is sctp_ack._AIORTC_SEND_SACK
        sctp_ack.install()
        sctp_ack.install()  # idempotent
        assert sctp_ack.installed()
    finally:
        await peer.close()

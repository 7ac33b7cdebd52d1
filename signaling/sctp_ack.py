"""Delayed SCTP acknowledgements for aiortc's receiver (RFC 4960 §6.2).

aiortc answers every SCTP packet that carries data with its own SACK. Each SACK goes through DTLS
encryption and a UDP send in Python, so on a bulk transfer into the helper (a browser sending a
result image) about a third of the process's CPU went to acknowledgements (profile of an 8 MiB
action from node-datachannel: 7,697 packets, 7,697 SACKs, 0.75 s of 2.4 s). Every other SCTP stack
(usrsctp in browsers and node-datachannel included) delays acknowledgements as the RFC says: a
SACK for at least every second packet, and within 200 ms of an unacknowledged one.

:func:`install` wraps ``RTCSctpTransport._send_sack`` (aiortc calls it after each packet that
needs an acknowledgement) so that:

* the first such packet since the last SACK is held, with a timer of :data:`ACK_DELAY_S`;
* the next one sends the SACK for both (as does the timer, if no packet follows);
* gaps or duplicates (loss, reordering) are acknowledged at once, as the RFC requires, so the
  sender's fast retransmit is not slowed down.

The SACK itself is aiortc's own (``cumulative_tsn``, gaps, duplicates, window), so nothing on the
wire changes but how often it is sent. Installed once per process, from :mod:`signaling.peer`;
:func:`uninstall` restores aiortc's method (tests).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from aiortc.rtcsctptransport import RTCSctpTransport

from signaling.background import BackgroundTasks

__all__ = ["ACK_DELAY_S", "install", "installed", "uninstall"]

#: How long the acknowledgement of a lone packet may wait for a second one. Far below the RFC's
#: 200 ms, so that a sender waiting for window space never notices; in a bulk transfer the next
#: packet arrives well within it.
ACK_DELAY_S = 0.02

SendSack = Callable[[RTCSctpTransport], Coroutine[Any, Any, None]]

#: aiortc's own method, taken before anything replaces it.
_AIORTC_SEND_SACK: SendSack = RTCSctpTransport._send_sack
# Timer-driven sends in flight. One on a transport closing meanwhile fails like aiortc's own sends
# do, with nothing to do about it: that is no error worth a log line above DEBUG.
_pending = BackgroundTasks(logging.getLogger(__name__), level=logging.DEBUG)


def installed() -> bool:
    return RTCSctpTransport._send_sack is _send_sack_delayed


# Both assignments replace a method of aiortc's class on purpose (method-assign), with a plain
# function whose argument is not named ``self`` like the method's (assignment).


def install() -> None:
    """Replace aiortc's per-packet SACK with the delayed one (idempotent)."""
    RTCSctpTransport._send_sack = _send_sack_delayed  # type: ignore[method-assign,assignment]


def uninstall() -> None:
    if installed():  # leave someone else's patch alone
        RTCSctpTransport._send_sack = _AIORTC_SEND_SACK  # type: ignore[method-assign,assignment]


async def _send_sack_delayed(transport: RTCSctpTransport) -> None:
    state = transport.__dict__
    if not state.get("_p2p_sack_held") and not transport._sack_misordered and not transport._sack_duplicates:
        state["_p2p_sack_held"] = True
        state["_p2p_sack_timer"] = asyncio.get_running_loop().call_later(ACK_DELAY_S, _timer_fired, transport)
        return
    await _send_now(transport)


async def _send_now(transport: RTCSctpTransport) -> None:
    state = transport.__dict__
    state["_p2p_sack_held"] = False
    timer = state.pop("_p2p_sack_timer", None)
    if timer is not None:
        timer.cancel()
    await _AIORTC_SEND_SACK(transport)


def _timer_fired(transport: RTCSctpTransport) -> None:
    state = transport.__dict__
    state.pop("_p2p_sack_timer", None)
    if not state.get("_p2p_sack_held"):
        return
    if not transport._sack_needed or transport._association_state != RTCSctpTransport.State.ESTABLISHED:
        state["_p2p_sack_held"] = False
        return
    _pending.spawn(_send_now(transport), "delayed SCTP acknowledgement")

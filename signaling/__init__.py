"""A Trystero-compatible peer for Python (aiortc): wire 0.25 or 0.22, MQTT, nostr or torrent signalling.

::

    import signaling

    room = signaling.join_room(signaling.RoomConfig(app_id="my-app"), "lobby")
    chat = room.make_action("chat")
    chat.on_receive(lambda payload, peer_id, metadata: print(peer_id, payload))
    await chat.send("hello")

Layers (each module's docstring has the details): ``relays`` move signalling text;
``signaller`` is Trystero's announce/offer/answer logic (``pacing`` its announce schedule);
``strategies`` holds one module per strategy (mqtt, nostr, torrent: relay client, default relays,
signaller per wire), registered in one place; ``peer`` is one RTCPeerConnection;
``wire`` holds the data-channel byte formats; ``session`` shares one connection per remote peer
between the rooms of an app id and runs admission; ``negotiation022`` is what ``wire="0.22"`` rooms
do differently (and ``foreign_wire`` spots peers of the other wire); ``room`` is the public API.

"spec §N" in this package's comments is section N of ``docs/trystero-wire.md``, the wire of both
Trystero versions as the published npm packages speak it, with test vectors.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the names below, for type checkers (``X as X``: re-exported)
    from signaling.config import DEFAULT_ICE_SERVERS as DEFAULT_ICE_SERVERS
    from signaling.config import JoinConfig as JoinConfig
    from signaling.config import Limits as Limits
    from signaling.config import RoomConfig as RoomConfig
    from signaling.config import Timeouts as Timeouts
    from signaling.room import Action as Action
    from signaling.room import PeerInfo as PeerInfo
    from signaling.room import PeerNotFound as PeerNotFound
    from signaling.room import Room as Room
    from signaling.session import PROCESS_SELF_ID as PROCESS_SELF_ID
    from signaling.session import Session as Session
    from signaling.session import close_default_session as close_default_session
    from signaling.session import default_session as default_session
    from signaling.session import join_room as join_room

# The public names, loaded on first use: a program that needs only a module without WebRTC
# (``signaling.bounded``, ``signaling.background``; p2pdiff's API-only server) never imports aiortc.
_PUBLIC = {
    "signaling.config": (
        "DEFAULT_ICE_SERVERS",
        "JoinConfig",
        "Limits",
        "RoomConfig",
        "Timeouts",
    ),
    "signaling.room": ("Action", "PeerInfo", "PeerNotFound", "Room"),
    "signaling.session": (
        "PROCESS_SELF_ID",
        "Session",
        "close_default_session",
        "default_session",
        "join_room",
    ),
}
_HOME = {name: module for module, names in _PUBLIC.items() for name in names}

__all__ = sorted(_HOME)


def __getattr__(name: str) -> Any:
    module = _HOME.get(name)
    if module is None:
        raise AttributeError(f"module 'signaling' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value

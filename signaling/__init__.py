"""A Trystero-compatible peer for Python (aiortc): wire 0.25 or 0.22, MQTT, nostr or torrent signalling.

::

    import signaling

    room = signaling.join_room(signaling.RoomConfig(app_id="my-app"), "lobby")
    chat = room.make_action("chat")
    chat.on_receive(lambda payload, peer_id, metadata: print(peer_id, payload))
    await chat.send("hello")

Layers (each module's docstring has the details): ``relays`` move signalling text;
``strategy`` is Trystero's announce/offer/answer logic (``pacing`` its announce schedule,
``torrent_strategy`` the tracker flavour); ``peer`` is one RTCPeerConnection;
``wire`` holds the data-channel byte formats; ``session`` shares one connection per remote peer
between the rooms of an app id and runs admission; ``legacy`` is what ``wire="0.22"`` rooms do
differently (and ``strangers`` spots peers of the other wire); ``room`` is the public API.
"""

from signaling.config import DEFAULT_ICE_SERVERS, DEFAULT_RELAY_URLS, JoinConfig, Limits, RoomConfig, Timeouts
from signaling.room import Action, PeerInfo, PeerNotFound, Room
from signaling.session import (
    PROCESS_SELF_ID,
    Session,
    close_default_session,
    default_session,
    join_room,
)

__all__ = [
    "DEFAULT_ICE_SERVERS",
    "DEFAULT_RELAY_URLS",
    "PROCESS_SELF_ID",
    "Action",
    "JoinConfig",
    "Limits",
    "PeerInfo",
    "PeerNotFound",
    "Room",
    "RoomConfig",
    "Session",
    "Timeouts",
    "close_default_session",
    "default_session",
    "join_room",
]

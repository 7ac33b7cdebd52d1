"""Relays move signaling text between topics (see :mod:`signaling.relays.base`)."""

from .base import Backoff, MessageCallback, Relay, RelayState, StateCallback
from .mqtt import BrokerAddress, MqttRelay, parse_broker_url
from .nostr import NostrKeys, NostrRelay
from .wsrelay import WsRelay

__all__ = [
    "Backoff",
    "BrokerAddress",
    "MessageCallback",
    "MqttRelay",
    "NostrKeys",
    "NostrRelay",
    "Relay",
    "RelayState",
    "StateCallback",
    "WsRelay",
    "parse_broker_url",
]

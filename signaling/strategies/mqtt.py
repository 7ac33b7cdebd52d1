"""Trystero's MQTT strategy (spec §3): topics on public MQTT brokers over WebSocket.

Relay client :class:`~signaling.relays.mqtt.MqttRelay` (one per broker URL, shared by the rooms of a
session); the room signallers are the topic-relay ones (:func:`~.base.topic_signallers`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from signaling.relays.mqtt import MqttRelay
from signaling.strategies.base import Strategy, topic_signallers
from signaling.wire import v022, v025

__all__ = ["DEFAULT_BROKERS", "PROFILE_022", "STRATEGY", "MqttProfile"]


@dataclass(frozen=True, slots=True)
class MqttProfile:
    """``trystero/mqtt`` 0.22 (§9.3). Payloads are ``signaling.wire.v022``'s relay payloads, QoS 0,
    no retain."""

    #: Default brokers in JS order; ``redundancy`` 4 > 3, so JS uses all of them.
    default_urls: tuple[str, ...] = (
        "wss://test.mosquitto.org:8081/mqtt",
        "wss://broker.emqx.io:8084/mqtt",
        "wss://broker.hivemq.com:8884/mqtt",
    )
    redundancy: int = 4
    #: JS subscribes root first (0.25: self first). Order does not matter to a receiver.
    subscribe_order: tuple[str, ...] = ("root", "self")
    #: mqtt.js re-subscribes after a reconnect (0.25 does it itself, with resubscribe off).
    resubscribe_on_reconnect: bool = True
    keepalive: float = 60.0
    reconnect_period: float = 1.0


PROFILE_022: Final = MqttProfile()

#: Wire version -> default brokers. 0.25: Trystero 0.25.4's first 4 (its default redundancy);
#: 0.22 has its own list (spec §9.3).
DEFAULT_BROKERS: Final = {
    v025.WIRE_VERSION: (
        "wss://test.mosquitto.org:8081/mqtt",
        "wss://broker.emqx.io:8084/mqtt",
        "wss://public:public@public.cloud.shiftr.io",
        "wss://broker-cn.emqx.io:8084/mqtt",
    ),
    v022.WIRE_VERSION: PROFILE_022.default_urls,
}

STRATEGY: Final = Strategy(
    name="mqtt",
    signallers=topic_signallers(MqttRelay),
    default_relays=lambda _app_id, wire: DEFAULT_BROKERS[wire],
)

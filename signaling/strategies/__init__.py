"""The strategies, registered in one place: how peers of a room find each other (spec §3-§5).

Each module holds all that is particular to its strategy (see :class:`~.base.Strategy`): the relay
client it uses (the clients live in :mod:`signaling.relays`), default relays per wire, its room
signaller per wire and so the wires it supports, and any per-strategy values of a wire's profile.
:mod:`signaling.config`, :mod:`signaling.session` and applications ask :func:`get` and
:func:`names`; nothing else names a strategy. Adding one: docs/architecture.md, "Adding a strategy".
"""

from __future__ import annotations

from signaling.strategies import mqtt, nostr, torrent
from signaling.strategies.base import SignallerFactory, Strategy, topic_signallers

__all__ = [
    "DEFAULT",
    "SignallerFactory",
    "Strategy",
    "get",
    "names",
    "register",
    "topic_signallers",
    "unregister",
]

_registry: dict[str, Strategy] = {}


def register(strategy: Strategy) -> None:
    """Make ``strategy`` joinable by name (ValueError if the name is taken)."""
    if strategy.name in _registry:
        raise ValueError(f"strategy {strategy.name!r} is already registered")
    _registry[strategy.name] = strategy


def unregister(name: str) -> None:
    """Forget a registered strategy (rooms already joined with it keep running)."""
    _registry.pop(name, None)


def get(name: str) -> Strategy:
    """The strategy registered as ``name`` (ValueError if none is)."""
    try:
        return _registry[name]
    except KeyError:
        raise ValueError(f"strategy {name!r} is not available (known: {', '.join(_registry)})") from None


def names() -> tuple[str, ...]:
    """Every registered strategy name, in registration order."""
    return tuple(_registry)


for _module in (mqtt, nostr, torrent):
    register(_module.STRATEGY)

#: ``RoomConfig.strategy`` when none is given.
DEFAULT = mqtt.STRATEGY.name

"""The strategies, registered in one place: how peers of a room find each other (spec §3-§5).

Each module holds all that is particular to its strategy (see :class:`~.base.Strategy`): the relay
client it uses (the clients live in :mod:`signaling.relays`), default relays per wire, its room
signaller per wire and so the wires it supports, and any per-strategy values of a wire's profile.
:mod:`signaling.config`, :mod:`signaling.session` and applications ask :func:`get` and
:func:`names`; nothing else names a strategy. Every module of this package that defines
``STRATEGY`` is registered when the package loads, so adding one is adding its module (see
docs/architecture.md, "Adding a strategy").
"""

from __future__ import annotations

import importlib
import pkgutil

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


def _register_package() -> None:
    for module in sorted(info.name for info in pkgutil.iter_modules(__path__)):
        strategy = getattr(importlib.import_module(f"{__name__}.{module}"), "STRATEGY", None)
        if isinstance(strategy, Strategy):
            register(strategy)


_register_package()

#: ``RoomConfig.strategy`` when none is given.
DEFAULT = "mqtt"

"""Small bounded containers for state keyed by remote parties (peer ids, offer ids, tokens).

Everything here has a fixed capacity and a stated eviction rule, so a remote party flooding us
with fresh keys costs at most the capacity.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class LruSet(Generic[K]):
    """A set that forgets its least recently added/touched key beyond ``capacity``."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.capacity = capacity
        self._items: OrderedDict[K, None] = OrderedDict()

    def add(self, key: K) -> None:
        self._items[key] = None
        self._items.move_to_end(key)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def discard(self, key: K) -> None:
        self._items.pop(key, None)

    def clear(self) -> None:
        self._items.clear()

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[K]:
        return iter(self._items)


class LruDict(Generic[K, V]):
    """A dict that evicts its least recently inserted (or touched) key beyond ``capacity``,
    calling ``on_evict(key, value)`` for it (to release what the value holds)."""

    def __init__(self, capacity: int, on_evict: Callable[[K, V], object] | None = None) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.capacity = capacity
        self._on_evict = on_evict
        self._items: OrderedDict[K, V] = OrderedDict()

    def get(self, key: K) -> V | None:
        return self._items.get(key)

    def touch(self, key: K) -> V | None:
        """Like ``get``, and ``key`` becomes the most recently used."""
        try:
            self._items.move_to_end(key)
        except KeyError:
            return None
        return self._items[key]

    def setdefault(self, key: K, factory: Callable[[], V]) -> V:
        if key in self._items:
            return self._items[key]
        value = self._items[key] = factory()
        self._evict()
        return value

    def __setitem__(self, key: K, value: V) -> None:
        """Insert or replace; ``key`` becomes the most recently used."""
        self._items[key] = value
        self._items.move_to_end(key)
        self._evict()

    def _evict(self) -> None:
        while len(self._items) > self.capacity:
            key, value = self._items.popitem(last=False)
            if self._on_evict is not None:
                self._on_evict(key, value)

    def pop(self, key: K) -> V | None:
        return self._items.pop(key, None)

    def oldest(self) -> tuple[K, V] | None:
        """The least recently used entry (the next to be evicted), if any."""
        return next(iter(self._items.items()), None)

    def values(self) -> Iterator[V]:
        return iter(self._items.values())

    def clear(self) -> None:
        self._items.clear()

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)


class TokenBucket:
    """Rate limiter: ``rate`` tokens per second, at most ``burst`` saved up."""

    def __init__(self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("need rate > 0 and burst >= 1")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tokens = burst
        self._stamp = clock()

    def take(self) -> bool:
        """Take one token if there is one."""
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False

    @property
    def retry_after(self) -> float:
        """Seconds from the last ``take`` until a token is there (0.0 if one is there now)."""
        return max(0.0, (1 - self._tokens) / self.rate)

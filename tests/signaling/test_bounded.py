"""Bounded containers (signaling.bounded): what the LRU dict and the token bucket promise."""

from __future__ import annotations

import pytest

from signaling.bounded import LruDict, TokenBucket


def test_lru_dict_evicts_the_least_recently_inserted_or_touched_key() -> None:
    evicted: list[tuple[str, int]] = []
    lru: LruDict[str, int] = LruDict(3, on_evict=lambda key, value: evicted.append((key, value)))
    for i, key in enumerate("abc"):
        lru[key] = i
    assert lru.touch("a") == 0  # now the most recent
    assert lru.get("b") == 1  # a plain get does not reorder
    assert lru.setdefault("b", lambda: 99) == 1  # nor does finding a key
    lru["d"] = 3
    assert evicted == [("b", 1)]
    assert "b" not in lru and "a" in lru
    assert lru.oldest() == ("c", 2)
    lru["c"] = 20  # replacing makes it the most recent
    assert lru.oldest() == ("a", 0)
    assert lru.setdefault("e", lambda: 4) == 4
    assert evicted == [("b", 1), ("a", 0)]
    assert list(lru.values()) == [3, 20, 4]
    assert lru.touch("zz") is None and len(lru) == 3


def test_lru_dict_pop_and_clear_evict_nothing() -> None:
    evicted: list[str] = []
    lru: LruDict[str, int] = LruDict(2, on_evict=lambda key, _value: evicted.append(key))
    lru["a"] = 1
    assert lru.pop("a") == 1 and lru.pop("a") is None
    lru["b"] = 2
    lru.clear()
    assert lru.oldest() is None and len(lru) == 0 and evicted == []
    with pytest.raises(ValueError, match="capacity"):
        LruDict[str, int](0)


def test_token_bucket_says_when_the_next_token_is_there() -> None:
    now = [0.0]
    bucket = TokenBucket(rate=4.0, burst=2, clock=lambda: now[0])
    assert bucket.take() and bucket.take()
    assert not bucket.take()
    assert bucket.retry_after == pytest.approx(0.25)
    now[0] += 0.1
    assert not bucket.take()
    assert bucket.retry_after == pytest.approx(0.15)
    now[0] += 0.15
    assert bucket.take()
    now[0] += 10
    bucket.take()
    assert bucket.retry_after == 0.0  # one token left of the burst

"""What the relay refuses or drops reaches the log, and a flood of it only a line per minute."""

from __future__ import annotations

import logging

import pytest

from p2pdiff.relay.metrics import LOG_EVERY_S, LoggedCounter, RelayMetrics


def test_refusals_are_logged_once_per_key_per_minute(caplog: pytest.LogCaptureFixture) -> None:
    now = [1000.0]
    counter = LoggedCounter("refused", clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="p2pdiff.relay"):
        for _ in range(500):  # a flood within one minute: one line
            counter["nostr", "connections_per_address"] += 1
        counter["nostr", "subscriptions"] += 1  # another reason: its own line at once
        now[0] += LOG_EVERY_S
        counter["nostr", "connections_per_address"] += 1  # a minute later: the count since
    lines = [r.getMessage() for r in caplog.records if r.name == "p2pdiff.relay"]
    assert lines == [
        "relay (nostr): refused connections_per_address: 1 since the last such line",
        "relay (nostr): refused subscriptions: 1 since the last such line",
        "relay (nostr): refused connections_per_address: 500 since the last such line",
    ]
    assert counter["nostr", "connections_per_address"] == 501


def test_metrics_count_what_they_log(caplog: pytest.LogCaptureFixture) -> None:
    metrics = RelayMetrics()
    with caplog.at_level(logging.INFO, logger="p2pdiff.relay"):
        metrics.dropped["ws-relay", "slow_reader"] += 1
    assert metrics.dropped["ws-relay", "slow_reader"] == 1
    assert any("closed a connection: slow_reader" in r.getMessage() for r in caplog.records)

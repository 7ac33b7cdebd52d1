"""Helpers shared by the wire tests (test_wire_v022.py, test_wire_v025.py) and others that check
our encoders against Trystero's own code in Node."""

from __future__ import annotations

import subprocess
from collections.abc import Iterable
from typing import Protocol

from tests.services import INTEROP_DIR


class _Decoder(Protocol):
    def feed(self, frame: bytes) -> Iterable[object]: ...


def h(hex_text: str) -> bytes:
    """Bytes from hex with spaces for readability."""
    return bytes.fromhex(hex_text.replace(" ", ""))


def feed_all(dec: _Decoder, frames: list[bytes]) -> list[object]:
    """Everything ``dec`` decodes from ``frames``, in order."""
    events: list[object] = []
    for frame in frames:
        events.extend(dec.feed(frame))
    return events


def run_node(script: str, stdin: str = "") -> str:
    """Run an ES module snippet in tests/interop (for its pinned node_modules)."""
    done = subprocess.run(
        ["node", "--input-type=module", "-e", script],
        cwd=INTEROP_DIR,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout

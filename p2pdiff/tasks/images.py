"""Which bytes count as a result image: PNG, JPEG or WebP, told by their first bytes.

The result store (results.py) refuses anything else with :class:`ImageRejected`; the room protocol
counts a refused image under the same ``reason`` as its other drops.
"""

from __future__ import annotations

IMAGE_EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp"}

# Why image bytes were refused (stable: the room protocol's stats keys use them).
TOO_LARGE = "too_large"  # over the configured max_result_bytes
NOT_AN_IMAGE = "not_an_image"  # not PNG, JPEG or WebP


class ImageRejected(ValueError):
    """Bytes the result store will not keep; ``reason`` is TOO_LARGE or NOT_AN_IMAGE."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def sniff_image(data: bytes | memoryview) -> str | None:
    """The content type from the first bytes (PNG, JPEG or WebP), or None for anything else.
    The bytes decide, never what the peer claims: the file is served from our origin."""
    head = bytes(data[:16])
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if len(head) >= 12 and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    return None

"""Domain errors. One middleware in rest/middleware.py turns them into the JSON error shape."""

from __future__ import annotations


class AppError(Exception):
    status = 500
    code = "internal_error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        # The message is part of the API: clients show it to people.
        self.message = message
        if code is not None:
            self.code = code


class BadRequest(AppError):
    status = 400
    code = "bad_request"


class NotFound(AppError):
    status = 404
    code = "not_found"


class Conflict(AppError):
    status = 409
    code = "conflict"


class InvalidTransition(Conflict):
    code = "invalid_transition"

    def __init__(self, action: str, from_status: str, to_status: str) -> None:
        super().__init__(f"cannot {action} the task: '{from_status}' -> '{to_status}' is not allowed")
        self.action = action
        self.from_status = from_status
        self.to_status = to_status


class PayloadTooLarge(AppError):
    status = 413
    code = "payload_too_large"


class UnsupportedMediaType(AppError):
    status = 415
    code = "unsupported_media_type"


class Unavailable(AppError):
    status = 503
    code = "unavailable"

    def __init__(self, message: str, *, code: str | None = None, retry_after: float | None = None) -> None:
        super().__init__(message, code=code)
        # Seconds a client should wait before trying again (the Retry-After header), if known.
        self.retry_after = retry_after

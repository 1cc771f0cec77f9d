"""Errors that end one request while the engine keeps serving the others."""
from __future__ import annotations


class RequestFailedError(RuntimeError):
    """One request failed inside the engine (its forward raised, its logits were not
    finite, its detokenizer raised); `code` names the failure for the HTTP error body."""

    def __init__(self, message: str, code: str = "request_failed") -> None:
        super().__init__(message)
        self.code = code


class QueueTimeoutError(RequestFailedError):
    """The request waited longer than max_queue_seconds without being scheduled."""

    def __init__(self, message: str) -> None:
        super().__init__(message, "queue_timeout")


def request_error(code: str, message: str) -> RequestFailedError:
    """The exception a stream raises for a request that finished with an error."""
    return QueueTimeoutError(message) if code == "queue_timeout" else RequestFailedError(message, code)

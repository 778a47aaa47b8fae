"""The router's exception tree; one handler renders each as an OpenAI error body."""

from __future__ import annotations

import logging

from fastapi.responses import JSONResponse, Response

from child.openai_http import error_response
from child.serving import ClientDisconnected

log = logging.getLogger(__name__)


class RouterError(Exception):
    status = 500
    error_type = "server_error"

    def __init__(self, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.error_type, self.headers)


class InvalidRequest(RouterError):
    status = 400
    error_type = "invalid_request_error"


class NotFound(RouterError):
    status = 404
    error_type = "not_found_error"


class ServerError(RouterError):
    status = 500
    error_type = "server_error"


class UpstreamFailed(RouterError):
    """The child died or answered nothing usable."""

    status = 502
    error_type = "server_error"


class UpstreamUnreachable(UpstreamFailed):
    """No connection could be made: the request was never sent (another replica may take it)."""


class PeerAnswered(RouterError):
    """A peer's own error answer to a forwarded load or unload, its status and message kept."""

    def __init__(self, status: int, message: str, error_type: str = "server_error") -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type


class GatewayTimeout(RouterError):
    """An upstream (the Hugging Face Hub, say) did not answer in time."""

    status = 504
    error_type = "server_error"


class TooManyRequests(RouterError):
    status = 429
    error_type = "rate_limit_error"


class Unavailable(RouterError):
    status = 503
    error_type = "unavailable_error"


class ConfigError(Exception):
    """A preset or flag is wrong; the router refuses to start and says where."""


def error_response_for(exc: Exception) -> Response:
    """The OpenAI-shaped answer to an exception raised while serving a request."""
    if isinstance(exc, RouterError):
        return exc.response()
    if isinstance(exc, ClientDisconnected):
        # Nobody reads this: nginx's 499 says in logs that the client closed the request.
        return error_response(499, "the client disconnected", "invalid_request_error")
    log.error("unexpected error", exc_info=exc)
    return error_response(500, f"internal error: {type(exc).__name__}", "server_error")

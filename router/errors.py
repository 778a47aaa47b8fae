"""The router's exception tree; one handler renders each as an OpenAI error body."""

from __future__ import annotations

from fastapi.responses import JSONResponse


class RouterError(Exception):
    status = 500
    error_type = "server_error"

    def __init__(self, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers

    def response(self) -> JSONResponse:
        return error_json(self.status, self.message, self.error_type, self.headers)


class InvalidRequest(RouterError):
    status = 400
    error_type = "invalid_request_error"


class Unauthorized(RouterError):
    status = 401
    error_type = "authentication_error"


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


class ClientGone(RouterError):
    """The client disconnected while its request waited; nobody reads this answer."""

    status = 499
    error_type = "invalid_request_error"


class Unavailable(RouterError):
    status = 503
    error_type = "unavailable_error"


class ConfigError(Exception):
    """A preset or flag is wrong; the router refuses to start and says where."""


def error_json(status: int, message: str, error_type: str,
               headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": status, "message": message, "type": error_type}},
                        status_code=status, headers=headers)

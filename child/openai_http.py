"""The OpenAI-compatible HTTP conventions both modelyard servers follow (router and child).

- Every error is `{"error": {"code": N, "message": "...", "type": "..."}}`, with the type named by
  the status (OpenAI's names, and llama-server's for 503).
- A request body is one JSON object; anything else is a 400 that says what is wrong.
"""

from __future__ import annotations

import json
import re
from typing import Any

from starlette.responses import JSONResponse

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               413: "invalid_request_error", 429: "rate_limit_error", 431: "invalid_request_error",
               499: "invalid_request_error", 500: "server_error", 502: "server_error", 503: "unavailable_error",
               504: "server_error"}


def error_body(status: int, message: str, error_type: str | None = None) -> dict[str, Any]:
    kind = error_type or ERROR_TYPES.get(status, "server_error")
    return {"error": {"code": status, "message": message, "type": kind}}


def error_response(status: int, message: str, error_type: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, error_type), status_code=status, headers=headers)


def error_bytes(status: int, message: str, error_type: str | None = None) -> bytes:
    """The error body, encoded (for answers written below the web framework)."""
    return json.dumps(error_body(status, message, error_type)).encode()


class NotAJsonObject(ValueError):
    pass


def json_object(raw: bytes) -> dict[str, Any]:
    """A request body as a JSON object; NotAJsonObject says why not."""
    try:
        # UTF-8 only (json.loads would also guess UTF-16 and UTF-32, which the checks below and
        # everything after them do not expect).
        data = json.loads(raw.decode("utf-8")) if raw else None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise NotAJsonObject(f"the request body is not valid JSON: {exc}") from exc
    except RecursionError as exc:
        raise NotAJsonObject("the request body is nested too deeply") from exc
    if not isinstance(data, dict):
        raise NotAJsonObject("the request body must be a JSON object")
    if _SURROGATE_ESCAPE.search(raw):
        # JSON may escape half a UTF-16 pair (\ud800) on its own: no text a model can read. Only
        # bodies with such an escape pay for the check.
        try:
            json.dumps(data, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as exc:
            raise NotAJsonObject("the request body has a string with a lone surrogate escape (\\ud800-\\udfff "
                                 "without its pair): it is not valid Unicode text") from exc
    return data


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")

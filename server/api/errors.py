"""Errors in OpenAI's shape: {"error": {"message", "type", "param", "code"}}, and the one translation
of a pydantic ValidationError into a 400."""
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError

from server.api import protocol
from server.api.protocol import ErrorInfo, ErrorResponse

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    499: "invalid_request_error",
    500: "server_error",
    503: "service_unavailable",
}

# Field names of every protocol model: the parts of a pydantic error location that are not these
# (nor list indices) name union members ("str", "list[int]"), which mean nothing to a client.
FIELD_NAMES = {name for model in vars(protocol).values()
               if isinstance(model, type) and issubclass(model, BaseModel) for name in model.model_fields}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> ErrorResponse:
        return ErrorResponse(error=ErrorInfo(message=self.message, type=ERROR_TYPES.get(self.status, "error"),
                                             param=self.param, code=self.code))

    def response(self) -> JSONResponse:
        return JSONResponse(self.body().model_dump(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


def client_gone() -> APIError:
    """The client hung up before its answer was ready; nobody reads this (nginx logs such a request as 499)."""
    return APIError(499, "the client closed the request", code="client_closed_request")


def validation_error(err: ValidationError) -> APIError:
    """A request that does not fit the protocol models, as a 400 naming the top-level field. Of a union's
    alternatives the error that got deepest is the one reported: it is the alternative the client meant."""
    first = max(err.errors(), key=lambda e: len(e["loc"]))
    parts = [p for p in first["loc"] if isinstance(p, int) or p in FIELD_NAMES]
    path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts).lstrip(".")
    message = f"{path}: {first['msg']}" if path else first["msg"]
    value = first.get("input")
    if first["type"] != "missing" and is_short(value):
        message += f" (got {value!r})"
    return bad_request(message, str(parts[0]) if parts else None)


def is_short(value) -> bool:
    return isinstance(value, (int, float, bool, type(None))) or isinstance(value, str) and len(value) <= 40

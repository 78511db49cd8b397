"""Errors as TF Serving reports them: a canonical status code, a message, and its HTTP status.

Both front ends raise `ServingError`; REST turns it into `{"error": message}` with
the HTTP status TF Serving uses for the code, gRPC into the same status code.
"""

from __future__ import annotations

import grpc

# tensorflow_serving/model_servers/http_rest_api_util.cc ToHTTPStatusCode.
HTTP_STATUS = {
    "OK": 200,
    "CANCELLED": 499,
    "UNKNOWN": 500,
    "INVALID_ARGUMENT": 400,
    "DEADLINE_EXCEEDED": 504,
    "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409,
    "PERMISSION_DENIED": 403,
    "RESOURCE_EXHAUSTED": 429,
    "FAILED_PRECONDITION": 400,
    "ABORTED": 409,
    "OUT_OF_RANGE": 400,
    "UNIMPLEMENTED": 501,
    "INTERNAL": 500,
    "UNAVAILABLE": 503,
    "DATA_LOSS": 500,
    "UNAUTHENTICATED": 401,
}



def code_name(code: int) -> str:
    """Canonical name of a numeric status code (TensorFlow's, gRPC's and absl's are the same numbers)."""
    names = list(HTTP_STATUS)  # in code order, 0..16
    return names[code] if 0 <= code < len(names) else "UNKNOWN"


class ServingError(Exception):
    """A request that cannot be answered; `code` is a canonical status name such as INVALID_ARGUMENT."""

    def __init__(self, code: str, message: str):
        if code not in HTTP_STATUS:
            raise ValueError(f"unknown status code {code!r}")
        super().__init__(message)
        self.code = code
        self.message = message
        self._http_status: int | None = None

    def with_http(self, status: int) -> "ServingError":
        """A more precise HTTP status than the code's (413, 408), for conditions only HTTP has."""
        self._http_status = status
        return self

    @property
    def http_status(self) -> int:
        return self._http_status or HTTP_STATUS[self.code]

    @property
    def grpc_status(self) -> grpc.StatusCode:
        return grpc.StatusCode[self.code]


def first_line(value: object, default: str) -> str:
    """The first line of an error or message, for one-line answers and logs; `default` if it is empty."""
    text = str(value).strip()
    return text.splitlines()[0] if text else default


def invalid_argument(message: str) -> ServingError:
    return ServingError("INVALID_ARGUMENT", message)


def not_found(message: str) -> ServingError:
    return ServingError("NOT_FOUND", message)

"""The API server's failures as `Status` objects: the code, reason and message wording of the
real kube-apiserver, so that clients (kubectl, the Python client, Pipit) react to them as they
would to the real one."""

from __future__ import annotations

from http import HTTPStatus

REASONS = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    406: "NotAcceptable",
    409: "Conflict",
    410: "Expired",
    415: "UnsupportedMediaType",
    422: "Invalid",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
    504: "Timeout",
}


class ApiError(Exception):
    """A request the server answers with a `Status` of failure."""

    def __init__(self, code: int, message: str, reason: str | None = None,
                 details: dict | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason or REASONS.get(code) or HTTPStatus(code).phrase.replace(" ", "")
        self.details = details

    def status(self) -> dict:
        body = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": self.message, "reason": self.reason, "code": self.code}
        if self.details:
            body["details"] = self.details
        return body


def not_found(plural: str, name: str, group: str = "") -> ApiError:
    what = f"{plural}.{group}" if group else plural
    return ApiError(404, f'{what} "{name}" not found',
                    details={"name": name, "group": group, "kind": plural} if group
                    else {"name": name, "kind": plural})


def already_exists(plural: str, name: str, group: str = "") -> ApiError:
    what = f"{plural}.{group}" if group else plural
    return ApiError(409, f'{what} "{name}" already exists', reason="AlreadyExists",
                    details={"name": name, "group": group, "kind": plural} if group
                    else {"name": name, "kind": plural})


def conflict(plural: str, name: str, group: str = "", why: str | None = None) -> ApiError:
    what = f"{plural}.{group}" if group else plural
    why = why or ("the object has been modified; please apply your changes to the latest "
                  "version and try again")
    return ApiError(409, f'Operation cannot be fulfilled on {what} "{name}": {why}',
                    details={"name": name, "group": group, "kind": plural} if group
                    else {"name": name, "kind": plural})


def invalid(kind: str, name: str, causes: list[tuple[str, str, str]], group: str = "") -> ApiError:
    """422 Invalid; `causes` are (reason, field, message) as FieldValueInvalid,
    FieldValueRequired..."""
    text = ", ".join(f"{field}: {message}" for _, field, message in causes)
    if len(causes) > 1:
        text = f"[{text}]"
    what = f"{kind}.{group}" if group else kind
    details = {"name": name, "kind": kind,
               "causes": [{"reason": r, "message": m, "field": f} for r, f, m in causes]}
    if group:
        details["group"] = group
    return ApiError(422, f'{what} "{name}" is invalid: {text}', details=details)


def bad_request(message: str) -> ApiError:
    return ApiError(400, message)


def expired(message: str) -> ApiError:
    return ApiError(410, message, reason="Expired")

"""Named exceptions: each carries the HTTP status and the JSON error code it maps to."""

from __future__ import annotations


class ImgclassError(Exception):
    """Base of every error this package raises on purpose."""

    status: int = 500
    code: str = "internal_error"

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after

    def to_json(self) -> dict[str, str]:
        return {"error": self.code, "message": self.message}

    def http_headers(self) -> dict[str, str]:
        if self.retry_after is None:
            return {}
        # Retry-After takes whole seconds; never advertise 0, which invites a hot loop.
        return {"Retry-After": str(max(1, round(self.retry_after)))}


# --- startup problems (never HTTP) -------------------------------------------------


class ConfigError(ImgclassError):
    """An invalid option value; the message says how to fix it."""

    code = "config_error"


class ModelFileError(ConfigError):
    """The model or label file is missing or does not match its checksum."""

    code = "model_file_error"


# --- bad requests (4xx) -------------------------------------------------------------


class RequestError(ImgclassError):
    """The client sent something we cannot use."""

    status = 400
    code = "bad_request"


class RequestTimeout(RequestError):
    """The request body stalled, or took longer than the overall cap."""

    status = 408
    code = "request_timeout"


class MissingField(RequestError):
    code = "missing_field"


class EmptyBody(RequestError):
    code = "empty_body"


class BadBase64(RequestError):
    code = "bad_base64"


class BadJSON(RequestError):
    code = "bad_json"


class BadParameter(RequestError):
    code = "bad_parameter"


class NotAnImage(RequestError):
    code = "not_an_image"


class TruncatedImage(RequestError):
    code = "truncated_image"


class PayloadTooLarge(RequestError):
    status = 413
    code = "payload_too_large"


class UnsupportedFormat(RequestError):
    status = 415
    code = "unsupported_format"


class UnsupportedContentType(RequestError):
    """The body is in a form the API does not take (the message lists the forms it does)."""

    status = 415
    code = "unsupported_content_type"


class TooManyPixels(RequestError):
    status = 422
    code = "too_many_pixels"


class Unauthorized(RequestError):
    status = 401
    code = "unauthorized"


class Forbidden(RequestError):
    status = 403
    code = "forbidden"


class NotFound(RequestError):
    status = 404
    code = "not_found"


class MethodNotAllowed(RequestError):
    status = 405
    code = "method_not_allowed"

    def __init__(self, message: str, allowed: str) -> None:
        super().__init__(message)
        self.allowed = allowed

    def http_headers(self) -> dict[str, str]:
        return {"Allow": self.allowed}


class Conflict(RequestError):
    status = 409
    code = "conflict"


class ClientGone(ImgclassError):
    """The client disconnected before its answer was ready: nothing is sent, the work is dropped."""

    status = 499  # nginx's code for it, in logs and metrics only
    code = "client_gone"


# --- service-side trouble (5xx) -----------------------------------------------------


class ServiceError(ImgclassError):
    status = 500
    code = "internal_error"


def unexpected() -> ServiceError:
    """What a client sees for a bug: one 500 whose details stay in the log."""
    return ServiceError("An unexpected error occurred; it has been logged.")


class Overloaded(ServiceError):
    """The bounded queue is full: shed load instead of queueing without bound."""

    status = 503
    code = "overloaded"


class QueueFull(Overloaded):
    """The balancer's queue for a free model server is at --queue-size."""

    code = "queue_full"


class QueueTimeout(Overloaded):
    """A request waited --queue-timeout seconds at the balancer without a free model server."""

    code = "queue_timeout"


class NotReady(ServiceError):
    status = 503
    code = "not_ready"


class NoBackendAvailable(ServiceError):
    status = 503
    code = "no_backend"


class UpstreamError(ServiceError):
    status = 502
    code = "bad_gateway"


class UpstreamTimeout(ServiceError):
    status = 504
    code = "upstream_timeout"


# --- engine mode: HAProxy as the data plane ------------------------------------------


class EngineUnavailable(ConfigError):
    """The chosen --engine cannot run here: HAProxy is missing or too old, or refused its configuration."""

    code = "engine_unavailable"


class EngineRestarting(NotReady):
    """HAProxy's runtime API did not answer: the engine is (re)starting."""


class EngineCommandFailed(ServiceError):
    """HAProxy refused a runtime API command: a bug in the control plane, logged with the reply."""

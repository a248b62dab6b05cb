"""Errors that reach the annotator: each carries the HTTP status and a message saying what was wrong."""


class BackendError(Exception):
    """Base class; `status` is the HTTP status the server answers with."""

    status = 500

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class BadRequest(BackendError):
    """The request itself is malformed: missing fields, unknown tags, absurd prompts."""

    status = 400


class Unauthorized(BackendError):
    status = 401


class ForbiddenImageSource(BackendError):
    """The image URL points outside the Label Studio host and the allow-list (SSRF guard)."""

    status = 403


class NotFound(BackendError):
    """A path the server does not serve (e.g. a static file that is not on the status page's list)."""

    status = 404


class PayloadTooLarge(BackendError):
    status = 413


class ImageUnavailable(BackendError):
    """The image could not be fetched or decoded: unreachable, corrupt, too large, not an image."""

    status = 422


class TooManyRequests(BackendError):
    """A bounded queue or per-request limit is full: the work was refused, try again later."""

    status = 429


class Overloaded(BackendError):
    """The backend is busy with other requests' images (DECODE_MAX_INFLIGHT_MEGAPIXELS): retry later."""

    status = 503


class LabelStudioUnavailable(BackendError):
    """Label Studio did not answer (down, timeout): the backend is degraded, not broken."""

    status = 503

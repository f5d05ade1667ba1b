"""Calls to services (Milvus, Redis, a database, an object store): retry what may pass, fail fast on the rest.

Transient: connection refused or reset, timeouts, a server unavailable or rate limiting. Retried with
exponential backoff and full jitter (tenacity), a bounded number of times within a deadline. Anything
else, such as bad configuration, a schema mismatch or a refused request, is permanent: raised at once,
with a message that says it was not retried.
"""

import errno
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt, stop_after_delay
from tenacity import RetryError as _TenacityRetryError
from tenacity.wait import wait_random_exponential

from quiver.errors import QuiverError

T = TypeVar("T")
_log = logging.getLogger("quiver.retry")
_TRANSIENT_WORDS = ("unavailable", "fail connecting", "connection refused", "connection reset", "deadline exceeded",
                    "timed out", "timeout", "too many requests", "rate limit", "broken pipe", "temporarily")


class ServiceUnavailableError(QuiverError):
    """A transient error that outlasted the retries."""


class ServiceRequestError(QuiverError):
    """A permanent error: retrying would not help."""


@dataclass(frozen=True)
class RetrySettings:
    attempts: int = 6
    initial_s: float = 0.5
    max_wait_s: float = 10.0
    deadline_s: float = 120.0


def _chain(exc: BaseException) -> list[BaseException]:
    """The error and the errors that caused it, outermost first."""
    seen: set[int] = set()
    found: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        found.append(current)
        current = current.__cause__ or current.__context__
    return found


# What a gRPC service (Milvus) answers for a request that no retry will fix: wrong credentials, no permission,
# a bad request; and a TLS handshake that fails on the certificate.
_PERMANENT_GRPC = ("UNAUTHENTICATED", "PERMISSION_DENIED", "INVALID_ARGUMENT", "UNIMPLEMENTED")
_PERMANENT_WORDS = ("certificate_verify_failed", "certificate verify failed", "auth check failure",
                    "authorization in header", "wrong version number")


def _permanent_one(exc: BaseException) -> bool:
    if type(exc).__module__.startswith("grpc"):
        code = getattr(exc, "code", lambda: None)()
        if getattr(code, "name", "") in _PERMANENT_GRPC:
            return True
    text = str(exc).lower()  # a gRPC error's text carries its details and debug string
    return any(word in text for word in _PERMANENT_WORDS)


def is_transient(exc: BaseException) -> bool:
    """Whether an error may pass by itself: judged on the error and the errors that caused it. A cause that
    says no retry can help (refused credentials, a certificate that does not verify) makes it permanent, even
    under a client's generic "cannot connect"."""
    chain = _chain(exc)
    if any(_permanent_one(e) for e in chain):
        return False
    return any(_transient_one(e) for e in chain)


def describe(exc: BaseException) -> str:
    """An error as a person reads it: its type and message, and the innermost cause's when it says more
    (a client's "fail connecting" hides the server's "auth check failure")."""
    text = f"{type(exc).__name__}: {exc}"
    innermost = _chain(exc)[-1]
    if innermost is not exc:
        details = getattr(innermost, "details", None)
        detail = details() if callable(details) else str(innermost)
        code = getattr(innermost, "code", None)
        name = getattr(code() if callable(code) else None, "name", "")
        text += f" ({name + ': ' if name else ''}{detail})"
    return text


# OS errors that say "not now" rather than "never": what object-store clients (s3fs maps SlowDown and 503 to
# EBUSY, 500 to EREMOTEIO) and network file systems raise for a service that may come back.
_TRANSIENT_ERRNOS = frozenset({errno.EIO, errno.ETIMEDOUT, errno.EAGAIN, errno.EBUSY, errno.ECONNRESET,
                               errno.ECONNREFUSED, errno.ECONNABORTED, errno.EHOSTUNREACH, errno.ENETUNREACH,
                               errno.ENETDOWN, errno.EPIPE, getattr(errno, "EREMOTEIO", errno.EIO)})
_TRANSIENT_HTTP_CODES = frozenset({"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout",
                                   "RequestLimitExceeded", "InternalError", "ServiceUnavailable",
                                   "TooManyRequestsException"})


def _http_status(exc: BaseException) -> int | None:
    """The HTTP status a client error carries (botocore's response, gcsfs's code), if any."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return int(status) if status else None
    code = getattr(exc, "code", None)
    return code if isinstance(code, int) and 100 <= code < 600 else None


def _transient_one(exc: BaseException) -> bool:
    if isinstance(exc, QuiverError):
        return False
    if isinstance(exc, ConnectionError | TimeoutError | socket.timeout):
        return True
    if type(exc) in (OSError, IOError) and exc.errno in _TRANSIENT_ERRNOS:
        return True
    module = type(exc).__module__
    name = type(exc).__name__
    if module.startswith(("botocore", "aiobotocore", "s3fs")):
        if name.endswith(("ConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
                          "EndpointConnectionError", "IncompleteReadError", "ResponseStreamingError")):
            return True
        code = (getattr(exc, "response", None) or {}).get("Error", {}).get("Code", "")
        status = _http_status(exc)
        return code in _TRANSIENT_HTTP_CODES or (status is not None and (status == 429 or status >= 500))
    if module.startswith(("aiohttp", "urllib3", "requests", "gcsfs", "google")):
        status = _http_status(exc)
        if status is not None:
            return status == 429 or status >= 500
        return any(word in name for word in ("Connection", "Disconnected", "Timeout", "Connector"))
    if module.startswith("redis"):
        return name in ("ConnectionError", "TimeoutError", "BusyLoadingError", "TryAgainError")
    if module.startswith("pymilvus"):
        if name in ("ConnectError", "MilvusUnavailableException"):
            return True
        code = getattr(exc, "code", None)
        message = str(getattr(exc, "message", exc)).lower()
        return code == 8 or any(word in message for word in _TRANSIENT_WORDS)
    if module.startswith("grpc"):
        code = getattr(exc, "code", lambda: None)()
        return getattr(code, "name", "") in ("UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "ABORTED")
    if module.startswith(("sqlalchemy", "psycopg")):
        return name in ("OperationalError", "InterfaceError") and any(
            word in str(exc).lower() for word in _TRANSIENT_WORDS + ("could not connect", "server closed"))
    return False


def call_with_retries(what: str, call: Callable[[], T], settings: RetrySettings = RetrySettings(),
                      on_retry: Callable[[], None] | None = None,
                      log: logging.Logger | logging.LoggerAdapter | None = None) -> T:
    """call(); transient failures are retried (on_retry runs before each new attempt, e.g. to reconnect)."""
    logger = log or _log

    def before_sleep(state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        logger.warning(f"{what}: transient error on attempt {state.attempt_number} of {settings.attempts} "
                       f"({type(error).__name__}: {error}); retrying in {state.upcoming_sleep:.1f}s")
        if on_retry is not None:
            on_retry()

    retrying = Retrying(
        retry=retry_if_exception(is_transient),
        wait=wait_random_exponential(multiplier=settings.initial_s, max=settings.max_wait_s),
        stop=stop_after_attempt(settings.attempts) | stop_after_delay(settings.deadline_s),
        before_sleep=before_sleep,
        reraise=False,
    )
    try:
        return retrying(call)
    except _TenacityRetryError as exhausted:
        last = exhausted.last_attempt.exception()
        attempts = exhausted.last_attempt.attempt_number
        raise ServiceUnavailableError(
            f"{what}: still failing after {attempts} attempts ({describe(last)}); a transient error, "
            "retried with backoff: is the service up and reachable?") from last
    except QuiverError:
        raise
    except Exception as exc:
        if is_transient(exc):  # pragma: no cover - tenacity retries these; kept for safety
            raise
        raise ServiceRequestError(f"{what}: {describe(exc)} (a permanent error: not retried)") from exc

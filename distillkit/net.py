"""Telling "no connection at all" apart from other download failures, for urllib's errors."""

from __future__ import annotations

import errno
import socket
import urllib.error
import urllib.request

UNREACHABLE_ERRNOS = (errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN)


def no_connection(error: BaseException) -> bool:
    """The server was never reached: a name that does not resolve, a refused connection, no route (a
    `URLError`'s reason, or the OS error itself). An HTTP error status means it was reached."""
    if isinstance(error, urllib.error.HTTPError):
        return False
    reason = error.reason if isinstance(error, urllib.error.URLError) else error
    refused_or_unknown = isinstance(reason, (socket.gaierror, ConnectionError))
    return refused_or_unknown or getattr(reason, "errno", None) in UNREACHABLE_ERRNOS


def reachable(url: str, timeout: float = 10.0) -> bool:
    """Whether one HEAD request to `url` gets any answer from its server, through urllib (so `HTTP_PROXY` /
    `HTTPS_PROXY` apply); no retries."""
    try:
        urllib.request.build_opener().open(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return True
    except (urllib.error.URLError, OSError) as e:
        return not no_connection(e)
    return True

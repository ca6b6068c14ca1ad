"""S3 fault injection: answers planted in place of the requests pgdr's S3 clients send,
through botocore's before-send hook on every client pgdr creates (S3_CLIENT_HOOKS)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

import pytest
from botocore.awsrequest import AWSRequest, AWSResponse
from botocore.exceptions import ConnectionClosedError

from pgdr.storage import s3repo

# Which requests a fault answers or a count counts: (operation name, URL) -> whether it does.
RequestMatch = Callable[[str, str], bool]


class _RawBody:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def stream(self, **_kwargs: Any) -> Iterator[bytes]:
        yield self.data


def fake_response(status: int, body: bytes = b"") -> AWSResponse:
    """An HTTP answer that never reached S3."""
    return AWSResponse("http://fault.invalid", status, {}, _RawBody(body))


def s3_error_body(code: str, message: str) -> bytes:
    """The XML body S3 answers an error with."""
    return (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
            f"<Message>{message}</Message></Error>").encode()


def reset() -> NoReturn:
    """A connection dropped before any answer."""
    raise ConnectionClosedError(endpoint_url="http://fault.invalid")


class S3Faults:
    """Faults planted in the S3 requests of every client pgdr creates; every request that
    reached the wire (faulted or not) is recorded as (operation, URL)."""

    def __init__(self) -> None:
        self._faults: list[tuple[RequestMatch, Callable[[], AWSResponse], list[int]]] = []
        self._lock = threading.Lock()  # parts are uploaded on several threads
        self.sent: list[tuple[str, str]] = []

    def plant(self, requests: str | RequestMatch, make: Callable[[], AWSResponse], times: int = -1) -> None:
        """The next `times` requests matching (all of them with -1) get make()'s answer or
        exception instead of S3's; `requests` is an operation name or a RequestMatch."""
        matches = requests if callable(requests) else _operation_is(requests)
        self._faults.append((matches, make, [times]))

    def count(self, requests: str | RequestMatch) -> int:
        """How many requests matching were sent (an operation name or a RequestMatch)."""
        matches = requests if callable(requests) else _operation_is(requests)
        return sum(1 for operation, url in self.sent if matches(operation, url))

    def install(self, client: Any) -> None:
        client.meta.events.register("before-send.s3", self._before_send)

    def _before_send(self, request: AWSRequest, **kwargs: Any) -> AWSResponse | None:
        operation = kwargs["event_name"].rsplit(".", 1)[-1]
        with self._lock:
            self.sent.append((operation, request.url))
            make = None
            for matches, planted, left in self._faults:
                if left[0] != 0 and matches(operation, request.url):
                    left[0] -= 1
                    make = planted
                    break
        return make() if make else None


def _operation_is(name: str) -> RequestMatch:
    return lambda operation, _url: operation == name


def install_s3_faults(monkeypatch: pytest.MonkeyPatch) -> S3Faults:
    """S3Faults on every S3 client pgdr creates from now on (in this test)."""
    faults = S3Faults()
    monkeypatch.setattr(s3repo, "S3_CLIENT_HOOKS", [faults.install])
    return faults

"""A WatchMailbox feed that survives broker restarts and failovers: it resumes from the last token it saw."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence

import grpc
from google.protobuf import duration_pb2
from mailbroker.v1 import mail_service_pb2, mail_service_pb2_grpc

from mailbroker_client.backoff import Backoff

# UNAVAILABLE is what a broker says when it shuts down (reason SERVER_SHUTTING_DOWN) and what gRPC says when the
# connection drops: the token lets another replica, or the same one restarted, carry on without loss. Anything
# else (NOT_FOUND after erasure, INVALID_ARGUMENT for a bad token, PERMISSION_DENIED) is the caller's to handle.
RESUMABLE = frozenset({grpc.StatusCode.UNAVAILABLE})


def watch(
    mail: mail_service_pb2_grpc.MailServiceStub,
    account: str,
    resume_token: str | None = None,
    *,
    folders: Sequence[str] = (),
    heartbeat_interval: float | None = None,
    backoff: Backoff = Backoff(),  # noqa: B008 (frozen, so sharing the default is safe)
    max_attempts: int | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> Iterator[mail_service_pb2.MailboxEvent]:
    """Yield ``account``'s events from ``resume_token`` on (from now when None), reconnecting on UNAVAILABLE.

    Each reconnect asks for the feed from the last event's resume token, after ``backoff.delay(n)`` for the n-th
    reconnect in a row (the count starts again once an event arrives); after ``max_attempts`` reconnects in a row
    (never, by default) the last error is raised. Every event is yielded, heartbeats too (their tokens keep a
    resume cheap), and so is ``resync_required``: when one comes, the events since the old token are lost, and the
    caller must list afresh (``ListMessages``) before it goes on with the events that follow. The generator ends when
    the broker ends the stream (after an ``account_state_changed`` that ends the feed); other errors are raised.
    Closing the generator cancels the call.
    """
    token = resume_token or ""
    interval = None
    if heartbeat_interval is not None:
        interval = duration_pb2.Duration()
        interval.FromNanoseconds(int(heartbeat_interval * 1e9))
    failures = 0
    while True:
        request = mail_service_pb2.WatchMailboxRequest(
            account=account, resume_token=token, folders=folders, heartbeat_interval=interval
        )
        call = mail.WatchMailbox(request)
        try:
            for event in call:
                failures = 0
                if event.resume_token:
                    token = event.resume_token
                yield event
            return
        except grpc.RpcError as error:
            if error.code() not in RESUMABLE or (max_attempts is not None and failures >= max_attempts):
                raise
        finally:
            call.cancel()
        sleep(backoff.delay(failures))
        failures += 1

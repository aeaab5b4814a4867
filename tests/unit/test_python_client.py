"""clients/python: the resuming watch and the retried send, driven through grpc_testing channels (the test plays the
broker, RPC by RPC), and the service config that makes gRPC retry the idempotent reads."""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import grpc_testing
import pytest
from mailbroker.v1 import account_service_pb2, mail_service_pb2
from mailbroker_client import RETRIED_METHODS, SERVICE_CONFIG, Backoff, Client

MAIL = mail_service_pb2.DESCRIPTOR.services_by_name["MailService"]
ACCOUNTS = account_service_pb2.DESCRIPTOR.services_by_name["AccountService"]
WATCH = MAIL.methods_by_name["WatchMailbox"]
SEND = MAIL.methods_by_name["SendMessage"]
STEADY = Backoff(initial=1, maximum=8, jitter=False)
DONE = object()


def event(token: str, kind: str = "heartbeat") -> mail_service_pb2.MailboxEvent:
    made = mail_service_pb2.MailboxEvent(resume_token=token)
    if kind == "resync_required":
        made.resync_required.reason = mail_service_pb2.RESYNC_REASON_CURSOR_EXPIRED
    elif kind == "message_added":
        made.message_added.message.name = f"accounts/a/messages/{token}"
    else:
        made.heartbeat.SetInParent()
    return made


class Consumer:
    """Runs ``make()``'s iterator in a thread and hands over each item (or the error it ends with) through a queue:
    the test waits on the queue, never on the clock."""

    def __init__(self, make: Callable[[], Iterator[Any]]) -> None:
        self.items: queue.Queue[Any] = queue.Queue()
        self.thread = threading.Thread(target=self._run, args=(make,), daemon=True)
        self.thread.start()

    def _run(self, make: Callable[[], Iterator[Any]]) -> None:
        try:
            for item in make():
                self.items.put(item)
            self.items.put(DONE)
        except Exception as error:
            self.items.put(error)

    def next(self) -> Any:
        return self.items.get(timeout=10)


@pytest.fixture
def channel() -> Any:
    return grpc_testing.channel([MAIL, ACCOUNTS], grpc_testing.strict_real_time())


def take_watch(channel: Any) -> tuple[mail_service_pb2.WatchMailboxRequest, Any]:
    _, request, rpc = channel.take_unary_stream(WATCH)
    return request, rpc


def test_watch_resumes_from_the_last_token_on_unavailable_with_growing_backoff(channel: Any) -> None:
    delays: list[float] = []
    feed = Consumer(lambda: Client(channel).watch("accounts/a", "t0", backoff=STEADY, sleep=delays.append))

    request, rpc = take_watch(channel)
    assert (request.account, request.resume_token) == ("accounts/a", "t0")
    rpc.send_response(event("t1", "message_added"))
    rpc.send_response(event("t2"))
    assert feed.next().resume_token == "t1"
    assert feed.next().resume_token == "t2"
    rpc.terminate((), grpc.StatusCode.UNAVAILABLE, "broker shutting down")

    for _ in range(3):  # three failures in a row: the delay doubles each time
        request, rpc = take_watch(channel)
        assert request.resume_token == "t2"
        rpc.terminate((), grpc.StatusCode.UNAVAILABLE, "connection refused")
    request, rpc = take_watch(channel)
    assert request.resume_token == "t2"
    assert delays == [1, 2, 4, 8]

    rpc.send_response(event("t3", "message_added"))  # an event resets the count
    assert feed.next().resume_token == "t3"
    rpc.terminate((), grpc.StatusCode.UNAVAILABLE, "again")
    request, rpc = take_watch(channel)
    assert request.resume_token == "t3"
    assert delays == [1, 2, 4, 8, 1]
    rpc.terminate((), grpc.StatusCode.OK, "")
    assert feed.next() is DONE


def test_a_resync_event_reaches_the_caller_and_the_feed_goes_on_from_its_token(channel: Any) -> None:
    feed = Consumer(lambda: Client(channel).watch("accounts/a", "expired", backoff=STEADY, sleep=lambda _: None))
    request, rpc = take_watch(channel)
    assert request.resume_token == "expired"
    rpc.send_response(event("r1", "resync_required"))
    resync = feed.next()
    assert resync.WhichOneof("event") == "resync_required"
    assert resync.resync_required.reason == mail_service_pb2.RESYNC_REASON_CURSOR_EXPIRED
    rpc.terminate((), grpc.StatusCode.UNAVAILABLE, "gone")
    request, rpc = take_watch(channel)
    assert request.resume_token == "r1"
    rpc.terminate((), grpc.StatusCode.OK, "")
    assert feed.next() is DONE


@pytest.mark.parametrize(
    "code", [grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED]
)
def test_watch_raises_other_errors_without_retrying(channel: Any, code: grpc.StatusCode) -> None:
    delays: list[float] = []
    feed = Consumer(lambda: Client(channel).watch("accounts/a", backoff=STEADY, sleep=delays.append))
    request, rpc = take_watch(channel)
    assert request.resume_token == ""
    rpc.terminate((), code, "no")
    error = feed.next()
    assert isinstance(error, grpc.RpcError)
    assert error.code() == code
    assert delays == []


def test_watch_gives_up_after_max_attempts_in_a_row(channel: Any) -> None:
    delays: list[float] = []
    feed = Consumer(
        lambda: Client(channel).watch("accounts/a", "t", backoff=STEADY, max_attempts=2, sleep=delays.append)
    )
    for _ in range(3):
        _, rpc = take_watch(channel)
        rpc.terminate((), grpc.StatusCode.UNAVAILABLE, "down")
    error = feed.next()
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert delays == [1, 2]


def test_watch_sends_folders_and_heartbeat_interval(channel: Any) -> None:
    folders = ["accounts/a/folders/INBOX", "accounts/a/folders/x"]
    feed = Consumer(lambda: Client(channel).watch("accounts/a", folders=folders, heartbeat_interval=5.5))
    request, rpc = take_watch(channel)
    assert list(request.folders) == folders
    assert request.heartbeat_interval.ToNanoseconds() == 5_500_000_000
    rpc.terminate((), grpc.StatusCode.OK, "")
    assert feed.next() is DONE


def test_send_message_retries_unavailable_with_one_request_id_it_made(channel: Any) -> None:
    delays: list[float] = []
    outgoing = mail_service_pb2.SendMessageRequest(account="accounts/a")
    outgoing.message.subject = "hi"
    sent = Consumer(lambda: iter([Client(channel).send_message(outgoing, sleep=delays.append)]))
    ids = []
    for _ in range(2):
        _, request, rpc = channel.take_unary_unary(SEND)
        ids.append(request.request_id)
        rpc.terminate(mail_service_pb2.SendMessageResponse(), (), grpc.StatusCode.UNAVAILABLE, "down")
    _, request, rpc = channel.take_unary_unary(SEND)
    ids.append(request.request_id)
    assert request.message.subject == "hi"
    rpc.terminate(mail_service_pb2.SendMessageResponse(internet_message_id="<m@x>"), (), grpc.StatusCode.OK, "")
    assert sent.next().internet_message_id == "<m@x>"
    assert ids[0] and len(set(ids)) == 1
    assert outgoing.request_id == ""  # the caller's request is left as it was
    assert len(delays) == 2


def test_send_message_keeps_the_callers_request_id_and_does_not_retry_other_errors(channel: Any) -> None:
    outgoing = mail_service_pb2.SendMessageRequest(account="accounts/a", request_id="my-id")
    sent = Consumer(lambda: iter([Client(channel).send_message(outgoing, sleep=lambda _: None)]))
    _, request, rpc = channel.take_unary_unary(SEND)
    assert request.request_id == "my-id"
    rpc.terminate(mail_service_pb2.SendMessageResponse(), (), grpc.StatusCode.FAILED_PRECONDITION, "no")
    assert sent.next().code() == grpc.StatusCode.FAILED_PRECONDITION


def test_the_service_config_retries_only_existing_idempotent_methods() -> None:
    (method_config,) = SERVICE_CONFIG["methodConfig"]
    named = {(n["service"], n["method"]) for n in method_config["name"]}
    services = {"mailbroker.v1.AccountService": ACCOUNTS, "mailbroker.v1.MailService": MAIL}
    for service, method in named:
        assert method in services[service].methods_by_name
    assert ("mailbroker.v1.MailService", "SendMessage") not in named
    assert ("mailbroker.v1.MailService", "WatchMailbox") not in named
    assert ("mailbroker.v1.AccountService", "DeleteAccount") not in named
    assert ("mailbroker.v1.AccountService", "ConnectImapAccount") not in named
    assert named == {(s, m) for s, methods in RETRIED_METHODS.items() for m in methods}
    assert method_config["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
    json.dumps(SERVICE_CONFIG)  # what connect() hands to gRPC

"""The policy: tenant mapping, capability caps, auditors, tokens bound to the tenant, reload in a live broker, by
SIGHUP and by the config file watch in a `mailbroker serve` process."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from mailbroker.v1 import account_service_pb2 as apb
from mailbroker.v1 import mail_service_pb2 as mpb
from mailbroker.v1 import resources_pb2 as rpb

from server.config import PolicyCap, PolicyConfig, PolicyRule, PolicyTenant
from server.crypto.keyring import load_keyring
from server.crypto.opaque import OpaqueTokens
from server.domain.policy import METHOD_ACTIONS, Policy
from server.domain.principal import Action
from server.errors import ConfigurationError
from server.providers.imap.ids import folder_id
from tests.broker import RunningBroker, broker_config, error_reason, rich_status, running_broker, seed_account, stubs
from tests.pki import TestPki, make_test_pki

TEAM = "team-a"
# AccountService methods no cap limits: they read the caller's own tenant's account list and audit log.
UNCAPPED = {"GetAccount", "ListAccounts", "ListAuditEvents"}


def _policy(pki: TestPki, **changes: object) -> PolicyConfig:
    """alice and carol act for team-a; carol may read but never send, connect or delete; bob audits."""
    base = PolicyConfig(
        rules=(PolicyRule(identities=(pki.alice.identity, pki.bob.identity, pki.carol.identity), methods=("*",)),),
        tenants=(PolicyTenant(tenant=TEAM, identities=(pki.alice.identity, pki.carol.identity)),),
        caps=(PolicyCap(identities=(pki.carol.identity,), allow=("METADATA", "READ")),),
        auditors=(pki.bob.identity,),
    )
    return replace(base, **changes)  # type: ignore[arg-type]


@pytest.fixture
async def team(tmp_path: Path, pki: TestPki) -> AsyncIterator[RunningBroker]:
    config = replace(broker_config(tmp_path, pki), policy=_policy(pki))
    async with running_broker(config, pki) as running:
        yield running


async def _fails(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    return caught.value


async def _stream_fails(stream: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in stream:  # type: ignore[attr-defined]
            pass
    return caught.value


def _error_metadata(error: grpc.aio.AioRpcError) -> dict[str, str]:
    status = rich_status(error)
    for detail in status.details if status else []:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return dict(info.metadata)
    return {}


def _tampered(token: str) -> str:
    middle = len(token) // 2
    return token[:middle] + ("A" if token[middle] != "A" else "B") + token[middle + 1 :]


# The compiled policy


def test_tenants_most_specific_pattern_wins_and_unmapped_identities_are_their_own_tenant() -> None:
    policy = Policy.from_config(
        PolicyConfig(
            tenants=(
                PolicyTenant(tenant="corp", identities=("spiffe://corp/*",)),
                PolicyTenant(tenant="billing", identities=("spiffe://corp/billing/*", "spiffe://other/invoicer")),
                PolicyTenant(tenant="special", identities=("spiffe://corp/billing/special",)),
            )
        )
    )
    assert policy.tenant_of("spiffe://corp/hr") == "corp"
    assert policy.tenant_of("spiffe://corp/billing/api") == "billing"
    assert policy.tenant_of("spiffe://other/invoicer") == "billing"
    assert policy.tenant_of("spiffe://corp/billing/special") == "special"
    assert policy.tenant_of("spiffe://elsewhere/x") == "spiffe://elsewhere/x"
    # An unmapped identity named like a mapped tenant would see that tenant's accounts: it has no tenant at all.
    assert policy.tenant_of("billing") is None
    assert policy.principal("billing") is None


def test_caps_intersect_and_auditors_match_patterns() -> None:
    policy = Policy.from_config(
        PolicyConfig(
            caps=(
                PolicyCap(identities=("spiffe://corp/*",), allow=("METADATA", "READ", "SEND")),
                PolicyCap(identities=("spiffe://corp/reader",), allow=("METADATA", "READ", "CONNECT")),
            ),
            auditors=("spiffe://corp/audit/*",),
        )
    )
    assert policy.actions_of("spiffe://corp/reader") == {Action.METADATA, Action.READ}
    assert policy.actions_of("spiffe://corp/sender") == {Action.METADATA, Action.READ, Action.SEND}
    assert policy.actions_of("spiffe://free/x") == frozenset(Action)
    principal = policy.principal("spiffe://corp/audit/one")
    assert principal is not None and principal.auditor
    principal = policy.principal("spiffe://corp/reader")
    assert principal is not None and not principal.auditor


@pytest.mark.parametrize(
    ("policy", "message"),
    [
        (PolicyConfig(tenants=(PolicyTenant(tenant="", identities=("a@example.test",)),)), "policy.tenants[0].tenant"),
        (PolicyConfig(tenants=(PolicyTenant(tenant="t"),)), "policy.tenants[0] needs identities"),
        (
            PolicyConfig(
                tenants=(
                    PolicyTenant(tenant="t1", identities=("a@example.test",)),
                    PolicyTenant(tenant="t2", identities=("a@example.test",)),
                )
            ),
            "policy.tenants[1].identities[0] is already mapped",
        ),
        (PolicyConfig(tenants=(PolicyTenant(tenant="t", identities=("spiffe://a*b",)),)), "identities[0] must be"),
        (PolicyConfig(caps=(PolicyCap(identities=("a@example.test",), allow=("WRITE",)),)), "policy.caps[0].allow[0]"),
        (PolicyConfig(caps=(PolicyCap(allow=("READ",)),)), "policy.caps[0] needs identities"),
        (PolicyConfig(rules=(PolicyRule(identities=("a@example.test",)),)), "policy.rules[0] needs"),
        (PolicyConfig(auditors=("",)), "policy.auditors[0]"),
    ],
)
def test_a_policy_that_does_not_hold_is_one_line_naming_positions_not_identities(
    policy: PolicyConfig, message: str
) -> None:
    with pytest.raises(ConfigurationError) as caught:
        Policy.from_config(policy)
    text = str(caught.value)
    assert message in text
    assert "\n" not in text and "example.test" not in text


def test_every_mail_rpc_and_every_account_changing_rpc_is_capped() -> None:
    services = {
        "mailbroker.v1.AccountService": apb.DESCRIPTOR.services_by_name["AccountService"],
        "mailbroker.v1.MailService": mpb.DESCRIPTOR.services_by_name["MailService"],
    }
    for full_name, service in services.items():
        for method in service.methods:
            key = f"{full_name}/{method.name}"
            assert (key in METHOD_ACTIONS) != (method.name in UNCAPPED), key


# Tenancy and tokens on a live broker


async def test_identities_of_one_tenant_share_accounts_and_page_tokens_and_nobody_else_does(
    team: RunningBroker,
) -> None:
    pki = team.pki
    store = team.store()
    ids = sorted(seed_account(store, TEAM).id for _ in range(3))
    async with team.channel(pki.alice) as a, team.channel(pki.carol) as c, team.channel(pki.bob) as b:
        (alice, _), (carol, _), (bob, _) = stubs(a), stubs(c), stubs(b)
        first = await alice.ListAccounts(apb.ListAccountsRequest(page_size=2), timeout=5)
        assert [x.name for x in first.accounts] == [f"accounts/{i}" for i in ids[:2]] and first.next_page_token
        # carol acts for the same tenant: the token is hers to use too.
        rest = await carol.ListAccounts(apb.ListAccountsRequest(page_token=first.next_page_token), timeout=5)
        assert [x.name for x in rest.accounts] == [f"accounts/{ids[2]}"]
        await carol.GetAccount(apb.GetAccountRequest(name=f"accounts/{ids[0]}"), timeout=5)

        assert not (await bob.ListAccounts(apb.ListAccountsRequest(), timeout=5)).accounts
        error = await _fails(bob.GetAccount(apb.GetAccountRequest(name=f"accounts/{ids[0]}"), timeout=5))
        assert (error.code(), error_reason(error)) == (grpc.StatusCode.NOT_FOUND, "ACCOUNT_NOT_FOUND")
        for token in (first.next_page_token, _tampered(first.next_page_token)):
            error = await _fails(bob.ListAccounts(apb.ListAccountsRequest(page_token=token), timeout=5))
            assert (error.code(), error_reason(error)) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PAGE_TOKEN")
        error = await _fails(
            alice.ListAccounts(apb.ListAccountsRequest(page_token=_tampered(first.next_page_token)), timeout=5)
        )
        assert (error.code(), error_reason(error)) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PAGE_TOKEN")

        # Audit listings: the tenant's erasures, paged; bob's own listing has none of them, and the token is not his.
        for account_id in ids[:2]:
            await alice.DeleteAccount(apb.DeleteAccountRequest(name=f"accounts/{account_id}"), timeout=10)
        page = await carol.ListAuditEvents(apb.ListAuditEventsRequest(page_size=1), timeout=5)
        assert len(page.audit_events) == 1 and page.next_page_token
        own = await bob.ListAuditEvents(apb.ListAuditEventsRequest(), timeout=5)
        assert not own.audit_events
        erased = await bob.ListAuditEvents(apb.ListAuditEventsRequest(account=f"accounts/{ids[0]}"), timeout=5)
        assert not erased.audit_events
        for token in (page.next_page_token, _tampered(page.next_page_token)):
            error = await _fails(bob.ListAuditEvents(apb.ListAuditEventsRequest(page_token=token), timeout=5))
            assert (error.code(), error_reason(error)) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PAGE_TOKEN")
        # bob audits every tenant: there, team-a's events are listed (and that is the only way across tenants).
        every = await bob.ListAuditEvents(apb.ListAuditEventsRequest(all_tenants=True), timeout=5)
        assert {e.account for e in every.audit_events} >= {f"accounts/{i}" for i in ids[:2]}


async def test_folder_message_and_resume_tokens_of_one_tenant_are_invalid_for_another(team: RunningBroker) -> None:
    pki = team.pki
    store = team.store()
    teams = seed_account(store, TEAM).id
    bobs = seed_account(store, pki.bob.identity).id
    # Tokens exactly as the broker seals them for team-a's account (its keyring, its bindings).
    sealer = OpaqueTokens(load_keyring(team.config.keyring_file, {}))
    inbox = folder_id("INBOX")
    issued = {
        "folders": sealer.seal("page:folders", [TEAM, teams], {"offset": 1}),
        "messages": sealer.seal("page:messages", [TEAM, teams, "", ""], {"uid": 1}),
        "resume": sealer.seal("resume", [TEAM, teams, inbox], {}),
    }
    async with team.channel(pki.bob) as b, team.channel(pki.alice) as a:
        for channel, account in ((b, bobs), (a, teams)):
            _, mail = stubs(channel)
            # On bob's own account the tokens are foreign; on team-a's, alice gets them tampered.
            tokens = issued if channel is b else {k: _tampered(v) for k, v in issued.items()}
            parent = f"accounts/{account}"
            error = await _fails(
                mail.ListFolders(mpb.ListFoldersRequest(parent=parent, page_token=tokens["folders"]), timeout=5)
            )
            assert (error.code(), error_reason(error)) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PAGE_TOKEN")
            error = await _fails(
                mail.ListMessages(mpb.ListMessagesRequest(parent=parent, page_token=tokens["messages"]), timeout=5)
            )
            assert (error.code(), error_reason(error)) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PAGE_TOKEN")
            error = await _stream_fails(
                mail.WatchMailbox(mpb.WatchMailboxRequest(account=parent, resume_token=tokens["resume"]), timeout=5)
            )
            assert (error.code(), error_reason(error)) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_RESUME_TOKEN")


# Capability caps


async def test_a_capped_identity_may_read_but_never_send_connect_or_delete(team: RunningBroker) -> None:
    pki = team.pki
    store = team.store()
    teams = seed_account(store, TEAM).id
    bobs = seed_account(store, pki.bob.identity).id
    async with team.channel(pki.carol) as c:
        accounts, mail = stubs(c)
        message = mpb.OutgoingMessage(subject="s", text_body="b")
        for account_id in (teams, bobs, "a0000000000000000000000000"):  # own, another tenant's, none: one answer
            name = f"accounts/{account_id}"
            calls = [
                (
                    mail.SendMessage(mpb.SendMessageRequest(account=name, request_id="r1", message=message), timeout=5),
                    "SEND",
                ),
                (accounts.DeleteAccount(apb.DeleteAccountRequest(name=name), timeout=5), "DELETE"),
                (
                    accounts.BeginOAuth(
                        apb.BeginOAuthRequest(provider=rpb.PROVIDER_GOOGLE, account=name, redirect_uri="x"), timeout=5
                    ),
                    "CONNECT",
                ),
            ]
            for call, capability in calls:
                error = await _fails(call)
                assert (error.code(), error_reason(error)) == (
                    grpc.StatusCode.PERMISSION_DENIED,
                    "POLICY_CAPABILITY_CAPPED",
                )
                assert _error_metadata(error) == {"capability": capability}
        for call in (
            accounts.CompleteOAuth(apb.CompleteOAuthRequest(state="s", code="c"), timeout=5),
            accounts.ConnectImapAccount(apb.ConnectImapAccountRequest(), timeout=5),
        ):
            error = await _fails(call)
            assert (error_reason(error), _error_metadata(error)) == (
                "POLICY_CAPABILITY_CAPPED",
                {"capability": "CONNECT"},
            )
        # Reading is within the cap: the call gets past the policy to the account (whose server is not there).
        error = await _fails(
            mail.GetMessage(
                mpb.GetMessageRequest(name=f"accounts/{teams}/messages/m1", view=rpb.MESSAGE_VIEW_FULL), timeout=5
            )
        )
        assert error_reason(error) not in ("POLICY_CAPABILITY_CAPPED", "ACCOUNT_NOT_FOUND", "CAPABILITY_NOT_GRANTED")
    # Nothing was deleted.
    assert team.store().get_account(TEAM, teams) is not None
    assert team.store().get_account(pki.bob.identity, bobs) is not None


# Reload


async def test_reload_puts_a_new_policy_in_force_and_a_bad_one_leaves_the_old(team: RunningBroker) -> None:
    pki = team.pki
    teams = seed_account(team.store(), TEAM).id
    name = f"accounts/{teams}"
    async with team.channel(pki.carol) as c, team.channel(pki.bob) as b:
        _, mail = stubs(c)
        bob, _ = stubs(b)
        await bob.ListAuditEvents(apb.ListAuditEventsRequest(all_tenants=True), timeout=5)

        # carol down to METADATA, bob no longer an auditor.
        metadata_only = _policy(
            pki, caps=(PolicyCap(identities=(pki.carol.identity,), allow=("METADATA",)),), auditors=()
        )
        team.broker.reload_policy(replace(team.config, policy=metadata_only))
        full = mpb.GetMessageRequest(name=f"{name}/messages/m1", view=rpb.MESSAGE_VIEW_FULL)
        for call in (
            mail.GetMessage(full, timeout=5),
            mail.ListMessages(mpb.ListMessagesRequest(parent=name, query="invoice"), timeout=5),
        ):
            error = await _fails(call)
            assert (error_reason(error), _error_metadata(error)) == ("POLICY_CAPABILITY_CAPPED", {"capability": "READ"})
        error = await _stream_fails(
            mail.GetAttachment(mpb.GetAttachmentRequest(name=f"{name}/messages/m1/attachments/a1"), timeout=5)
        )
        assert error_reason(error) == "POLICY_CAPABILITY_CAPPED"
        error = await _fails(
            mail.GetMessage(
                mpb.GetMessageRequest(name=f"{name}/messages/m1", view=rpb.MESSAGE_VIEW_METADATA), timeout=5
            )
        )
        assert error_reason(error) != "POLICY_CAPABILITY_CAPPED"
        error = await _fails(bob.ListAuditEvents(apb.ListAuditEventsRequest(all_tenants=True), timeout=5))
        assert (error.code(), error_reason(error)) == (grpc.StatusCode.PERMISSION_DENIED, "AUDITOR_ONLY")

        # A policy that does not hold is refused whole; the one in force stays.
        broken = _policy(
            pki, tenants=(PolicyTenant(tenant="", identities=(pki.alice.identity,)),), auditors=(pki.bob.identity,)
        )
        with pytest.raises(ConfigurationError):
            team.broker.reload_policy(replace(team.config, policy=broken))
        error = await _fails(bob.ListAuditEvents(apb.ListAuditEventsRequest(all_tenants=True), timeout=5))
        assert error_reason(error) == "AUDITOR_ONLY"

        # bob now acts for a tenant named "carol": carol (unmapped, named like it) is refused outright.
        clash = _policy(pki, tenants=(PolicyTenant(tenant=pki.carol.identity, identities=(pki.bob.identity,)),))
        team.broker.reload_policy(replace(team.config, policy=clash))
        error = await _fails(mail.ListFolders(mpb.ListFoldersRequest(parent=name), timeout=5))
        assert (error.code(), error_reason(error)) == (grpc.StatusCode.PERMISSION_DENIED, "IDENTITY_TENANT_CONFLICT")


# SIGHUP and the file watch on a `mailbroker serve` process


def _toml(pki: TestPki, data: Path, log: Path, policy: str, *, watch: float = 0) -> str:
    """A config with ``policy`` (``[[policy....]]`` tables); ``watch`` is [policy] watch_interval_seconds."""
    return f"""data_dir = "{data}"
[server]
listen = "127.0.0.1:0"
[tls]
cert = "{pki.server.cert}"
key = "{pki.server.key}"
client_ca = "{pki.ca}"
[logging]
file = "{log}"
[policy]
watch_interval_seconds = {watch}
{policy}"""


def _conflicting_tenants(identity: str) -> str:
    """A policy that does not hold: one identity mapped to two tenants."""
    return (
        _rules(identity)
        + f'[[policy.tenants]]\ntenant = "t"\nidentities = ["{identity}"]\n'
        + f'[[policy.tenants]]\ntenant = "u"\nidentities = ["{identity}"]\n'
    )


@contextmanager
def _serving(config: Path) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """`mailbroker serve --config config` and its target; ended with SIGTERM (it must exit 0)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "serve", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert process.stdout is not None
        banner = process.stdout.readline()
        assert banner.startswith("mailbroker is serving on "), "the broker did not start"
        yield process, banner.split()[4]
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        if process.stdout is not None:
            process.stdout.close()


def _rules(*identities: str) -> str:
    return "".join(f'[[policy.rules]]\nidentities = ["{i}"]\nmethods = ["*"]\n' for i in identities)


def _events(log: Path) -> list[dict[str, object]]:
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def _wait_for_event(log: Path, event: str, count: int) -> list[dict[str, object]]:
    """The log's lines of ``event`` once there are ``count`` of them (polled: a signal has no reply to wait on)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        found = [e for e in _events(log) if e.get("event") == event]
        if len(found) >= count:
            return found
        time.sleep(0.05)
    raise AssertionError(f"no {event} line in the log")


def _list_accounts(pki: TestPki, target: str, who: str) -> tuple[grpc.StatusCode, str]:
    client = getattr(pki, who)
    key, cert = client.key_cert_pair()
    credentials = grpc.ssl_channel_credentials(pki.ca_pem(), private_key=key, certificate_chain=cert)
    with grpc.secure_channel(target, credentials) as channel:
        call = channel.unary_unary(
            "/mailbroker.v1.AccountService/ListAccounts",
            request_serializer=apb.ListAccountsRequest.SerializeToString,
            response_deserializer=apb.ListAccountsResponse.FromString,
        )
        try:
            call(apb.ListAccountsRequest(), timeout=10)
        except grpc.RpcError as error:
            status = error.code()
            info = error_details_pb2.ErrorInfo()
            rich = rpc_status.from_call(error)  # type: ignore[arg-type]
            reason = next((info.reason for d in (rich.details if rich else []) if d.Unpack(info)), "")
            return status, reason
    return grpc.StatusCode.OK, ""


def test_sighup_reloads_the_policy_and_a_broken_file_is_refused_in_one_line(tmp_path: Path) -> None:
    pki = make_test_pki(tmp_path)
    data, log, config = tmp_path / "var", tmp_path / "broker.log", tmp_path / "mailbroker.toml"
    data.mkdir()
    config.write_text(_toml(pki, data, log, _rules(pki.alice.identity)))  # no file watch: only the signal reloads
    with _serving(config) as (process, target):
        assert _list_accounts(pki, target, "alice") == (grpc.StatusCode.OK, "")
        assert _list_accounts(pki, target, "bob") == (grpc.StatusCode.PERMISSION_DENIED, "IDENTITY_NOT_ALLOWED")

        config.write_text(_toml(pki, data, log, _rules(pki.bob.identity)))
        process.send_signal(signal.SIGHUP)
        _wait_for_event(log, "policy_reloaded", 1)
        assert _list_accounts(pki, target, "bob") == (grpc.StatusCode.OK, "")
        assert _list_accounts(pki, target, "alice") == (grpc.StatusCode.PERMISSION_DENIED, "IDENTITY_NOT_ALLOWED")

        # Broken two ways in turn: not TOML, then a policy that does not hold. Each refused, bob's policy stays.
        for broken in ("[policy\n", _toml(pki, data, log, _conflicting_tenants(pki.alice.identity))):
            config.write_text(broken)
            refused = len([e for e in _events(log) if e.get("event") == "policy_reload_refused"]) + 1
            process.send_signal(signal.SIGHUP)
            line = _wait_for_event(log, "policy_reload_refused", refused)[-1]
            message = str(line["msg"])
            assert message.startswith("policy reload refused, the previous policy stays in force: ")
            assert "\n" not in message and "spiffe://" not in message and "exc" not in line
            assert _list_accounts(pki, target, "bob") == (grpc.StatusCode.OK, "")
            assert _list_accounts(pki, target, "alice")[1] == "IDENTITY_NOT_ALLOWED"
        assert process.poll() is None


def _count(log: Path, event: str) -> int:
    return len([e for e in _events(log) if e.get("event") == event])


def test_a_changed_config_file_reloads_the_policy_without_a_signal_and_a_broken_one_is_refused_once(
    tmp_path: Path,
) -> None:
    pki = make_test_pki(tmp_path)
    data, log, config = tmp_path / "var", tmp_path / "broker.log", tmp_path / "mailbroker.toml"
    data.mkdir()
    watch = 0.1  # the test's poll interval; every wait below is for a log line, with a generous overall timeout
    config.write_text(_toml(pki, data, log, _rules(pki.alice.identity), watch=watch))
    with _serving(config) as (process, target):
        assert _list_accounts(pki, target, "alice") == (grpc.StatusCode.OK, "")
        assert _list_accounts(pki, target, "bob") == (grpc.StatusCode.PERMISSION_DENIED, "IDENTITY_NOT_ALLOWED")

        config.write_text(_toml(pki, data, log, _rules(pki.bob.identity), watch=watch))
        _wait_for_event(log, "policy_reloaded", 1)
        assert _list_accounts(pki, target, "bob") == (grpc.StatusCode.OK, "")
        assert _list_accounts(pki, target, "alice") == (grpc.StatusCode.PERMISSION_DENIED, "IDENTITY_NOT_ALLOWED")

        # A policy that does not hold, then a file that is not TOML: each refused in one line, bob's policy stays.
        for refused, broken in enumerate(
            (_toml(pki, data, log, _conflicting_tenants(pki.alice.identity), watch=watch), "[policy\n"), start=1
        ):
            config.write_text(broken)
            line = _wait_for_event(log, "policy_reload_refused", refused)[-1]
            message = str(line["msg"])
            assert message.startswith("policy reload refused, the previous policy stays in force: ")
            assert "\n" not in message and "spiffe://" not in message and "exc" not in line
            assert _list_accounts(pki, target, "bob") == (grpc.StatusCode.OK, "")
            assert _list_accounts(pki, target, "alice")[1] == "IDENTITY_NOT_ALLOWED"

        # Fixed again: reloaded. The broken files, polled many times meanwhile, were refused once each.
        config.write_text(_toml(pki, data, log, _rules(pki.alice.identity), watch=watch))
        _wait_for_event(log, "policy_reloaded", 2)
        assert _list_accounts(pki, target, "alice") == (grpc.StatusCode.OK, "")
        assert _count(log, "policy_reload_refused") == 2
        assert _count(log, "policy_file_changed") == 4
        assert process.poll() is None

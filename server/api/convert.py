"""Conversions between domain types and mailbroker.v1 messages (no logic beyond the mapping)."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from google.protobuf import timestamp_pb2
from mailbroker.v1 import resources_pb2 as pb

from server.api import names
from server.domain.models import Account, AccountState, AuditEvent, Capability, MailServer, Provider, TransportSecurity
from server.errors import FieldViolation, InvalidArgument

PROVIDERS = {
    Provider.GOOGLE: pb.PROVIDER_GOOGLE,
    Provider.MICROSOFT: pb.PROVIDER_MICROSOFT,
    Provider.IMAP: pb.PROVIDER_IMAP,
}
CAPABILITIES = {
    Capability.METADATA: pb.CAPABILITY_METADATA,
    Capability.READ: pb.CAPABILITY_READ,
    Capability.SEND: pb.CAPABILITY_SEND,
}
STATES = {AccountState.ACTIVE: pb.ACCOUNT_STATE_ACTIVE, AccountState.NEEDS_REAUTH: pb.ACCOUNT_STATE_NEEDS_REAUTH}
SECURITY = {
    TransportSecurity.IMPLICIT_TLS: pb.TRANSPORT_SECURITY_IMPLICIT_TLS,
    TransportSecurity.STARTTLS: pb.TRANSPORT_SECURITY_STARTTLS,
    TransportSecurity.PLAINTEXT: pb.TRANSPORT_SECURITY_PLAINTEXT,
}
AUDIT_ACTIONS = {
    "account_connected": pb.AUDIT_ACTION_ACCOUNT_CONNECTED,
    "consent_granted": pb.AUDIT_ACTION_CONSENT_GRANTED,
    "account_state_changed": pb.AUDIT_ACTION_ACCOUNT_STATE_CHANGED,
    "account_erased": pb.AUDIT_ACTION_ACCOUNT_ERASED,
    "key_rotated": pb.AUDIT_ACTION_KEY_ROTATED,
}


def timestamp(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    if value is None:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)
    return stamp


def _server(server: MailServer | None) -> pb.MailServer | None:
    if server is None:
        return None
    return pb.MailServer(host=server.host, port=server.port, security=SECURITY[server.security])


def account_to_proto(account: Account) -> pb.Account:
    return pb.Account(
        name=names.account_name(account.id),
        provider=PROVIDERS[account.provider],
        state=STATES[account.state],
        capabilities=sorted(CAPABILITIES[c] for c in account.capabilities),
        email_address=account.profile.email_address,
        imap_server=_server(account.profile.imap_server),
        smtp_server=_server(account.profile.smtp_server),
        username=account.profile.username,
        create_time=timestamp(account.create_time),
        update_time=timestamp(account.update_time),
    )


def capabilities_from_proto(values: Iterable[int], field: str = "capabilities") -> frozenset[Capability]:
    """The requested capabilities; at least one, each a known value."""
    by_value: dict[int, Capability] = {int(v): k for k, v in CAPABILITIES.items()}
    wanted = list(values)
    if not wanted or any(v not in by_value for v in wanted):
        raise InvalidArgument(
            "capabilities must name at least one of METADATA, READ, SEND",
            reason="INVALID_CAPABILITIES",
            field_violations=[FieldViolation(field, "at least one known capability, none UNSPECIFIED")],
        )
    return frozenset(by_value[v] for v in wanted)


def audit_event_to_proto(event: AuditEvent) -> pb.AuditEvent:
    details: dict[str, Any] = event.details
    return pb.AuditEvent(
        name=names.audit_event_name(event.event_id),
        sequence=event.sequence,
        event_time=timestamp(event.event_time),
        action=AUDIT_ACTIONS.get(event.action, pb.AUDIT_ACTION_UNSPECIFIED),
        tenant=event.tenant,
        actor=event.actor,
        account=names.account_name(event.account_id) if event.account_id else "",
        provider=PROVIDERS.get(Provider(details["provider"])) if "provider" in details else None,
        scopes=list(details.get("scopes", [])),
        capabilities=[CAPABILITIES[Capability(c)] for c in details.get("capabilities", [])],
        erasure_steps=[erasure_step_to_proto(step) for step in details.get("erasure_steps", [])],
        state=STATES.get(AccountState(details["state"])) if "state" in details else None,
        previous_digest=event.previous_digest,
        digest=event.digest,
    )


def erasure_step_to_proto(step: dict[str, Any]) -> pb.ErasureStep:
    return pb.ErasureStep(
        kind=f"ERASURE_STEP_KIND_{step['kind']}",
        outcome=f"ERASURE_OUTCOME_{step['outcome']}",
        reason=step.get("reason", ""),
        detail=step.get("detail", ""),
        complete_time=timestamp(datetime.fromisoformat(step["complete_time"])) if step.get("complete_time") else None,
    )

"""Conversions between domain types and mailbroker.v1 messages (no logic beyond the mapping)."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from google.protobuf import timestamp_pb2
from mailbroker.v1 import mail_service_pb2 as mpb
from mailbroker.v1 import resources_pb2 as pb

from server.api import names
from server.domain.mail import (
    AccountStateChanged,
    AttachmentInfo,
    EmailAddress,
    FeedEvent,
    Folder,
    FolderAdded,
    FolderDeleted,
    FolderRole,
    Message,
    MessageAdded,
    MessageDeleted,
    MessageUpdated,
    MessageView,
    OutgoingAttachment,
    OutgoingMessage,
    ResyncReason,
    ResyncRequired,
)
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


def provider_from_proto(value: int, field: str = "provider") -> Provider:
    """A provider the request names (UNSPECIFIED is refused)."""
    by_value: dict[int, Provider] = {int(v): k for k, v in PROVIDERS.items()}
    provider = by_value.get(int(value))
    if provider is None:
        raise InvalidArgument(
            "provider must be GOOGLE or MICROSOFT",
            reason="INVALID_PROVIDER",
            field_violations=[FieldViolation(field, "GOOGLE or MICROSOFT")],
        )
    return provider


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


# Mail


FOLDER_ROLES = {
    FolderRole.INBOX: pb.FOLDER_ROLE_INBOX,
    FolderRole.SENT: pb.FOLDER_ROLE_SENT,
    FolderRole.DRAFTS: pb.FOLDER_ROLE_DRAFTS,
    FolderRole.TRASH: pb.FOLDER_ROLE_TRASH,
    FolderRole.JUNK: pb.FOLDER_ROLE_JUNK,
    FolderRole.ARCHIVE: pb.FOLDER_ROLE_ARCHIVE,
    FolderRole.ALL: pb.FOLDER_ROLE_ALL,
    FolderRole.FLAGGED: pb.FOLDER_ROLE_FLAGGED,
    FolderRole.IMPORTANT: pb.FOLDER_ROLE_IMPORTANT,
}
VIEWS = {MessageView.METADATA: pb.MESSAGE_VIEW_METADATA, MessageView.FULL: pb.MESSAGE_VIEW_FULL}


def folder_name(account_id: str, folder_id: str) -> str:
    return f"accounts/{account_id}/folders/{folder_id}"


def message_name(account_id: str, message_id: str) -> str:
    return f"accounts/{account_id}/messages/{message_id}"


def folder_to_proto(account_id: str, folder: Folder) -> pb.Folder:
    return pb.Folder(
        name=folder_name(account_id, folder.id),
        display_name=folder.display_name,
        role=FOLDER_ROLES[folder.role] if folder.role else pb.FOLDER_ROLE_UNSPECIFIED,
        parent_folder=folder_name(account_id, folder.parent_id) if folder.parent_id else "",
        message_count=folder.message_count,
        unread_count=folder.unread_count,
    )


def _address(address: EmailAddress) -> pb.EmailAddress:
    return pb.EmailAddress(display_name=address.display_name, address=address.address)


def message_to_proto(account_id: str, message: Message) -> pb.Message:
    name = message_name(account_id, message.id)
    return pb.Message(
        name=name,
        folders=[folder_name(account_id, f) for f in message.folder_ids],
        thread_id=message.thread_id,
        internet_message_id=message.internet_message_id,
        subject=message.subject,
        sender=_address(message.sender) if message.sender else None,
        to_recipients=[_address(a) for a in message.to],
        cc_recipients=[_address(a) for a in message.cc],
        bcc_recipients=[_address(a) for a in message.bcc],
        reply_to=[_address(a) for a in message.reply_to],
        send_time=timestamp(message.send_time),
        receive_time=timestamp(message.receive_time),
        size_bytes=message.size_bytes,
        read=message.read,
        flagged=message.flagged,
        answered=message.answered,
        draft=message.draft,
        keywords=list(message.keywords),
        headers=[pb.MessageHeader(name=n, value=v) for n, v in message.headers],
        text_body=message.text_body,
        html_body=message.html_body,
        attachments=[attachment_to_proto(name, a) for a in message.attachments],
        view=VIEWS[message.view],
    )


def attachment_to_proto(message_resource: str, attachment: AttachmentInfo) -> pb.Attachment:
    return pb.Attachment(
        name=f"{message_resource}/attachments/{attachment.id}",
        filename=attachment.filename,
        content_type=attachment.content_type,
        size_bytes=attachment.size_bytes,
        inline=attachment.inline,
        content_id=attachment.content_id,
    )


def mail_server_from_proto(server: pb.MailServer, field: str, present: bool) -> MailServer | None:
    if not present:
        return None
    by_value = {int(v): k for k, v in SECURITY.items()}
    if server.security not in by_value:
        raise InvalidArgument(
            f"{field}.security is required",
            reason="INVALID_ARGUMENT",
            field_violations=[FieldViolation(f"{field}.security", "IMPLICIT_TLS, STARTTLS or PLAINTEXT")],
        )
    return MailServer(host=server.host, port=server.port, security=by_value[server.security])


def view_from_proto(view: int) -> MessageView:
    return MessageView.FULL if view == pb.MESSAGE_VIEW_FULL else MessageView.METADATA


def _addresses(values: Iterable[pb.EmailAddress]) -> tuple[EmailAddress, ...]:
    return tuple(EmailAddress(address=a.address, display_name=a.display_name) for a in values)


def outgoing_from_proto(message: Any) -> OutgoingMessage:
    return OutgoingMessage(
        to=_addresses(message.to_recipients),
        cc=_addresses(message.cc_recipients),
        bcc=_addresses(message.bcc_recipients),
        reply_to=_addresses(message.reply_to),
        subject=message.subject,
        text_body=message.text_body,
        html_body=message.html_body,
        attachments=tuple(
            OutgoingAttachment(
                filename=a.filename,
                content=a.content,
                content_type=a.content_type,
                inline=a.inline,
                content_id=a.content_id,
            )
            for a in message.attachments
        ),
        in_reply_to=message.in_reply_to,
        references=tuple(message.references),
        sender_display_name=message.sender_display_name,
    )


HEARTBEAT_DEFAULT_SECONDS = 30.0
HEARTBEAT_MIN_SECONDS = 5.0
HEARTBEAT_MAX_SECONDS = 300.0
RESYNC_REASONS = {
    ResyncReason.CURSOR_EXPIRED: mpb.RESYNC_REASON_CURSOR_EXPIRED,
    ResyncReason.UIDVALIDITY_CHANGED: mpb.RESYNC_REASON_UIDVALIDITY_CHANGED,
    ResyncReason.GAP: mpb.RESYNC_REASON_GAP,
}


def heartbeat_seconds(request: Any) -> float:
    if not request.HasField("heartbeat_interval"):
        return HEARTBEAT_DEFAULT_SECONDS
    interval = request.heartbeat_interval
    # Read the fields, not ToTimedelta(): a Duration may hold more seconds than a timedelta can (OverflowError).
    seconds: float = float(interval.seconds) + float(interval.nanos) / 1e9
    if not HEARTBEAT_MIN_SECONDS <= seconds <= HEARTBEAT_MAX_SECONDS:
        raise InvalidArgument(
            "heartbeat_interval must be 5 s to 300 s",
            reason="INVALID_HEARTBEAT_INTERVAL",
            field_violations=[FieldViolation("heartbeat_interval", "5 s to 300 s")],
        )
    return seconds


def event_to_proto(account_id: str, event: FeedEvent, token: str) -> mpb.MailboxEvent:
    out = mpb.MailboxEvent(resume_token=token, observe_time=timestamp(event.observe_time))
    change = event.change
    if isinstance(change, MessageAdded):
        out.message_added.message.CopyFrom(message_to_proto(account_id, change.message))
    elif isinstance(change, MessageUpdated):
        out.message_updated.message.CopyFrom(message_to_proto(account_id, change.message))
    elif isinstance(change, MessageDeleted):
        out.message_deleted.message = message_name(account_id, change.message_id)
    elif isinstance(change, FolderAdded):
        out.folder_added.folder.CopyFrom(folder_to_proto(account_id, change.folder))
    elif isinstance(change, FolderDeleted):
        out.folder_deleted.folder = folder_name(account_id, change.folder_id)
    elif isinstance(change, ResyncRequired):
        out.resync_required.reason = RESYNC_REASONS[change.reason]
        if change.folder_id:
            out.resync_required.folder = folder_name(account_id, change.folder_id)
    elif isinstance(change, AccountStateChanged):
        out.account_state_changed.state = STATES[change.state]
        out.account_state_changed.reason = change.reason
    else:
        out.heartbeat.SetInParent()
    return out

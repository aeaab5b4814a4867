import datetime

from google.api import field_behavior_pb2 as _field_behavior_pb2
from google.api import resource_pb2 as _resource_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Provider(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PROVIDER_UNSPECIFIED: _ClassVar[Provider]
    PROVIDER_GOOGLE: _ClassVar[Provider]
    PROVIDER_MICROSOFT: _ClassVar[Provider]
    PROVIDER_IMAP: _ClassVar[Provider]

class Capability(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CAPABILITY_UNSPECIFIED: _ClassVar[Capability]
    CAPABILITY_METADATA: _ClassVar[Capability]
    CAPABILITY_READ: _ClassVar[Capability]
    CAPABILITY_SEND: _ClassVar[Capability]

class AccountState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ACCOUNT_STATE_UNSPECIFIED: _ClassVar[AccountState]
    ACCOUNT_STATE_ACTIVE: _ClassVar[AccountState]
    ACCOUNT_STATE_NEEDS_REAUTH: _ClassVar[AccountState]

class TransportSecurity(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TRANSPORT_SECURITY_UNSPECIFIED: _ClassVar[TransportSecurity]
    TRANSPORT_SECURITY_IMPLICIT_TLS: _ClassVar[TransportSecurity]
    TRANSPORT_SECURITY_STARTTLS: _ClassVar[TransportSecurity]
    TRANSPORT_SECURITY_PLAINTEXT: _ClassVar[TransportSecurity]

class FolderRole(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FOLDER_ROLE_UNSPECIFIED: _ClassVar[FolderRole]
    FOLDER_ROLE_INBOX: _ClassVar[FolderRole]
    FOLDER_ROLE_SENT: _ClassVar[FolderRole]
    FOLDER_ROLE_DRAFTS: _ClassVar[FolderRole]
    FOLDER_ROLE_TRASH: _ClassVar[FolderRole]
    FOLDER_ROLE_JUNK: _ClassVar[FolderRole]
    FOLDER_ROLE_ARCHIVE: _ClassVar[FolderRole]
    FOLDER_ROLE_ALL: _ClassVar[FolderRole]
    FOLDER_ROLE_FLAGGED: _ClassVar[FolderRole]
    FOLDER_ROLE_IMPORTANT: _ClassVar[FolderRole]

class MessageView(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MESSAGE_VIEW_UNSPECIFIED: _ClassVar[MessageView]
    MESSAGE_VIEW_METADATA: _ClassVar[MessageView]
    MESSAGE_VIEW_FULL: _ClassVar[MessageView]

class ErasureStepKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ERASURE_STEP_KIND_UNSPECIFIED: _ClassVar[ErasureStepKind]
    ERASURE_STEP_KIND_REVOKE_AT_PROVIDER: _ClassVar[ErasureStepKind]
    ERASURE_STEP_KIND_STOP_WATCHES: _ClassVar[ErasureStepKind]
    ERASURE_STEP_KIND_PURGE_ROWS: _ClassVar[ErasureStepKind]
    ERASURE_STEP_KIND_SCRUB_STORAGE: _ClassVar[ErasureStepKind]
    ERASURE_STEP_KIND_RECORD_AUDIT: _ClassVar[ErasureStepKind]

class ErasureOutcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ERASURE_OUTCOME_UNSPECIFIED: _ClassVar[ErasureOutcome]
    ERASURE_OUTCOME_DONE: _ClassVar[ErasureOutcome]
    ERASURE_OUTCOME_NOT_APPLICABLE: _ClassVar[ErasureOutcome]
    ERASURE_OUTCOME_NOT_SUPPORTED_BY_PROVIDER: _ClassVar[ErasureOutcome]
    ERASURE_OUTCOME_FAILED: _ClassVar[ErasureOutcome]

class AuditAction(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    AUDIT_ACTION_UNSPECIFIED: _ClassVar[AuditAction]
    AUDIT_ACTION_ACCOUNT_CONNECTED: _ClassVar[AuditAction]
    AUDIT_ACTION_CONSENT_GRANTED: _ClassVar[AuditAction]
    AUDIT_ACTION_ACCOUNT_STATE_CHANGED: _ClassVar[AuditAction]
    AUDIT_ACTION_ACCOUNT_ERASED: _ClassVar[AuditAction]
    AUDIT_ACTION_KEY_ROTATED: _ClassVar[AuditAction]
PROVIDER_UNSPECIFIED: Provider
PROVIDER_GOOGLE: Provider
PROVIDER_MICROSOFT: Provider
PROVIDER_IMAP: Provider
CAPABILITY_UNSPECIFIED: Capability
CAPABILITY_METADATA: Capability
CAPABILITY_READ: Capability
CAPABILITY_SEND: Capability
ACCOUNT_STATE_UNSPECIFIED: AccountState
ACCOUNT_STATE_ACTIVE: AccountState
ACCOUNT_STATE_NEEDS_REAUTH: AccountState
TRANSPORT_SECURITY_UNSPECIFIED: TransportSecurity
TRANSPORT_SECURITY_IMPLICIT_TLS: TransportSecurity
TRANSPORT_SECURITY_STARTTLS: TransportSecurity
TRANSPORT_SECURITY_PLAINTEXT: TransportSecurity
FOLDER_ROLE_UNSPECIFIED: FolderRole
FOLDER_ROLE_INBOX: FolderRole
FOLDER_ROLE_SENT: FolderRole
FOLDER_ROLE_DRAFTS: FolderRole
FOLDER_ROLE_TRASH: FolderRole
FOLDER_ROLE_JUNK: FolderRole
FOLDER_ROLE_ARCHIVE: FolderRole
FOLDER_ROLE_ALL: FolderRole
FOLDER_ROLE_FLAGGED: FolderRole
FOLDER_ROLE_IMPORTANT: FolderRole
MESSAGE_VIEW_UNSPECIFIED: MessageView
MESSAGE_VIEW_METADATA: MessageView
MESSAGE_VIEW_FULL: MessageView
ERASURE_STEP_KIND_UNSPECIFIED: ErasureStepKind
ERASURE_STEP_KIND_REVOKE_AT_PROVIDER: ErasureStepKind
ERASURE_STEP_KIND_STOP_WATCHES: ErasureStepKind
ERASURE_STEP_KIND_PURGE_ROWS: ErasureStepKind
ERASURE_STEP_KIND_SCRUB_STORAGE: ErasureStepKind
ERASURE_STEP_KIND_RECORD_AUDIT: ErasureStepKind
ERASURE_OUTCOME_UNSPECIFIED: ErasureOutcome
ERASURE_OUTCOME_DONE: ErasureOutcome
ERASURE_OUTCOME_NOT_APPLICABLE: ErasureOutcome
ERASURE_OUTCOME_NOT_SUPPORTED_BY_PROVIDER: ErasureOutcome
ERASURE_OUTCOME_FAILED: ErasureOutcome
AUDIT_ACTION_UNSPECIFIED: AuditAction
AUDIT_ACTION_ACCOUNT_CONNECTED: AuditAction
AUDIT_ACTION_CONSENT_GRANTED: AuditAction
AUDIT_ACTION_ACCOUNT_STATE_CHANGED: AuditAction
AUDIT_ACTION_ACCOUNT_ERASED: AuditAction
AUDIT_ACTION_KEY_ROTATED: AuditAction

class MailServer(_message.Message):
    __slots__ = ("host", "port", "security")
    HOST_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    SECURITY_FIELD_NUMBER: _ClassVar[int]
    host: str
    port: int
    security: TransportSecurity
    def __init__(self, host: _Optional[str] = ..., port: _Optional[int] = ..., security: _Optional[_Union[TransportSecurity, str]] = ...) -> None: ...

class Account(_message.Message):
    __slots__ = ("name", "provider", "state", "capabilities", "email_address", "imap_server", "smtp_server", "username", "create_time", "update_time")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    EMAIL_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    IMAP_SERVER_FIELD_NUMBER: _ClassVar[int]
    SMTP_SERVER_FIELD_NUMBER: _ClassVar[int]
    USERNAME_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    name: str
    provider: Provider
    state: AccountState
    capabilities: _containers.RepeatedScalarFieldContainer[Capability]
    email_address: str
    imap_server: MailServer
    smtp_server: MailServer
    username: str
    create_time: _timestamp_pb2.Timestamp
    update_time: _timestamp_pb2.Timestamp
    def __init__(self, name: _Optional[str] = ..., provider: _Optional[_Union[Provider, str]] = ..., state: _Optional[_Union[AccountState, str]] = ..., capabilities: _Optional[_Iterable[_Union[Capability, str]]] = ..., email_address: _Optional[str] = ..., imap_server: _Optional[_Union[MailServer, _Mapping]] = ..., smtp_server: _Optional[_Union[MailServer, _Mapping]] = ..., username: _Optional[str] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class Folder(_message.Message):
    __slots__ = ("name", "display_name", "role", "parent_folder", "message_count", "unread_count")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    PARENT_FOLDER_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_COUNT_FIELD_NUMBER: _ClassVar[int]
    UNREAD_COUNT_FIELD_NUMBER: _ClassVar[int]
    name: str
    display_name: str
    role: FolderRole
    parent_folder: str
    message_count: int
    unread_count: int
    def __init__(self, name: _Optional[str] = ..., display_name: _Optional[str] = ..., role: _Optional[_Union[FolderRole, str]] = ..., parent_folder: _Optional[str] = ..., message_count: _Optional[int] = ..., unread_count: _Optional[int] = ...) -> None: ...

class EmailAddress(_message.Message):
    __slots__ = ("display_name", "address")
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    display_name: str
    address: str
    def __init__(self, display_name: _Optional[str] = ..., address: _Optional[str] = ...) -> None: ...

class MessageHeader(_message.Message):
    __slots__ = ("name", "value")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    name: str
    value: str
    def __init__(self, name: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...

class Message(_message.Message):
    __slots__ = ("name", "folders", "thread_id", "internet_message_id", "subject", "sender", "to_recipients", "cc_recipients", "bcc_recipients", "reply_to", "send_time", "receive_time", "size_bytes", "read", "flagged", "answered", "draft", "keywords", "headers", "text_body", "html_body", "attachments", "view")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FOLDERS_FIELD_NUMBER: _ClassVar[int]
    THREAD_ID_FIELD_NUMBER: _ClassVar[int]
    INTERNET_MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    SENDER_FIELD_NUMBER: _ClassVar[int]
    TO_RECIPIENTS_FIELD_NUMBER: _ClassVar[int]
    CC_RECIPIENTS_FIELD_NUMBER: _ClassVar[int]
    BCC_RECIPIENTS_FIELD_NUMBER: _ClassVar[int]
    REPLY_TO_FIELD_NUMBER: _ClassVar[int]
    SEND_TIME_FIELD_NUMBER: _ClassVar[int]
    RECEIVE_TIME_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    READ_FIELD_NUMBER: _ClassVar[int]
    FLAGGED_FIELD_NUMBER: _ClassVar[int]
    ANSWERED_FIELD_NUMBER: _ClassVar[int]
    DRAFT_FIELD_NUMBER: _ClassVar[int]
    KEYWORDS_FIELD_NUMBER: _ClassVar[int]
    HEADERS_FIELD_NUMBER: _ClassVar[int]
    TEXT_BODY_FIELD_NUMBER: _ClassVar[int]
    HTML_BODY_FIELD_NUMBER: _ClassVar[int]
    ATTACHMENTS_FIELD_NUMBER: _ClassVar[int]
    VIEW_FIELD_NUMBER: _ClassVar[int]
    name: str
    folders: _containers.RepeatedScalarFieldContainer[str]
    thread_id: str
    internet_message_id: str
    subject: str
    sender: EmailAddress
    to_recipients: _containers.RepeatedCompositeFieldContainer[EmailAddress]
    cc_recipients: _containers.RepeatedCompositeFieldContainer[EmailAddress]
    bcc_recipients: _containers.RepeatedCompositeFieldContainer[EmailAddress]
    reply_to: _containers.RepeatedCompositeFieldContainer[EmailAddress]
    send_time: _timestamp_pb2.Timestamp
    receive_time: _timestamp_pb2.Timestamp
    size_bytes: int
    read: bool
    flagged: bool
    answered: bool
    draft: bool
    keywords: _containers.RepeatedScalarFieldContainer[str]
    headers: _containers.RepeatedCompositeFieldContainer[MessageHeader]
    text_body: str
    html_body: str
    attachments: _containers.RepeatedCompositeFieldContainer[Attachment]
    view: MessageView
    def __init__(self, name: _Optional[str] = ..., folders: _Optional[_Iterable[str]] = ..., thread_id: _Optional[str] = ..., internet_message_id: _Optional[str] = ..., subject: _Optional[str] = ..., sender: _Optional[_Union[EmailAddress, _Mapping]] = ..., to_recipients: _Optional[_Iterable[_Union[EmailAddress, _Mapping]]] = ..., cc_recipients: _Optional[_Iterable[_Union[EmailAddress, _Mapping]]] = ..., bcc_recipients: _Optional[_Iterable[_Union[EmailAddress, _Mapping]]] = ..., reply_to: _Optional[_Iterable[_Union[EmailAddress, _Mapping]]] = ..., send_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., receive_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., size_bytes: _Optional[int] = ..., read: _Optional[bool] = ..., flagged: _Optional[bool] = ..., answered: _Optional[bool] = ..., draft: _Optional[bool] = ..., keywords: _Optional[_Iterable[str]] = ..., headers: _Optional[_Iterable[_Union[MessageHeader, _Mapping]]] = ..., text_body: _Optional[str] = ..., html_body: _Optional[str] = ..., attachments: _Optional[_Iterable[_Union[Attachment, _Mapping]]] = ..., view: _Optional[_Union[MessageView, str]] = ...) -> None: ...

class Attachment(_message.Message):
    __slots__ = ("name", "filename", "content_type", "size_bytes", "inline", "content_id")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FILENAME_FIELD_NUMBER: _ClassVar[int]
    CONTENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    INLINE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_ID_FIELD_NUMBER: _ClassVar[int]
    name: str
    filename: str
    content_type: str
    size_bytes: int
    inline: bool
    content_id: str
    def __init__(self, name: _Optional[str] = ..., filename: _Optional[str] = ..., content_type: _Optional[str] = ..., size_bytes: _Optional[int] = ..., inline: _Optional[bool] = ..., content_id: _Optional[str] = ...) -> None: ...

class ErasureStep(_message.Message):
    __slots__ = ("kind", "outcome", "reason", "detail", "complete_time")
    KIND_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_TIME_FIELD_NUMBER: _ClassVar[int]
    kind: ErasureStepKind
    outcome: ErasureOutcome
    reason: str
    detail: str
    complete_time: _timestamp_pb2.Timestamp
    def __init__(self, kind: _Optional[_Union[ErasureStepKind, str]] = ..., outcome: _Optional[_Union[ErasureOutcome, str]] = ..., reason: _Optional[str] = ..., detail: _Optional[str] = ..., complete_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ErasureReceipt(_message.Message):
    __slots__ = ("account", "steps", "start_time", "complete_time", "audit_event")
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_TIME_FIELD_NUMBER: _ClassVar[int]
    AUDIT_EVENT_FIELD_NUMBER: _ClassVar[int]
    account: str
    steps: _containers.RepeatedCompositeFieldContainer[ErasureStep]
    start_time: _timestamp_pb2.Timestamp
    complete_time: _timestamp_pb2.Timestamp
    audit_event: str
    def __init__(self, account: _Optional[str] = ..., steps: _Optional[_Iterable[_Union[ErasureStep, _Mapping]]] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., complete_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., audit_event: _Optional[str] = ...) -> None: ...

class AuditEvent(_message.Message):
    __slots__ = ("name", "sequence", "event_time", "action", "tenant", "actor", "account", "provider", "scopes", "capabilities", "erasure_steps", "state", "previous_digest", "digest")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    EVENT_TIME_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    SCOPES_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    ERASURE_STEPS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_DIGEST_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    name: str
    sequence: int
    event_time: _timestamp_pb2.Timestamp
    action: AuditAction
    tenant: str
    actor: str
    account: str
    provider: Provider
    scopes: _containers.RepeatedScalarFieldContainer[str]
    capabilities: _containers.RepeatedScalarFieldContainer[Capability]
    erasure_steps: _containers.RepeatedCompositeFieldContainer[ErasureStep]
    state: AccountState
    previous_digest: str
    digest: str
    def __init__(self, name: _Optional[str] = ..., sequence: _Optional[int] = ..., event_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., action: _Optional[_Union[AuditAction, str]] = ..., tenant: _Optional[str] = ..., actor: _Optional[str] = ..., account: _Optional[str] = ..., provider: _Optional[_Union[Provider, str]] = ..., scopes: _Optional[_Iterable[str]] = ..., capabilities: _Optional[_Iterable[_Union[Capability, str]]] = ..., erasure_steps: _Optional[_Iterable[_Union[ErasureStep, _Mapping]]] = ..., state: _Optional[_Union[AccountState, str]] = ..., previous_digest: _Optional[str] = ..., digest: _Optional[str] = ...) -> None: ...

import datetime

from google.api import field_behavior_pb2 as _field_behavior_pb2
from google.api import resource_pb2 as _resource_pb2
from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from mailbroker.v1 import resources_pb2 as _resources_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ResyncReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RESYNC_REASON_UNSPECIFIED: _ClassVar[ResyncReason]
    RESYNC_REASON_CURSOR_EXPIRED: _ClassVar[ResyncReason]
    RESYNC_REASON_UIDVALIDITY_CHANGED: _ClassVar[ResyncReason]
    RESYNC_REASON_GAP: _ClassVar[ResyncReason]
RESYNC_REASON_UNSPECIFIED: ResyncReason
RESYNC_REASON_CURSOR_EXPIRED: ResyncReason
RESYNC_REASON_UIDVALIDITY_CHANGED: ResyncReason
RESYNC_REASON_GAP: ResyncReason

class ListFoldersRequest(_message.Message):
    __slots__ = ("parent", "page_size", "page_token")
    PARENT_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    parent: str
    page_size: int
    page_token: str
    def __init__(self, parent: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListFoldersResponse(_message.Message):
    __slots__ = ("folders", "next_page_token")
    FOLDERS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    folders: _containers.RepeatedCompositeFieldContainer[_resources_pb2.Folder]
    next_page_token: str
    def __init__(self, folders: _Optional[_Iterable[_Union[_resources_pb2.Folder, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class ListMessagesRequest(_message.Message):
    __slots__ = ("parent", "folder", "query", "page_size", "page_token")
    PARENT_FIELD_NUMBER: _ClassVar[int]
    FOLDER_FIELD_NUMBER: _ClassVar[int]
    QUERY_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    parent: str
    folder: str
    query: str
    page_size: int
    page_token: str
    def __init__(self, parent: _Optional[str] = ..., folder: _Optional[str] = ..., query: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListMessagesResponse(_message.Message):
    __slots__ = ("messages", "next_page_token")
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[_resources_pb2.Message]
    next_page_token: str
    def __init__(self, messages: _Optional[_Iterable[_Union[_resources_pb2.Message, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class GetMessageRequest(_message.Message):
    __slots__ = ("name", "view")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VIEW_FIELD_NUMBER: _ClassVar[int]
    name: str
    view: _resources_pb2.MessageView
    def __init__(self, name: _Optional[str] = ..., view: _Optional[_Union[_resources_pb2.MessageView, str]] = ...) -> None: ...

class GetAttachmentRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class AttachmentChunk(_message.Message):
    __slots__ = ("attachment", "offset", "data")
    ATTACHMENT_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    attachment: _resources_pb2.Attachment
    offset: int
    data: bytes
    def __init__(self, attachment: _Optional[_Union[_resources_pb2.Attachment, _Mapping]] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class OutgoingAttachment(_message.Message):
    __slots__ = ("filename", "content_type", "content", "inline", "content_id")
    FILENAME_FIELD_NUMBER: _ClassVar[int]
    CONTENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    INLINE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_ID_FIELD_NUMBER: _ClassVar[int]
    filename: str
    content_type: str
    content: bytes
    inline: bool
    content_id: str
    def __init__(self, filename: _Optional[str] = ..., content_type: _Optional[str] = ..., content: _Optional[bytes] = ..., inline: _Optional[bool] = ..., content_id: _Optional[str] = ...) -> None: ...

class OutgoingMessage(_message.Message):
    __slots__ = ("to_recipients", "cc_recipients", "bcc_recipients", "reply_to", "subject", "text_body", "html_body", "attachments", "in_reply_to", "references", "sender_display_name")
    TO_RECIPIENTS_FIELD_NUMBER: _ClassVar[int]
    CC_RECIPIENTS_FIELD_NUMBER: _ClassVar[int]
    BCC_RECIPIENTS_FIELD_NUMBER: _ClassVar[int]
    REPLY_TO_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    TEXT_BODY_FIELD_NUMBER: _ClassVar[int]
    HTML_BODY_FIELD_NUMBER: _ClassVar[int]
    ATTACHMENTS_FIELD_NUMBER: _ClassVar[int]
    IN_REPLY_TO_FIELD_NUMBER: _ClassVar[int]
    REFERENCES_FIELD_NUMBER: _ClassVar[int]
    SENDER_DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    to_recipients: _containers.RepeatedCompositeFieldContainer[_resources_pb2.EmailAddress]
    cc_recipients: _containers.RepeatedCompositeFieldContainer[_resources_pb2.EmailAddress]
    bcc_recipients: _containers.RepeatedCompositeFieldContainer[_resources_pb2.EmailAddress]
    reply_to: _containers.RepeatedCompositeFieldContainer[_resources_pb2.EmailAddress]
    subject: str
    text_body: str
    html_body: str
    attachments: _containers.RepeatedCompositeFieldContainer[OutgoingAttachment]
    in_reply_to: str
    references: _containers.RepeatedScalarFieldContainer[str]
    sender_display_name: str
    def __init__(self, to_recipients: _Optional[_Iterable[_Union[_resources_pb2.EmailAddress, _Mapping]]] = ..., cc_recipients: _Optional[_Iterable[_Union[_resources_pb2.EmailAddress, _Mapping]]] = ..., bcc_recipients: _Optional[_Iterable[_Union[_resources_pb2.EmailAddress, _Mapping]]] = ..., reply_to: _Optional[_Iterable[_Union[_resources_pb2.EmailAddress, _Mapping]]] = ..., subject: _Optional[str] = ..., text_body: _Optional[str] = ..., html_body: _Optional[str] = ..., attachments: _Optional[_Iterable[_Union[OutgoingAttachment, _Mapping]]] = ..., in_reply_to: _Optional[str] = ..., references: _Optional[_Iterable[str]] = ..., sender_display_name: _Optional[str] = ...) -> None: ...

class SendMessageRequest(_message.Message):
    __slots__ = ("account", "message", "request_id")
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    account: str
    message: OutgoingMessage
    request_id: str
    def __init__(self, account: _Optional[str] = ..., message: _Optional[_Union[OutgoingMessage, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class SendMessageResponse(_message.Message):
    __slots__ = ("message", "internet_message_id", "send_time", "replayed", "refused_recipients")
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    INTERNET_MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    SEND_TIME_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    REFUSED_RECIPIENTS_FIELD_NUMBER: _ClassVar[int]
    message: str
    internet_message_id: str
    send_time: _timestamp_pb2.Timestamp
    replayed: bool
    refused_recipients: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, message: _Optional[str] = ..., internet_message_id: _Optional[str] = ..., send_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., replayed: _Optional[bool] = ..., refused_recipients: _Optional[_Iterable[str]] = ...) -> None: ...

class WatchMailboxRequest(_message.Message):
    __slots__ = ("account", "resume_token", "folders", "heartbeat_interval")
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    RESUME_TOKEN_FIELD_NUMBER: _ClassVar[int]
    FOLDERS_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_FIELD_NUMBER: _ClassVar[int]
    account: str
    resume_token: str
    folders: _containers.RepeatedScalarFieldContainer[str]
    heartbeat_interval: _duration_pb2.Duration
    def __init__(self, account: _Optional[str] = ..., resume_token: _Optional[str] = ..., folders: _Optional[_Iterable[str]] = ..., heartbeat_interval: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class MessageAdded(_message.Message):
    __slots__ = ("message",)
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    message: _resources_pb2.Message
    def __init__(self, message: _Optional[_Union[_resources_pb2.Message, _Mapping]] = ...) -> None: ...

class MessageDeleted(_message.Message):
    __slots__ = ("message",)
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    message: str
    def __init__(self, message: _Optional[str] = ...) -> None: ...

class MessageUpdated(_message.Message):
    __slots__ = ("message",)
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    message: _resources_pb2.Message
    def __init__(self, message: _Optional[_Union[_resources_pb2.Message, _Mapping]] = ...) -> None: ...

class FolderAdded(_message.Message):
    __slots__ = ("folder",)
    FOLDER_FIELD_NUMBER: _ClassVar[int]
    folder: _resources_pb2.Folder
    def __init__(self, folder: _Optional[_Union[_resources_pb2.Folder, _Mapping]] = ...) -> None: ...

class FolderDeleted(_message.Message):
    __slots__ = ("folder",)
    FOLDER_FIELD_NUMBER: _ClassVar[int]
    folder: str
    def __init__(self, folder: _Optional[str] = ...) -> None: ...

class ResyncRequired(_message.Message):
    __slots__ = ("reason", "folder")
    REASON_FIELD_NUMBER: _ClassVar[int]
    FOLDER_FIELD_NUMBER: _ClassVar[int]
    reason: ResyncReason
    folder: str
    def __init__(self, reason: _Optional[_Union[ResyncReason, str]] = ..., folder: _Optional[str] = ...) -> None: ...

class AccountStateChanged(_message.Message):
    __slots__ = ("state", "reason")
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    state: _resources_pb2.AccountState
    reason: str
    def __init__(self, state: _Optional[_Union[_resources_pb2.AccountState, str]] = ..., reason: _Optional[str] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class MailboxEvent(_message.Message):
    __slots__ = ("resume_token", "observe_time", "message_added", "message_deleted", "message_updated", "folder_added", "folder_deleted", "resync_required", "account_state_changed", "heartbeat")
    RESUME_TOKEN_FIELD_NUMBER: _ClassVar[int]
    OBSERVE_TIME_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_ADDED_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_DELETED_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_UPDATED_FIELD_NUMBER: _ClassVar[int]
    FOLDER_ADDED_FIELD_NUMBER: _ClassVar[int]
    FOLDER_DELETED_FIELD_NUMBER: _ClassVar[int]
    RESYNC_REQUIRED_FIELD_NUMBER: _ClassVar[int]
    ACCOUNT_STATE_CHANGED_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    resume_token: str
    observe_time: _timestamp_pb2.Timestamp
    message_added: MessageAdded
    message_deleted: MessageDeleted
    message_updated: MessageUpdated
    folder_added: FolderAdded
    folder_deleted: FolderDeleted
    resync_required: ResyncRequired
    account_state_changed: AccountStateChanged
    heartbeat: Heartbeat
    def __init__(self, resume_token: _Optional[str] = ..., observe_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., message_added: _Optional[_Union[MessageAdded, _Mapping]] = ..., message_deleted: _Optional[_Union[MessageDeleted, _Mapping]] = ..., message_updated: _Optional[_Union[MessageUpdated, _Mapping]] = ..., folder_added: _Optional[_Union[FolderAdded, _Mapping]] = ..., folder_deleted: _Optional[_Union[FolderDeleted, _Mapping]] = ..., resync_required: _Optional[_Union[ResyncRequired, _Mapping]] = ..., account_state_changed: _Optional[_Union[AccountStateChanged, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ...) -> None: ...

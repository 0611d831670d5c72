from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DeleteRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class DeleteResponse(_message.Message):
    __slots__ = ("kind", "id", "known", "detail")
    KIND_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    KNOWN_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    kind: str
    id: str
    known: bool
    detail: str
    def __init__(self, kind: _Optional[str] = ..., id: _Optional[str] = ..., known: _Optional[bool] = ..., detail: _Optional[str] = ...) -> None: ...

class RecommendRequest(_message.Message):
    __slots__ = ("user", "k", "exclude_seen", "exclude", "exclude_items", "include_only", "items")
    USER_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_SEEN_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_ITEMS_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_ONLY_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    user: str
    k: int
    exclude_seen: bool
    exclude: str
    exclude_items: _containers.RepeatedScalarFieldContainer[str]
    include_only: _containers.RepeatedScalarFieldContainer[str]
    items: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, user: _Optional[str] = ..., k: _Optional[int] = ..., exclude_seen: _Optional[bool] = ..., exclude: _Optional[str] = ..., exclude_items: _Optional[_Iterable[str]] = ..., include_only: _Optional[_Iterable[str]] = ..., items: _Optional[_Iterable[str]] = ...) -> None: ...

class ScoredItem(_message.Message):
    __slots__ = ("item", "score")
    ITEM_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    item: str
    score: float
    def __init__(self, item: _Optional[str] = ..., score: _Optional[float] = ...) -> None: ...

class RecommendResponse(_message.Message):
    __slots__ = ("user", "items", "model_version", "cold_start", "anonymous")
    USER_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    COLD_START_FIELD_NUMBER: _ClassVar[int]
    ANONYMOUS_FIELD_NUMBER: _ClassVar[int]
    user: str
    items: _containers.RepeatedCompositeFieldContainer[ScoredItem]
    model_version: int
    cold_start: bool
    anonymous: bool
    def __init__(self, user: _Optional[str] = ..., items: _Optional[_Iterable[_Union[ScoredItem, _Mapping]]] = ..., model_version: _Optional[int] = ..., cold_start: _Optional[bool] = ..., anonymous: _Optional[bool] = ...) -> None: ...

class RecommendBatchRequest(_message.Message):
    __slots__ = ("users", "k", "exclude_seen", "exclude", "exclude_items", "include_only")
    USERS_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_SEEN_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_ITEMS_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_ONLY_FIELD_NUMBER: _ClassVar[int]
    users: _containers.RepeatedScalarFieldContainer[str]
    k: int
    exclude_seen: bool
    exclude: str
    exclude_items: _containers.RepeatedScalarFieldContainer[str]
    include_only: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, users: _Optional[_Iterable[str]] = ..., k: _Optional[int] = ..., exclude_seen: _Optional[bool] = ..., exclude: _Optional[str] = ..., exclude_items: _Optional[_Iterable[str]] = ..., include_only: _Optional[_Iterable[str]] = ...) -> None: ...

class RecommendBatchResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[RecommendResponse]
    def __init__(self, results: _Optional[_Iterable[_Union[RecommendResponse, _Mapping]]] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("user", "items")
    USER_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    user: str
    items: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, user: _Optional[str] = ..., items: _Optional[_Iterable[str]] = ...) -> None: ...

class ItemScore(_message.Message):
    __slots__ = ("item", "known", "score")
    ITEM_FIELD_NUMBER: _ClassVar[int]
    KNOWN_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    item: str
    known: bool
    score: float
    def __init__(self, item: _Optional[str] = ..., known: _Optional[bool] = ..., score: _Optional[float] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("user", "scores", "model_version")
    USER_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    user: str
    scores: _containers.RepeatedCompositeFieldContainer[ItemScore]
    model_version: int
    def __init__(self, user: _Optional[str] = ..., scores: _Optional[_Iterable[_Union[ItemScore, _Mapping]]] = ..., model_version: _Optional[int] = ...) -> None: ...

class SimilarRequest(_message.Message):
    __slots__ = ("item", "k")
    ITEM_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    item: str
    k: int
    def __init__(self, item: _Optional[str] = ..., k: _Optional[int] = ...) -> None: ...

class SimilarResponse(_message.Message):
    __slots__ = ("item", "items", "model_version")
    ITEM_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    item: str
    items: _containers.RepeatedCompositeFieldContainer[ScoredItem]
    model_version: int
    def __init__(self, item: _Optional[str] = ..., items: _Optional[_Iterable[_Union[ScoredItem, _Mapping]]] = ..., model_version: _Optional[int] = ...) -> None: ...

class PopularRequest(_message.Message):
    __slots__ = ("k",)
    K_FIELD_NUMBER: _ClassVar[int]
    k: int
    def __init__(self, k: _Optional[int] = ...) -> None: ...

class PopularItem(_message.Message):
    __slots__ = ("item", "count")
    ITEM_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    item: str
    count: int
    def __init__(self, item: _Optional[str] = ..., count: _Optional[int] = ...) -> None: ...

class PopularResponse(_message.Message):
    __slots__ = ("items", "window_seconds", "model_version")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    WINDOW_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[PopularItem]
    window_seconds: float
    model_version: int
    def __init__(self, items: _Optional[_Iterable[_Union[PopularItem, _Mapping]]] = ..., window_seconds: _Optional[float] = ..., model_version: _Optional[int] = ...) -> None: ...

class UserItemsRequest(_message.Message):
    __slots__ = ("user", "offset", "limit")
    USER_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    user: str
    offset: int
    limit: int
    def __init__(self, user: _Optional[str] = ..., offset: _Optional[int] = ..., limit: _Optional[int] = ...) -> None: ...

class KnownItem(_message.Message):
    __slots__ = ("item", "ts")
    ITEM_FIELD_NUMBER: _ClassVar[int]
    TS_FIELD_NUMBER: _ClassVar[int]
    item: str
    ts: float
    def __init__(self, item: _Optional[str] = ..., ts: _Optional[float] = ...) -> None: ...

class UserItemsResponse(_message.Message):
    __slots__ = ("user", "items", "total", "model_version")
    USER_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    user: str
    items: _containers.RepeatedCompositeFieldContainer[KnownItem]
    total: int
    model_version: int
    def __init__(self, user: _Optional[str] = ..., items: _Optional[_Iterable[_Union[KnownItem, _Mapping]]] = ..., total: _Optional[int] = ..., model_version: _Optional[int] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("events_consumed", "events_rejected", "events_trained", "consumer_lag", "users", "items", "interactions", "model_version", "snapshot_events", "snapshot_age_seconds", "ingest", "ingest_reason", "role", "ranks")
    EVENTS_CONSUMED_FIELD_NUMBER: _ClassVar[int]
    EVENTS_REJECTED_FIELD_NUMBER: _ClassVar[int]
    EVENTS_TRAINED_FIELD_NUMBER: _ClassVar[int]
    CONSUMER_LAG_FIELD_NUMBER: _ClassVar[int]
    USERS_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    INTERACTIONS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_EVENTS_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_AGE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    INGEST_FIELD_NUMBER: _ClassVar[int]
    INGEST_REASON_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    RANKS_FIELD_NUMBER: _ClassVar[int]
    events_consumed: int
    events_rejected: int
    events_trained: int
    consumer_lag: int
    users: int
    items: int
    interactions: int
    model_version: int
    snapshot_events: int
    snapshot_age_seconds: float
    ingest: str
    ingest_reason: str
    role: str
    ranks: _containers.RepeatedCompositeFieldContainer[RankStatus]
    def __init__(self, events_consumed: _Optional[int] = ..., events_rejected: _Optional[int] = ..., events_trained: _Optional[int] = ..., consumer_lag: _Optional[int] = ..., users: _Optional[int] = ..., items: _Optional[int] = ..., interactions: _Optional[int] = ..., model_version: _Optional[int] = ..., snapshot_events: _Optional[int] = ..., snapshot_age_seconds: _Optional[float] = ..., ingest: _Optional[str] = ..., ingest_reason: _Optional[str] = ..., role: _Optional[str] = ..., ranks: _Optional[_Iterable[_Union[RankStatus, _Mapping]]] = ...) -> None: ...

class RankStatus(_message.Message):
    __slots__ = ("rank", "model_version", "snapshot_events", "snapshot_age_seconds")
    RANK_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_EVENTS_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_AGE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    rank: int
    model_version: int
    snapshot_events: int
    snapshot_age_seconds: float
    def __init__(self, rank: _Optional[int] = ..., model_version: _Optional[int] = ..., snapshot_events: _Optional[int] = ..., snapshot_age_seconds: _Optional[float] = ...) -> None: ...

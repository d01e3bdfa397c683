from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Interaction(_message.Message):
    __slots__ = ("item_id", "rating", "timestamp")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    RATING_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    rating: float
    timestamp: int
    def __init__(self, item_id: _Optional[str] = ..., rating: _Optional[float] = ..., timestamp: _Optional[int] = ...) -> None: ...

class StringList(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, values: _Optional[_Iterable[str]] = ...) -> None: ...

class FeatureValue(_message.Message):
    __slots__ = ("string_value", "int_value", "number_value", "string_list")
    STRING_VALUE_FIELD_NUMBER: _ClassVar[int]
    INT_VALUE_FIELD_NUMBER: _ClassVar[int]
    NUMBER_VALUE_FIELD_NUMBER: _ClassVar[int]
    STRING_LIST_FIELD_NUMBER: _ClassVar[int]
    string_value: str
    int_value: int
    number_value: float
    string_list: StringList
    def __init__(self, string_value: _Optional[str] = ..., int_value: _Optional[int] = ..., number_value: _Optional[float] = ..., string_list: _Optional[_Union[StringList, _Mapping]] = ...) -> None: ...

class ModelSpec(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class UserContext(_message.Message):
    __slots__ = ("user_id", "features", "interactions")
    class FeaturesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: FeatureValue
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[FeatureValue, _Mapping]] = ...) -> None: ...
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    INTERACTIONS_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    features: _containers.MessageMap[str, FeatureValue]
    interactions: _containers.RepeatedCompositeFieldContainer[Interaction]
    def __init__(self, user_id: _Optional[str] = ..., features: _Optional[_Mapping[str, FeatureValue]] = ..., interactions: _Optional[_Iterable[_Union[Interaction, _Mapping]]] = ...) -> None: ...

class RecommendRequest(_message.Message):
    __slots__ = ("model", "user", "candidate_item_ids", "k", "include_seen")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_SEEN_FIELD_NUMBER: _ClassVar[int]
    model: ModelSpec
    user: UserContext
    candidate_item_ids: _containers.RepeatedScalarFieldContainer[str]
    k: int
    include_seen: bool
    def __init__(self, model: _Optional[_Union[ModelSpec, _Mapping]] = ..., user: _Optional[_Union[UserContext, _Mapping]] = ..., candidate_item_ids: _Optional[_Iterable[str]] = ..., k: _Optional[int] = ..., include_seen: _Optional[bool] = ...) -> None: ...

class ServedModel(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class RecommendResponse(_message.Message):
    __slots__ = ("item_ids", "scores", "model")
    ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    item_ids: _containers.RepeatedScalarFieldContainer[str]
    scores: _containers.RepeatedScalarFieldContainer[float]
    model: ServedModel
    def __init__(self, item_ids: _Optional[_Iterable[str]] = ..., scores: _Optional[_Iterable[float]] = ..., model: _Optional[_Union[ServedModel, _Mapping]] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("model", "user", "candidate_item_ids")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    model: ModelSpec
    user: UserContext
    candidate_item_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, model: _Optional[_Union[ModelSpec, _Mapping]] = ..., user: _Optional[_Union[UserContext, _Mapping]] = ..., candidate_item_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("item_ids", "scores", "model")
    ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    item_ids: _containers.RepeatedScalarFieldContainer[str]
    scores: _containers.RepeatedScalarFieldContainer[float]
    model: ServedModel
    def __init__(self, item_ids: _Optional[_Iterable[str]] = ..., scores: _Optional[_Iterable[float]] = ..., model: _Optional[_Union[ServedModel, _Mapping]] = ...) -> None: ...

class LogInteractionsRequest(_message.Message):
    __slots__ = ("user_id", "interactions", "request_id")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    INTERACTIONS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    interactions: _containers.RepeatedCompositeFieldContainer[Interaction]
    request_id: str
    def __init__(self, user_id: _Optional[str] = ..., interactions: _Optional[_Iterable[_Union[Interaction, _Mapping]]] = ..., request_id: _Optional[str] = ...) -> None: ...

class LogInteractionsResponse(_message.Message):
    __slots__ = ("stored", "replayed")
    STORED_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    stored: int
    replayed: bool
    def __init__(self, stored: _Optional[int] = ..., replayed: _Optional[bool] = ...) -> None: ...

class GetModelStatusRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class RefusedVersion(_message.Message):
    __slots__ = ("version", "reason")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    version: int
    reason: str
    def __init__(self, version: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class ModelStatus(_message.Message):
    __slots__ = ("name", "state", "version", "loaded_at", "feedback", "rating_min", "rating_max", "num_items", "item_id_type", "refused", "user_features")
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATE_UNSPECIFIED: _ClassVar[ModelStatus.State]
        LOADING: _ClassVar[ModelStatus.State]
        AVAILABLE: _ClassVar[ModelStatus.State]
        UNAVAILABLE: _ClassVar[ModelStatus.State]
    STATE_UNSPECIFIED: ModelStatus.State
    LOADING: ModelStatus.State
    AVAILABLE: ModelStatus.State
    UNAVAILABLE: ModelStatus.State
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    LOADED_AT_FIELD_NUMBER: _ClassVar[int]
    FEEDBACK_FIELD_NUMBER: _ClassVar[int]
    RATING_MIN_FIELD_NUMBER: _ClassVar[int]
    RATING_MAX_FIELD_NUMBER: _ClassVar[int]
    NUM_ITEMS_FIELD_NUMBER: _ClassVar[int]
    ITEM_ID_TYPE_FIELD_NUMBER: _ClassVar[int]
    REFUSED_FIELD_NUMBER: _ClassVar[int]
    USER_FEATURES_FIELD_NUMBER: _ClassVar[int]
    name: str
    state: ModelStatus.State
    version: int
    loaded_at: float
    feedback: str
    rating_min: float
    rating_max: float
    num_items: int
    item_id_type: str
    refused: _containers.RepeatedCompositeFieldContainer[RefusedVersion]
    user_features: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., state: _Optional[_Union[ModelStatus.State, str]] = ..., version: _Optional[int] = ..., loaded_at: _Optional[float] = ..., feedback: _Optional[str] = ..., rating_min: _Optional[float] = ..., rating_max: _Optional[float] = ..., num_items: _Optional[int] = ..., item_id_type: _Optional[str] = ..., refused: _Optional[_Iterable[_Union[RefusedVersion, _Mapping]]] = ..., user_features: _Optional[_Iterable[str]] = ...) -> None: ...

class GetModelStatusResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelStatus]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelStatus, _Mapping]]] = ...) -> None: ...

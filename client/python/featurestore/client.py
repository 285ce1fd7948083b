"""A thin client of the feature store over its generated gRPC stubs.

Every call has a deadline (the client's ``timeout``, or the call's own), and every failure
becomes a :class:`FeatureStoreError` carrying the gRPC code and, when the write-time policy
refused the whole request, its machine-readable reason.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import grpc
import numpy as np
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from featurestore.v1 import featurestore_pb2 as pb
from featurestore.v1 import featurestore_pb2_grpc as rpc

#: A feature value as Python takes it: a float, an int, a string, a list of floats (a
#: vector) or a mapping of topic to weight (a sparse map).
FeatureInput = Union[float, int, str, Sequence[float], Mapping[str, float]]


class FeatureStoreError(Exception):
    """A call failed. ``code`` is the gRPC status code; ``reason`` is the policy's reason
    code name (e.g. ``"STALE_GENERATION"``) when the write-time policy refused the whole
    request, with ``metadata`` (``row``, ``current_generation``); ``request_id`` is the id
    the server's log lines for the call carry."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        reason: Optional[str] = None,
        metadata: Optional[Dict[str, str]] = None,
        request_id: Optional[str] = None,
    ):
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.reason = reason
        self.metadata = metadata or {}
        self.request_id = request_id

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> "FeatureStoreError":
        reason, metadata = None, {}
        status = rpc_status.from_call(error)
        if status is not None:
            for detail in status.details:
                if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                    info = error_details_pb2.ErrorInfo()
                    detail.Unpack(info)
                    reason, metadata = info.reason or None, dict(info.metadata)
        trailing = dict(error.trailing_metadata() or ())
        request_id = trailing.get("x-request-id")
        return cls(error.code(), error.details() or "", reason, metadata, request_id)


@dataclass
class Row:
    """One key's answer: ``status`` is the row status name (``"OK"``,
    ``"UNKNOWN_SURFACE"``, ``"DATA_LOSS"``, ``"UNAVAILABLE"``); ``values`` maps each requested feature to its
    value, or None where nothing is served; ``statuses`` maps it to its value status name
    (``"PRESENT"``, ``"NOT_FOUND"``, ``"EXPIRED"``, ``"DEFAULTED"``, ...)."""

    user_id: int
    surface: str
    status: str
    values: Dict[str, Any]
    statuses: Dict[str, str]
    event_times_unix_micros: Dict[str, int] = field(default_factory=dict)


class ReadResult:
    """The answer to :meth:`Client.get_features`: one :class:`Row` per key, in request
    order, and :meth:`matrix` for a feature's values over the whole batch."""

    def __init__(self, keys: Sequence[Tuple[int, str]], response: pb.GetFeaturesResponse):
        self.response = response
        self.columns = list(response.columns)
        self._by_name = {column.name: column for column in self.columns}
        self.rows: List[Row] = []
        for (user_id, surface), row in zip(keys, response.rows):
            values, statuses, times = {}, {}, {}
            for index, column in enumerate(self.columns):
                status = pb.ValueStatus.Name(row.statuses[index]).removeprefix("VALUE_STATUS_")
                statuses[column.name] = status
                served = status in ("PRESENT", "DEFAULTED")
                values[column.name] = _cell(row, column) if served else None
                if row.event_times_unix_micros:
                    times[column.name] = row.event_times_unix_micros[index]
            self.rows.append(
                Row(
                    user_id=user_id,
                    surface=surface,
                    status=pb.RowStatus.Name(row.status).removeprefix("ROW_STATUS_"),
                    values=values,
                    statuses=statuses,
                    event_times_unix_micros=times,
                )
            )

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self):
        return iter(self.rows)

    def __getitem__(self, index: int) -> Row:
        return self.rows[index]

    def matrix(self, feature: str, missing: float = np.nan) -> np.ndarray:
        """The values of a FLOAT, FLOAT_VECTOR or INT64 feature for every key, as a
        ``(keys,)`` array (``(keys, dimension)`` for a vector); cells without a served value
        hold ``missing``."""
        column = self._by_name.get(feature)
        if column is None:
            raise KeyError(f"{feature!r} is not a column of this read")
        kind = column.value_type
        if kind == pb.VALUE_TYPE_INT64:
            width, source = 1, "int64_values"
        elif kind in (pb.VALUE_TYPE_FLOAT, pb.VALUE_TYPE_FLOAT_VECTOR):
            width, source = max(column.dimension, 1), "float_values"
        else:
            raise TypeError(f"{feature!r} is a {pb.ValueType.Name(kind)} feature, not numeric")
        index = self.columns.index(column)
        out = np.full((len(self.response.rows), width), missing, dtype=np.float64)
        for number, row in enumerate(self.response.rows):
            if row.statuses and row.statuses[index] in (
                pb.VALUE_STATUS_PRESENT,
                pb.VALUE_STATUS_DEFAULTED,
            ):
                values = getattr(row, source)
                out[number] = values[column.offset : column.offset + width]
        return out[:, 0] if kind != pb.VALUE_TYPE_FLOAT_VECTOR else out


def _cell(row: pb.FeatureRow, column: pb.FeatureColumn) -> Any:
    offset = column.offset
    kind = column.value_type
    if kind == pb.VALUE_TYPE_FLOAT:
        return row.float_values[offset]
    if kind == pb.VALUE_TYPE_FLOAT_VECTOR:
        return list(row.float_values[offset : offset + column.dimension])
    if kind == pb.VALUE_TYPE_INT64:
        return row.int64_values[offset]
    if kind == pb.VALUE_TYPE_STRING:
        return row.string_values[offset]
    if kind == pb.VALUE_TYPE_SPARSE:
        sparse = row.sparse_values[offset]
        return dict(zip(sparse.topics, sparse.weights))
    return None


@dataclass
class Verdict:
    """What happened to one feature value of a write: ``verdict`` (``"ALLOW"``,
    ``"ALLOW_WITH_TRANSFORM"``, ``"DENY"``), the ``reasons`` that refused it somewhere, and
    the ``outcomes`` per target surface (``"STORED"``, ``"SUPERSEDED"``, ``"REFUSED"``;
    ``"ADMITTED"`` when explained)."""

    feature: str
    verdict: str
    reasons: List[str]
    outcomes: Dict[str, str]


def _verdicts(rows: Iterable[pb.RowResult]) -> List[List[Verdict]]:
    return [
        [
            Verdict(
                feature=verdict.feature,
                verdict=pb.Verdict.Name(verdict.verdict).removeprefix("VERDICT_"),
                reasons=[pb.ReasonCode.Name(r).removeprefix("REASON_CODE_") for r in verdict.reasons],
                outcomes={
                    outcome.surface: pb.Outcome.Name(outcome.outcome).removeprefix("OUTCOME_")
                    for outcome in verdict.surfaces
                },
            )
            for verdict in row.verdicts
        ]
        for row in rows
    ]


@dataclass
class WriteRow:
    """One row of a write: the user, its target surfaces, the provenance (the registered
    ``source``, the app the interaction happened in, the producing model or pipeline with
    its version, e.g. ``"topic-model@v3"``), and ``features``: feature names to values (see
    :data:`FeatureInput`). ``interaction_time_unix_micros`` defaults to now."""

    user_id: int
    surfaces: Sequence[str]
    source: str
    origin_app: str
    producer_id: str
    features: Mapping[str, FeatureInput]
    interaction_time_unix_micros: Optional[int] = None
    microphone_permission_granted: bool = False
    user_state_generation: int = 0

    def to_proto(self) -> pb.WriteRow:
        when = self.interaction_time_unix_micros
        if when is None:
            when = time.time_ns() // 1000
        return pb.WriteRow(
            user_id=self.user_id,
            target_surfaces=list(self.surfaces),
            provenance=pb.Provenance(
                source=self.source,
                origin_app=self.origin_app,
                interaction_time_unix_micros=when,
                producer_id=self.producer_id,
                microphone_permission_granted=self.microphone_permission_granted,
            ),
            features=[_feature_value(name, value) for name, value in self.features.items()],
            user_state_generation=self.user_state_generation,
        )


def _feature_value(name: str, value: FeatureInput) -> pb.FeatureValue:
    if isinstance(value, bool):
        raise TypeError(f"feature {name!r}: a bool is not a feature value")
    if isinstance(value, int):
        return pb.FeatureValue(name=name, int64_value=value)
    if isinstance(value, float):
        return pb.FeatureValue(name=name, float_value=value)
    if isinstance(value, str):
        return pb.FeatureValue(name=name, string_value=value)
    if isinstance(value, Mapping):
        return pb.FeatureValue(
            name=name,
            sparse_value=pb.SparseVector(
                topics=list(value.keys()), weights=[float(w) for w in value.values()]
            ),
        )
    return pb.FeatureValue(name=name, vector_value=pb.FloatVector(values=[float(v) for v in value]))


@dataclass
class WriteResult:
    """The answer to a write: per row, per feature, its :class:`Verdict`."""

    rows: List[List[Verdict]]
    replayed: bool
    policy_bundle_hash: str


class Client:
    """A connection to a feature store server.

    ``target`` is ``host:port``. ``token`` is the caller's bearer token; ``tls_ca`` (PEM
    bytes) turns TLS on, with ``tls_cert`` and ``tls_key`` for mutual TLS and
    ``tls_server_name`` when the certificate's name is not the host's. ``timeout`` is the
    deadline of every call, in seconds, unless the call gives its own.
    """

    def __init__(
        self,
        target: str,
        *,
        token: Optional[str] = None,
        tls_ca: Optional[bytes] = None,
        tls_cert: Optional[bytes] = None,
        tls_key: Optional[bytes] = None,
        tls_server_name: Optional[str] = None,
        timeout: float = 5.0,
        max_message_bytes: int = 64 * 1024 * 1024,
    ):
        options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", 16 * 1024 * 1024),
        ]
        if tls_server_name:
            options.append(("grpc.ssl_target_name_override", tls_server_name))
        if tls_ca is not None:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=tls_ca, private_key=tls_key, certificate_chain=tls_cert
            )
            self._channel = grpc.secure_channel(target, credentials, options=options)
        elif tls_cert is not None or tls_key is not None:
            raise ValueError("a client certificate needs TLS: give tls_ca too")
        else:
            self._channel = grpc.insecure_channel(target, options=options)
        self._metadata: List[Tuple[str, str]] = []
        if token:
            self._metadata.append(("authorization", f"Bearer {token}"))
        self.timeout = timeout
        self._store = rpc.FeatureStoreStub(self._channel)
        self._privacy = rpc.PrivacyStub(self._channel)
        self._admin = rpc.AdminStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    def _call(self, method, request, timeout: Optional[float], request_id: Optional[str]):
        metadata = list(self._metadata)
        if request_id:
            metadata.append(("x-request-id", request_id))
        try:
            return method(
                request,
                timeout=self.timeout if timeout is None else timeout,
                metadata=metadata,
            )
        except grpc.RpcError as error:
            raise FeatureStoreError.from_rpc_error(error) from None

    def get_features(
        self,
        keys: Sequence[Tuple[int, str]],
        features: Sequence[str] = (),
        *,
        include_event_times: bool = False,
        timeout: Optional[float] = None,
        request_id: Optional[str] = None,
    ) -> ReadResult:
        """Reads ``features`` (every feature of the keys' surfaces when empty) for each
        ``(user_id, surface)`` key."""
        request = pb.GetFeaturesRequest(
            keys=[pb.FeatureKey(user_id=user, surface=surface) for user, surface in keys],
            features=list(features),
            include_event_times=include_event_times,
        )
        response = self._call(self._store.GetFeatures, request, timeout, request_id)
        return ReadResult(list(keys), response)

    def write_features(
        self,
        rows: Sequence[WriteRow],
        *,
        idempotency_key: Optional[str] = None,
        timeout: Optional[float] = None,
        request_id: Optional[str] = None,
    ) -> WriteResult:
        """Writes rows; each value is decided by the write-time policy, and the answer says
        what became of it. A retry with the same ``idempotency_key`` is applied once."""
        request = pb.WriteFeaturesRequest(
            idempotency_key=idempotency_key or str(uuid.uuid4()),
            rows=[row.to_proto() for row in rows],
        )
        response = self._call(self._store.WriteFeatures, request, timeout, request_id)
        return WriteResult(
            rows=_verdicts(response.rows),
            replayed=response.replayed,
            policy_bundle_hash=response.policy_bundle_hash,
        )

    def explain_write(
        self, rows: Sequence[WriteRow], *, timeout: Optional[float] = None
    ) -> pb.ExplainWriteResponse:
        """Decides rows as a write would, storing nothing: the verdicts and the rules that
        fired."""
        request = pb.WriteFeaturesRequest(
            idempotency_key=str(uuid.uuid4()), rows=[row.to_proto() for row in rows]
        )
        return self._call(self._store.ExplainWrite, request, timeout, None)

    def set_user_state(
        self,
        user_id: int,
        *,
        jurisdiction: str,
        age_band: str,
        linked_apps: Sequence[str] = (),
        ads_objection: bool = False,
        expected_generation: int = 0,
        timeout: Optional[float] = None,
    ) -> pb.UserState:
        """Sets a user's state (privacy role). ``age_band`` is ``"ADULT"``, ``"MINOR"`` or
        ``"UNKNOWN"``."""
        state = pb.UserState(
            user_id=user_id,
            jurisdiction=jurisdiction,
            age_band=pb.AgeBand.Value(f"AGE_BAND_{age_band.upper()}"),
            linked_apps=list(linked_apps),
            ads_objection=ads_objection,
        )
        request = pb.SetUserStateRequest(state=state, expected_generation=expected_generation)
        return self._call(self._privacy.SetUserState, request, timeout, None)

    def get_user_state(self, user_id: int, *, timeout: Optional[float] = None) -> pb.UserState:
        return self._call(
            self._privacy.GetUserState, pb.GetUserStateRequest(user_id=user_id), timeout, None
        )

    def erase_user(self, user_id: int, *, timeout: Optional[float] = None) -> pb.ErasureReceipt:
        """Erases a user (privacy role): every row, the state reset, the audit trail made
        unlinkable. Returns the receipt."""
        return self._call(
            self._privacy.EraseUser, pb.EraseUserRequest(user_id=user_id), timeout, None
        )

    def erasure_status(self, receipt_id: str, *, timeout: Optional[float] = None) -> pb.ErasureReceipt:
        return self._call(
            self._privacy.GetErasureStatus,
            pb.GetErasureStatusRequest(receipt_id=receipt_id),
            timeout,
            None,
        )

    def stats(self, *, timeout: Optional[float] = None) -> pb.StoreStats:
        """What the server holds and runs with (admin role)."""
        return self._call(self._admin.GetStats, pb.GetStatsRequest(), timeout, None)

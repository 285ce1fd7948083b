"""Python client of the feature store.

``featurestore.Client`` is the thin client rankers and pipelines use;
``featurestore.v1.featurestore_pb2`` and ``featurestore_pb2_grpc`` are the messages and
stubs generated from the server's ``proto/`` when this package is built.
"""

from featurestore.client import (
    Client,
    FeatureStoreError,
    ReadResult,
    Row,
    Verdict,
    WriteResult,
    WriteRow,
)

__all__ = [
    "Client",
    "FeatureStoreError",
    "ReadResult",
    "Row",
    "Verdict",
    "WriteResult",
    "WriteRow",
]

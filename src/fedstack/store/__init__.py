"""The model store: every local, cluster and semi-global model with its lineage and metrics."""

from fedstack.store.blobs import BlobStore
from fedstack.store.federation import ClusterResume, FederationView, Member, SemiGlobal
from fedstack.store.repository import (
    CredentialRefused,
    Registration,
    ResumeState,
    RunInfo,
    Store,
    UploadRecord,
)

__all__ = [
    "BlobStore",
    "ClusterResume",
    "CredentialRefused",
    "FederationView",
    "Member",
    "Registration",
    "ResumeState",
    "RunInfo",
    "SemiGlobal",
    "Store",
    "UploadRecord",
]

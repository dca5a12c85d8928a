"""coherent-volume: a shared workspace where a stale write fails closed instead of losing work."""

from .errors import (
    Absent,
    CasConflict,
    CoherenceError,
    DamagedContent,
    GlobError,
    InstallPending,
    InvalidPath,
    MergeConflict,
    NotManaged,
    OutsideVolume,
    RegistryError,
    RegistryLoginRefused,
    RetriesExhausted,
    StaleWriteError,
    TooManyLines,
    TreeClash,
    VersionGone,
    VolumeConfigError,
)
from .policy import Policy, Retention
from .volume import CoherentVolume

__all__ = [
    "CoherentVolume",
    "CoherenceError",
    "StaleWriteError",
    "CasConflict",
    "RetriesExhausted",
    "OutsideVolume",
    "GlobError",
    "InvalidPath",
    "InstallPending",
    "NotManaged",
    "RegistryError",
    "RegistryLoginRefused",
    "VolumeConfigError",
    "VersionGone",
    "TooManyLines",
    "MergeConflict",
    "Policy",
    "Retention",
    "DamagedContent",
    "TreeClash",
    "Absent",
]

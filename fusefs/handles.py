"""Open-file state of the mount: one object per FUSE file handle."""
from __future__ import annotations

import os
from dataclasses import dataclass

from coherent_volume.paths import Target
from coherent_volume.protocol import Grant


@dataclass
class Passthrough:
    """An unmanaged file: reads and writes go straight to the backing fd."""

    fd: int
    rel: str

    def close(self) -> None:
        os.close(self.fd)


@dataclass
class Snapshot:
    """A managed file opened for reading: `fd` is the inode of the version it opened, which no
    commit modifies (commits install new inodes), so it serves exactly that version's bytes."""

    fd: int
    version: int

    def close(self) -> None:
        os.close(self.fd)


@dataclass
class Shadow:
    """A managed file opened for writing: writes land in an unnamed shadow file beside the target,
    installed as one commit at flush/close, so readers never see a partial write. The commit
    installs the shadow itself; `fd` is then -1 until the handle writes again.

    Invariant: from open (or the first write after a commit) until the next commit, `grant` (this
    agent's write grant) keeps every other agent out; between commits it is None."""

    target: Target
    agent: str
    fd: int
    grant: Grant | None
    owns_grant: bool
    append: bool
    base_version: int
    """The version the shadow's content starts from: its commit is a CAS against it."""
    pending: bool = False
    """The shadow differs from what was last committed (an O_TRUNC open alone makes it so)."""
    wrote: bool = False
    """Data was written or resized since the last commit: flush commits only then, because
    shells flush a freshly opened descriptor (dup2, then close) before writing anything."""
    synced: bool = False
    """The program fsynced the shadow since its last write, asking for its content to be durable."""
    created: bool = False
    """This handle created the file: as on a local disk, its name is durable only once the
    program fsyncs the directory, so even a synced commit need not fsync it."""

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclass
class Listing:
    """An open directory: its entry names, taken at opendir."""

    inode: int
    names: list[bytes]

    def close(self) -> None:
        self.names = []


Handle = Passthrough | Snapshot | Shadow | Listing

"""A seeded random-operation file exerciser in the spirit of fsx: one file, an in-memory model of
its bytes, and every read checked against the model.

    python -m tests.harness.exerciser FILE --ops N --seed S

Operations: pwrite at random offsets (past the end too, leaving holes), pread, ftruncate up and
down, truncate by path, mmap reads (shared and private) and writes (shared with or without msync;
private, which must not reach the file), copy_file_range from and to a second file (FILE.aux),
fsync and fdatasync, lseek (SEEK_END, SEEK_DATA, SEEK_HOLE), fstat sizes, and close and reopen
cycles that re-read the whole file. A file of the volume's managed globs seen through a mount
(it has the `user.coherent.version` attribute) is exercised under the mount's handle rules
(docs/mount.md): a write handle is alone, so truncating by path and mapping shared happen with it
closed (its close commits), and a shared mapping of the write handle must fail ENODEV.

The random choices depend only on the seed and on the model, so a run replays exactly as long
as the file system agrees with the model. On the first disagreement (or an unexpected error) it
prints the seed, the operation's number and the log of the operations before it, and exits 1.
"""

from __future__ import annotations

import argparse
import collections
import errno
import mmap
import os
import random
import sys
from collections.abc import Callable
from pathlib import Path

MANAGED_ATTR = "user.coherent.version"
"""The attribute the mount shows on managed files (fusefs/operations.py XATTR_VERSION)."""


def _managed(path: Path) -> bool:
    """Whether the mount manages `path`: it answers `MANAGED_ATTR` (asked by name: it is not listed)."""
    try:
        os.getxattr(path, MANAGED_ATTR)
    except OSError as e:
        if e.errno in (errno.ENODATA, errno.ENOTSUP):
            return False
        raise
    return True


PAGE = mmap.PAGESIZE


class Mismatch(AssertionError):
    """The file system disagreed with the model."""


class Exerciser:
    """One file and its model. `fd` is a read-write descriptor of it, or -1 while it is closed."""

    def __init__(self, path: Path, seed: int, max_size: int, max_io: int, log_size: int) -> None:
        self.path, self.aux_path = path, path.with_name(path.name + ".aux")
        self.seed = seed
        self.rng = random.Random(seed)
        self.max_size, self.max_io = max_size, max_io
        self.log: collections.deque[str] = collections.deque(maxlen=log_size)
        self.counts: collections.Counter[str] = collections.Counter()
        self.model = bytearray(self._read_whole(path)) if path.exists() else bytearray()
        self.aux = bytearray(self._read_whole(self.aux_path)) if self.aux_path.exists() else bytearray()
        self.fresh = not self.model and not self.aux
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        self.aux_fd = os.open(self.aux_path, os.O_RDWR | os.O_CREAT, 0o644)
        self.managed = _managed(path)
        self.ops: list[tuple[int, Callable[[], None]]] = [
            (20, self.write),
            (20, self.read),
            (5, self.ftruncate),
            (3, self.truncate_path),
            (5, self.mmap_read_shared),
            (5, self.mmap_read_private),
            (5, self.mmap_write_shared),
            (3, self.mmap_write_private),
            (4, self.copy_in),
            (4, self.copy_out),
            (2, self.aux_write),
            (3, self.fsync),
            (6, self.seek),
            (5, self.fstat),
            (3, self.reopen),
        ]

    @staticmethod
    def _read_whole(path: Path) -> bytes:
        """The file's bytes (a tracked read on a mount: its agent may then write it)."""
        with open(path, "rb") as f:
            return f.read()

    # ---- helpers ----------------------------------------------------------------------

    def note(self, text: str) -> None:
        self.log.append(text)

    def check(self, what: str, got: object, expected: object) -> None:
        if got != expected:
            raise Mismatch(f"{what}: got {_show(got)}, expected {_show(expected)}")

    def check_bytes(self, what: str, got: bytes, expected: bytes, offset: int) -> None:
        if got == expected:
            return
        where = next((i for i, (a, b) in enumerate(zip(got, expected, strict=False)) if a != b), None)
        first = f"first difference at file offset {offset + where}" if where is not None else "lengths differ"
        raise Mismatch(f"{what}: {len(got)} bytes read, {len(expected)} expected, {first}")

    def data(self, size: int) -> bytes:
        """Random bytes (zeros among them, so that holes and data look alike now and then)."""
        if self.rng.random() < 0.1:
            return bytes(size)
        return self.rng.randbytes(size)

    def offset(self, beyond: int = 0) -> int:
        """A random offset in the file, or up to `beyond` bytes past its end."""
        return self.rng.randrange(0, min(len(self.model) + beyond, self.max_size) + 1)

    def closed(self) -> None:
        """Close the write descriptor (on a mount, its close commits), if open."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def opened(self) -> None:
        """Reopen the write descriptor and check the whole file."""
        if self.fd < 0:
            self.fd = os.open(self.path, os.O_RDWR)
            self.check_bytes("whole file after reopen", _pread_all(self.fd), bytes(self.model), 0)

    @staticmethod
    def set_bytes(model: bytearray, off: int, data: bytes) -> None:
        """`data` written at `off` (nothing written changes nothing, even past the end)."""
        if not data:
            return
        if off > len(model):
            model.extend(bytes(off - len(model)))
        model[off : off + len(data)] = data

    # ---- operations -------------------------------------------------------------------

    def write(self) -> None:
        size = self.rng.randint(1, self.max_io)
        off = min(self.offset(beyond=self.max_io), self.max_size - size)
        data = self.data(size)
        self.note(f"pwrite {size} bytes at {off} (size {len(self.model)})")
        self.check("pwrite count", os.pwrite(self.fd, data, off), size)
        self.set_bytes(self.model, off, data)

    def read(self) -> None:
        off, size = self.offset(beyond=self.max_io), self.rng.randint(1, self.max_io)
        self.note(f"pread {size} at {off} (size {len(self.model)})")
        self.check_bytes("pread", _pread(self.fd, size, off), bytes(self.model[off : off + size]), off)

    def ftruncate(self) -> None:
        size = self.rng.randrange(0, self.max_size + 1)
        self.note(f"ftruncate {len(self.model)} -> {size}")
        os.ftruncate(self.fd, size)
        self._resize(size)

    def truncate_path(self) -> None:
        size = self.rng.randrange(0, self.max_size + 1)
        self.note(f"truncate by path {len(self.model)} -> {size}" + (" (write handle closed)" if self.managed else ""))
        if self.managed:  # a write handle is alone: the path's own truncation waits for its close
            self.closed()
        os.truncate(self.path, size)
        self._resize(size)
        self.opened()

    def _resize(self, size: int) -> None:
        del self.model[size:]
        self.model.extend(bytes(size - len(self.model)))

    def _window(self) -> tuple[int, int] | None:
        """A random page-aligned (offset, length) inside the file, None for an empty file."""
        if not self.model:
            return None
        off = self.rng.randrange(0, len(self.model)) // PAGE * PAGE
        return off, self.rng.randint(1, len(self.model) - off)

    def mmap_read_shared(self) -> None:
        window = self._window()
        if window is None:
            return self.note("mmap shared read: empty file, nothing to map")
        off, size = window
        separate = self.managed or self.rng.random() < 0.5
        self.note(f"mmap shared read {size} at {off}" + (" through a read-only descriptor" if separate else ""))
        if self.managed:  # the write handle cannot be mapped shared: read what its close committed
            self.closed()
        fd = os.open(self.path, os.O_RDONLY) if separate else self.fd
        try:
            with mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ, offset=off) as m:
                self.check_bytes("mmap shared read", m[:], bytes(self.model[off : off + size]), off)
        finally:
            if separate:
                os.close(fd)
        self.opened()

    def mmap_read_private(self) -> None:
        window = self._window()
        if window is None:
            return self.note("mmap private read: empty file, nothing to map")
        off, size = window
        self.note(f"mmap private read {size} at {off}")
        with mmap.mmap(self.fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ, offset=off) as m:
            self.check_bytes("mmap private read", m[:], bytes(self.model[off : off + size]), off)

    def mmap_write_shared(self) -> None:
        window = self._window()
        if window is None:
            return self.note("mmap shared write: empty file, nothing to map")
        off, size = window
        if self.managed:
            self.note(f"mmap shared writable {size} at {off}: must fail ENODEV (write handles are not mapped shared)")
            try:
                mmap.mmap(self.fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=off)
            except OSError as e:
                return self.check("mmap shared of a write handle", errno.errorcode.get(e.errno or 0), "ENODEV")
            raise Mismatch("mmap shared of a managed file's write handle worked; the mount's rule is ENODEV")
        start = self.rng.randrange(0, size)
        data = self.data(self.rng.randint(1, min(size - start, self.max_io)))
        sync = self.rng.random() < 0.5
        self.note(f"mmap shared write {len(data)} at {off + start}" + (" + msync" if sync else ""))
        with mmap.mmap(self.fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=off) as m:
            m[start : start + len(data)] = data
            if sync:
                m.flush()
        self.set_bytes(self.model, off + start, data)

    def mmap_write_private(self) -> None:
        window = self._window()
        if window is None:
            return self.note("mmap private write: empty file, nothing to map")
        off, size = window
        start = self.rng.randrange(0, size)
        data = self.data(self.rng.randint(1, min(size - start, self.max_io)))
        self.note(f"mmap private write {len(data)} at {off + start} (must not reach the file)")
        with mmap.mmap(self.fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=off) as m:
            m[start : start + len(data)] = data
            self.check_bytes("private mapping after its write", m[start : start + len(data)], data, off + start)
        begin = off + start
        self.check_bytes(
            "file after a private write",
            _pread(self.fd, len(data), begin),
            bytes(self.model[begin : begin + len(data)]),
            begin,
        )

    def copy_in(self) -> None:
        src = self.rng.randrange(0, len(self.aux) + 1)
        size = self.rng.randint(1, self.max_io)
        dst = min(self.offset(beyond=self.max_io), self.max_size - size)
        available = max(0, min(size, len(self.aux) - src))
        self.note(f"copy_file_range {size} from aux {src} (aux size {len(self.aux)}) to {dst} (size {len(self.model)})")
        copied = os.copy_file_range(self.aux_fd, self.fd, size, src, dst)
        self._check_copied(copied, available)
        self.set_bytes(self.model, dst, bytes(self.aux[src : src + copied]))

    def copy_out(self) -> None:
        src = self.offset()
        size = self.rng.randint(1, self.max_io)
        dst = self.rng.randrange(0, min(len(self.aux), self.max_size - size) + 1)
        available = max(0, min(size, len(self.model) - src))
        self.note(f"copy_file_range {size} from {src} (size {len(self.model)}) to aux {dst}")
        copied = os.copy_file_range(self.fd, self.aux_fd, size, src, dst)
        self._check_copied(copied, available)
        self.set_bytes(self.aux, dst, bytes(self.model[src : src + copied]))
        self.check_bytes(
            "aux after copy_file_range", _pread(self.aux_fd, copied, dst), bytes(self.aux[dst : dst + copied]), dst
        )

    def _check_copied(self, copied: int, available: int) -> None:
        """copy_file_range may copy less than asked, but something when there is something to copy."""
        if not (0 < copied <= available or copied == available == 0):
            sizes = f"fstat now: file {os.fstat(self.fd).st_size}, aux {os.fstat(self.aux_fd).st_size}"
            raise Mismatch(f"copy_file_range copied {copied} bytes, {available} were there to copy ({sizes})")

    def aux_write(self) -> None:
        size = self.rng.randint(1, self.max_io)
        off = self.rng.randrange(0, min(len(self.aux), self.max_size - size) + 1)
        data = self.data(size)
        self.note(f"aux pwrite {size} at {off}")
        self.check("aux pwrite count", os.pwrite(self.aux_fd, data, off), size)
        self.set_bytes(self.aux, off, data)

    def fsync(self) -> None:
        data_only = self.rng.random() < 0.5
        self.note("fdatasync" if data_only else "fsync")
        (os.fdatasync if data_only else os.fsync)(self.fd)

    def seek(self) -> None:
        whence = self.rng.choice([os.SEEK_END, os.SEEK_DATA, os.SEEK_HOLE])
        size = len(self.model)
        if whence == os.SEEK_END:
            self.note(f"lseek SEEK_END (size {size})")
            return self.check("lseek SEEK_END", os.lseek(self.fd, 0, os.SEEK_END), size)
        name = "SEEK_DATA" if whence == os.SEEK_DATA else "SEEK_HOLE"
        off = self.offset(beyond=PAGE)
        self.note(f"lseek {name} {off} (size {size})")
        try:
            found = os.lseek(self.fd, off, whence)
        except OSError as e:
            if e.errno != errno.ENXIO:
                raise
            # past the end, or (SEEK_DATA) nothing but a hole up to it
            if off >= size or (whence == os.SEEK_DATA and not any(self.model[off:])):
                return None
            raise Mismatch(f"lseek {name} {off} failed ENXIO inside the file (size {size})") from None
        if off >= size:
            raise Mismatch(f"lseek {name} {off} found {found} at or past the end (size {size})")
        if not off <= found <= size or (whence == os.SEEK_DATA and found == size):
            raise Mismatch(f"lseek {name} {off} found {found}, outside [{off}, {size}]")
        if whence == os.SEEK_DATA and any(self.model[off:found]):
            raise Mismatch(f"lseek SEEK_DATA {off} skipped data: found {found}")
        if whence == os.SEEK_HOLE and found < size and self.model[found]:
            raise Mismatch(f"lseek SEEK_HOLE {off} found {found}, where a byte is not zero")
        return None

    def fstat(self) -> None:
        self.note(f"fstat (size {len(self.model)})")
        self.check("fstat size", os.fstat(self.fd).st_size, len(self.model))

    def reopen(self) -> None:
        self.note(f"close and reopen (size {len(self.model)})")
        self.closed()
        self.check("stat size of the closed file", os.stat(self.path).st_size, len(self.model))
        self.opened()

    # ---- the run ----------------------------------------------------------------------

    def run(self, count: int) -> int:
        """Run `count` operations; 0 if all agreed with the model, else 1 (the report printed)."""
        weights = [weight for weight, _ in self.ops]
        number = 0  # the operation under way; count + 1 is the final check
        try:
            while number < count:
                number += 1
                op = self.rng.choices(self.ops, weights)[0][1]
                self.counts[op.__name__] += 1
                op()
            number += 1
            self.note("final check: close both files, reopen and read them whole")
            self.closed()
            os.close(self.aux_fd)
            self.aux_fd = -1
            self.check_bytes("whole file at the end", self._read_whole(self.path), bytes(self.model), 0)
            self.check_bytes("aux at the end", self._read_whole(self.aux_path), bytes(self.aux), 0)
        except (Mismatch, OSError, ValueError) as e:  # ValueError: what mmap says of a bad length
            self.report(number, e)
            return 1
        finally:
            self.closed()
            if self.aux_fd >= 0:
                os.close(self.aux_fd)
        rules = "managed (the mount's handle rules)" if self.managed else "plain"
        print(f"exerciser: {self.path}: {count} operations clean, seed {self.seed}, rules {rules}")
        print("  " + ", ".join(f"{name} {n}" for name, n in sorted(self.counts.items())))
        return 0

    def report(self, number: int, error: BaseException) -> None:
        out = sys.stderr
        print(f"exerciser: {self.path}: FAILED at operation {number} (seed {self.seed}): {error}", file=out)
        print(f"  replay: python -m tests.harness.exerciser {self.path} --seed {self.seed} --ops {number}", file=out)
        if self.fresh:
            print(f"  (it started without {self.path} and {self.aux_path.name}: remove them first)", file=out)
        else:
            print("  (it started from the content the files had then: restore it first)", file=out)
        print(f"  the last {len(self.log)} operations, the failing one last:", file=out)
        first = number - len(self.log) + 1
        for i, line in enumerate(self.log):
            print(f"  {first + i:>7}  {line}", file=out)


def _pread(fd: int, size: int, off: int) -> bytes:
    """`size` bytes at `off`, fewer only at the end of the file (pread may return less)."""
    chunks = []
    while size > 0:
        chunk = os.pread(fd, min(size, 1 << 20), off)
        if not chunk:
            break
        chunks.append(chunk)
        size -= len(chunk)
        off += len(chunk)
    return b"".join(chunks)


def _pread_all(fd: int) -> bytes:
    return _pread(fd, 1 << 40, 0)


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) < 80 else text[:77] + "..."


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.harness.exerciser", description=__doc__.split("\n\n")[0])
    parser.add_argument("file", type=Path, help="the file to exercise (created if missing; FILE.aux beside it)")
    parser.add_argument("--ops", type=int, default=10_000, help="operations to run (default 10000)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: a random one, printed)")
    parser.add_argument("--max-size", type=int, default=256 * 1024, help="largest file size (default 256 KiB)")
    parser.add_argument("--max-io", type=int, default=16 * 1024, help="largest single write or read (default 16 KiB)")
    parser.add_argument("--log", type=int, default=30, help="operations shown before a failure (default 30)")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 32)
    exerciser = Exerciser(args.file, seed, args.max_size, args.max_io, args.log)
    return exerciser.run(args.ops)


if __name__ == "__main__":
    sys.exit(main())

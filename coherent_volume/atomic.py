"""Atomic, durable replacement of one file: the disk edge of a commit.

Content is staged before the commit lock is taken (write + fsync), and only given a name
inside the lock, so a writer killed while staging leaves nothing behind. Install follows the
classic order: fsync'd temp in the same directory, rename over the target, fsync the directory.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import itertools
import os
import secrets
import stat as stat_mod
from collections.abc import Callable
from dataclasses import dataclass

from .errors import OutsideVolume, root_gone
from .fingerprint import Fingerprint, content_hash, data_runs, hash_fd, open_to_check
from .paths import Anchor, open_beneath

_libc = ctypes.CDLL(None, use_errno=True)
_AT_FDCWD = -100
_AT_SYMLINK_FOLLOW = 0x400


def named(path: str) -> str:
    """`path` as a message names it: a name beneath a directory's descriptor (`/proc/self/fd/N/...`,
    `VolumePaths.beneath`) by that directory's path now."""
    return os.path.realpath(path) if path.startswith("/proc/self/fd/") else path


def fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


@dataclass
class Staged:
    """New content for `target`: unnamed (an O_TMPFILE `fd`) until `install` links it to `tmp`, or
    (on file systems without O_TMPFILE) already named `tmp`. When `durable`, the content was
    fsynced and `install` fsyncs the directory, so the new name survives a power loss."""

    target: str
    hash: str
    fd: int | None
    tmp: str | None = None
    named: bool = False
    durable: bool = True
    data: bytes | None = None
    """The bytes it was staged from (`stage`): what its commit stores instead of reading it back."""
    makes: tuple[str, int] | None = None
    """(the volume's root, a mode): `install` first makes the target's missing directories below
    the root with that mode (`_made_dirs`: beneath the nearest one there is, never through a
    symlink). Staging makes none (it stages in the nearest directory there is), so a write that is
    refused, or never installed, leaves no directory behind."""
    at: str | None = None
    """The directory it was staged in, where the target's is not there yet: the nearest one on its
    way, on the file system the target's will be on (a copy of its content is made there too)."""
    own_attributes: bool = False
    """It keeps the mode, owner and extended attributes it has (`take_attributes`) at its install,
    instead of taking the target's as an in-place write keeps them."""
    anchor: Anchor | None = None
    """A descriptor of the target's directory, opened when its missing directories were made
    (`_made_dirs`): `target` (and a temp name beside it) is then its name beneath that descriptor,
    `/proc/self/fd/N/name`, so that no name on its way is looked up again (a symlink a program puts
    there meanwhile is never followed: /tmp/s33api 1)."""

    def take_attributes(self, source: str) -> None:
        """Give the content `source`'s mode, owner and extended attributes, kept at its install: a
        save by rename that is merged installs the merge where rename(2) would have put `source`,
        with what `source` had (a program that saves a private file 0600 gets a 0600 file)."""
        st = os.stat(source, follow_symlinks=False)
        if self.named:
            assert self.tmp is not None
            dest: str | int = self.tmp
        else:
            assert self.fd is not None
            dest = self.fd
        copy_xattrs(source, dest)
        if os.geteuid() == 0:
            os.chown(dest, st.st_uid, st.st_gid)  # first: chown clears set-id bits, chmod restores them
        os.chmod(dest, stat_mod.S_IMODE(st.st_mode))
        self.own_attributes = True

    def plan_name(self) -> str:
        """The temp name `install` will use, decided before any disk change (for a commit intent)."""
        if self.tmp is None:
            self.tmp = temp_name(self.target)
        return self.tmp

    def reader(self) -> int:
        """A new read-only descriptor of the staged content (the caller closes it)."""
        if self.named:
            assert self.tmp is not None
            return os.open(self.tmp, os.O_RDONLY | os.O_CLOEXEC)
        assert self.fd is not None
        return os.open(f"/proc/self/fd/{self.fd}", os.O_RDONLY | os.O_CLOEXEC)

    def name_in(self, directory: str) -> str:
        """Give the content a temp name before its commit is recorded, so that a name still there
        after the commit means its install did not happen (see `protocol.recovery`): in
        `directory` (the volume's staging directory), or beside the target when that is another
        file system. Content named already keeps its name. Returns the name."""
        if self.named:
            assert self.tmp is not None
            return self.tmp
        assert self.fd is not None
        tmp = os.path.join(directory, _temp_base(self.target))
        try:
            try:
                _link(self.fd, tmp)
            except FileNotFoundError:
                try:
                    os.mkdir(directory, 0o700)  # as private as the registry beside it
                except FileExistsError:
                    pass
                try:
                    _link(self.fd, tmp)
                except FileNotFoundError:  # named once and unnamed (an earlier commit that failed): a copy
                    self._copy_anew()
                    _link(self.fd, tmp)
        except OSError as e:
            if e.errno != errno.EXDEV:
                raise
            # beside the target, where recovery looks for it (`VolumePaths.staged`): its directories
            # are made now (the commit was decided; only a registry failure can still stop it)
            self._make_dirs()
            tmp = temp_name(self.target)
            _link(self.fd, tmp)
        self.tmp, self.named = tmp, True
        return tmp

    def _make_dirs(self) -> None:
        """Make the target's missing directories (`makes`), one at a time beneath the one above
        (`_made_dirs`), and name the target (and a temp name planned beside it) beneath a
        descriptor of its directory so obtained."""
        if self.makes is None:
            return
        anchor = _made_dirs(os.path.dirname(self.target), *self.makes)
        if anchor is not None:
            self._rebase(anchor)

    def _rebase(self, anchor: Anchor) -> None:
        """Name the target, and a temp name planned beside it, beneath `anchor` (its directory)."""
        directory = os.path.dirname(self.target)
        self.target = f"/proc/self/fd/{anchor.fd}/{os.path.basename(self.target)}"
        if self.tmp is not None and os.path.dirname(self.tmp) == directory:
            self.tmp = f"/proc/self/fd/{anchor.fd}/{os.path.basename(self.tmp)}"
        self.anchor = anchor

    @property
    def _directory(self) -> str:
        """Where its unnamed content lives (`at`, else the target's directory)."""
        return self.at or os.path.dirname(self.target)

    def _copy_anew(self) -> None:
        """Replace the staged descriptor by an unnamed copy of its content (an inode that was named
        and unnamed again cannot be linked any more)."""
        assert self.fd is not None
        source = self.fd
        fd = os.open(self._directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, os.fstat(source).st_mode & 0o7777)
        try:
            try:
                fcntl.ioctl(fd, _FICLONE, source)
            except OSError:
                _copy_range(source, fd, 0, os.fstat(source).st_size, 0)
            if self.durable:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd  # first: `discard` then never closes `source` again
        os.close(source)

    def fingerprint(self) -> Fingerprint:
        """The staged file's fingerprint now: its install keeps its inode, size and mtime (a
        rename moves only its ctime)."""
        return Fingerprint.of(os.fstat(self.fd) if self.fd is not None else os.stat(self.plan_name()))

    def leave_name(self) -> None:
        """After a failed install of recorded content: leave its name to recovery (`discard` no
        longer removes it), which installs it or finds the file changed since."""
        self.named = False

    def install(self, noreplace: bool = False, exchange: bool = False) -> bool:
        """Name the content, rename it over the target (keeping the target's mode), fsync the directory
        when durable. `noreplace`: only where nothing is (FileExistsError otherwise, nothing changed).
        `exchange`: swap it with the file found at the target (`swap_in`), which then holds the temp
        name, left to the caller (`discard` does not remove it). Whether the temp name holds a file
        the install displaced."""
        self._make_dirs()
        tmp = self.plan_name()
        if not self.named:
            assert self.fd is not None
            _link(self.fd, tmp)
            self.named = True
        try:
            st = os.stat(self.target, follow_symlinks=False)
        except FileNotFoundError:
            st = None
        if st is not None and not self.own_attributes:
            copy_xattrs(self.target, tmp)
            own = os.fstat(self.fd) if self.fd is not None else os.stat(tmp)
            if (st.st_uid, st.st_gid) != (own.st_uid, own.st_gid) and os.geteuid() == 0:
                os.chown(tmp, st.st_uid, st.st_gid)  # first: chown clears set-id bits, chmod restores them
                own = os.stat(tmp)
            if stat_mod.S_IMODE(st.st_mode) != stat_mod.S_IMODE(own.st_mode):
                os.chmod(tmp, stat_mod.S_IMODE(st.st_mode))
        displaced = False
        if noreplace:
            rename(tmp, self.target, noreplace=True)
        elif exchange and (st is None or not stat_mod.S_ISDIR(st.st_mode)):  # a directory is refused, not moved
            displaced = swap_in(tmp, self.target)
        else:
            os.replace(tmp, self.target)
        self.named = False
        if self.durable:
            fsync_dir(os.path.dirname(self.target))
        return displaced

    def discard(self) -> None:
        """Drop whatever is left of the staged content (idempotent; its descriptor is forgotten before
        it is closed, so a second call cut in between, by an interrupt, never closes that number
        again: by then it may be another file's)."""
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)
        if self.named and self.tmp is not None:
            try:
                os.unlink(self.tmp)
            except FileNotFoundError:
                pass
            self.named = False


NAME_MAX = 255


def _link(fd: int, name: str) -> None:
    """Give the unnamed file open as `fd` the name `name` (linkat through /proc)."""
    if _libc.linkat(_AT_FDCWD, f"/proc/self/fd/{fd}".encode(), _AT_FDCWD, os.fsencode(name), _AT_SYMLINK_FOLLOW) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), name)


def copy_xattrs(source: str | int, dest: str | int) -> None:
    """Carry the extended attributes (user.*, ACLs, security labels) of the file a commit replaces
    (`source`: its name or descriptor) over to its new content (`dest`: the same), as an in-place
    write would keep them, and only those: one the new content got where it was made (a directory's
    default ACL) and the file lacks is removed."""
    by_fd = isinstance(source, int)  # a descriptor is no symlink (and takes no follow_symlinks=False)
    try:
        names = os.listxattr(source, follow_symlinks=by_fd)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.ENOENT):
            return
        raise
    follow = isinstance(dest, int)  # a descriptor is no symlink (and takes no follow_symlinks=False)
    for name in set(os.listxattr(dest, follow_symlinks=follow)) - set(names):
        try:
            os.removexattr(dest, name, follow_symlinks=follow)
        except OSError as e:
            if e.errno not in (errno.ENOTSUP, errno.EPERM, errno.ENODATA):
                raise
    for name in names:
        try:
            os.setxattr(dest, name, os.getxattr(source, name, follow_symlinks=by_fd), follow_symlinks=follow)
        except OSError as e:
            if e.errno not in (errno.ENOTSUP, errno.EPERM, errno.ENODATA):
                raise


_serials = itertools.count(secrets.randbits(32))
"""Numbers that tell apart the temp names of one process: from a random start, so a process that
reuses a dead one's pid does not retrace its names."""


def _temp_base(target: str) -> str:
    """A temp name for content of `target` (no directory), within NAME_MAX bytes however long the
    target's name is, and never the name of another of this process's temp files."""
    base = os.path.basename(target)
    suffix = f".cv-{os.getpid()}-{next(_serials) & 0xFFFFFFFF:08x}.tmp"
    if len(base) * 4 > NAME_MAX - 1 - len(suffix):  # may not fit: cut its UTF-8 encoding
        base = os.fsencode(base)[: NAME_MAX - 1 - len(suffix)].decode("utf-8", "ignore")
    return f".{base}{suffix}"


def temp_name(target: str) -> str:
    """A temp name beside `target` (`_temp_base`): never a managed file (`globs.STAGED`)."""
    return os.path.join(os.path.dirname(target), _temp_base(target))


def _missing(directory: str, root: str) -> list[str]:
    """The directories from `directory` up that do not exist, innermost first: below `root`, each
    one's parent a directory there is or one of them. NotADirectoryError where a name on the way is
    something else (nothing can be made there); FileNotFoundError if `root` itself is gone
    (removed or moved while the volume was in use)."""
    missing = []
    while True:
        try:
            if stat_mod.S_ISDIR(os.stat(directory).st_mode):
                break
            raise NotADirectoryError(errno.ENOTDIR, "Not a directory", directory)
        except FileNotFoundError:
            pass
        if directory == root:
            raise root_gone(root)
        missing.append(directory)
        parent = os.path.dirname(directory)
        if parent == directory:
            break
        directory = parent
    return missing


_PROC_FD = "/proc/self/fd/"


def below_missing(path: str) -> bool:
    """Whether `path` is named beneath a descriptor of a directory other than its own
    (`VolumePaths.beneath` where its directory is missing): names on its way are still looked up."""
    return path.startswith(_PROC_FD) and path.count("/", len(_PROC_FD)) > 1


def _made_dirs(directory: str, root: str, mode: int = 0o777) -> Anchor | None:
    """mkdir -p of `directory` below `root` (never `root` itself), never through a symlink: each
    missing directory is made beneath a descriptor of the one above (mkdirat), then opened beneath
    it with no symlink (openat2 RESOLVE_NO_SYMLINKS, or O_NOFOLLOW one name at a time), and the
    next made from that descriptor. New directories get `mode` (less the umask). A name on the way
    that is a symlink (one a program put there, even right after it was made): OutsideVolume; something else that is no
    directory: NotADirectoryError; nothing is made below either. Returns a descriptor of `directory`
    where anything on its way was looked at, None where there was nothing to do: `directory` is a
    descriptor's own (`/proc/self/fd/N`, as `VolumePaths.beneath` names a parent that exists), or a
    path from the root whose directory exists (by name, as before)."""
    at: int | None = None
    if directory.startswith(_PROC_FD):
        fd, _, rest = directory[len(_PROC_FD) :].partition("/")
        if not rest:
            return None
        at = int(fd)
    else:
        try:
            if stat_mod.S_ISDIR(os.stat(directory).st_mode):
                return None
            raise NotADirectoryError(errno.ENOTDIR, "Not a directory", directory)
        except FileNotFoundError:
            pass
        if directory == root:
            raise root_gone(root)
        if not directory.startswith(root + os.sep):
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", directory)
        rest = directory[len(root) + 1 :]
    try:
        parent = Anchor(os.dup(at) if at is not None else os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC))
    except FileNotFoundError:
        raise root_gone(root) from None
    for name in rest.split("/"):
        if name in ("", ".", ".."):
            raise OutsideVolume(f"{directory!r}: {name!r} is no name of a directory to make")
        try:
            try:
                inner = open_beneath(parent.fd, name)
            except FileNotFoundError:
                try:
                    os.mkdir(name, mode, dir_fd=parent.fd)
                except FileExistsError:
                    pass  # made meanwhile (by another writer): taken if it is a directory
                inner = open_beneath(parent.fd, name)
        except OSError as e:
            path = os.path.join(os.path.realpath(f"{_PROC_FD}{parent.fd}"), name)
            if e.errno in (errno.ELOOP, errno.EXDEV):
                raise OutsideVolume(
                    f"{path!r} is a symlink now (a program put it there while the file's missing directories "
                    "were being made); nothing was written there, nor through it"
                ) from None
            if e.errno == errno.ENOTDIR:
                raise NotADirectoryError(errno.ENOTDIR, "Not a directory", path) from None
            if e.errno == errno.ENOENT:  # (the one above was removed meanwhile: its path says "(deleted)")
                raise FileNotFoundError(
                    errno.ENOENT,
                    "a directory on the file's way was removed while its directories were being made; nothing "
                    "was written there",
                    directory,
                ) from None
            e.filename = path
            raise
        parent = Anchor(inner)
    return parent


def stage(target: str, data: bytes, mode: int = 0o666, *, root: str) -> Staged:
    """Write `data` durably beside `target` (creating missing parent directories below `root`)."""
    return stage_written(target, content_hash(data), lambda write: write(data), data, mode, root=root)


def _removed(directory: str) -> bool:
    """Whether `directory` (a path, or a descriptor's `/proc/self/fd/N`) is gone: removed meanwhile."""
    try:
        return os.stat(directory).st_nlink == 0
    except FileNotFoundError:
        return True


def _open_staged(target: str, mode: int, directory: str) -> tuple[int, str | None]:
    """A new file for content of `target`, in `directory` (its own, or the nearest one there is on
    its way), open for writing: unnamed (O_TMPFILE) where the file system can, else under a temp
    name; (descriptor, that name or None)."""
    try:
        return os.open(directory, os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, mode), None
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.EPERM) and _removed(directory):  # (EPERM said permissions)
            raise FileNotFoundError(
                errno.ENOENT,
                "the file's directory was removed while it was being written; nothing was written",
                target,
            ) from None
        if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            raise
    tmp = os.path.join(directory, _temp_base(target))
    return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode), tmp


def stage_written(
    target: str,
    digest: str,
    fill: Callable[[Callable[[bytes], None]], object],
    data: bytes | None = None,
    mode: int = 0o666,
    durable: bool = True,
    *,
    root: str,
) -> Staged:
    """Stage durably beside `target`, as `stage` does, the content that `fill` writes (it is called with
    a function that appends bytes), a part at a time if it likes, so it need never be whole in memory.
    `digest` is its hash (the caller's word: `fill` raises rather than write other bytes); whatever
    `fill` raises leaves nothing staged. `data`: the same content, when the caller holds it anyway.
    `mode`: of the file when its install creates it, less the process umask (as for any new file),
    and of missing parent directories (below `root`, the volume's: never made again) with search
    bits added; an existing target keeps its own.
    Not `durable`: not fsynced, and its install fsyncs no directory.
    Where its directory is missing, it is staged in the nearest one there is, and its install makes
    the missing ones (`Staged.install`): none is made for a write that is refused."""
    makes = (root, mode | (mode & 0o444) >> 2)
    anchor: Anchor | None = None
    missing = _missing(os.path.dirname(target), root)
    at = os.path.dirname(missing[-1]) if missing else None
    fd, tmp = _open_staged(target, mode, at or os.path.dirname(target))
    if tmp is not None and at is not None:  # no O_TMPFILE here: named beside the target, where recovery
        os.close(fd)  # looks for it (`VolumePaths.staged`), so its directories are made now (beneath
        os.unlink(tmp)  # the nearest one, never through a symlink; a refused write leaves them here)
        anchor = _made_dirs(os.path.dirname(target), *makes)
        if anchor is not None:
            target = f"{_PROC_FD}{anchor.fd}/{os.path.basename(target)}"
        at = None
        fd, tmp = _open_staged(target, mode, os.path.dirname(target))
    staged = Staged(
        target,
        digest,
        fd,
        tmp,
        named=tmp is not None,
        durable=durable,
        data=data,
        makes=makes,
        at=at,
        anchor=anchor,
    )
    try:
        fill(lambda part: _write_all(fd, part))
        if durable:
            os.fsync(fd)
        if tmp is not None:
            os.close(fd)
            staged.fd = None
    except OSError as e:
        staged.discard()
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OSError(
                e.errno,
                f"{e.strerror}: the new content of {named(target)} could not be written to a staging file in its "
                "file system; nothing was changed. Free some space there, then write it again",
                named(target),
            ) from e
        raise
    except BaseException:
        staged.discard()
        raise
    return staged


def _copy_range(src: int, dst: int, start: int, end: int, at: int) -> None:
    """Copy src[start:end] (what of it exists) to dst at offset `at`, without passing through memory
    and keeping its holes: only runs that may hold data are copied, and dst is extended over a hole
    at the end. Moves src's position."""
    end = min(end, os.fstat(src).st_size)
    for begin, stop in data_runs(src, start, end):
        offset = begin
        while offset < stop:
            done = os.copy_file_range(src, dst, stop - offset, offset, at + offset - start)
            if done == 0:
                return  # src was cut meanwhile
            offset += done
    if end > start and os.fstat(dst).st_size < at + end - start:
        os.ftruncate(dst, at + end - start)


_FICLONE = 0x40049409
"""ioctl(dst, FICLONE, src): dst shares src's blocks, copied only when either is written (reflink)."""


def unnamed_copy(target: str, copy: bool) -> int:
    """An unnamed read-write file beside `target` (same file system, so a commit can link it in
    place), holding a copy of the target's current content when `copy`: sharing its blocks where
    the file system can (reflink: instant, whatever the size), else copied with its holes kept."""
    fd = os.open(os.path.dirname(target), os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    if copy:
        try:
            current = open_to_check(target, follow=True)  # a copy is no one's read: its access time stays
            try:
                try:
                    fcntl.ioctl(fd, _FICLONE, current)
                except OSError:  # no reflink here (EOPNOTSUPP, EXDEV, EINVAL, ENOTTY)
                    _copy_range(current, fd, 0, os.fstat(current).st_size, 0)
            finally:
                os.close(current)
        except BaseException:
            os.close(fd)
            raise
    return fd


def _stage_changed(target: str, change: Callable[[int], None]) -> Staged:
    """A copy of the target's current content with `change(fd)` applied; not fsynced (its commit
    decides its own durability)."""
    fd = unnamed_copy(target, copy=True)
    try:
        change(fd)
        return Staged(target, hash_fd(fd), fd, durable=False)
    except BaseException:
        os.close(fd)
        raise


def stage_appended(target: str, shadow: int, start: int) -> Staged:
    """The target's current content followed by shadow[start:]: a handle's appends, committed onto
    whatever is current."""
    return _stage_changed(
        target, lambda fd: _copy_range(shadow, fd, start, os.fstat(shadow).st_size, os.fstat(fd).st_size)
    )


def stage_resized(target: str, size: int) -> Staged:
    """The target's current content cut or zero-extended to `size` bytes, without a copy in memory."""
    return _stage_changed(target, lambda fd: os.ftruncate(fd, size))


_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2


def rename(src: str, dst: str, *, exchange: bool = False, noreplace: bool = False) -> None:
    """rename(2) with renameat2's flags (not made durable: see `sync_dirs`)."""
    flags = (_RENAME_EXCHANGE if exchange else 0) | (_RENAME_NOREPLACE if noreplace else 0)
    if not flags:
        os.rename(src, dst)
    elif _libc.renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), src, None, dst)


def swap_in(src: str, dst: str) -> bool:
    """Put the file `src` at `dst` so that nothing found there is destroyed: exchanged with it
    (renameat2 RENAME_EXCHANGE: `src` then names what `dst` held), or, where nothing is there,
    renamed without replacing (a file made there meanwhile is exchanged instead). Where the file
    system cannot exchange (EINVAL), a plain rename over `dst`. Whether `src` now names a file that
    `dst` held. A directory at `dst` (a program made it there) is never taken away: exchanged back,
    IsADirectoryError, nothing changed (an exchange works across types, where rename(2) of a file
    over a directory fails so)."""
    while True:
        try:
            rename(src, dst, exchange=True)
            if _is_directory(src):
                rename(src, dst, exchange=True)
                raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), dst)
            return True
        except OSError as e:
            if e.errno == errno.EINVAL:
                os.replace(src, dst)
                return False
            if e.errno != errno.ENOENT:
                raise
        try:
            rename(src, dst, noreplace=True)
            return False
        except FileExistsError:
            continue


def set_aside(path: str, aside: str) -> bool:
    """Move the file at `path` to `aside` (a `temp_name`), without replacing anything there, so that
    what is checked at `aside` is the very file a removal takes: a file saved at `path` afterwards
    is a new one, untouched. Whether a file was there. A directory a program made at `path` is
    moved back and IsADirectoryError raised, as unlink(2) fails there: nothing changed (unless
    something was made at `path` in between: then the directory stays at `aside`, and the error
    says so)."""
    try:
        rename(path, aside, noreplace=True)
    except FileNotFoundError:
        return False
    if _is_directory(aside):
        error = IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), named(path))
        try:
            rename(aside, path, noreplace=True)
        except FileExistsError:
            error.strerror = (
                f"{error.strerror}; that directory is at {named(aside)} now, since something was made at {named(path)}"
            )
        raise error
    return True


def remove_special(path: str) -> bool:
    """unlink(2) of what is at `path` where that is no regular file (a symlink, a FIFO, a socket, a
    device node), never of a file a program put there meanwhile: the entry is set aside first, and
    one found to be a regular file is moved back: False, nothing removed. FileNotFoundError where
    nothing is there; a directory is moved back and IsADirectoryError raised (as `set_aside`)."""
    aside = temp_name(path)
    rename(path, aside, noreplace=True)
    st = os.lstat(aside)
    if not (stat_mod.S_ISREG(st.st_mode) or stat_mod.S_ISDIR(st.st_mode)):
        os.unlink(aside)
        return True
    try:
        rename(aside, path, noreplace=True)
    except FileExistsError:
        raise SetAside(path, aside) from None
    if stat_mod.S_ISDIR(st.st_mode):
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
    return False


class SetAside(FileExistsError):
    """What a removal set aside (`remove_special`) could not go back: a program made another entry
    at its name meanwhile. `aside`: where it is."""

    def __init__(self, path: str, aside: str) -> None:
        super().__init__(
            errno.EEXIST, f"File exists: something was made at {path} while what was there was set aside to {aside}"
        )
        self.filename, self.aside = path, aside


def _is_directory(path: str) -> bool:
    return stat_mod.S_ISDIR(os.lstat(path).st_mode)


def sync_dirs(*paths: str) -> None:
    """fsync the directories holding `paths`, once each."""
    for directory in {os.path.dirname(p) for p in paths}:
        fsync_dir(directory)


def remove(target: str) -> None:
    """Unlink `target` durably."""
    os.unlink(target)
    sync_dirs(target)

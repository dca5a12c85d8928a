"""Virtual inode numbers keyed by path, so a managed file keeps its inode across commits.

A commit installs a new backing inode under the same path; the kernel must keep seeing one
inode for that path, so FUSE inodes are ours, not the backing file system's. The names of one
hard-linked (unmanaged) file share one inode, as on disk: each of them maps to it, and the inode
maps to one of them that still exists.
"""

from __future__ import annotations

import itertools
import stat as stat_mod

import pyfuse3


class InodeTable:
    """Bidirectional map inode <-> root-relative path ("" is the root), with kernel lookup counts."""

    def __init__(self) -> None:
        self._path: dict[int, str] = {pyfuse3.ROOT_INODE: ""}
        self._inode: dict[str, int] = {"": pyfuse3.ROOT_INODE}
        self._lookups: dict[int, int] = {pyfuse3.ROOT_INODE: 1}
        self._names: dict[int, set[str]] = {}
        """Every name of an inode that has more than one (hard links)."""
        self._past: dict[int, str] = {}
        """Inodes that lost their name to a newer version of the file there (`superseded`), with that
        name; it follows the file through renames and is dropped when the file goes (`unlinked`)."""
        self._swapped: set[int] = set()
        """Inodes an exchange moved while the kernel held them, until it forgets them (`swapped`)."""
        self._kinds: dict[int, int] = {}
        """The file type each inode was last described with (`retyped`), until the kernel forgets it."""
        self._next = itertools.count(pyfuse3.ROOT_INODE + 1)

    def __len__(self) -> int:
        """How many inodes the table keeps: every name's, and nameless ones until `drop`."""
        return len(self._path)

    def path(self, inode: int) -> str:
        """The path of `inode`; KeyError once it was dropped (`drop`; never for a live one)."""
        return self._path[inode]

    def child(self, parent: int, name: bytes) -> str:
        base = self._path[parent]
        text = name.decode("utf-8", "surrogateescape")
        return f"{base}/{text}" if base else text

    def inode(self, path: str) -> int:
        """The inode of `path`, allocating one on first sight (no lookup counted)."""
        inode = self._inode.get(path)
        if inode is None:
            inode = next(self._next)
            self._inode[path] = inode
            self._path[inode] = path
        return inode

    def below(self, path: str, tree: bool) -> dict[int, str]:
        """The known inode of `path` (and of every path below it when `tree`, a directory), with its
        name there. Only a directory's look touches the other paths, as in `moved`."""
        if not tree:
            inode = self._inode.get(path)
            return {} if inode is None else {inode: path}
        prefix = path + "/"
        return {inode: name for name, inode in self._inode.items() if name == path or name.startswith(prefix)}

    def inode_if_known(self, path: str) -> int | None:
        return self._inode.get(path)

    def path_if_known(self, inode: int) -> str | None:
        return self._path.get(inode)

    def remember(self, path: str) -> int:
        """The inode of `path`, counting one kernel lookup (the kernel will forget it later)."""
        inode = self.inode(path)
        self.looked_up(inode)
        return inode

    def looked_up(self, inode: int) -> None:
        """Count one kernel lookup of `inode` (one answered for a name it lost, see `lost`)."""
        self._lookups[inode] = self._lookups.get(inode, 0) + 1

    def cached(self) -> list[int]:
        """Inodes the kernel currently holds (and may cache attributes and data of)."""
        return list(self._lookups)

    def held(self, inode: int) -> bool:
        """Whether the kernel holds `inode` (its lookups are not all forgotten)."""
        return inode in self._lookups

    def forget(self, inode: int, count: int) -> bool:
        """The kernel dropped `count` references; returns whether it still holds the inode. The number
        stays bound to its path, so a file keeps its inode number for the life of the mount
        (programs like vim compare it across a save)."""
        left = self._lookups.get(inode, 0) - count
        if left > 0:
            self._lookups[inode] = left
            return True
        self._lookups.pop(inode, None)
        self._past.pop(inode, None)
        self._swapped.discard(inode)
        self._kinds.pop(inode, None)
        return False

    def retyped(self, inode: int, mode: int) -> bool:
        """Whether `inode` was described as another file type than `mode`'s while the kernel holds it
        (a name whose file a program replaced by a directory, a symlink, ... behind the mount's back):
        the kernel takes a reply that changes an inode's type for a broken file system (EIO), so
        that name needs a new inode. Otherwise `mode`'s type is the one it was described with."""
        kind = stat_mod.S_IFMT(mode)
        return self._kinds.setdefault(inode, kind) != kind

    def drop(self, inode: int) -> None:
        """Let go of `inode` if it has no name (`unlinked`, `apart`) and the kernel forgot it: no path
        leads to it any more, so it would stay in the table for the life of the mount. The caller
        knows that nothing else uses it (no open handle)."""
        if inode not in self._lookups and "\0" in self._path.get(inode, ""):
            del self._path[inode]
            self._kinds.pop(inode, None)

    def link(self, inode: int, path: str) -> None:
        """`path` (no name yet) is another name of `inode`, a hard link of its file (one unlinked while
        open gets its name back)."""
        current = self._path[inode]
        if "\0" in current:
            self._path[inode] = path
            self._past.pop(inode, None)
        else:
            self._names.setdefault(inode, {current}).add(path)
        self._inode[path] = inode

    def unlinked(self, path: str) -> None:
        """`path` is gone: a later file at the same path gets a new inode. An inode with another name
        goes on by that name. Past versions of the file there (`superseded`) are of no file now."""
        if self._past:
            self._past = {held: name for held, name in self._past.items() if name != path}
        inode = self._inode.pop(path, None)
        if inode is None:
            return
        others = self._names.pop(inode, set()) - {path}
        if others:
            if self._path[inode] == path:
                self._path[inode] = min(others)
            if len(others) > 1:
                self._names[inode] = others
            return
        self._path[inode] = path + "\0deleted"

    def superseded(self, path: str) -> None:
        """The file at `path` has a newer version, which a later lookup gives a new inode (as `unlinked`);
        the inode it had holds a past version of that file, whose name is `path` (`current_name`)."""
        past = {held: name for held, name in self._past.items() if name == path}
        old = self._inode.get(path)
        self.unlinked(path)
        if old is not None and self._path[old] == path + "\0deleted":
            past[old] = path
        self._past.update(past)

    def current_name(self, inode: int) -> str | None:
        """The name of the file `inode` holds a past version of (`superseded`), while that file has one."""
        return self._past.get(inode)

    def not_superseded(self, inode: int) -> None:
        """`inode` holds a past version of no file at a name now (that file was deleted, outside the
        mount, and maybe made anew: `current_name` no longer says its name)."""
        self._past.pop(inode, None)

    def apart(self, path: str) -> int:
        """A new inode for the file at `path` that its name does not map to (a write handle's own: see
        the mount's `lookup`), nameless as after `unlinked`."""
        inode = next(self._next)
        self._path[inode] = path + "\0deleted"
        return inode

    def lost(self, inode: int, path: str) -> bool:
        """Whether `inode` lost the name `path` (`unlinked`) and has no other."""
        return self._path.get(inode) == path + "\0deleted"

    def rebind(self, inode: int, path: str) -> None:
        """`inode`, which lost its name `path` (`unlinked`), is `path`'s again; the inode there now
        loses it. The file is the same: past versions of it keep its name (`superseded`)."""
        past = {held: name for held, name in self._past.items() if name == path and held != inode}
        self.unlinked(path)
        self._past.update(past)
        self._path[inode] = path
        self._inode[path] = inode

    def swapped(self, inode: int) -> bool:
        """Whether an exchange moved `inode` while the kernel held it: a call on it may come from a path
        walk that found it by the name it had before, which the other side of the exchange has now."""
        return inode in self._swapped

    def _renamed(self, inode: int, old: str, new: str) -> None:
        self._inode[new] = inode
        if self._path[inode] == old:
            self._path[inode] = new
        names = self._names.get(inode)
        if names is not None:
            names.discard(old)
            names.add(new)

    def moved(self, old: str, new: str, tree: bool) -> None:
        """`old` is now `new` (with everything below it when `tree`, a directory); whatever was at
        `new` is gone. A file's move is O(1); only a directory's touches the paths below it."""
        self.unlinked(new)
        for held, name in self._past.items():  # past versions follow their file
            if name == old or (tree and name.startswith(old + "/")):
                self._past[held] = new + name[len(old) :]
        if not tree:
            inode = self._inode.pop(old, None)
            if inode is not None:
                self._renamed(inode, old, new)
            return
        prefix = old + "/"
        for path in [p for p in self._inode if p == old or p.startswith(prefix)]:
            self._renamed(self._inode.pop(path), path, new + path[len(old) :])

    def exchanged(self, a: str, b: str, tree: bool) -> None:
        tmp = "\0exchange"
        self.moved(a, tmp, tree)
        self.moved(b, a, tree)
        self.moved(tmp, b, tree)
        self._swapped.update(inode for inode in (*self.below(a, tree), *self.below(b, tree)) if inode in self._lookups)

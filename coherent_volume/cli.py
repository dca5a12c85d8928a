"""The `coherent-volume` command: a thin presentation layer over core and report.

Human output is a table (rich); `--json` output is for tools and keeps every field. Diffs and a
version's bytes are printed as they are. Typed errors are messages with an exit status per kind
(EXIT_*), never tracebacks.
"""

from __future__ import annotations

import datetime as dt
import errno
import io
import json
import math
import os
import shlex
import signal
import stat
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any, NoReturn

import click

from . import report
from .core import VolumeCore, open_core, validate_agent
from .errors import CoherenceError, DamagedContent, RegistryError, StaleWriteError, VersionGone, VolumeConfigError
from .fingerprint import file_identity
from .globs import REGISTRY_DIR, ManagedGlobs
from .paths import Target, is_registry_path, shown
from .policy import MAX_COUNT, MAX_KEEP_DAYS, Policy, Retention
from .protocol import EXTERNAL, FileRecord
from .registry import recorded_in

EXIT_ERROR = 1
"""Any other error (click uses 2 for bad usage)."""
EXIT_REFUSED = 3
"""A write (`restore`) was refused (StaleWriteError): nothing was changed."""
EXIT_GONE = 4
"""The version asked for has no bytes: it never existed, is a deletion, was pruned or was never kept (VersionGone)."""
EXIT_DAMAGED = 5
"""The version's stored bytes no longer match its hash: they are never served (DamagedContent)."""
EXIT_INTERRUPTED = 130
"""`log --follow` was ended by Ctrl-C (SIGINT), its documented end: the shell's status for it."""


def _when(ts: float | None) -> str:
    """A registry time as local date and time; one no calendar holds (a clock gone wild) as its number."""
    if ts is None:
        return "-"
    try:
        return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")
    except (OverflowError, OSError, ValueError):
        return f"{ts:g} s after 1970"


def _console() -> Any:
    # imported lazily: hooks and scripts must start fast
    from rich.console import Console

    # markup and emoji codes off: paths and agent names are data ("plans/[bold]:x:.md" prints as it is)
    class _Console(Console):
        def on_broken_pipe(self) -> None:  # (rich's own exits 1, an error's status: /tmp/s33cli 9)
            _end_by_sigpipe()

    return _Console(
        highlight=False, markup=False, emoji=False, soft_wrap=True, width=None if sys.stdout.isatty() else 160
    )


PLAIN_ROWS = 500
"""Rows past which a table prints as plain columns (`_Columns`): rich lays out every cell, 1 to 2 ms
a row here (`status` of 50,000 managed files took 55 s, its --json 7 s). Such a table keeps each row
on one line, where rich fits a table wider than the console to it, folding its cells."""


def _table(title: str, columns: list[str], rows: list[list[str]]) -> Any:
    cells = [[shown(cell) for cell in row] for row in rows]  # data: a name prints as one line, escapes and all
    if len(cells) > PLAIN_ROWS:
        return _Columns(title, columns, cells)
    from rich.table import Table

    table = Table(title=title, title_justify="left", show_edge=False, header_style="bold")
    for column in columns:
        table.add_column(column, overflow="fold")  # a path too long for its cell wraps, never cut
    for row in cells:
        table.add_row(*row)
    return table


class _Columns:
    """A table drawn as rich draws `_table`'s, each column as wide as its widest cell, whole however
    long (printed as it is: `_console` soft-wraps)."""

    def __init__(self, title: str, columns: list[str], rows: list[list[str]]) -> None:
        self.title, self.columns, self.rows = title, columns, rows

    def __rich_console__(self, console: Any, options: Any) -> Iterator[Any]:
        from rich.cells import cell_len
        from rich.segment import Segment
        from rich.style import Style

        widths = [max([cell_len(c)] + [cell_len(row[i]) for row in self.rows]) for i, c in enumerate(self.columns)]

        def line(cells: list[str], bar: str) -> str:
            return bar.join(
                f" {cell}{' ' * (width - cell_len(cell))} " for cell, width in zip(cells, widths, strict=True)
            )

        yield Segment(self.title, Style(italic=True))
        yield Segment("\n")
        yield Segment(line(self.columns, "┃"), Style(bold=True))
        yield Segment("\n" + "╇".join("━" * (width + 2) for width in widths) + "\n")
        yield Segment("".join(line(row, "│") + "\n" for row in self.rows))


def _json(data: object) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True))


def _let_stdout_go() -> None:
    """Point stdout at /dev/null once it cannot be written (a closed pipe, a full disk), so nothing is
    left to flush at exit."""
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, sys.stdout.fileno())
    os.close(null)


def _done(report: object, as_json: bool = False) -> None:
    """Print what a command that changed something (a volume, a mount, a settings file) did
    (`report`: text, or data printed as JSON with `as_json`): where stdout cannot be written (a
    closed pipe, a full disk), on stderr instead, saying so, and the exit status stays 0: the change
    was made, so the report is never lost nor the change taken for a failure."""
    text = json.dumps(report, indent=2, sort_keys=True) if as_json else str(report)
    try:
        click.echo(text)
        sys.stdout.flush()
    except OSError as e:
        _let_stdout_go()
        click.echo(f"coherent-volume: stdout could not be written ({e.strerror or e}); done:\n{text}", err=True)


def _fail(error: BaseException, code: int, as_json: bool = False) -> NoReturn:
    """End the command as click ends one on an error: its message on stderr, exit status `code`;
    with `as_json`, also the error as JSON on stdout (`_error_json`), where a tool reads."""
    if as_json:
        _echo_json(_error_json(error, code))
    click.echo(f"Error: {error}", err=True)
    raise click.exceptions.Exit(code) from error


def _echo_json(text: str) -> None:
    """An error as JSON on stdout, where it can be written: stdout may be what failed (a full disk,
    a closed pipe), and the message goes to stderr anyway."""
    if sys.stdout is None:  # (started with its stdout closed)
        return
    try:
        click.echo(text)
        sys.stdout.flush()
    except OSError:
        _let_stdout_go()


def _error_json(error: BaseException, code: int) -> str:
    """What a `--json` command prints on stdout when it fails, one line (`log --json` prints one
    object per line): the error's kind (its class), its message and the exit status."""
    kind = "UsageError" if isinstance(error, click.UsageError) else type(error).__name__
    message = error.format_message() if isinstance(error, click.ClickException) else str(error)
    return json.dumps({"error": {"kind": kind, "message": message, "exit_status": code}}, sort_keys=True)


def _end_by_sigpipe() -> NoReturn:
    """End as a program SIGPIPE kills ends, the reader of its output gone (`status | true`,
    `log -p | head`): silently, status 141 in the shell, so `set -o pipefail` takes `cv log | head`
    as `yes | head` (before, exit status 1, that of an error: /tmp/s33cli 9). Python ignores the
    signal, so it is made deadly again and sent to this process."""
    _let_stdout_go()
    sys.stderr.flush()
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGPIPE)
    raise click.exceptions.Exit(128 + signal.SIGPIPE)  # (only where the signal is blocked)


class _ClosedStdout(io.TextIOBase):
    """What stands for stdout when the command was started with it closed: every write fails
    EBADF, so a report goes to stderr (`_done`) and any other output ends the command with an error
    saying so, never a traceback."""

    def write(self, text: str) -> int:
        raise OSError(errno.EBADF, "stdout is closed")

    def fileno(self) -> int:
        return 1


def _guard(fn: Callable[..., None]) -> Callable[..., None]:
    """Turn our typed errors into a clear message and their exit status (never a traceback); a
    command run with `--json` prints its error as JSON on stdout too (`_error_json`)."""

    def wrapper(*args: Any, **kwargs: Any) -> None:
        as_json = bool(kwargs.get("as_json"))
        if sys.stdout is None:  # started with stdout closed (`>&-`): writing it fails as a closed pipe does
            sys.stdout = _ClosedStdout()
        try:
            fn(*args, **kwargs)
            if sys.stdout is not None:
                sys.stdout.flush()  # here, where a reader gone is seen, not at exit
        except StaleWriteError as e:
            _fail(e, EXIT_REFUSED, as_json)
        except VersionGone as e:
            _fail(e, EXIT_GONE, as_json)
        except DamagedContent as e:
            _fail(e, EXIT_DAMAGED, as_json)
        except BrokenPipeError:  # the reader left (`log -p | head`): end as other tools do
            _end_by_sigpipe()
        except (CoherenceError, OSError) as e:
            _fail(e, EXIT_ERROR, as_json)
        except click.ClickException as e:  # a usage error found past parsing (`UsageError`: status 2)
            if as_json:
                _echo_json(_error_json(e, e.exit_code))
            raise

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


def _agent_name(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """The callback of every option and argument naming an agent: the name as `validate_agent`
    checks it (a reserved or malformed one is an error, exit status 1, as JSON too with `--json`)."""
    if value is None:
        return None
    try:
        return validate_agent(value)
    except CoherenceError as e:
        if ctx.params.get("as_json"):  # (`--json` is eager: known by now wherever it was given)
            _echo_json(_error_json(e, EXIT_ERROR))
        raise click.ClickException(str(e)) from e


HISTORY_SHOWN = 50
"""Versions `history` lists by default as a table (the newest; its help says the number); --all
lists every one, --json too."""


class _Days(click.FloatRange):
    """A number of days in range: not NaN, which compares with no bound and so passes FloatRange."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        days = super().convert(value, param, ctx)
        if math.isnan(days):
            self.fail(f"{value!r} is not a number of days", param, ctx)
        return days


def _policy_options(fn: Callable[..., None]) -> Callable[..., None]:
    """The options that set a volume's policy (`init`, `policy`)."""
    options = [
        click.option(
            "--merge",
            "merge",
            multiple=True,
            metavar="GLOB",
            help="Managed paths whose stale writes are merged three-way when the changes do not overlap "
            "(repeatable; replaces the stored list; a glob no managed path can match is refused).",
        ),
        click.option(
            "--keep-days",
            type=_Days(min=0, max=MAX_KEEP_DAYS),
            help="Keep every version this many days, unless --max-store-bytes needs them pruned sooner.",
        ),
        click.option(
            "--keep-last", type=click.IntRange(min=1, max=MAX_COUNT), help="Keep at least this many versions per path."
        ),
        click.option(
            "--max-store-bytes",
            type=click.IntRange(min=0, max=MAX_COUNT),
            help="Prune older versions (beyond --keep-last), however young, while the content exceeds this many bytes.",
        ),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _changed_policy(
    current: Policy,
    merge: tuple[str, ...],
    keep_days: float | None,
    keep_last: int | None,
    max_store_bytes: int | None,
) -> Policy:
    r = current.retention
    return Policy(
        merge or current.merge,
        Retention(
            r.keep_days if keep_days is None else keep_days,
            r.keep_last if keep_last is None else keep_last,
            r.max_bytes if max_store_bytes is None else max_store_bytes,
        ),
    )


def _describe(p: Policy) -> str:
    r = p.retention
    budget = "no size budget" if r.max_bytes is None else f"within {r.max_bytes} bytes"
    merge = ", ".join(p.merge) if p.merge else "none"
    return f"merge: {merge}; keep versions {r.keep_days:g} days, at least the last {r.keep_last} per path, {budget}"


class _Root(click.Path):
    """An existing directory ROOT (a volume's root or mountpoint); a mount whose daemon is gone is
    said to be one, not taken for a missing directory."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if value == "":  # (`init ''` said "[Errno 2] No such file or directory: ''": /tmp/s33cli 8)
            self.fail("an empty path names no directory", param, ctx)
        try:
            os.statvfs(value)  # (it always reaches a mount's daemon; stat may be answered from the kernel's cache)
        except OSError as e:
            if e.errno in (errno.ENOTCONN, errno.ECONNABORTED):
                mountpoint = _mount_above(value)
                self.fail(
                    f"{value!r} is {'' if mountpoint == value else f'in {mountpoint!r}, '}a mount whose daemon is "
                    f"gone (the kernel says: {e.strerror}): unmount it (`coherent-volume unmount "
                    f"{shlex.quote(mountpoint)}`) and mount the volume again",
                    param,
                    ctx,
                )
        else:
            if not stat.S_ISDIR(os.stat(value).st_mode):  # (click lets a FIFO or a device pass for one)
                self.fail(f"{value!r} is not a directory", param, ctx)
        return super().convert(value, param, ctx)


def _mount_above(path: str) -> str:
    """The mountpoint of the volume mount that `path` (a symlink to it, or a path inside it) lies
    in, as mountinfo names it; `path` itself if none is found."""
    from .mounts import mount_holding

    mounted = mount_holding(os.path.realpath(path))
    return path if mounted is None else mounted.mountpoint


class _Mountpoint(click.Path):
    """A mountpoint: never empty (`mount ROOT ''` took the working directory for it)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if value == "":
            self.fail("an empty path names no directory", param, ctx)
        return super().convert(value, param, ctx)


ROOT = _Root(exists=True, file_okay=False)
"""The type of a command's ROOT argument."""
NEW_ROOT = _Root(file_okay=False)
"""The type of `init`'s ROOT, which may not exist yet."""


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Shared workspace where a stale write fails closed instead of silently losing work."""


def _first_missing(path: str) -> str | None:
    """The outermost directory of `path` that does not exist yet (None: all of it exists)."""
    missing = None
    while not os.path.lexists(path):
        missing, parent = path, os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return missing


def _undo_made(root: str, made: str) -> None:
    """Remove what a refused `init` made: the directories from ROOT up to `made`, each only while it
    is empty, and ROOT's registry directory only while it holds no registry, only lock files. What
    another process put there meanwhile (a volume made inside, its commits) stays whole."""
    coherent = os.path.join(root, REGISTRY_DIR)
    try:
        if not recorded_in(coherent) and all(name.endswith(".lock") for name in os.listdir(coherent)):
            for name in os.listdir(coherent):
                os.unlink(os.path.join(coherent, name))
            os.rmdir(coherent)
    except OSError:
        pass
    path = root
    while path == made or path.startswith(made + os.sep):
        try:
            os.rmdir(path)
        except OSError:
            return
        path = os.path.dirname(path)


@main.command()
@click.argument("root", type=NEW_ROOT)
@click.option(
    "--managed",
    "-m",
    "globs",
    multiple=True,
    metavar="GLOB",
    help="Glob of paths the protocol protects (repeatable), e.g. 'plans/**'; required unless ROOT joins an "
    "existing PostgreSQL volume (--registry, --volume).",
)
@click.option(
    "--registry",
    metavar="URL",
    help="Keep the registry and the versions' content in PostgreSQL: postgresql://USER@HOST:PORT/DB "
    "(no password: libpq's PGPASSFILE, PGSERVICEFILE or environment carry it). Default: SQLite in ROOT.",
)
@click.option("--volume", metavar="NAME", help="The volume's name in the PostgreSQL database (with --registry).")
@_policy_options
@_guard
def init(root: str, globs: tuple[str, ...], registry: str | None, volume: str | None, **policy: Any) -> None:
    """Create a volume at ROOT managing GLOB paths (idempotent with the same globs), with its merge
    globs and retention policy (`coherent-volume policy` changes them later). With --registry and
    --volume naming an existing PostgreSQL volume, ROOT joins it as another working copy (on this
    or any host): every managed file's current version is installed into ROOT."""
    if volume is not None and registry is None:
        raise click.UsageError("--volume names a volume in a PostgreSQL registry: give --registry too")
    if not globs and registry is None:
        raise click.UsageError("give the managed paths (--managed GLOB), or join a PostgreSQL volume (--registry)")
    _changed_policy(Policy(), **policy)  # bad values refused before anything is written
    if globs and policy["merge"]:  # (joining, the globs are the volume's)
        Policy(policy["merge"]).check_merges(ManagedGlobs.of(globs))
    made = _first_missing(os.path.abspath(root))
    os.makedirs(root, exist_ok=True)
    try:
        core = open_core(root, globs or None, registry=registry, volume=volume)
        before: dict[str, FileRecord] = {}
        unchecked: list[tuple[str, str]] = []
        if registry is not None:  # a copy: every managed file brought in
            with core.registry.read() as tx:
                before = {record.path: record for record in tx.files()}
            try:
                unchecked = core.scan()
            except RegistryError as e:  # what the last step did not do, not what init did
                raise RegistryError(
                    f"{core.paths.root} joined the volume, but bringing its managed files in stopped: {e}. The files "
                    "brought in so far hold current versions; run this init again to bring in the rest",
                    e.errno,
                ) from e
    except BaseException:
        if made is not None:
            _undo_made(os.path.abspath(root), made)
        raise
    for rel, why in unchecked:
        click.echo(f"not checked: {shown(rel)}: {why}", err=True)
    if registry is not None:
        _say_taken_in(core, before)
    if any(value not in (None, ()) for value in policy.values()):
        core.set_policy(_changed_policy(core.policy(), **policy))
    _done(f"volume {core.paths.root} manages: {', '.join(core.paths.globs.patterns)}\n{_describe(core.policy())}")


def _say_taken_in(core: VolumeCore, before: dict[str, FileRecord]) -> None:
    """After a working copy's first scan: each managed file of its root that differed from the
    volume's record (`before` the scan) is now a version by `external`, the current one on every
    host; say which, and how to see the version it went over."""
    root = shlex.quote(core.paths.root)
    with core.registry.read() as tx:
        after = [record for record in tx.files() if record.writer == EXTERNAL]
    for record in after:
        old = before.get(record.path)
        if old is not None and old.version == record.version:
            continue
        rel = shlex.quote(record.path)
        if old is None or not old.present:
            click.echo(
                f"taken in: {shown(record.path)}: a file the volume did not hold, now its v{record.version} "
                "(by external) on every host",
                err=True,
            )
            continue
        click.echo(
            f"taken in: {shown(record.path)}: this root held other bytes than the volume's v{old.version} "
            f"(by {old.writer}); they are now its v{record.version} (by external) on every host, and v{old.version} "
            f"stays in history: `coherent-volume diff {root} {rel} {old.version} {record.version}` shows the change, "
            f"`coherent-volume show {root} {rel} --version {old.version}` its bytes (an agent that read the file "
            "takes them back with `restore`)",
            err=True,
        )


@main.command()
@click.option(
    "--registry", metavar="URL", required=True, help="The PostgreSQL database: postgresql://USER@HOST:PORT/DB."
)
@_guard
def migrate(registry: str) -> None:
    """Bring a PostgreSQL registry's schema to the version this coherent-volume needs (in one transaction)."""
    from .registry.postgresql import migrate as run

    before, after = run(registry)
    _done(f"schema version {after}" + (" (it was already)" if before == after else f" (was {before})"))


@main.command()
@click.argument("root", type=ROOT)
@_policy_options
@click.option("--no-merge", is_flag=True, help="Merge no path any more.")
@click.option("--json", "as_json", is_flag=True, is_eager=True, help="Machine-readable output.")
@_guard
def policy(root: str, no_merge: bool, as_json: bool, **changes: Any) -> None:
    """Show the volume's merge globs and retention policy, or change them (options given)."""
    if no_merge and changes["merge"]:
        raise click.UsageError("--merge sets merge globs and --no-merge removes them all: give one of them")
    core = _open(root)
    current = core.policy()
    if no_merge:
        current = Policy((), current.retention)
    if no_merge or any(value not in (None, ()) for value in changes.values()):
        current = _changed_policy(current, **changes)
        core.set_policy(current)
    if as_json:
        _done(json.loads(current.to_json()), as_json)
    else:
        _done(_describe(current))


@main.command()
@click.argument("root", type=ROOT)
@click.option("--json", "as_json", is_flag=True, is_eager=True, help="Machine-readable output.")
@_guard
def prune(root: str, as_json: bool) -> None:
    """Drop the stored bytes of versions the retention policy no longer keeps, to the end (commits
    also do this hourly, a short step per commit)."""
    done = _open(root).prune()
    if as_json:
        _done(asdict(done), as_json)
    else:
        _done(f"pruned {done.versions} versions: {done.objects} stored objects, {done.bytes} bytes freed")


@main.command()
@click.argument("root", type=ROOT)
@click.option(
    "--json", "as_json", is_flag=True, is_eager=True, help="Machine-readable output (always lists every path)."
)
@click.option("--all", "show_all", is_flag=True, help="Also list deleted paths (temp files of editors and tools).")
@click.option(
    "--hosts",
    is_flag=True,
    help="List the volume's working copies instead: host, root, boot, last seen, how far behind each is.",
)
@_guard
def status(root: str, as_json: bool, show_all: bool, hosts: bool) -> None:
    """Each managed file (version, last writer, when, grant holder) and each agent's stale views;
    with --hosts, each working copy of the volume (nothing is checked or changed). ROOT may also be
    a mountpoint of the volume, or a directory inside it (its volume's status is shown, said so on
    stderr)."""
    root = _volume_root(root)
    if hosts:
        if show_all:
            raise click.UsageError("--all lists deleted paths, --hosts working copies: give one of them")
        _hosts(report.hosts(_open(root)), as_json)
        return
    st = report.status(_open(root))
    if as_json:
        _json(st.as_json())
        return
    console = _console()
    console.print(f"volume {shown(st.root)}  managed: {', '.join(map(shown, st.managed))}")
    if st.store is not None:
        console.print(f"content store: {st.store.objects} objects, {_size(st.store.bytes)}")
    for mountpoint, direct in st.mounts.items():
        served = f" (served directly by the kernel: {', '.join(direct)})" if direct else ""
        if mountpoint in st.gone:
            served += (
                ": its daemon is gone (killed), so every use there fails (Transport endpoint is not connected): "
                f"`coherent-volume unmount {shown(shlex.quote(mountpoint))}` removes the mount; then mount it again"
            )
        console.print(f"mounted at {shown(mountpoint)}{served}")
    listed = [f for f in st.files if show_all or f.present or f.holder or not f.version]
    console.print(
        _table(
            "files",
            ["path", "version", "last writer", "when", "grant holder"],
            [
                [
                    f.path + ("" if f.present or not f.version else " (deleted)"),
                    str(f.version),
                    f.writer,
                    _when(f.committed_at),
                    f"{f.holder} (until {_when(f.holder_expires_at)})" if f.holder else "-",
                ]
                for f in listed
            ],
        )
    )
    if len(listed) < len(st.files):
        console.print(f"({len(st.files) - len(listed)} deleted paths not shown; --all lists them)")
    console.print(
        _table(
            "agents",
            ["agent", "views", "stale", "last read"],
            [[a.agent, str(a.views), str(a.stale), _when(a.last_read)] for a in st.agents],
        )
    )
    for u in st.unchecked:
        console.print(f"not checked: {shown(u.path)}: {u.problem}")


def _volume_root(root: str) -> str:
    """ROOT, or, when it is a directory inside a volume (plain or mounted) and no volume's root or
    mountpoint itself, that volume's root, said on stderr."""
    from .hook_paths import located
    from .mounts import fuse_mounts

    real = os.path.realpath(root)
    if real in fuse_mounts() or os.path.lexists(os.path.join(real, REGISTRY_DIR)):
        return root  # a volume's own (opening it says what is wrong with it, if anything)
    found = located(real)
    if found is None or is_registry_path(os.path.relpath(real, found.root)):
        return root  # in no volume, or in its registry directory: opening it says so
    click.echo(
        f"{root} is a directory inside the volume at {found.root}, not its root: the status of that volume follows",
        err=True,
    )
    return found.root


def _ago(seconds: float) -> str:
    """A duration for people: 12 s, 4 min, 3 h, 2 d."""
    seconds = max(seconds, 0.0)  # commit times come from the committing host's clock
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= 2 * size:
            return f"{seconds // size:.0f} {unit}"
    return f"{seconds:.0f} s"


def _hosts(h: report.Hosts, as_json: bool) -> None:
    if as_json:
        _json(h.as_json())
        return
    console = _console()
    console.print(f"volume {h.root}: {h.registry}")
    rows = []
    for c in h.copies:
        behind = "-" if c.behind == 0 else f"{c.behind} path" + ("s" if c.behind > 1 else "")
        if c.behind_for is not None:
            behind += f" (oldest missing commit {_ago(c.behind_for)} ago)"
        rows.append(
            [
                (c.replica or "-")[:8],
                c.hostname,
                c.root + (" (this one)" if c.this else ""),
                c.boot_id[:8],
                f"{_ago(c.seen_ago)} ago",
                behind,
            ]
        )
    console.print(_table("working copies", ["copy", "host", "root", "boot", "last seen", "behind"], rows))


@main.command()
@click.argument("root", type=ROOT)
@click.argument("copy")
@click.option("--json", "as_json", is_flag=True, is_eager=True, help="Machine-readable output.")
@_guard
def forget(root: str, copy: str, as_json: bool) -> None:
    """Remove another working copy of a PostgreSQL volume from its registrations (COPY: the start of
    its id, as `status --hosts` shows it), once it has been unseen for an hour. Its files are not
    touched; if it is used again, its next open fails until `init` makes it a working copy again."""
    gone = report.forget(_open(root), copy)
    if as_json:
        _done(asdict(gone), as_json)
    else:
        _done(
            f"forgot the working copy {gone.replica}: {gone.hostname}:{gone.root}, last seen {_ago(gone.seen_ago)} ago"
        )


def _made(kind: str, parents: tuple[int, ...]) -> str:
    """A version's kind, with what a restore or merge was made from."""
    if kind == "restore" and parents:
        return f"restore of v{parents[0]}"
    if kind == "merge" and parents:
        return f"merge of v{parents[0]} and v{parents[-1]}"
    return kind


def _event_row(line: report.LogLine) -> list[str]:
    """A log line as a row: its detail's first line only (a conflict's hunks follow it: `why`)."""
    e = line.event
    if e.kind == "refusal":
        what = f"{e.reason}: read v{e.seen_version if e.seen_version is not None else '-'}, current v{e.version}"
    elif e.kind == "conflict":  # its detail names the versions
        what = ""
    elif line.parents:
        what = f"v{e.version} ({_made(line.kind, line.parents)})"
    elif e.version is not None:
        what = f"v{e.version}" + (f" (from v{e.seen_version})" if e.seen_version is not None else "")
    else:
        what = ""
    if e.detail:  # (names in it, a read-set refusal's changed paths, shown escaped as any name)
        what = shown(f"{what} {e.detail.partition(chr(10))[0]}".strip())
    return [str(e.seq), _when(e.at), line.kind, shown(e.path) if e.path else "-", e.agent or "-", what]


_LOG_COLUMNS = ["seq", "when", "event", "path", "agent", "detail"]


@main.command()
@click.argument("root", type=ROOT)
@click.option("--follow", "-f", is_flag=True, help="Keep printing new events until interrupted.")
@click.option("--json", "as_json", is_flag=True, is_eager=True, help="One JSON object per line.")
@click.option(
    "--limit",
    "-n",
    type=click.IntRange(min=1),
    default=50,
    show_default=True,
    help="How many of the latest events to show first.",
)
@click.option("--patch", "-p", is_flag=True, help="Show each version's diff against the version before it.")
@_guard
def log(root: str, follow: bool, as_json: bool, limit: int, patch: bool) -> None:
    """Commits, refusals (with reason), merge conflicts, foreign writes, grants and reclaims,
    oldest first. A commit is named by the kind of version it made, as `history` names it
    (commit, merge, restore), with the versions a merge or restore was made from ("parents").

    With -p, each event that made a version is followed by its diff against the version before
    it (none for binary content; a note when either version's bytes are not retained); --json
    adds them as "diff" and "diff_note"."""
    if follow:
        try:
            _log(root, follow, as_json, limit, patch)
        except KeyboardInterrupt:  # (Ctrl-C, its documented end: not click's "Aborted!", status 1)
            raise click.exceptions.Exit(EXIT_INTERRUPTED) from None
    else:
        _log(root, follow, as_json, limit, patch)


def _log(root: str, follow: bool, as_json: bool, limit: int, patch: bool) -> None:
    core = _open(root)
    batch, mark = report.events(core, limit=limit)

    def emit(items: list[report.LogLine]) -> None:
        if as_json:
            for line in items:
                data = line.as_json()
                if patch:
                    shown = report.commit_diff(core, line)
                    data["diff"], data["diff_note"] = (shown.diff, shown.note) if shown else (None, None)
                click.echo(json.dumps(data, sort_keys=True))
        elif follow or patch:
            for line in items:
                click.echo("  ".join(_event_row(line)))
                if patch:
                    _echo_diff(report.commit_diff(core, line))
        else:
            _console().print(_table("log", _LOG_COLUMNS, [_event_row(line) for line in items]))
        sys.stdout.flush()

    emit(batch)
    registry = os.path.join(core.paths.root, REGISTRY_DIR)
    anchor = file_identity(registry)
    while follow:
        time.sleep(0.2)
        try:
            gone = file_identity(registry) != anchor or not recorded_in(registry)
            if not gone:
                batch, mark = report.events_since(core, mark)
        except (PermissionError, RegistryError) as e:
            if isinstance(e, PermissionError) or isinstance(e.__cause__, PermissionError):
                continue  # not allowed to look for a while (its permissions changed): that is not gone
            raise
        if gone:
            raise VolumeConfigError(
                f"{shown(core.paths.root)}: the volume followed is gone (its {REGISTRY_DIR} directory was removed, "
                "moved or made anew): nothing more will be logged there; follow the volume where it is now"
            )
        if batch:
            emit(batch)


def _echo_diff(shown: report.VersionDiff | None) -> None:
    """A diff as it is, or the note saying why there is none."""
    if shown is None:
        return
    if shown.diff:
        click.echo(shown.diff, nl=False)
    elif shown.note:
        click.echo(f"    ({shown.note})")


def _size(n: int) -> str:
    """`n` bytes for people: 512 bytes, 1.5 KiB, 3.2 MiB, 2.0 GiB."""
    if n < 1024:
        return f"{n} bytes"
    power = min((n.bit_length() - 1) // 10, 3)
    return f"{n / 1024**power:.1f} {('KiB', 'MiB', 'GiB')[power - 1]}"


def _open(root: str) -> VolumeCore:
    """The volume at ROOT; ROOT may also be where it is mounted, or a symlink to either (its backing
    root is opened). A directory inside a volume that is not its root is refused, naming the root."""
    from .hook_paths import located
    from .mounts import fuse_mounts

    real = os.path.realpath(root)
    if (
        real not in fuse_mounts()
        and not recorded_in(os.path.join(real, REGISTRY_DIR))
        and (found := located(real)) is not None
    ):
        raise VolumeConfigError(
            f"{root} is a directory inside the volume at {found.root}, not its root: give {found.root} "
            "(nothing was changed)"
        )
    return open_core(root)


def _target(
    args: tuple[str, ...], extra: int = 0, versions: bool = False
) -> tuple[VolumeCore, Target, tuple[str, ...]]:
    """The volume and file named by `[ROOT] PATH` at the start of `args`, and the (at most `extra`)
    arguments after them. ROOT is a volume root or a mountpoint of one; without it, PATH is a path
    inside a volume (mounted or not). With `extra`, a first argument that is a directory is ROOT.
    `versions`: the file is asked about its versions (`CoreBase.resolve_name`)."""
    from .hook_paths import locate

    if len(args) == 2 + extra or (len(args) > 1 and os.path.isdir(args[0])):
        root, path, rest = args[0], args[1], args[2:]
        ROOT.convert(root, None, None)  # a usage error (exit status 2) unless a directory, as a ROOT argument's
        given = os.path.abspath(root)
        if os.path.isabs(path) and path.startswith(given + os.sep):
            path = os.path.relpath(path, given)  # a path through the mountpoint given as ROOT
    elif args and (found := locate(args[0])) is not None:
        (root, path), rest = found, args[1:]
    else:
        raise click.UsageError("give ROOT PATH, or a PATH inside a volume (its root or a mount of it)")
    if len(rest) > extra:
        raise click.UsageError(f"unexpected arguments: {' '.join(rest[extra:])}")
    core = _open(root)
    return core, core.resolve_name(path) if versions else core.resolve(path), rest


@main.command()
@click.argument("paths", nargs=-1, required=True, metavar="[ROOT] PATH")
@click.option("--json", "as_json", is_flag=True, is_eager=True, help="Machine-readable output.")
@_guard
def why(paths: tuple[str, ...], as_json: bool) -> None:
    """Why a write to PATH was refused: the refusal, who changed the file since (and the diff from
    the refused agent's view to the current version; for a write that was to be merged, the hunks
    that overlapped), and what to do.

    Give the volume ROOT and a PATH in it, or just a PATH inside a volume (mounted or not)."""
    core, target, _ = _target(paths)
    answer = report.why(core, target)
    if as_json:
        _json(answer.as_json())
        return
    console = _console()
    console.print(
        f"{shown(answer.path)}: {answer.state('v')}"
        + (f", last written by {answer.writer} at {_when(answer.committed_at)}" if answer.writer else "")
        + (f", write grant held by {answer.holder}" if answer.holder else "")
        + answer.occupied()
    )
    r = answer.refusal
    if r is not None:
        seen = f"v{r.seen_version}" if r.seen_version is not None else "nothing (never read)"
        console.print(
            f"last refusal: {_when(r.at)} agent {r.agent} ({r.reason}); it had read {seen}, current was v{r.version}"
        )
        if answer.earlier_changes:
            console.print(
                f"{answer.earlier_changes:,} earlier changes since that agent's view are not listed (`coherent-volume "
                f"history {shlex.quote(core.paths.root)} {shlex.quote(answer.path)}` lists every version)"
            )
        if answer.changes:
            console.print(
                _table("changed since that agent's view", _LOG_COLUMNS, [_event_row(e) for e in answer.changes])
            )
        if answer.diff:
            console.print(f"what changed from v{r.seen_version} (that agent's view) to the current v{answer.version}:")
            click.echo(answer.diff, nl=False)
        elif answer.diff_note:
            console.print(answer.diff_note)
        if answer.conflict:
            console.print("the write was to be merged, and its changes overlapped:")
            click.echo(answer.conflict, nl=False)
    console.print(f"what to do: {answer.advice}")


@main.command()
@click.argument("paths", nargs=-1, required=True, metavar="[ROOT] PATH")
@click.option(
    "--limit",
    "-n",
    type=click.IntRange(min=1),
    help=f"Only the newest N versions (default {HISTORY_SHOWN}, not --json).",
)
@click.option("--all", "show_all", is_flag=True, help="Every version (the default with --json).")
@click.option("--json", "as_json", is_flag=True, is_eager=True, help="Machine-readable output.")
@_guard
def history(paths: tuple[str, ...], limit: int | None, show_all: bool, as_json: bool) -> None:
    """The versions of a managed file, newest first: version, kind, writer, when, size, content
    hash, and whether its bytes are still retained. Shows the newest 50 and how many more there
    are, unless --limit, --all or --json says otherwise."""
    if show_all and limit is not None:
        raise click.UsageError("--all shows every version and --limit only the newest N: give one of them")
    core, target, _ = _target(paths, versions=True)
    if limit is None and not (show_all or as_json):
        limit = HISTORY_SHOWN
    versions = core.history(target)  # whole (a fast read): how many are left out is said
    if not versions:
        raise report.never_recorded(target)
    left_out = versions[limit:] if limit is not None else []
    versions = versions[:limit]
    if as_json:
        _json({"path": target.rel, "versions": [v._asdict() for v in versions]})
        return
    _console().print(
        _table(
            f"history of {shown(target.rel)}",
            ["version", "kind", "writer", "when", "size", "content"],
            [
                [
                    str(v.version),
                    _made(v.kind, v.parents),
                    v.writer,
                    _when(v.at),
                    "-" if v.size is None else str(v.size),
                    "-" if v.hash is None else v.hash[:16] + ("" if (why := report.unkept(v)) is None else f" ({why})"),
                ]
                for v in versions
            ],
        )
    )
    if left_out:
        click.echo(
            f"{len(left_out)} older version{'s' if len(left_out) > 1 else ''} not shown (v{left_out[0].version} to "
            f"v{left_out[-1].version}): --all lists every version, --limit N the newest N"
        )


@main.command()
@click.argument("paths", nargs=-1, required=True, metavar="[ROOT] PATH")
@click.option("--version", "version", type=click.IntRange(min=1), required=True, help="The version to print.")
@_guard
def show(paths: tuple[str, ...], version: int) -> None:
    """Print the bytes of one version of a managed file, as they are (no view is registered)."""
    core, target, _ = _target(paths, versions=True)
    data = core.read_version(target, version)  # whole and checked before a byte is printed
    sys.stdout.flush()
    write_all(sys.stdout.fileno(), data)


def write_all(fd: int, data: bytes) -> None:
    """Write all of `data` to `fd`: one write(2) moves at most 2 GiB - 4 KiB (a version of 3 GiB was
    printed cut there, with exit status 0), and a pipe may take less."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _version_number(text: str) -> int:
    if not text.isdigit():
        raise click.UsageError(f"{text!r} is not a version number (0 is before the file existed)")
    return int(text)


@main.command("diff")
@click.argument("args", nargs=-1, required=True, metavar="[ROOT] PATH [A [B]]")
@click.option(
    "--agent",
    callback=_agent_name,
    help="From this agent's view (the version it last read; 0 if none, said on stderr) to the current version.",
)
@click.option("--json", "as_json", is_flag=True, is_eager=True, help="Machine-readable output.")
@_guard
def diff_command(args: tuple[str, ...], agent: str | None, as_json: bool) -> None:
    """Unified diff between two versions of a managed file.

    No A: the latest change (the version before the current one to the current one). A: from A to
    the current version. A B: from A to B. Version 0 is before the file existed. Binary content
    has no line diff. A path with no version at all is an error (exit status 4)."""
    core, target, rest = _target(args, extra=2, versions=True)
    numbers = [_version_number(text) for text in rest]
    if agent is not None and numbers:
        raise click.UsageError("give versions A [B] or --agent, not both")
    current = core.version(target)
    if current == 0:
        raise report.never_recorded(target)
    if agent is not None:
        seen = core.seen(agent, target)
        if seen is None:
            click.echo(
                f"agent {agent} has no view of {shown(target.rel)} (never read it): from v0, before it existed",
                err=True,
            )
        old = seen or 0
    else:
        old = numbers[0] if numbers else max(current - 1, 0)
    new = numbers[1] if len(numbers) > 1 else current
    text = core.diff(target, old, new)
    if as_json:
        _json({"path": target.rel, "from": old, "to": new, "diff": text, "binary": text is None})
    elif text is None:
        click.echo(f"{shown(target.rel)}: v{old} to v{new}: binary content, no line diff")
    else:
        click.echo(text, nl=False)


@main.command()
@click.argument("paths", nargs=-1, required=True, metavar="[ROOT] PATH")
@click.option("--version", "version", type=click.IntRange(min=1), required=True, help="The version to restore.")
@click.option(
    "--agent",
    required=True,
    envvar="COHERENT_AGENT",
    callback=_agent_name,
    help="Who restores it (default: $COHERENT_AGENT); it must have read the current version.",
)
@click.option("--json", "as_json", is_flag=True, is_eager=True, help="Machine-readable output (a refusal too).")
@_guard
def restore(paths: tuple[str, ...], version: int, agent: str, as_json: bool) -> None:
    """Commit the bytes of an old version again, as a new version (kind restore), with the checks of
    any write: AGENT must have read the current version, else the refusal (with the diff of what
    changed since its view) and exit status 3."""
    core, target, _ = _target(paths)
    before = core.version(target) if target.managed else 0  # else `restore` says why it cannot
    try:
        new = core.restore(agent, target, version, isolation="file")
    except StaleWriteError as refusal:
        if not as_json:
            raise
        refused = {"path": target.rel, "restored": version, "version": None, "refusal": _refusal_json(refusal)}
        _echo_json(json.dumps(refused, indent=2, sort_keys=True))
        _fail(refusal, EXIT_REFUSED)  # its JSON is that above, not `_error_json`'s
    if as_json:
        _done({"path": target.rel, "restored": version, "version": new, "refusal": None}, as_json)
    elif new == before:
        _done(f"{shown(target.rel)}: v{new} already holds the bytes of v{version}; nothing committed")
    else:
        _done(f"{shown(target.rel)}: restored v{version} as v{new}")


@main.command()
@click.argument("paths", nargs=-1, required=True, metavar="[ROOT] PATH")
@click.option("--json", "as_json", is_flag=True, is_eager=True, help="Machine-readable output.")
@_guard
def reclaim(paths: tuple[str, ...], as_json: bool) -> None:
    """End the write grant on PATH now, as its expiry would: for a holder whose process cannot be
    checked from here (another PID namespace or host) and that you know is gone. A lock() holder's
    later write is refused (fenced); an open handle's commit is checked again as a new write."""
    core, target, _ = _target(paths)
    grant = core.reclaim(target)
    if as_json:
        held = None if grant is None else {"agent": grant.agent, "pid": grant.owner.pid, "host": grant.owner.host}
        _done({"path": target.rel, "reclaimed": held}, as_json)
    elif grant is None:
        click.echo(f"{shown(target.rel)}: no write grant is held on it; nothing changed")
    else:
        owner = f"process {grant.owner.pid} of {grant.owner.host}"
        _done(f"{shown(target.rel)}: reclaimed the write grant of {grant.agent!r} ({owner})")
        if grant.owner.alive():
            click.echo(
                f"note: that process is still running here: its next write to {shown(target.rel)} is checked "
                "again (a lock() holder's is refused, fenced, until it reads the file again)",
                err=True,
            )


def _refusal_json(e: StaleWriteError) -> dict[str, object]:
    return {
        "agent": e.agent,
        "reason": e.reason,
        "seen_version": e.seen_version,
        "current_version": e.current_version,
        "last_writer": e.last_writer,
        "holder": e.holder,
        "changed": list(e.changed),
        "diff": e.diff,
        "message": str(e),
    }


@main.command()
@click.argument("root", type=ROOT)
@click.argument("mountpoint", type=_Mountpoint(file_okay=False))
@click.option(
    "--agent",
    callback=_agent_name,
    help="Agent for processes that set no COHERENT_AGENT (default: one per login session).",
)
@click.option("--foreground", "-f", is_flag=True, help="Serve in this process until unmounted.")
@click.option("--allow-other", is_flag=True, help="Let other users enter the mount (needs user_allow_other).")
@click.option(
    "--direct",
    "direct_dirs",
    multiple=True,
    metavar="DIR",
    help="Serve DIR (relative to ROOT, repeatable; no managed glob may reach into it) by the kernel, "
    "bypassing the daemon: a bind mount (root only). See docs/mount.md for what that changes.",
)
@_guard
def mount(
    root: str, mountpoint: str, agent: str | None, foreground: bool, allow_other: bool, direct_dirs: tuple[str, ...]
) -> None:
    """Mount the volume at ROOT on MOUNTPOINT; returns once the mount works."""
    from fusefs.mount import mount as do_mount

    do_mount(root, mountpoint, agent, foreground, allow_other, direct_dirs)
    if not foreground:  # the mount is up: its report never turns it into a failure (`_done`)
        lines = [f"mounted {shown(os.path.realpath(root))} on {shown(os.path.abspath(mountpoint))}"]
        lines += [f"  {os.path.normpath(rel)}: served directly by the kernel (a bind mount)" for rel in direct_dirs]
        _done("\n".join(lines))


@main.command()
@click.argument("mountpoint", type=click.Path())
@_guard
def unmount(mountpoint: str) -> None:
    """Unmount a mounted volume (an error if it is busy)."""
    from fusefs.mount import unmount as do_unmount

    held = do_unmount(mountpoint)
    if held:
        click.echo(
            f"unmounted {mountpoint}; the mount is still held {'; '.join(held)}, and its daemon serves it there "
            "until it is unmounted there or every process holding it has ended",
            err=True,
        )


@main.command("as", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.argument("name", callback=_agent_name)
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def run_as(name: str, command: tuple[str, ...]) -> None:
    """Run COMMAND as agent NAME (sets COHERENT_AGENT): coherent-volume as alice -- CMD ARGS...

    Where an agent integration bound a process above it to its session (a hook of Claude Code,
    Codex, Gemini CLI or Cursor run by it), the mount and the API take that session's agent
    instead, as for any of the session's programs (docs/mount.md, "Who is writing")."""
    argv = list(command[1:] if command and command[0] == "--" else command)
    if not argv:
        raise click.UsageError("no command given")
    try:
        os.execvpe(argv[0], argv, {**os.environ, "COHERENT_AGENT": name})
    except OSError as e:  # exit status as a shell's: 127 not found, 126 found but not run
        click.echo(f"Error: cannot run {shown(argv[0])}: {e.strerror}", err=True)
        raise click.exceptions.Exit(127 if isinstance(e, FileNotFoundError) else 126) from e


# defined beside the server (mcp_server.py), which imports the MCP SDK only when the command runs
from .mcp_server import mcp_command  # noqa: E402

main.add_command(mcp_command)


# ---- agent integrations: a face's module is imported only when its command runs ----------------

AGENTS = {
    "claude-code": (
        "claude_code",
        ".claude/settings.json",
        "Claude Code integration: hooks that make a session's view what its model read.",
    ),
    "gemini": (
        "gemini",
        ".gemini/settings.json",
        "Gemini CLI integration: hooks that make a session's view what its model read.",
    ),
    "cursor": (
        "cursor",
        ".cursor/hooks.json",
        "Cursor integration: hooks that make a conversation's view what its model read.",
    ),
    "codex": (
        "codex",
        ".codex/hooks.json",
        "Codex CLI integration: hooks that form a session's view from its patches and check its writes.",
    ),
}
"""Each agent face by its command name: (module, its settings file below DIR or ~, summary)."""


@main.group("hook")
def hook_group() -> None:
    """Entry points that agent tools call."""


def _face(name: str) -> Any:
    """The `hooks.Face` of agent `name`, from its module."""
    from importlib import import_module

    return import_module(f"{__package__}.{AGENTS[name][0]}").FACE


def _add_agent(name: str) -> None:
    """`coherent-volume NAME install|uninstall [DIR] [--user]`, and `coherent-volume hook NAME`."""
    _, settings, summary = AGENTS[name]
    group = click.Group(name, help=summary)
    for verb, done, what in (
        ("install", "installed coherent-volume hooks in", "Merge the hooks into"),
        ("uninstall", "removed coherent-volume hooks from", "Remove exactly the hooks install added from"),
    ):

        def change(project_dir: str | None, user: bool, verb: str = verb, done: str = done) -> None:
            if user and project_dir is not None:  # (DIR was ignored: /tmp/s33cli 5)
                raise click.UsageError(f"give DIR or --user (~/{settings}), not both")
            if user and not Path.home().is_dir():  # (it was made, or a bare errno said it was a file)
                raise CoherenceError(
                    f"your home directory {str(Path.home())!r} (HOME) is not an existing directory: set HOME to "
                    "yours, or give DIR instead of --user; nothing was changed"
                )
            path = (Path.home() if user else Path(project_dir or ".").resolve()) / settings
            if getattr(_face(name), verb)(path) is False:  # (an uninstall with nothing to remove)
                there = "" if os.path.lexists(path) else " (there is no such file)"
                click.echo(f"no coherent-volume hooks in {path}{there}; nothing was changed")
                return
            _done(f"{done} {path}")  # the file was changed: a report stdout cannot take goes to stderr

        change.__doc__ = (
            f"{what} DIR/{settings} (DIR: an existing directory, default the current one; idempotent; other "
            "settings are kept)."
        )
        command = click.option("--user", is_flag=True, help=f"Use ~/{settings} instead.")(_guard(change))
        command = click.argument(  # an existing directory: a typo is not made into one (/tmp/s33cli 6)
            "project_dir", required=False, metavar="[DIR]", type=click.Path(exists=True, file_okay=False)
        )(command)
        group.command(verb)(command)
    main.add_command(group)

    def hook() -> None:
        from .hooks import run_cli

        run_cli(_face(name).run)

    hook.__doc__ = (
        f"Read one {name} hook event (JSON) on stdin and answer it within the hook's budget (from the process's "
        "start); a write to a path that is (or may be) managed that cannot be decided in time is denied."
    )
    hook_group.command(name)(hook)


for _agent in AGENTS:
    _add_agent(_agent)

"""Self-checking file contents used by every workload.

One line: ``cv1 TOKEN PREV COUNT FILL_LEN -xxx…x TOKEN``. TOKEN names the attempt that wrote
it (unique across a run), PREV the token it was computed from, COUNT the counter value. The
token is repeated at the end and the filler length is stated, so a torn, truncated or mixed
file never parses. Plain text so bash can read and write it too.
"""

from __future__ import annotations

from dataclasses import dataclass

MAGIC = "cv1"


@dataclass(frozen=True)
class Payload:
    token: str
    prev: str
    count: int


def make(token: str, prev: str, count: int, fill: int = 0) -> bytes:
    """The bytes of a payload with `fill` filler characters (to make multi-page files)."""
    return f"{MAGIC} {token} {prev} {count} {fill} -{'x' * fill} {token}\n".encode()


def parse(data: bytes | str | None) -> Payload | None:
    """The payload in `data`, or None if it is not exactly one complete, consistent payload."""
    if data is None:
        return None
    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
    if not text.endswith("\n") or text.count("\n") != 1:
        return None
    fields = text[:-1].split(" ")
    if len(fields) != 7 or fields[0] != MAGIC or fields[1] != fields[6]:
        return None
    _, token, prev, count, fill, filler, _ = fields
    if not (count.isdigit() and fill.isdigit()) or filler != "-" + "x" * int(fill):
        return None
    return Payload(token, prev, int(count))


def seed_token(path: str) -> str:
    """Token of the content the harness puts in `path` before a run."""
    return "seed:" + path.replace("/", "_")

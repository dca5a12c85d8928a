"""The location of a PostgreSQL volume, as a root records it in ROOT/.coherent/registry.json.

Invariant: the location lives in ROOT/.coherent/registry.json and never holds a password (libpq's
PGPASSFILE, PGSERVICEFILE or environment carry credentials).
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from urllib.parse import urlsplit

from ..errors import RegistryError, VolumeConfigError
from . import LOCATION_FILE


@dataclass(frozen=True)
class Location:
    """A PostgreSQL volume: the database's URL (no password) and the volume's name in it."""

    url: str
    volume: str

    @classmethod
    def of(cls, url: str, volume: str | None) -> Location:
        """Check a location given by the user: VolumeConfigError saying what is wrong."""
        _check_url(url)
        if volume is None:
            raise VolumeConfigError("name the volume in the PostgreSQL registry with --volume NAME (it may hold many)")
        if not volume or len(volume) > 200 or not volume.isprintable():
            raise VolumeConfigError(
                f"a PostgreSQL volume needs a name (--volume) of 1 to 200 printable characters, not {volume!r}"
            )
        return cls(url, volume)

    @property
    def server(self) -> str:
        """HOST:PORT as the URL names it (libpq's defaults when it does not)."""
        return _server(self.url)

    def describe(self) -> str:
        return f"volume {self.volume!r} in the PostgreSQL registry at {self.server}"


SECRETS = ("password", "sslpassword")
"""libpq parameters that are secrets: never in a URL a root records (nor printed)."""


def _params(url: str) -> dict[str, str]:
    """`url`'s libpq parameters (`pg_connections.url_params`: the driver is imported there only)."""
    from .pg_connections import url_params

    return url_params(url)


def _check_url(url: str) -> None:
    """VolumeConfigError unless `url` is a postgresql:// URL libpq can read, without a secret."""
    if urlsplit(url).scheme not in ("postgresql", "postgres"):
        raise VolumeConfigError("the registry URL is not a postgresql://USER@HOST:PORT/DB URL")
    if any(secret in _params(url) for secret in SECRETS):
        raise VolumeConfigError(
            "the registry URL carries a password (or an sslpassword); it would be stored in the volume's files. "
            "Give the URL without it and let libpq find it: a password in a password file (PGPASSFILE, ~/.pgpass), "
            "a service file (PGSERVICEFILE) or the PGPASSWORD environment variable; an sslpassword in a service file"
        )


def _server(url: str) -> str:
    """HOST:PORT (comma-separated for several hosts) as libpq reads `url`, its defaults where it names none."""
    params = _params(url)
    hosts = (params.get("host") or os.environ.get("PGHOST") or "the local socket").split(",")
    ports = (params.get("port") or os.environ.get("PGPORT") or "5432").split(",")
    if len(ports) == 1:
        ports = ports * len(hosts)
    return ",".join(f"{h or 'the local socket'}:{p or 5432}" for h, p in zip(hosts, ports, strict=False))


def recorded(directory: str) -> tuple[Location, uuid.UUID] | None:
    """The location (and volume id) recorded in registry directory `directory`, None if none is."""
    path = os.path.join(directory, LOCATION_FILE)
    try:
        with open(path) as f:
            data = json.load(f)
        return Location(data["url"], data["volume"]), uuid.UUID(data["volume_id"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise RegistryError(f"{path!r} does not say which PostgreSQL registry this volume uses ({e})") from e


def _record_location(directory: str, location: Location, volume_id: uuid.UUID) -> None:
    os.makedirs(directory, mode=0o700, exist_ok=True)
    path = os.path.join(directory, LOCATION_FILE)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(
            {"backend": "postgresql", "url": location.url, "volume": location.volume, "volume_id": str(volume_id)}, f
        )
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)

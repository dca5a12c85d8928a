"""PostgreSQL registry: a volume's registry and the content of its versions in one PostgreSQL
database (many volumes may share one), chosen at `init --registry postgresql://…`.

Every root that uses the volume is a working copy of it (a replica, registered in `cv_replicas`
with its host and boot): the root that created it, and each root that joined it (`init ROOT
--registry URL --volume NAME` on any host). A working copy's own state (which version of each path
its disk holds, with the file's stat fingerprint) is host-local, in its `Replica`
(ROOT/.coherent/replica.db), never in the database. A root whose replica is registered to another
boot of a kernel is refused (a root shared across hosts by a network file system, or a disk moved
from another machine) until `init` takes it over.

This module is the backend's face; each part and its invariants are in its own module:
- pg_location: the location a root records (registry.json; never a password);
- pg_connections: settings, the pool, what a PostgreSQL error means (psycopg loaded only there);
- pg_schema: migrations and the schema check;
- pg_transaction: the SQL of each Transaction method, content in parts, writes queued and sent
  in one pipeline with the next read or the COMMIT;
- pg_registry: the commit lock, write transactions with commit ids, fork safety;
- pg_hosts: what each working copy reports it holds, and how far behind each one is;
- pg_open: opening, creating and joining a volume.
"""

from .pg_location import Location, recorded
from .pg_open import open_postgres
from .pg_registry import PostgresRegistry
from .pg_schema import SCHEMA_VERSION, migrate, migrations
from .pg_transaction import PostgresTransaction
from .replica import DB_FILE as REPLICA_FILE

__all__ = [
    "REPLICA_FILE",
    "SCHEMA_VERSION",
    "Location",
    "PostgresRegistry",
    "PostgresTransaction",
    "migrate",
    "migrations",
    "open_postgres",
    "recorded",
]

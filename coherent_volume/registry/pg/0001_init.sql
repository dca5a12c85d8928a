-- coherent-volume registry schema 1: one PostgreSQL database may hold many volumes; every table
-- carries the volume id. Paths are text COLLATE "C": byte order, the order SQLite's registry uses.
-- Times the core supplies (time.time(), seconds) are float8, stored exactly as given.
-- Applied by coherent_volume.registry.postgresql.migrate, in one transaction, which records it in cv_schema.

CREATE TABLE cv_volumes (
    id uuid PRIMARY KEY,
    name text UNIQUE NOT NULL,
    globs jsonb NOT NULL,
    serial bigint NOT NULL DEFAULT 0,      -- bumped by every write transaction: they serialise on this row
    root text NOT NULL,                    -- the one working copy (this release): its directory,
    hostname text NOT NULL,                -- host name
    boot_id text NOT NULL,                 -- and the boot of the kernel that serves it
    created_at timestamptz NOT NULL DEFAULT now()
);

-- which write transactions committed: a commit whose reply was lost is looked up here by its id
CREATE TABLE cv_commits (
    id uuid PRIMARY KEY,
    volume uuid NOT NULL REFERENCES cv_volumes ON DELETE CASCADE,
    serial bigint NOT NULL,
    committed_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX cv_commits_age ON cv_commits (volume, committed_at);

CREATE TABLE cv_meta (
    volume uuid NOT NULL REFERENCES cv_volumes ON DELETE CASCADE,
    key text COLLATE "C" NOT NULL,
    value text NOT NULL,
    PRIMARY KEY (volume, key)
);

CREATE TABLE cv_files (
    volume uuid NOT NULL REFERENCES cv_volumes ON DELETE CASCADE,
    path text COLLATE "C" NOT NULL,
    version bigint NOT NULL,
    present bool NOT NULL,
    hash text,
    ino bigint,                            -- unsigned 64-bit inode numbers, stored two's-complement
    size bigint,
    mtime_ns bigint,
    ctime_ns bigint,
    writer text NOT NULL,
    committed_at float8 NOT NULL,
    checked_ns bigint NOT NULL,
    PRIMARY KEY (volume, path)
);

CREATE TABLE cv_versions (
    volume uuid NOT NULL REFERENCES cv_volumes ON DELETE CASCADE,
    path text COLLATE "C" NOT NULL,
    version bigint NOT NULL,
    kind text NOT NULL,
    writer text NOT NULL,
    at float8 NOT NULL,
    size bigint,
    hash text,
    parents text,
    pruned bool NOT NULL DEFAULT false,
    PRIMARY KEY (volume, path, version)
);
CREATE INDEX cv_versions_hash ON cv_versions (volume, hash);

-- retained content, stored once per hash, in the transaction that names it (a version or an intent):
-- cut in parts of at most 8 MiB, the first in cv_contents (inserted last), the others in order in
-- cv_content_parts (part 1, 2, ...); `size` is the whole content's
CREATE TABLE cv_contents (
    volume uuid NOT NULL REFERENCES cv_volumes ON DELETE CASCADE,
    hash text NOT NULL,
    size bigint NOT NULL,
    data bytea NOT NULL,
    PRIMARY KEY (volume, hash)
);

CREATE TABLE cv_content_parts (
    volume uuid NOT NULL REFERENCES cv_volumes ON DELETE CASCADE,
    hash text NOT NULL,
    part int NOT NULL,
    data bytea NOT NULL,
    PRIMARY KEY (volume, hash, part)
);

CREATE TABLE cv_views (
    volume uuid NOT NULL REFERENCES cv_volumes ON DELETE CASCADE,
    agent text COLLATE "C" NOT NULL,
    path text COLLATE "C" NOT NULL,
    version bigint NOT NULL,
    read_at float8 NOT NULL,
    PRIMARY KEY (volume, agent, path)
);
CREATE INDEX cv_views_path ON cv_views (volume, path);

CREATE TABLE cv_grants (
    volume uuid NOT NULL REFERENCES cv_volumes ON DELETE CASCADE,
    path text COLLATE "C" NOT NULL,
    agent text COLLATE "C" NOT NULL,
    token text NOT NULL,
    host text NOT NULL,
    pid integer NOT NULL,
    start bigint NOT NULL,
    expires_at float8 NOT NULL,
    fences bool NOT NULL,
    PRIMARY KEY (volume, path)
);
CREATE INDEX cv_grants_agent ON cv_grants (volume, agent);

CREATE TABLE cv_fences (
    volume uuid NOT NULL REFERENCES cv_volumes ON DELETE CASCADE,
    agent text COLLATE "C" NOT NULL,
    path text COLLATE "C" NOT NULL,
    at float8 NOT NULL,
    PRIMARY KEY (volume, agent, path)
);

CREATE TABLE cv_intents (
    volume uuid NOT NULL REFERENCES cv_volumes ON DELETE CASCADE,
    path text COLLATE "C" NOT NULL,
    agent text NOT NULL,
    version bigint NOT NULL,
    present bool NOT NULL,
    hash text,
    tmp text,
    PRIMARY KEY (volume, path)
);

CREATE TABLE cv_events (
    seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    volume uuid NOT NULL REFERENCES cv_volumes ON DELETE CASCADE,
    at float8 NOT NULL,
    kind text NOT NULL,
    path text COLLATE "C",
    agent text,
    reason text,
    seen_version bigint,
    version bigint,
    detail text
);
CREATE INDEX cv_events_volume ON cv_events (volume, seq);
CREATE INDEX cv_events_path ON cv_events (volume, path, seq);

CREATE TABLE cv_sessions (
    volume uuid NOT NULL REFERENCES cv_volumes ON DELETE CASCADE,
    agent text COLLATE "C" NOT NULL,
    host text NOT NULL,
    pid integer NOT NULL,
    start bigint NOT NULL,
    pinned bool NOT NULL,
    at float8 NOT NULL,
    PRIMARY KEY (volume, agent)
);
CREATE INDEX cv_sessions_process ON cv_sessions (volume, host, pid, start);

-- coherent-volume registry schema 2: every root using a volume is a working copy of it, registered
-- here; what a working copy holds on its disk (versions and stat fingerprints) is host-local
-- (ROOT/.coherent/replica.db), so the shared records carry no fingerprint any more.

CREATE TABLE cv_replicas (
    id uuid PRIMARY KEY,
    volume uuid NOT NULL REFERENCES cv_volumes ON DELETE CASCADE,
    hostname text NOT NULL,                -- the host serving it,
    boot_id text NOT NULL,                 -- the boot of that host's kernel,
    root text NOT NULL,                    -- and its directory there
    created_at timestamptz NOT NULL DEFAULT now(),
    last_seen timestamptz NOT NULL DEFAULT now()   -- last opened
);
CREATE INDEX cv_replicas_volume ON cv_replicas (volume);

-- schema 1's one working copy becomes a registered replica when its root is next opened by `init`
ALTER TABLE cv_volumes DROP COLUMN root, DROP COLUMN hostname, DROP COLUMN boot_id;
ALTER TABLE cv_files DROP COLUMN ino, DROP COLUMN size, DROP COLUMN mtime_ns, DROP COLUMN ctime_ns,
    DROP COLUMN checked_ns;

-- coherent-volume registry schema 3: what each working copy reports it holds, for `status --hosts`.
-- A row says the copy's disk held that version of the path (a deletion's version: no file) when
-- the copy last reported it; written only by that copy (pg_hosts), after its disk changed. A path
-- with no row was never reported: the copy has never held it. `cv_replicas.last_seen` is on the
-- database's clock: bumped when a process opens the copy and, at most every few seconds, by its reports.

CREATE TABLE cv_replica_holds (
    volume uuid NOT NULL REFERENCES cv_volumes ON DELETE CASCADE,
    replica uuid NOT NULL REFERENCES cv_replicas ON DELETE CASCADE,
    path text COLLATE "C" NOT NULL,
    version bigint NOT NULL,
    PRIMARY KEY (volume, replica, path)
);

-- coherent-volume registry schema 5: write transactions that touch no common path commit side by
-- side (each holds the locks of its paths), so a log line numbered first (seq) may commit last.
-- Each line records the id of the transaction that wrote it (xact); a reader of the log
-- (`coherent-volume log --follow`) asks for the lines of the transactions not finished when it
-- last read (pg_snapshot_xmin), so none is skipped (PostgresTransaction.events_since). The lines
-- of one path are numbered in commit order (they are written under its lock).
-- The volume's serial, which every write transaction bumped, is gone: a commit's serial is its
-- transaction's id.

ALTER TABLE cv_events ADD COLUMN xact bigint NOT NULL DEFAULT (pg_current_xact_id()::text::bigint);
CREATE INDEX cv_events_xact ON cv_events (volume, xact);
ALTER TABLE cv_volumes DROP COLUMN serial;

-- coherent-volume registry schema 4: every change of a managed path's current record notifies the
-- volume's channel, cv_<volume id as 32 hex digits>, at COMMIT (in commit order; nothing for a
-- transaction rolled back), whichever code path wrote it. A mount daemon LISTENs there to bring its
-- working copy up to date and drop the kernel's caches (fusefs/listen.py). The payload is a hint:
--   C<path>  the path's current record changed (a new version, or a deletion),
--   G<path>  the same, and the path has no file any more (a deletion),
--   *        some path whose name does not fit a payload (8000 bytes) changed: resync everything.
-- A listener that lost its connection missed notifications, and resyncs everything too.

CREATE FUNCTION cv_notify_file() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify(
        'cv_' || replace(NEW.volume::text, '-', ''),
        CASE WHEN octet_length(NEW.path) < 7999 THEN (CASE WHEN NEW.present THEN 'C' ELSE 'G' END) || NEW.path
             ELSE '*' END
    );
    RETURN NULL;
END
$$;

CREATE TRIGGER cv_files_notify AFTER INSERT OR UPDATE ON cv_files
    FOR EACH ROW EXECUTE FUNCTION cv_notify_file();

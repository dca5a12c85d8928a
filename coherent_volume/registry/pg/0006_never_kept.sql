-- coherent-volume registry schema 6: a version whose bytes were never kept (the file changed again
-- while it was being recorded) is told apart from one pruned by the retention policy, so
-- `read_version` names the one cause (`pruned` is true for both; rows older than this schema are
-- taken as pruned).

ALTER TABLE cv_versions ADD COLUMN never_kept bool NOT NULL DEFAULT false;

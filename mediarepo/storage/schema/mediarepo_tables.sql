-- mediarepo's own tables, on every database (Synapse's included). Each is
-- prefixed mediarepo_ so it can never collide with one of Synapse's.

CREATE TABLE IF NOT EXISTS mediarepo_schema_version (
    lock CHAR(1) DEFAULT 'X' NOT NULL,
    version INTEGER NOT NULL,
    CONSTRAINT mediarepo_schema_version_lock_key UNIQUE (lock)
)
;
-- Work owed to storage providers: copies to asynchronous providers
-- (store_synchronous: false) and deletions a provider failed, kept until
-- done and retried across restarts.
CREATE TABLE IF NOT EXISTS mediarepo_provider_tasks (
    provider TEXT NOT NULL,
    relative_path TEXT NOT NULL,
    operation TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    next_attempt_ts BIGINT NOT NULL,
    last_error TEXT,
    CONSTRAINT mediarepo_provider_tasks_key UNIQUE (provider, relative_path, operation)
)
;
CREATE INDEX IF NOT EXISTS mediarepo_provider_tasks_due
    ON mediarepo_provider_tasks (next_attempt_ts)
;
-- Thumbnails owed to media stored before its answer was sent (uploads and
-- remote media, whose sizes are pre-generated in the background): written
-- with the media's row, deleted once the thumbnails are, and resumed after
-- a crash. media_origin is '' for local media. The owning process keeps
-- the item until lease_until_ts, or until it is known to have exited.
CREATE TABLE IF NOT EXISTS mediarepo_pending_thumbnails (
    media_origin TEXT NOT NULL,
    media_id TEXT NOT NULL,
    instance_name TEXT NOT NULL,
    lease_until_ts BIGINT NOT NULL,
    attempts INTEGER NOT NULL,
    CONSTRAINT mediarepo_pending_thumbnails_key UNIQUE (media_origin, media_id)
)

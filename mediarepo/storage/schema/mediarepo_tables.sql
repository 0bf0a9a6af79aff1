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

-- mediarepo's own tables, on every database (Synapse's included). Each is
-- prefixed mediarepo_ so it can never collide with one of Synapse's.

CREATE TABLE IF NOT EXISTS mediarepo_schema_version (
    lock CHAR(1) DEFAULT 'X' NOT NULL,
    version INTEGER NOT NULL,
    CONSTRAINT mediarepo_schema_version_lock_key UNIQUE (lock)
)

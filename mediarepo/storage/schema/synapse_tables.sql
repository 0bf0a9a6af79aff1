-- Synapse's tables, with Synapse's names and columns, for a database that
-- Synapse does not own (the standalone server). On a database that Synapse
-- owns these are never created, dropped or altered.
-- Statements are separated by lines holding only ';'.

CREATE TABLE IF NOT EXISTS local_media_repository (
    media_id TEXT,
    media_type TEXT,
    media_length INTEGER,
    created_ts BIGINT,
    upload_name TEXT,
    user_id TEXT,
    quarantined_by TEXT,
    url_cache TEXT,
    last_access_ts BIGINT,
    safe_from_quarantine BOOLEAN DEFAULT FALSE NOT NULL,
    authenticated BOOLEAN DEFAULT FALSE NOT NULL,
    sha256 TEXT,
    CONSTRAINT local_media_repository_media_id_key UNIQUE (media_id)
)
;
CREATE INDEX IF NOT EXISTS users_have_local_media
    ON local_media_repository (user_id, created_ts)
;
CREATE INDEX IF NOT EXISTS local_media_repository_url_idx
    ON local_media_repository (created_ts) WHERE url_cache IS NOT NULL
;
CREATE INDEX IF NOT EXISTS local_media_repository_sha256
    ON local_media_repository (sha256) WHERE sha256 IS NOT NULL
;
CREATE TABLE IF NOT EXISTS local_media_repository_thumbnails (
    media_id TEXT,
    thumbnail_width INTEGER,
    thumbnail_height INTEGER,
    thumbnail_type TEXT,
    thumbnail_method TEXT,
    thumbnail_length INTEGER
)
;
CREATE UNIQUE INDEX IF NOT EXISTS local_media_repository_thumbn_media_id_width_height_method_key
    ON local_media_repository_thumbnails
    (media_id, thumbnail_width, thumbnail_height, thumbnail_type, thumbnail_method)
;
CREATE INDEX IF NOT EXISTS local_media_repository_thumbnails_media_id
    ON local_media_repository_thumbnails (media_id)
;
CREATE TABLE IF NOT EXISTS local_media_repository_url_cache (
    url TEXT,
    response_code INTEGER,
    etag TEXT,
    expires_ts BIGINT,
    og TEXT,
    media_id TEXT,
    download_ts BIGINT
)
;
CREATE INDEX IF NOT EXISTS local_media_repository_url_cache_by_url_download_ts
    ON local_media_repository_url_cache (url, download_ts)
;
CREATE INDEX IF NOT EXISTS local_media_repository_url_cache_expires_idx
    ON local_media_repository_url_cache (expires_ts)
;
CREATE INDEX IF NOT EXISTS local_media_repository_url_cache_media_idx
    ON local_media_repository_url_cache (media_id)
;
CREATE TABLE IF NOT EXISTS remote_media_cache (
    media_origin TEXT,
    media_id TEXT,
    media_type TEXT,
    created_ts BIGINT,
    upload_name TEXT,
    media_length INTEGER,
    filesystem_id TEXT,
    last_access_ts BIGINT,
    quarantined_by TEXT,
    authenticated BOOLEAN DEFAULT FALSE NOT NULL,
    sha256 TEXT,
    CONSTRAINT remote_media_cache_media_origin_media_id_key UNIQUE (media_origin, media_id)
)
;
CREATE INDEX IF NOT EXISTS remote_media_cache_sha256
    ON remote_media_cache (sha256) WHERE sha256 IS NOT NULL
;
CREATE TABLE IF NOT EXISTS remote_media_cache_thumbnails (
    media_origin TEXT,
    media_id TEXT,
    thumbnail_width INTEGER,
    thumbnail_height INTEGER,
    thumbnail_method TEXT,
    thumbnail_type TEXT,
    thumbnail_length INTEGER,
    filesystem_id TEXT
)
;
CREATE UNIQUE INDEX IF NOT EXISTS remote_media_repository_thumbn_media_origin_id_width_height_met
    ON remote_media_cache_thumbnails
    (media_origin, media_id, thumbnail_width, thumbnail_height, thumbnail_type, thumbnail_method)
;
CREATE TABLE IF NOT EXISTS users (
    name TEXT,
    password_hash TEXT,
    creation_ts BIGINT,
    admin SMALLINT DEFAULT 0 NOT NULL,
    upgrade_ts BIGINT,
    is_guest SMALLINT DEFAULT 0 NOT NULL,
    appservice_id TEXT,
    consent_version TEXT,
    consent_server_notice_sent TEXT,
    user_type TEXT,
    deactivated SMALLINT DEFAULT 0 NOT NULL,
    shadow_banned BOOLEAN,
    consent_ts BIGINT,
    approved BOOLEAN,
    locked BOOLEAN DEFAULT FALSE NOT NULL,
    suspended BOOLEAN DEFAULT FALSE NOT NULL,
    CONSTRAINT users_name_key UNIQUE (name)
)
;
CREATE TABLE IF NOT EXISTS access_tokens (
    id BIGINT PRIMARY KEY,
    user_id TEXT NOT NULL,
    device_id TEXT,
    token TEXT NOT NULL,
    valid_until_ms BIGINT,
    puppets_user_id TEXT,
    last_validated BIGINT,
    refresh_token_id BIGINT,
    used BOOLEAN,
    CONSTRAINT access_tokens_token_key UNIQUE (token)
)
;
CREATE INDEX IF NOT EXISTS access_tokens_device_id ON access_tokens (user_id, device_id)
;
CREATE TABLE IF NOT EXISTS worker_locks (
    lock_name TEXT NOT NULL,
    lock_key TEXT NOT NULL,
    instance_name TEXT NOT NULL,
    token TEXT NOT NULL,
    last_renewed_ts BIGINT NOT NULL
)
;
CREATE UNIQUE INDEX IF NOT EXISTS worker_locks_key ON worker_locks (lock_name, lock_key)
;
CREATE TABLE IF NOT EXISTS server_keys_json (
    server_name TEXT NOT NULL,
    key_id TEXT NOT NULL,
    from_server TEXT NOT NULL,
    ts_added_ms BIGINT NOT NULL,
    ts_valid_until_ms BIGINT NOT NULL,
    key_json BYTEA NOT NULL,
    CONSTRAINT server_keys_json_uniqueness UNIQUE (server_name, key_id, from_server)
)
;
CREATE TABLE IF NOT EXISTS quarantined_media_changes (
    stream_id INTEGER NOT NULL PRIMARY KEY,
    instance_name TEXT NOT NULL,
    origin TEXT,
    media_id TEXT NOT NULL,
    quarantined BOOLEAN NOT NULL
)
;
-- Synapse's federation backoff per server (all times in milliseconds).
CREATE TABLE IF NOT EXISTS destinations (
    destination TEXT NOT NULL PRIMARY KEY,
    retry_last_ts BIGINT,
    retry_interval BIGINT,
    failure_ts BIGINT,
    last_successful_stream_ordering BIGINT
)

-- The control plane's state: services, their revisions and deploys, API tokens.
-- An applied migration is never edited: add 0002_*.sql instead.

CREATE TABLE services (
    id                 INTEGER PRIMARY KEY,
    name               TEXT NOT NULL UNIQUE,
    -- What the next deploy uses unless it says otherwise.
    -- NULL: the env's PORT, else the image's single exposed port, else 8080.
    port               INTEGER,
    -- A JSON object of string values.
    env                TEXT NOT NULL DEFAULT '{}',
    health_path        TEXT,
    min                INTEGER NOT NULL,
    max                INTEGER NOT NULL,
    concurrency        INTEGER NOT NULL,
    freeze_after_ms    INTEGER NOT NULL,
    stop_after_ms      INTEGER NOT NULL,
    request_timeout_ms INTEGER NOT NULL,
    queue              INTEGER NOT NULL,
    -- The revision that takes the traffic (revisions.number), NULL before the first deploy.
    revision           INTEGER,
    created_at         TEXT NOT NULL,
    updated_at         TEXT NOT NULL
);

-- Immutable: the image pinned by id plus the config an instance runs with.
CREATE TABLE revisions (
    id          INTEGER PRIMARY KEY,
    service_id  INTEGER NOT NULL REFERENCES services(id) ON DELETE CASCADE,
    number      INTEGER NOT NULL,
    image       TEXT NOT NULL,
    image_id    TEXT NOT NULL,
    port        INTEGER NOT NULL,
    env         TEXT NOT NULL,
    health_path TEXT,
    created_at  TEXT NOT NULL,
    -- When it first took the traffic; NULL for a revision whose deploy failed.
    served_at   TEXT,
    UNIQUE (service_id, number)
);

CREATE TABLE deploys (
    -- AUTOINCREMENT: a deploy id is never reused, even after its service is deleted.
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    service_id  INTEGER NOT NULL REFERENCES services(id) ON DELETE CASCADE,
    revision    INTEGER,
    -- 'deploy' (a new image) or 'rollback' (an earlier revision again).
    kind        TEXT NOT NULL DEFAULT 'deploy',
    image       TEXT NOT NULL,
    status      TEXT NOT NULL,
    error       TEXT,
    token       TEXT NOT NULL,
    created_at  TEXT NOT NULL,
    finished_at TEXT
);

CREATE INDEX deploys_service ON deploys(service_id);

CREATE TABLE tokens (
    id         INTEGER PRIMARY KEY,
    name       TEXT NOT NULL UNIQUE,
    -- Hex SHA-256 of the token; the token itself is never stored.
    hash       TEXT NOT NULL UNIQUE,
    scope      TEXT NOT NULL,
    created_at TEXT NOT NULL
);

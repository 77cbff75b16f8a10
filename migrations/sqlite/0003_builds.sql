-- Builds from source (git push, `berth deploy --source`, the builds API) and the SSH keys
-- allowed to push. An applied migration is never edited: add 0004_*.sql instead.

-- The branch whose pushes deploy the service.
ALTER TABLE services ADD COLUMN deploy_branch TEXT NOT NULL DEFAULT 'main';

-- One build of a service's source. Its output is the file <data-dir>/builds/<id>.log.
CREATE TABLE builds (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    service_id  INTEGER NOT NULL REFERENCES services(id) ON DELETE CASCADE,
    -- The deploy that followed a successful build, if any.
    deploy_id   INTEGER,
    -- 'building', 'deploying', 'succeeded' or 'failed'.
    status      TEXT NOT NULL,
    -- 'git' (a push) or 'upload' (a context sent to the builds API).
    source      TEXT NOT NULL,
    -- For a push: the commit and branch.
    git_commit  TEXT,
    branch      TEXT,
    -- The built image's reference and id.
    image       TEXT,
    image_id    TEXT,
    error       TEXT,
    token       TEXT NOT NULL,
    created_at  TEXT NOT NULL,
    finished_at TEXT
);

CREATE INDEX builds_service ON builds(service_id, id);

-- Public keys allowed to push over SSH (`berth keys add`), in OpenSSH one-line form.
CREATE TABLE ssh_keys (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    name        TEXT NOT NULL UNIQUE,
    fingerprint TEXT NOT NULL UNIQUE,
    public_key  TEXT NOT NULL,
    created_at  TEXT NOT NULL
);

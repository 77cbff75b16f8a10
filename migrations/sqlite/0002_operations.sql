-- Operations: autoscaling, traffic splits and tags.
-- An applied migration is never edited: add 0003_*.sql instead.

-- The autoscaler's concurrency target per instance (0: 70% of concurrency) and stable window.
ALTER TABLE services ADD COLUMN target INTEGER NOT NULL DEFAULT 0;
ALTER TABLE services ADD COLUMN stable_window_ms INTEGER NOT NULL DEFAULT 60000;
-- A JSON array [{"revision": N, "percent": P}, ...] adding up to 100; NULL: all to `revision`.
ALTER TABLE services ADD COLUMN traffic TEXT;
-- A JSON object {"tag": revision number}.
ALTER TABLE services ADD COLUMN tags TEXT NOT NULL DEFAULT '{}';

-- Secret variables: a JSON object {"NAME": sealed value} (see server/src/server/secrets.rs);
-- values are never stored in plain text.
ALTER TABLE services ADD COLUMN secrets TEXT NOT NULL DEFAULT '{}';
ALTER TABLE revisions ADD COLUMN secrets TEXT NOT NULL DEFAULT '{}';

-- Tokens: scope 'admin' (everything) or 'deploy' (deploy `service` and follow its deploys).
ALTER TABLE tokens ADD COLUMN service TEXT;

-- Extra host names a service answers at (besides <name>.<domain>), lowercase, no trailing dot.
CREATE TABLE domains (
    host       TEXT PRIMARY KEY,
    service_id INTEGER NOT NULL REFERENCES services(id) ON DELETE CASCADE,
    created_at TEXT NOT NULL
);

CREATE INDEX domains_service ON domains(service_id);

-- Named volumes mounted into a service: a JSON array [{"volume": "data", "path": "/data"}];
-- a volume is the directory <data-dir>/volumes/<volume>, kept across revisions and restarts.
ALTER TABLE services ADD COLUMN volumes TEXT NOT NULL DEFAULT '[]';
ALTER TABLE revisions ADD COLUMN volumes TEXT NOT NULL DEFAULT '[]';
-- Run once (`/bin/sh -c`) in a new revision's image before it takes traffic; NULL: none.
ALTER TABLE services ADD COLUMN release_command TEXT;
ALTER TABLE revisions ADD COLUMN release_command TEXT;

-- Resources of each instance: a memory limit in bytes and CPUs in thousandths; NULL: none.
ALTER TABLE services ADD COLUMN memory INTEGER;
ALTER TABLE services ADD COLUMN cpu_millis INTEGER;
ALTER TABLE revisions ADD COLUMN memory INTEGER;
ALTER TABLE revisions ADD COLUMN cpu_millis INTEGER;

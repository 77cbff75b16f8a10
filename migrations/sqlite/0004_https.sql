-- Per-service HTTPS settings (`berth https`): a JSON object {"redirect": bool,
-- "hsts_max_age": seconds or null}. An applied migration is never edited: add 0005_*.sql instead.
ALTER TABLE services ADD COLUMN https TEXT NOT NULL DEFAULT '{}';

-- A job's row is written three times (enqueued, processing, ended). With half of each page
-- left free at insert, the next versions are written on the row's own page: PostgreSQL then
-- neither looks for another page nor logs a lock on the old version first (measured with
-- `hangar bench`: 13 % less WAL per job, 1–3 % more jobs/s). Existing pages keep their fill;
-- the setting applies to pages filled from now on.
ALTER TABLE jobs SET (fillfactor = 50);

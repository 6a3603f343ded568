-- An owner is set exactly while a job is processing. jobs_processing_has_owner already says
-- that processing means an owner and a lease expiry; this says an owner means processing, so
-- that `lease_owner = …` alone is "held by that owner" (the statements over many held jobs
-- rely on it, to keep the planner off the partial index of processing jobs).
ALTER TABLE jobs ADD CONSTRAINT jobs_owner_only_while_processing
    CHECK (lease_owner IS NULL OR state = 'processing') NOT VALID;
ALTER TABLE jobs VALIDATE CONSTRAINT jobs_owner_only_while_processing;

-- hangar's job core. Every statement is unqualified: hangar sets search_path to the configured
-- schema (default "hangar") on each connection, so one database can hold several hangar schemas
-- (the tests run one schema per test).

CREATE TABLE jobs (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- A registered handler name (e.g. "detection-run").
    kind             text        NOT NULL,
    args             jsonb       NOT NULL DEFAULT '{}',
    queue            text        NOT NULL,
    -- enqueued | scheduled | awaiting | processing | succeeded | failed | deleted
    state            text        NOT NULL,
    -- How many times the job has been started; part of the fence of every state write.
    attempt          integer     NOT NULL DEFAULT 0,
    -- How many attempts failed (including rescues); what the retry policy counts.
    failures         integer     NOT NULL DEFAULT 0,
    -- Per-job execution timeout; NULL means the server default.
    timeout_ms       bigint,
    scheduled_at     timestamptz,
    -- Ownership while processing: the owning server's id (name + per-boot nonce) and the lease
    -- expiry its heartbeat extends.
    lease_owner      text,
    lease_expires_at timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    finished_at      timestamptz,
    CONSTRAINT jobs_state_known CHECK (state IN
        ('enqueued', 'scheduled', 'awaiting', 'processing', 'succeeded', 'failed', 'deleted')),
    CONSTRAINT jobs_processing_has_owner CHECK
        ((state = 'processing') = (lease_owner IS NOT NULL AND lease_expires_at IS NOT NULL))
);

-- The producer's fetch: oldest enqueued job per queue.
CREATE INDEX jobs_enqueued_by_queue ON jobs (queue, id) WHERE state = 'enqueued';
-- The scheduler: due scheduled jobs.
CREATE INDEX jobs_scheduled_due ON jobs (scheduled_at) WHERE state = 'scheduled';
-- The rescuer: expired leases.
CREATE INDEX jobs_processing_lease ON jobs (lease_expires_at) WHERE state = 'processing';
-- The expirer: finished jobs past retention.
CREATE INDEX jobs_finished ON jobs (finished_at) WHERE finished_at IS NOT NULL;

-- Every transition, append-only. No foreign key: a referential check on each of the three or
-- more entries every job gets costs a third of the queue's throughput; entries are only ever
-- written beside their job, and the expirer deletes them with it.
CREATE TABLE job_states (
    -- Orders a job's entries; no primary key index, the (job_id, id) index serves every read.
    id         bigint GENERATED ALWAYS AS IDENTITY,
    job_id     bigint      NOT NULL,
    state      text        NOT NULL,
    attempt    integer     NOT NULL,
    reason     text,
    -- For failed: {"exception_type", "message", "details"}; for scheduled: {"scheduled_at"}.
    data       jsonb       NOT NULL DEFAULT '{}',
    created_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX job_states_by_job ON job_states (job_id, id);

CREATE TABLE job_parameters (
    job_id bigint NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    name   text   NOT NULL,
    value  text   NOT NULL,
    PRIMARY KEY (job_id, name)
);

CREATE TABLE continuations (
    child_id  bigint NOT NULL PRIMARY KEY REFERENCES jobs (id) ON DELETE CASCADE,
    parent_id bigint NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    -- on_success: the child runs only if the parent succeeded (else it is deleted);
    -- on_any_final: the child runs once the parent succeeded or failed.
    -- A deleted parent deletes its waiting children either way.
    option    text   NOT NULL CHECK (option IN ('on_success', 'on_any_final'))
);
CREATE INDEX continuations_by_parent ON continuations (parent_id);

CREATE TABLE servers (
    id           text        PRIMARY KEY,
    name         text        NOT NULL,
    queues       text[]      NOT NULL,
    worker_count integer     NOT NULL,
    started_at   timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now(),
    -- Set when the server stopped fetching at shutdown; it only drains from then on.
    draining_since timestamptz,
    stopped_at     timestamptz
);

CREATE TABLE api_tokens (
    id           uuid        PRIMARY KEY,
    name         text        NOT NULL,
    -- Only the SHA-256 of the secret is kept.
    token_sha256 bytea       NOT NULL UNIQUE,
    claims       text[]      NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    revoked_at   timestamptz
);

-- The MMDetection workload: trained models, training runs, detection runs and their detections.

CREATE TABLE models (
    id                 uuid        PRIMARY KEY,
    name               text        NOT NULL,
    config_path        text        NOT NULL,
    checkpoint_path    text        NOT NULL,
    -- Class names in label order.
    classes            jsonb       NOT NULL DEFAULT '[]',
    training_run_id    uuid,
    published          boolean     NOT NULL DEFAULT false,
    created_at         timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE training_runs (
    id               uuid        PRIMARY KEY,
    name             text        NOT NULL,
    description      text,
    -- Waiting | Processing | Success | Error | Canceled
    status           text        NOT NULL,
    dataset_path     text        NOT NULL,
    base_config      text        NOT NULL,
    base_checkpoint  text,
    epochs           integer     NOT NULL,
    batch_size       integer     NOT NULL,
    frozen_stages    integer     NOT NULL,
    device           text,
    job_id           bigint      REFERENCES jobs (id) ON DELETE SET NULL,
    trained_model_id uuid        REFERENCES models (id) ON DELETE SET NULL,
    error_message    text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    started_at       timestamptz,
    finished_at      timestamptz
);
CREATE INDEX training_runs_by_job ON training_runs (job_id);

CREATE TABLE detection_runs (
    id              uuid        PRIMARY KEY,
    name            text        NOT NULL,
    description     text,
    -- Waiting | Processing | Success | Error | Canceled
    status          text        NOT NULL,
    image_path      text        NOT NULL,
    model_id        uuid        NOT NULL REFERENCES models (id),
    score_threshold real        NOT NULL,
    -- The device the run asked for ("cpu", "cuda") and the one it got ("cuda:0", "cpu").
    device          text,
    job_id          bigint      REFERENCES jobs (id) ON DELETE SET NULL,
    error_message   text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    started_at      timestamptz,
    finished_at     timestamptz
);
CREATE INDEX detection_runs_by_job ON detection_runs (job_id);
CREATE INDEX detection_runs_by_status ON detection_runs (status);

CREATE TABLE detections (
    run_id     uuid    NOT NULL REFERENCES detection_runs (id) ON DELETE CASCADE,
    ordinal    integer NOT NULL,
    x1         real    NOT NULL,
    y1         real    NOT NULL,
    x2         real    NOT NULL,
    y2         real    NOT NULL,
    score      real    NOT NULL,
    label      integer NOT NULL,
    class_name text,
    PRIMARY KEY (run_id, ordinal)
);

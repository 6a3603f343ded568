-- Policy plugins (WASI components). Every server of a cluster loads the active version of each
-- slot from here; activating a version is one transaction plus a NOTIFY.

CREATE TABLE plugins (
    -- Which role the plugin fills: "retry-policy", "state-filter/<name>", "cleanup-hook/<name>".
    slot         text        NOT NULL,
    version      integer     NOT NULL,
    sha256       text        NOT NULL,
    bytes        bytea       NOT NULL,
    uploaded_by  text        NOT NULL,
    uploaded_at  timestamptz NOT NULL DEFAULT now(),
    active       boolean     NOT NULL DEFAULT false,
    PRIMARY KEY (slot, version)
);
-- At most one active version per slot.
CREATE UNIQUE INDEX plugins_one_active ON plugins (slot) WHERE active;

-- What happened to each slot: uploads, activations, rollbacks (manual or automatic).
CREATE TABLE plugin_events (
    id         bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    slot       text        NOT NULL,
    version    integer,
    event      text        NOT NULL,
    actor      text        NOT NULL,
    reason     text,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX plugin_events_by_slot ON plugin_events (slot, id);

-- Stored step results and the transactional outbox.
-- {schema} is replaced by the configured schema name.

-- Results of external calls made through `context.step`, one row per
-- message, step name and call number. Each row is committed on its own
-- right after the call returns, so a retry, a rollback or a redelivery of
-- the message reuses it instead of calling again.
CREATE TABLE {schema}.step_results (
    dedup_scope     text        NOT NULL,
    idempotency_key text        NOT NULL,
    step_name       text        NOT NULL,
    -- 1 for the first call of this step name in a handler run, 2 for the second ...
    call_number     integer     NOT NULL,
    result          jsonb       NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (dedup_scope, idempotency_key, step_name, call_number)
);

CREATE INDEX step_results_created_at ON {schema}.step_results (dedup_scope, created_at);

-- Messages a handler publishes with `context.publish`, written in the
-- handler's transaction and sent by the worker's relay afterwards, in id
-- order. A row is sent at least once; its Idempotency-Key header lets a
-- consumer built on this framework apply it once.
CREATE TABLE {schema}.outbox (
    id              bigserial   PRIMARY KEY,
    dedup_scope     text        NOT NULL,
    topic           text        NOT NULL,
    key             bytea,
    value           bytea,
    header_names    text[]      NOT NULL DEFAULT '{}',
    header_values   bytea[]     NOT NULL DEFAULT '{}',
    created_at      timestamptz NOT NULL DEFAULT now(),
    sent_at         timestamptz,
    attempts        integer     NOT NULL DEFAULT 0,
    last_error      text
);

CREATE INDEX outbox_unsent ON {schema}.outbox (dedup_scope, id) WHERE sent_at IS NULL;
CREATE INDEX outbox_sent_at ON {schema}.outbox (dedup_scope, sent_at) WHERE sent_at IS NOT NULL;

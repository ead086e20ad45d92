-- Tables of the side-effect tests' handlers (tests/side_effects/handlers.py).
CREATE SCHEMA IF NOT EXISTS leads_test;

-- One row per call of the lead scorer's `score`, written on a separate
-- autocommit connection, so calls whose transaction rolled back or whose
-- worker was killed are counted too.
CREATE TABLE leads_test.handler_calls (
    seq        bigserial   PRIMARY KEY,
    event_id   text        NOT NULL,
    -- 1 for the first call of this event, 2 for the second ...
    call       integer     NOT NULL,
    -- context.attempt as the framework counted it.
    attempt    integer     NOT NULL,
    -- context.idempotency_key("score") and context.idempotency_key("crm").
    score_key  text        NOT NULL,
    crm_key    text        NOT NULL,
    "offset"   bigint      NOT NULL,
    pid        integer     NOT NULL,
    called_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);

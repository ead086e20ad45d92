-- Tables of the test handlers.
CREATE SCHEMA IF NOT EXISTS test_app;

-- One row per applied message, deliberately without a unique constraint:
-- an effect applied twice shows up as two rows.
CREATE TABLE test_app.effects (
    seq        bigserial   PRIMARY KEY,
    idem_key   text        NOT NULL,
    order_id   text,
    amount     integer,
    topic      text        NOT NULL,
    partition  integer     NOT NULL,
    "offset"   bigint      NOT NULL,
    worker     text        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- Second step of the two-step handler.
CREATE TABLE test_app.ledger (
    idem_key   text        NOT NULL,
    amount     integer
);

-- Handler calls, written on a separate autocommit connection so that calls
-- whose transaction rolled back are counted too.
CREATE TABLE test_app.invocations (
    idem_key   text        NOT NULL,
    attempt    integer     NOT NULL,
    worker     text        NOT NULL,
    called_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);

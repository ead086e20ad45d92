-- Tables of the chaos handler, in a schema of their own.
CREATE SCHEMA IF NOT EXISTS chaos_app;

-- One row per handler call whose transaction committed. There is no unique
-- constraint on purpose: a message applied twice shows up as two rows, and
-- the backend and transaction id tell which transactions wrote them.
CREATE TABLE chaos_app.effects (
    seq          bigserial   PRIMARY KEY,
    idem_key     text        NOT NULL,
    topic        text        NOT NULL,
    partition    integer     NOT NULL,
    "offset"     bigint      NOT NULL,
    -- Worker slot and process id, e.g. w1/pid-1234.
    worker       text        NOT NULL,
    backend_pid  integer     NOT NULL,
    xid          bigint      NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- Every handler call, written over a separate autocommit connection, so calls
-- whose transaction rolled back are counted too.
CREATE TABLE chaos_app.invocations (
    idem_key     text        NOT NULL,
    -- 1 for the first call of this key in any worker, 2 for the second ...
    call_number  integer     NOT NULL,
    worker       text        NOT NULL,
    called_at    timestamptz NOT NULL DEFAULT clock_timestamp()
);

CREATE INDEX invocations_key ON chaos_app.invocations (idem_key);

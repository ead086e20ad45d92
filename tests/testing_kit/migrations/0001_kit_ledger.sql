-- Tables of the testing kit's test handlers.
CREATE SCHEMA IF NOT EXISTS kit_ledger;

-- One row per applied order, with no unique constraint on purpose: an order
-- applied twice shows up as two rows.
CREATE TABLE kit_ledger.entries (
    order_id   text        NOT NULL,
    amount     integer     NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);

-- Written outside the batch transaction by LeakyHandler, so a retry repeats it.
CREATE TABLE kit_ledger.notifications (
    order_id   text        NOT NULL
);

-- Tables of the webhook-ledger example.
CREATE SCHEMA IF NOT EXISTS webhook_ledger;

-- One row per applied delivery, with no unique constraint on purpose: a
-- delivery applied twice would show up here as two rows.
CREATE TABLE webhook_ledger.deliveries (
    -- The X-GitHub-Delivery GUID: the idempotency key.
    event_id     text        NOT NULL,
    -- X-GitHub-Event, such as issues or pull_request.
    event_name   text        NOT NULL,
    -- payload.action, such as opened; null for events without actions (push, ping).
    action       text,
    entity_kind  text,
    entity_id    bigint,
    occurred_at  timestamptz,
    -- payload.repository.full_name and payload.sender.login, when present.
    repository   text,
    sender       text,
    applied_at   timestamptz NOT NULL DEFAULT now()
);

-- The latest known state of each GitHub object the deliveries are about.
CREATE TABLE webhook_ledger.entities (
    kind             text        NOT NULL,
    entity_id        bigint      NOT NULL,
    -- Applied deliveries about this object, in any order.
    deliveries       integer     NOT NULL,
    -- The delivery with the newest occurred_at; a delivery that is older,
    -- or has no time, never replaces it.
    last_event_type  text        NOT NULL,
    last_event_id    text        NOT NULL,
    last_occurred_at timestamptz,
    PRIMARY KEY (kind, entity_id)
);

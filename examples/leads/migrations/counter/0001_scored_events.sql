-- Tables of the downstream counter (examples.leads.downstream:ScoredLeadCounter).
CREATE SCHEMA IF NOT EXISTS crm;

-- Every lead.scored event the counter applied, with no unique constraint on
-- purpose: an event applied twice would show up here as two rows.
CREATE TABLE crm.scored_events (
    -- The event's Idempotency-Key header, set by the scorer's outbox.
    event_key   text             NOT NULL,
    lead_id     text             NOT NULL,
    score       double precision NOT NULL,
    received_at timestamptz      NOT NULL DEFAULT now()
);

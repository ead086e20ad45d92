-- Tables of the lead scorer (examples.leads.handler:LeadScorer).
CREATE SCHEMA IF NOT EXISTS crm;

-- The CRM's view of each lead's score, one row per lead.
CREATE TABLE crm.lead_scores (
    lead_id     text             PRIMARY KEY,
    email       text             NOT NULL,
    company     text,
    -- 0 to 100, as the scoring service returned it.
    score       double precision NOT NULL,
    -- Version of the scoring model that produced `score`.
    model       text             NOT NULL,
    -- Event id of the lead event that was scored last.
    event_id    text             NOT NULL,
    -- 1 when the row is first written, plus 1 on every later write: a lead
    -- event applied twice would show up as version 2.
    version     integer          NOT NULL DEFAULT 1,
    scored_at   timestamptz      NOT NULL DEFAULT now()
);

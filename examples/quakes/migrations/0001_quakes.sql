-- Tables of the quake-store example.
CREATE SCHEMA IF NOT EXISTS quake_store;

-- One row per earthquake at its newest version.
CREATE TABLE quake_store.quakes (
    quake_id     text        PRIMARY KEY,
    -- USGS `properties.updated`: the version; a row only moves forward.
    updated_at   timestamptz NOT NULL,
    occurred_at  timestamptz,
    magnitude    double precision,
    place        text,
    longitude    double precision,
    latitude     double precision,
    depth_km     double precision,
    event_id     text        NOT NULL
);

-- Audit of every applied event, with no unique constraint on purpose: a
-- message applied twice would show up here as two rows.
CREATE TABLE quake_store.applied_events (
    event_id     text        NOT NULL,
    quake_id     text        NOT NULL,
    applied_at   timestamptz NOT NULL DEFAULT now()
);

-- Learned noise (A/A calibration) across replicas. Each replica owns its
-- rows: everything its own Envoys' calibration taught about a route, as a
-- whole value (so a retried write is harmless), with `rev` counting its
-- writes so a reader fetches only rows that changed. A route's learned
-- noise is the sum of every replica's row at the route's current epoch.
CREATE TABLE learned_noise (
    replica text   NOT NULL,
    route   text   NOT NULL,
    epoch   bigint NOT NULL,
    rev     bigint NOT NULL,
    learned jsonb  NOT NULL,
    PRIMARY KEY (replica, route)
);

-- Fleet-wide resets of a route's shadow measurement: `DELETE
-- /v1/shadow/noise/{route}` (kind 'noise': forget learned noise) and
-- `DELETE /v1/shadow/routes/{route}` (kind 'live': start the live counts
-- over), on any replica. Each bumps the route's epoch; every replica
-- applies an epoch newer than the last it applied. `at_ms` (the resetting
-- replica's clock) is when: shipped batches from before it no longer count
-- as live evidence for the route, even on a replica that starts later.
CREATE TABLE shadow_resets (
    route text   NOT NULL,
    kind  text   NOT NULL CHECK (kind IN ('noise', 'live')),
    epoch bigint NOT NULL,
    at_ms bigint NOT NULL,
    PRIMARY KEY (route, kind)
);

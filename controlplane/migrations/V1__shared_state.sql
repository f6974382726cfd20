-- Understudy's shared state for replicas (`serve --database postgres://...`).
-- Owned by the binary: refinery runs the files of this directory in order at
-- start, once each (its table `refinery_schema_history` records them).

-- The desired state: one JSON document (the state file's shape), versioned.
-- Every replica serves ADS from it; a change bumps `version` and NOTIFYs.
CREATE TABLE desired_state (
    id      integer PRIMARY KEY CHECK (id = 1),
    version bigint  NOT NULL,
    doc     jsonb   NOT NULL
);

-- Rollouts: the current record of each, and its append-only audit log.
CREATE TABLE rollouts (
    id     text  PRIMARY KEY,
    record jsonb NOT NULL
);
CREATE TABLE audit (
    rollout text   NOT NULL,
    seq     bigint NOT NULL,
    entry   jsonb  NOT NULL,
    PRIMARY KEY (rollout, seq)
);

-- The leader's lease. `term` is the fencing token: it grows by one with
-- every new holder. Times are the database's clock only (clock_timestamp()),
-- so replicas' clocks never have to agree.
CREATE TABLE lease (
    id         integer     PRIMARY KEY CHECK (id = 1),
    holder     text        NOT NULL,
    term       bigint      NOT NULL,
    expires_at timestamptz NOT NULL,
    -- Where the holder's API answers, for followers to name.
    holder_api text        NOT NULL DEFAULT ''
);
INSERT INTO lease (id, holder, term, expires_at) VALUES (1, '', 0, '-infinity');

-- The fence: a transaction that says it writes as (holder, term) passes only
-- while that lease is current, and holds the lease row (FOR SHARE) until it
-- ends, so no takeover can commit in between. A write whose term has passed
-- is refused here, by the database, whatever the writer believes.
CREATE FUNCTION understudy_fence() RETURNS void AS $$
DECLARE
    h text := current_setting('understudy.holder', true);
    t text := current_setting('understudy.term', true);
BEGIN
    IF h IS NULL OR h = '' OR t IS NULL OR t = '' THEN
        RAISE EXCEPTION 'understudy: this write needs the leader''s lease, and none was given'
            USING ERRCODE = 'UF001';
    END IF;
    PERFORM 1 FROM lease
        WHERE id = 1 AND holder = h AND term = t::bigint AND expires_at > clock_timestamp()
        FOR SHARE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'understudy: the lease term % of % has passed', t, h
            USING ERRCODE = 'UF001';
    END IF;
END
$$ LANGUAGE plpgsql;

-- Rollouts and their audit are written by the leader only: always fenced.
CREATE FUNCTION understudy_fenced_write() RETURNS trigger AS $$
BEGIN
    PERFORM understudy_fence();
    RETURN NEW;
END
$$ LANGUAGE plpgsql;
CREATE TRIGGER rollouts_fenced BEFORE INSERT OR UPDATE ON rollouts
    FOR EACH ROW EXECUTE FUNCTION understudy_fenced_write();
CREATE TRIGGER audit_fenced BEFORE INSERT OR UPDATE ON audit
    FOR EACH ROW EXECUTE FUNCTION understudy_fenced_write();

-- The desired state is written by operators on any replica, and by the
-- leader's rollouts: a write that names a lease (the engine's) is fenced.
CREATE FUNCTION understudy_state_write() RETURNS trigger AS $$
BEGIN
    IF coalesce(current_setting('understudy.holder', true), '') <> '' THEN
        PERFORM understudy_fence();
    END IF;
    RETURN NEW;
END
$$ LANGUAGE plpgsql;
CREATE TRIGGER desired_state_fenced BEFORE INSERT OR UPDATE ON desired_state
    FOR EACH ROW EXECUTE FUNCTION understudy_state_write();

-- Evidence: what each replica's Envoys reported, per flush and cluster
-- (Envoy's stats stream already sends deltas). Keyed per replica with the
-- replica's own sequence, so the leader reads each replica's rows in the
-- order they were committed and counts each exactly once.
CREATE TABLE stat_samples (
    replica  text   NOT NULL,
    seq      bigint NOT NULL,
    cluster  text   NOT NULL,
    node     text   NOT NULL,
    at_ms    bigint NOT NULL,
    requests bigint NOT NULL,
    errors   bigint NOT NULL,
    -- [[upper bound ms, count], ...] as in the in-memory sample.
    latency  jsonb  NOT NULL,
    PRIMARY KEY (replica, seq)
);
CREATE INDEX stat_samples_at ON stat_samples (at_ms);

-- The key probe pins are derived from: every replica renders the same pin
-- routes, so it is shared (written once by whichever replica starts first).
CREATE TABLE probe_key (
    id  integer PRIMARY KEY CHECK (id = 1),
    key bytea   NOT NULL CHECK (length(key) = 32)
);

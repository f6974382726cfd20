-- The filter's reports (shadow comparison batches) across replicas: each
-- replica stores the batches its Envoys pushed, as received (protobuf
-- `understudy.v1.ReportBatch`), keyed like `stat_samples` so every other
-- replica reads each exactly once. `identity` is the verified certificate
-- identity of the sender (NULL: unverified), which decides replayability.
CREATE TABLE report_batches (
    replica  text   NOT NULL,
    seq      bigint NOT NULL,
    at_ms    bigint NOT NULL,
    identity text,
    batch    bytea  NOT NULL,
    PRIMARY KEY (replica, seq)
);
CREATE INDEX report_batches_at ON report_batches (at_ms);

-- How many Envoys each replica serves, so fleet-wide rate limits are
-- divided among the whole fleet's Envoys, not each replica's. A replica
-- that stops refreshing its row (dead) drops out after a few seconds.
CREATE TABLE fleet (
    replica text        PRIMARY KEY,
    envoys  bigint      NOT NULL,
    seen_at timestamptz NOT NULL
);

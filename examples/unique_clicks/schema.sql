-- The unique-clicks example's tables. Idempotent: `setup` and the tests run it every time.

-- Distinct visitors per URL and window. A window is one bucketly take; window_start is
-- the take's since_ms, so a re-delivered take lands on the same rows.
CREATE TABLE IF NOT EXISTS url_clicks (
    url             text        NOT NULL,
    window_start    timestamptz NOT NULL,
    unique_visitors bigint      NOT NULL,
    PRIMARY KEY (url, window_start)
);

-- One row per flushed window, written in the same transaction as its url_clicks rows:
-- what was absorbed (events) and written (urls), for measuring and auditing. Windows of
-- one bucket chain: each window_start is the previous window_end.
CREATE TABLE IF NOT EXISTS bucketly_windows (
    bucket       text        NOT NULL,
    window_start timestamptz NOT NULL,
    window_end   timestamptz NOT NULL,
    take_id      bigint      NOT NULL,
    events       bigint      NOT NULL,
    urls         bigint      NOT NULL,
    PRIMARY KEY (bucket, window_start)
);

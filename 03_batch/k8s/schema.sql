-- The one table of the batch pattern. Runs unchanged on MySQL 8.0 and MariaDB 10.6+.
-- Applied by the API at start-up when the table is missing (CREATE ... IF NOT EXISTS).
CREATE TABLE IF NOT EXISTS items (
    id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT,
    `values` JSON NOT NULL,
    prediction JSON NULL,
    -- Why the job could not score the row (quarantined: it is never claimed again), else NULL.
    error VARCHAR(255) NULL,
    -- A nullable JSON column cannot be indexed, so the job finds its work through this small
    -- column instead: 0 waiting for the job, 1 predicted, 2 quarantined. Generated from
    -- `prediction` and `error`, it can never disagree with them.
    state TINYINT AS (CASE WHEN prediction IS NOT NULL THEN 1
                           WHEN error IS NOT NULL THEN 2 ELSE 0 END) STORED,
    created_datetime DATETIME NOT NULL DEFAULT CURRENT_TIMESTAMP,
    PRIMARY KEY (id),
    -- (state, id): "the next waiting rows after id X, in id order" is one range scan.
    KEY idx_items_state (state, id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;

-- The one table of the batch pattern. Runs unchanged on MySQL 8.0 and MariaDB 10.6+.
-- Applied by the API at start-up when the table is missing (CREATE ... IF NOT EXISTS).
CREATE TABLE IF NOT EXISTS items (
    id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT,
    `values` JSON NOT NULL,
    prediction JSON NULL,
    -- A nullable JSON column cannot be indexed, so the job finds its work through this small
    -- column instead. Generated from `prediction`, it can never disagree with it.
    predicted BOOLEAN AS (prediction IS NOT NULL) STORED,
    created_datetime DATETIME NOT NULL DEFAULT CURRENT_TIMESTAMP,
    PRIMARY KEY (id),
    -- (predicted, id): "the next unpredicted rows after id X, in id order" is one range scan.
    KEY idx_items_predicted (predicted, id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;

-- A small table on the replication primary, to watch it arrive on the standby.
CREATE TABLE heartbeat (
    id bigserial PRIMARY KEY,
    note text NOT NULL,
    at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO heartbeat (note) VALUES ('sandbox created');

-- The sandbox's "dev" database starts as an older copy with its own migrations table,
-- the case the seed's EXCLUDE_TABLES=_prisma_migrations protects.
CREATE TABLE _prisma_migrations (
    id varchar(36) PRIMARY KEY,
    migration_name varchar(255) NOT NULL,
    finished_at timestamptz,
    applied_steps_count integer NOT NULL DEFAULT 0
);
INSERT INTO _prisma_migrations VALUES
    ('8c1f0a52-0000-4000-8000-000000000001', '20240101000000_init', now(), 1),
    ('8c1f0a52-0000-4000-8000-00000000d001', '20991231000000_dev_only_experiment', now(), 1);

CREATE TABLE customers (
    id serial PRIMARY KEY,
    name text NOT NULL,
    email text NOT NULL UNIQUE,
    phone text,
    created_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO customers (name, email) VALUES ('Old dev customer', 'old@example.com');

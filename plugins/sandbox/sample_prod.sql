-- Sample CRM data for the sandbox's "prod" database (crm_production).
CREATE TABLE _prisma_migrations (
    id varchar(36) PRIMARY KEY,
    migration_name varchar(255) NOT NULL,
    finished_at timestamptz,
    applied_steps_count integer NOT NULL DEFAULT 0
);
INSERT INTO _prisma_migrations VALUES
    ('8c1f0a52-0000-4000-8000-000000000001', '20240101000000_init', now(), 1),
    ('8c1f0a52-0000-4000-8000-000000000002', '20240301000000_chats', now(), 1);

CREATE TABLE customers (
    id serial PRIMARY KEY,
    name text NOT NULL,
    email text NOT NULL UNIQUE,
    phone text,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE contacts (
    id serial PRIMARY KEY,
    instance varchar(255) NOT NULL,
    name varchar(255) NOT NULL,
    phone varchar(50) NOT NULL,
    customer_id integer REFERENCES customers(id),
    deleted_at timestamptz,
    updated_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (instance, phone)
);

CREATE TABLE sectors (
    id serial PRIMARY KEY,
    instance varchar(255) NOT NULL,
    name text NOT NULL
);

CREATE TABLE contact_sectors (
    contact_id integer NOT NULL REFERENCES contacts(id) ON DELETE CASCADE,
    sector_id integer NOT NULL REFERENCES sectors(id) ON DELETE CASCADE,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (contact_id, sector_id)
);

CREATE TABLE chats (
    id serial PRIMARY KEY,
    instance varchar(255) NOT NULL,
    type varchar(50) NOT NULL,
    avatar_url text,
    user_id integer,
    contact_id integer NOT NULL REFERENCES contacts(id),
    sector_id integer REFERENCES sectors(id),
    started_at timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz,
    finished_by integer,
    result_id integer,
    is_finished boolean NOT NULL DEFAULT false,
    is_schedule boolean NOT NULL DEFAULT false,
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE perfis (
    id serial PRIMARY KEY,
    nome text NOT NULL,
    email text NOT NULL UNIQUE,
    updated_at timestamptz NOT NULL DEFAULT now()
);

INSERT INTO customers (name, email, phone)
SELECT 'Customer ' || g, 'customer' || g || '@example.com', '+55 11 9' || lpad(g::text, 8, '0')
FROM generate_series(1, 200) g;

INSERT INTO sectors (instance, name)
SELECT i, s FROM unnest(ARRAY['exatron', 'acme']) i, unnest(ARRAY['Vendas', 'Suporte', 'Financeiro']) s;

INSERT INTO contacts (instance, name, phone, customer_id, deleted_at)
SELECT CASE WHEN g % 3 = 0 THEN 'acme' ELSE 'exatron' END, 'Contato ' || g, '5511' || lpad(g::text, 9, '0'),
       CASE WHEN g % 2 = 0 THEN 1 + g % 200 END, CASE WHEN g % 50 = 0 THEN now() END
FROM generate_series(1, 1500) g;

INSERT INTO contact_sectors (contact_id, sector_id)
SELECT c.id, s.id FROM contacts c JOIN sectors s ON s.instance = c.instance
WHERE (c.id + s.id) % 3 = 0;

INSERT INTO chats (instance, type, contact_id, sector_id, started_at, finished_at, is_finished)
SELECT c.instance, CASE WHEN c.id % 4 = 0 THEN 'group' ELSE 'individual' END, c.id,
       (SELECT min(s.id) FROM sectors s WHERE s.instance = c.instance),
       now() - (c.id || ' minutes')::interval,
       CASE WHEN c.id % 2 = 0 THEN now() END, c.id % 2 = 0
FROM contacts c WHERE c.id % 4 <> 1;

INSERT INTO perfis (nome, email)
SELECT 'Perfil ' || g, 'perfil' || g || '@example.com' FROM generate_series(1, 50) g;

-- history: the CRM rows were last written a day ago (an incremental local-sync then reads only new changes)
UPDATE contacts SET updated_at = now() - interval '1 day';
UPDATE contact_sectors SET updated_at = now() - interval '1 day';
UPDATE chats SET updated_at = now() - interval '1 day';

ANALYZE;

-- The "external" side of sync-databases (Neon in the seed): the same perfis table, an older copy
-- with one profile of its own, so the first round moves rows both ways.
CREATE TABLE perfis (
    id serial PRIMARY KEY,
    nome text NOT NULL,
    email text NOT NULL UNIQUE,
    updated_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO perfis (id, nome, email, updated_at)
SELECT g, 'Perfil ' || g, 'perfil' || g || '@example.com', now() - interval '2 days' FROM generate_series(1, 40) g;
INSERT INTO perfis (id, nome, email) VALUES (1001, 'Perfil externo', 'externo@example.com');
SELECT setval('perfis_id_seq', 2000);

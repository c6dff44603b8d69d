"""The seed's three tenant tables (exact DDL), their default source queries and their log labels.

A source query returns the target table's columns by name, plus the watermark column, for one
instance (``%(instance)s``). It is plain SQL run on the main database; dbdeck wraps it, it never
pastes anything into it. Other tables are configuration: give name, ddl, key and source_query.
"""

WPP_CONTACTS_DDL = """CREATE TABLE wpp_contacts (
    id INT NOT NULL,
    instance VARCHAR(255) NOT NULL,
    name VARCHAR(255) NOT NULL,
    phone VARCHAR(50) NOT NULL,
    customer_id INT NULL,
    is_deleted TINYINT(1) NOT NULL DEFAULT 0,
    PRIMARY KEY (id),
    UNIQUE KEY unique_instance_phone (instance, phone)
)"""

WPP_CONTACT_SECTORS_DDL = """CREATE TABLE wpp_contact_sectors (
    contact_id INT NOT NULL,
    sector_id INT NOT NULL,
    PRIMARY KEY (contact_id, sector_id)
)"""

WPP_CHATS_DDL = """CREATE TABLE wpp_chats (
    id INT NOT NULL,
    instance VARCHAR(255) NOT NULL,
    type VARCHAR(50) NOT NULL,
    avatar_url TEXT NULL,
    user_id INT NULL,
    contact_id INT NOT NULL,
    sector_id INT NULL,
    started_at DATETIME NOT NULL,
    finished_at DATETIME NULL,
    finished_by INT NULL,
    result_id INT NULL,
    is_finished TINYINT(1) NOT NULL DEFAULT 0,
    is_schedule TINYINT(1) NOT NULL DEFAULT 0,
    PRIMARY KEY (id)
)"""

BUILTIN_TABLES = {
    "wpp_contacts": {
        "ddl": WPP_CONTACTS_DDL,
        "key": ["id"],
        "columns": ["id", "instance", "name", "phone", "customer_id", "is_deleted"],
        # a soft-deleted contact stays, with is_deleted = 1 (the seed's column)
        "source_query": "SELECT c.id, c.instance, c.name, c.phone, c.customer_id,\n"
                        "       c.deleted_at IS NOT NULL AS is_deleted, c.updated_at\n"
                        "FROM contacts c WHERE c.instance = %(instance)s",
        "watermark": "updated_at",
        "source_tables": ["contacts"],
        # a hard-deleted contact leaves no row to find by its timestamp either
        "capture_deletes": {"source_table": "contacts"},
        "labels": {"pt": ("contatos", "contatos"), "en": ("contacts", "contacts")},
    },
    "wpp_contact_sectors": {
        "ddl": WPP_CONTACT_SECTORS_DDL,
        "key": ["contact_id", "sector_id"],
        "columns": ["contact_id", "sector_id"],
        "source_query": "SELECT cs.contact_id, cs.sector_id, cs.updated_at\n"
                        "FROM contact_sectors cs JOIN contacts c ON c.id = cs.contact_id\n"
                        "WHERE c.instance = %(instance)s",
        "watermark": "updated_at",
        "source_tables": ["contact_sectors"],
        # a removed sector leaves no row to find by its timestamp: its deletion is captured on the source
        "capture_deletes": {"source_table": "contact_sectors"},
        "labels": {"pt": ("setores de contatos", "setores"), "en": ("contact sectors", "sectors")},
    },
    "wpp_chats": {
        "ddl": WPP_CHATS_DDL,
        "key": ["id"],
        "columns": ["id", "instance", "type", "avatar_url", "user_id", "contact_id", "sector_id", "started_at",
                    "finished_at", "finished_by", "result_id", "is_finished", "is_schedule"],
        "source_query": "SELECT ch.id, ch.instance, ch.type, ch.avatar_url, ch.user_id, ch.contact_id, ch.sector_id,\n"
                        "       ch.started_at, ch.finished_at, ch.finished_by, ch.result_id, ch.is_finished,\n"
                        "       ch.is_schedule, ch.updated_at\n"
                        "FROM chats ch WHERE ch.instance = %(instance)s",
        "watermark": "updated_at",
        "source_tables": ["chats"],
        "capture_deletes": {"source_table": "chats"},
        "labels": {"pt": ("chats", "chats"), "en": ("chats", "chats")},
    },
}

# The seed's log lines ([LocalSync] prefix added by the caller), and their English equivalents.
MESSAGES = {
    "pt": {
        "start": "====== Iniciando sincronização para: {instance} ======",
        "checking": "Verificando tabelas no banco do tenant: {instance}",
        "table_ok": "Tabela {table} verificada/criada",
        "syncing": "Sincronizando {label} para: {instance}",
        "synced": "{count} {label} sincronizados",
        "removed": "{count} {label} removidos",
        "done": "====== Sincronização concluída para: {instance} ======",
        "summary": "Resumo: {parts}",
        "failed": "ERRO na sincronização de {instance}: {error}",
        "failed_summary": "Falha em {count} de {total} instância(s): {names}",
    },
    "en": {
        "start": "====== Starting sync for: {instance} ======",
        "checking": "Checking tables in the tenant database: {instance}",
        "table_ok": "Table {table} checked/created",
        "syncing": "Syncing {label} for: {instance}",
        "synced": "{count} {label} synced",
        "removed": "{count} {label} removed",
        "done": "====== Sync finished for: {instance} ======",
        "summary": "Summary: {parts}",
        "failed": "ERROR syncing {instance}: {error}",
        "failed_summary": "{count} of {total} instance(s) failed: {names}",
    },
}

import io

from dbdeck.plugins.sync_prod_to_dev.parallel import balance, group_post_data, split_post_data, sql_only
from dbdeck.plugins.sync_prod_to_dev.progress import Progress

POST_DATA = """--
-- PostgreSQL database dump
--

\\restrict abc123
SET statement_timeout = 0;
SELECT pg_catalog.set_config('search_path', '', false);

--
-- Name: my table my table_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public."my table"
    ADD CONSTRAINT "my table_pkey" PRIMARY KEY (id);


--
-- Name: orders_customer; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX orders_customer ON public.orders USING btree (customer_id);


--
-- Name: INDEX orders_customer; Type: COMMENT; Schema: public; Owner: -
--

COMMENT ON INDEX public.orders_customer IS 'by customer';


--
-- Name: orders orders_customer_id_fkey; Type: FK CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.orders
    ADD CONSTRAINT orders_customer_id_fkey FOREIGN KEY (customer_id) REFERENCES public."my table"(id);


--
-- Name: orders orders_positive; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE public.orders ADD CONSTRAINT orders_positive CHECK (total > 0) NOT VALID;

\\unrestrict abc123
"""


def test_post_data_split_at_headers_and_grouped_by_table():
    preamble, entries = split_post_data(POST_DATA)
    assert "set_config('search_path'" in preamble
    assert [kind for kind, *_ in entries] == ["CONSTRAINT", "INDEX", "COMMENT", "FK CONSTRAINT", "CONSTRAINT"]
    per_table, foreign, rest = group_post_data(
        entries, index_tables={"public.orders_customer": "public.orders"},
        raw_tables={"public.my table": 'public."my table"', "public.orders": "public.orders"})
    assert list(per_table) == ['public."my table"', "public.orders"]
    assert "PRIMARY KEY" in per_table['public."my table"'][0]
    assert "CREATE INDEX orders_customer" in per_table["public.orders"][0]
    assert len(foreign) == 1 and "FOREIGN KEY" in foreign[0]
    # comments and not-valid checks keep dump order, after the indexes they refer to
    assert [("COMMENT" in body, "CHECK" in body) for body in rest] == [(True, False), (False, True)]


def test_preamble_sent_with_dash_c_loses_meta_commands():
    preamble, _ = split_post_data(POST_DATA)
    assert "\\restrict" not in sql_only(preamble) and "SET statement_timeout = 0;" in sql_only(preamble)


def test_balance_puts_biggest_first_on_least_loaded():
    streams = balance([(100, "a"), (60, "b"), (50, "c"), (5, "d")], 2)
    assert streams == [["a", "d"], ["b", "c"]]
    assert balance([(1, "x")], 4) == [["x"]]


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_logs_each_tenth_off_a_terminal_and_rewrites_one_line_on_it():
    said = []
    progress = Progress(said.append, total_items=20, total_bytes=2000, what="tables", stream=io.StringIO())
    for done in range(1, 20):
        progress.update(done, done * 100)
    progress.finish()
    assert len(said) == 10 and said[0].startswith("progress: 2/20 tables") and said[-1].startswith("copied 20/20")

    terminal = FakeTerminal()
    said = []
    progress = Progress(said.append, total_items=3, total_bytes=3 * 1024 * 1024, what="tables", stream=terminal)
    progress.update(1, 1024 * 1024)
    progress.finish()
    assert "\r\x1b[K1/3 tables, 1.0 MB of 3.0 MB (33%" in terminal.getvalue()
    assert said == [said[0]] and said[0].startswith("copied 3/3 tables")


def test_the_last_entry_loses_the_dumps_trailer_it_would_be_sent_with_dash_c():
    # a database whose last post-data entry is a key (one table): that statement goes to psql -c
    _, entries = split_post_data(POST_DATA.split("--\n-- Name: INDEX orders_customer")[0].rstrip() +
                                 "\n\n\\unrestrict abc123\n")
    assert entries[-1][0] == "INDEX" and "\\unrestrict" not in entries[-1][3]
    assert "CREATE INDEX orders_customer" in entries[-1][3]


def test_work_database_names_stay_distinct_within_63_bytes():
    from dbdeck.plugins.sync_prod_to_dev.clone import OLD_SUFFIX, STAGING_SUFFIX, work_database_name

    assert work_database_name("crm_development", STAGING_SUFFIX) == "crm_development__dbdeck_staging"
    for dev in ("d" * 48, "d" * 62, "d" * 63, "é" * 31, "app_" + "x" * 50):
        staging, old = work_database_name(dev, STAGING_SUFFIX), work_database_name(dev, OLD_SUFFIX)
        assert len(staging.encode()) <= 63 and len(old.encode()) <= 63
        assert staging != old and staging.endswith(STAGING_SUFFIX) and old.endswith(OLD_SUFFIX)
        assert work_database_name(dev, STAGING_SUFFIX) == staging
    assert work_database_name("d" * 60 + "a", OLD_SUFFIX) != work_database_name("d" * 60 + "b", OLD_SUFFIX)


class _Staging:
    def __init__(self, waiting):
        self.waiting = waiting

    def query(self, sql_text):
        if "pg_stat_activity" in sql_text:
            return [{"sessions": 2, "waiting": self.waiting}]
        return []


def test_a_copy_with_no_rows_while_every_load_waits_is_a_stall():
    import pytest

    from dbdeck.errors import DbdeckError
    from dbdeck.plugins.sync_prod_to_dev.parallel import CopyWatcher

    now = [0.0]
    streams = [[{"name": "public.t", "bytes": 10}]]
    building = CopyWatcher(_Staging(waiting=1), streams, Progress(lambda line: None, 1, 10, "tables"),
                           stall_timeout=60, clock=lambda: now[0])
    for now[0] in (0, 30, 61, 200):
        building.poll()  # one session builds an index: no stall, however long
    stalled = CopyWatcher(_Staging(waiting=2), streams, Progress(lambda line: None, 1, 10, "tables"),
                          stall_timeout=60, clock=lambda: now[0])
    now[0] = 0
    stalled.poll()
    now[0] = 59
    stalled.poll()
    now[0] = 61
    with pytest.raises(DbdeckError, match="no rows from prod for 61s"):
        stalled.poll()


def test_progress_never_goes_backwards_and_shows_rate_and_time_left():
    said = []
    progress = Progress(said.append, total_items=10, total_bytes=10_000, what="tables", stream=io.StringIO())
    progress.started -= 10  # ten seconds in
    progress.update(5, 5_000)
    progress.update(5, 0)  # a table's COPY row gone while its indexes build: not a step back
    assert (progress.items, progress.bytes) == (5, 5_000)
    line = progress.line()
    assert "50%" in line and "/s" in line and "s left" in line
    progress.finish()
    assert "left" not in said[-1]

"""Restoring a >= 500 MB database to a point in time: Barman (dbdeck pitr restore + WAL replay) against the
seed's way (the last `pg_dump` file -> `psql`), in one run on the same data.

The pair is built as the README says (stock PostgreSQL, setup-master, rebuild-replica, dbdeck pitr setup).
Timeline: data loaded; the nightly base backup (`pitr create`) and the seed's dump, both taken at the same
moment; then a writer commits a row every 10 ms for WRITE_SECONDS; the "incident" is the moment T the
writer stops. Each way restores as close to T as it can:
  seed    the dump (`pg_dump` plain SQL) into a new database with `psql`
  Barman  `dbdeck pitr restore --to-time T` into a new directory, started until it accepts writes
Printed: wall time of each restore and the ratio, and the recovery point each reached (seconds of
commits lost before T).

    DBDECK_BENCH_ROWS=4500000 (about 520 MB with its index)   DBDECK_BENCH_WRITE_SECONDS=30
"""

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psycopg
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dbdeck.plugins.sandbox.servers import PostgresServer, free_port, give_to  # noqa: E402
from dbdeck.run import Runner  # noqa: E402

ROWS = int(os.environ.get("DBDECK_BENCH_ROWS", "4500000"))
WRITE_SECONDS = float(os.environ.get("DBDECK_BENCH_WRITE_SECONDS", "30"))


def dbdeck(config, *args, timeout=3600):
    result = subprocess.run([str(ROOT / "bin" / args[0]), "--config", str(config), *args[1:]],
                            capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{result.stdout}{result.stderr}")
    return result


def main():
    if shutil.which("barman") is None:
        raise SystemExit("barman is not installed (apt-get install barman; scripts/bootstrap does it)")
    base = Path(tempfile.mkdtemp(prefix="dbdeck-bench-backup-"))
    os.chmod(base, 0o755)
    password = "bench-" + os.urandom(6).hex()
    ports = {"alpha": free_port(), "beta": free_port()}
    alpha = PostgresServer(base / "alpha", ports["alpha"], Runner(), socket_dir=base / "alpha.run")
    alpha.init(password, stock=True)
    alpha.start()
    servers = [alpha]
    give_to(base / "beta", alpha.os_user, 0o700)
    give_to(base / "beta.run", alpha.os_user, 0o700)
    node = lambda name, settings: {  # noqa: E731
        "endpoint": {"host": "127.0.0.1", "port": ports[name], "user": "postgres", "password": password,
                     "database": "postgres", "connect_timeout": 3},
        "driver": "local", "data_dir": str(base / name), "settings": settings}
    config = base / "dbdeck.yaml"
    config.write_text(yaml.safe_dump({
        "dbdeck": {"run_dir": str(base / "run"), "state_dir": str(base / "state")},
        "replication": {"nodes": {"alpha": node("alpha", {}),
                                  "beta": node("beta", {"port": ports["beta"],
                                                        "unix_socket_directories": str(base / "beta.run")})},
                        "replication_password_file": str(base / "replicator.pw"), "log_dir": str(base / "logs"),
                        "backup": {"home": str(base / "barman")}}}))
    connect = lambda port=ports["alpha"], database="postgres": psycopg.connect(  # noqa: E731
        host="127.0.0.1", port=port, user="postgres", password=password, dbname=database, autocommit=True)
    try:
        subprocess.run([str(ROOT / "bin" / "setup-master"), "--config", str(config), "--apply-settings"],
                       capture_output=True)
        alpha.stop()
        alpha.start()
        dbdeck(config, "setup-master")
        dbdeck(config, "rebuild-replica")
        dbdeck(config, "dbdeck", "pitr", "setup", "--no-backup")
        with connect() as conn:
            conn.execute("CREATE DATABASE app")
        with connect(database="app") as conn:
            conn.execute("CREATE TABLE orders (id bigint PRIMARY KEY, customer int, note text, at timestamptz)")
            conn.execute("INSERT INTO orders SELECT g, g %% 1000, md5(g::text) || md5((g * 7)::text), now() "
                         "FROM generate_series(1, %s) g", (ROWS,))
            conn.execute("CREATE TABLE ticks (id serial PRIMARY KEY, at timestamptz DEFAULT clock_timestamp())")
            size = conn.execute("SELECT pg_database_size('app')").fetchone()[0]
        print(f"app database: {size / 1024**2:.0f} MB ({ROWS} rows)")

        dbdeck(config, "dbdeck", "pitr", "create")
        dump = base / "app.sql"
        dumped_at = time.time()
        with open(dump, "wb") as out:
            subprocess.run([str(alpha.bindir / "pg_dump"), "-h", "127.0.0.1", "-p", str(ports["alpha"]), "-U",
                            "postgres", "app"], stdout=out, check=True, env={**os.environ, "PGPASSWORD": password})

        stop = threading.Event()

        def writer():
            with connect(database="app") as conn:
                while not stop.is_set():
                    conn.execute("INSERT INTO ticks DEFAULT VALUES")
                    time.sleep(0.01)

        thread = threading.Thread(target=writer)
        thread.start()
        time.sleep(WRITE_SECONDS)
        stop.set()
        thread.join()
        with connect(database="app") as conn:
            incident, last_tick = conn.execute("SELECT clock_timestamp(), max(at) FROM ticks").fetchone()
        incident_text = incident.isoformat()

        # the seed's way: the last dump into a new database
        started = time.monotonic()
        with connect() as conn:
            conn.execute("CREATE DATABASE app_from_dump")
        subprocess.run([str(alpha.bindir / "psql"), "-q", "-X", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-p",
                        str(ports["alpha"]), "-U", "postgres", "-d", "app_from_dump", "-f", str(dump)],
                       check=True, stdout=subprocess.DEVNULL, env={**os.environ, "PGPASSWORD": password})
        seed_seconds = time.monotonic() - started
        with connect(database="app_from_dump") as conn:
            seed_last = conn.execute("SELECT max(at) FROM ticks").fetchone()[0]
        seed_lost = (incident - seed_last).total_seconds() if seed_last else incident.timestamp() - dumped_at

        # Barman: restore to T and start it until it accepts writes
        target = base / "restored"
        started = time.monotonic()
        dbdeck(config, "dbdeck", "pitr", "restore", "--to-time", incident_text, "--target", str(target))
        files_seconds = time.monotonic() - started
        port = free_port()
        run_dir = base / "restored.run"
        give_to(run_dir, alpha.os_user, 0o700)
        restored = PostgresServer(target, port, Runner(), socket_dir=run_dir)
        restored.configure({"port": port, "unix_socket_directories": f"'{run_dir}'"})
        restored.start(timeout=3600)
        deadline = time.monotonic() + 3600
        while True:
            try:
                with connect(port=port) as conn:
                    if not conn.execute("SELECT pg_is_in_recovery()").fetchone()[0]:
                        break
            except psycopg.OperationalError:
                if not restored.is_running() or time.monotonic() > deadline:
                    raise SystemExit("the restored copy did not start: " + restored.log_path.read_text()[-2000:])
            time.sleep(0.2)
        barman_seconds = time.monotonic() - started
        servers.append(restored)
        with connect(port=port, database="app") as conn:
            barman_last, rows = conn.execute("SELECT (SELECT max(at) FROM ticks), (SELECT count(*) FROM orders)"
                                             ).fetchone()
        assert rows == ROWS, f"the restored copy has {rows} orders, not {ROWS}"
        barman_lost = (incident - barman_last).total_seconds()

        print(f"seed   (pg_dump file -> psql):        {seed_seconds:7.1f} s, recovery point {seed_lost:6.1f} s "
              f"before the incident (the dump)")
        print(f"Barman (pitr restore --to-time + replay): {barman_seconds:7.1f} s, recovery point "
              f"{barman_lost:6.2f} s before the incident (last commit {last_tick.isoformat()})")
        print(f"       of which the files (barman recover, WAL to the target): {files_seconds:.1f} s; the server's start, "
              f"replay and promotion: {barman_seconds - files_seconds:.1f} s")
        print(f"ratio: the seed's restore takes {seed_seconds / barman_seconds:.2f}x Barman's; data lost: seed "
              f"{seed_lost:.1f} s, Barman {barman_lost:.2f} s")
    finally:
        subprocess.run(["pkill", "-f", f"directory={base}/barman"], check=False)
        for server in servers:
            try:
                server.stop(mode="immediate")
            except Exception:  # noqa: BLE001 - cleaning up what may not have started
                pass
        if not os.environ.get("DBDECK_BENCH_KEEP"):
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()

"""CLI start-up, and the cost of a skipped scheduled run, against `python3 -c pass` in the same run.

1. `dbdeck --version` / `--help` against `python3 -c pass` and a bash script.
2. The whole cron-started process for an unchanged sync-prod-to-dev: the installed crontab line's
   command, run under cron's environment from /, with prod unchanged since the last sync (what most
   5-minute runs are), answered from its stamp (dbdeck.quick), and the same with the stamp removed
   before each run (the full path). Two throwaway local clusters; target: at most 0.25 s of wall time.

Prints medians and ratios (absolute times are not comparable across machines or runs).
"""

import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RUNS = 25
CRON_ENVIRONMENT = {"HOME": "/root", "LOGNAME": "root", "SHELL": "/bin/sh", "PATH": "/usr/bin:/bin"}


def median_seconds(argv, env=None, cwd=None, before=None):
    subprocess.run(argv, capture_output=True, check=True, env=env, cwd=cwd)  # warm the page cache
    samples = []
    for _ in range(RUNS):
        if before:
            before()
        start = time.perf_counter()
        subprocess.run(argv, capture_output=True, check=True, env=env, cwd=cwd)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def skipped_scheduled_run():
    """Median wall time of the crontab line's command when prod is unchanged, and the job's log."""
    from dbdeck.plugins.sandbox.servers import PostgresServer, free_port

    base = Path(tempfile.mkdtemp(prefix="dbdeck-bench-startup-", dir="/var/tmp"))
    os.chmod(base, 0o755)  # the clusters run as the postgres user
    password = secrets.token_urlsafe(16)
    servers = {name: PostgresServer(base / name, free_port()) for name in ("prod", "dev")}
    try:
        for server in servers.values():
            server.init(password, stock=True)
            server.start()
        servers["prod"].psql("CREATE DATABASE app")
        servers["prod"].psql("CREATE TABLE t AS SELECT g AS id FROM generate_series(1, 1000) g", database="app")
        (base / "pw").write_text(password + "\n")
        (base / "pw").chmod(0o600)
        cron_file = base / "crond"
        config = base / "dbdeck.yaml"
        config.write_text(f"""
dbdeck:
  state_dir: {base}/state
  run_dir: {base}/run
endpoints:
  prod: {{host: 127.0.0.1, port: {servers['prod'].port}, user: postgres, database: app, password_file: {base}/pw,
          role: production}}
  dev: {{host: 127.0.0.1, port: {servers['dev'].port}, user: postgres, database: app_dev, password_file: {base}/pw,
         role: development}}
sync_prod_to_dev: {{source: prod, target: dev}}
scheduler: {{cron_file: {cron_file}}}
""")
        subprocess.run([str(ROOT / "bin" / "setup-sync-cron"), "--config", str(config), "--install"], check=True,
                       capture_output=True)
        line = [l for l in cron_file.read_text().splitlines() if "dbdeck:job=sync-prod-to-dev" in l][0]
        argv = ["/bin/sh", "-c", line.split(None, 6)[6]]
        first = subprocess.run(argv, env=CRON_ENVIRONMENT, cwd="/", capture_output=True, text=True)
        if first.returncode != 0:
            raise SystemExit(f"the first (copying) run failed: {first.stderr}")
        from dbdeck import quick

        stamp = quick.stamp_path(["dbdeck", "--config", str(config), "schedule", "exec", "sync-prod-to-dev"])
        quick_seconds = median_seconds(argv, env=CRON_ENVIRONMENT, cwd="/")
        full_seconds = median_seconds(argv, env=CRON_ENVIRONMENT, cwd="/", before=lambda: stamp.unlink(missing_ok=True))
        log = (base / "state" / "log" / "job-sync-prod-to-dev.log").read_text()
        if log.count("prod unchanged") < 2 * RUNS:
            raise SystemExit("the timed runs did not all skip: " + log[-500:])
        return quick_seconds, full_seconds
    finally:
        for server in servers.values():
            server.destroy()
        subprocess.run(["rm", "-rf", str(base)], check=False)


def main():
    with tempfile.NamedTemporaryFile("w", suffix=".sh", delete=False) as script:
        script.write('#!/bin/bash\ncase "$1" in --version) echo "sync-prod-to-dev.sh 1.0";; esac\n')
    Path(script.name).chmod(0o755)
    python = median_seconds([sys.executable, "-c", "pass"])
    bash = median_seconds([script.name, "--version"])
    version = median_seconds([str(ROOT / "bin" / "dbdeck"), "--version"])
    helptext = median_seconds([str(ROOT / "bin" / "dbdeck"), "--help"])
    print(f"python3 -c pass        {python * 1000:7.1f} ms  (baseline)")
    print(f"bash script --version  {bash * 1000:7.1f} ms")
    print(f"dbdeck --version       {version * 1000:7.1f} ms")
    print(f"dbdeck --help          {helptext * 1000:7.1f} ms")
    print(f"ratio dbdeck --version / python3 -c pass: {version / python:.2f}x")
    print(f"ratio dbdeck --help    / python3 -c pass: {helptext / python:.2f}x")
    print(f"ratio dbdeck --version / bash script:     {version / bash:.2f}x")
    Path(script.name).unlink()
    skipped, full = skipped_scheduled_run()
    print(f"skipped scheduled run  {skipped * 1000:7.1f} ms  (crontab line, cron's environment, prod unchanged: "
          f"answered from its stamp)")
    print(f"  same, full path      {full * 1000:7.1f} ms  (stamp removed before each run)")
    print(f"ratio skipped run      / python3 -c pass: {skipped / python:.2f}x  "
          f"(target: <= 0.25 s here, i.e. <= {0.25 / python:.1f}x)")
    print(f"ratio full-path skip   / quick answer:    {full / skipped:.2f}x")


if __name__ == "__main__":
    main()

"""deploy against real components: dockerd + docker-compose, an sshd on loopback, rsync, and the
seed's database container for the backups. The sample app (deploy_app/) serves its version on
/api/health; a build carrying migrations/FAIL fails its migration, one carrying HEALTH_FAIL answers 503.
"""

import json
import os
import shutil
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import CONTAINER_PREFIX, require

pytestmark = pytest.mark.integration
# the tests of one module-scoped server build on each other's state: one worker runs them, in order
ON_WORLD, ON_STAGING, ON_SEED = (pytest.mark.xdist_group(f"deploy-{name}") for name in ("world", "staging", "seed"))

APP = Path(__file__).parent / "deploy_app"
DATABASE = "deployapp"


def docker(*args, check=True):
    return subprocess.run(["docker", *args], capture_output=True, text=True, check=check)


class World:
    """One server directory (reached over SSH, or locally) with the sample app's source beside it."""

    def __init__(self, root, sshd, database_container, dbdeck_bin, name, target="ssh"):
        from dbdeck.plugins.sandbox.servers import free_port

        self.root, self.run_bin, self.name, self.sshd = root, dbdeck_bin, name, sshd
        self.source = root / "source"
        # compose names its project after this directory: prefixed, so no other worker or checkout shares it
        self.path = root / "server" / f"{CONTAINER_PREFIX}deploy-backend"
        self.hooks = root / "hooks"
        shutil.copytree(APP, self.source)
        self.hooks.mkdir()
        (self.source / ".env").write_text("APP_PORT=1\nDATABASE_URL=postgresql://u:runner-secret@x/db\n")
        (self.source / ".env.local").write_text("LOCAL=only-on-the-runner\n")
        self.port = free_port()
        self.container = f"{CONTAINER_PREFIX}{name}-backend"
        self.image = f"dbdeck-test-{CONTAINER_PREFIX.lower()}{name}"
        self.path.mkdir(parents=True)
        self.server_env = f"APP_PORT={self.port}\nAPP_IMAGE={self.image}\nAPP_CONTAINER={self.container}\n"
        (self.path / ".env").write_text(self.server_env)
        server = {"target": target}
        if target == "ssh":
            server.update(host="127.0.0.1", port=sshd.port, user=sshd.user, key_file=str(sshd.key),
                          known_hosts=str(sshd.known_hosts))
        profile = {
            "path": str(self.path), "source": str(self.source), "container": self.container, "image": self.image,
            "compose_file": "docker-compose.yml", "migrate_command": ["python3", "/app/migrate.py"],
            "health_url": f"http://127.0.0.1:{self.port}/api/health", "health_attempts": 6,
            "health_interval": 0.3, "start_timeout": 30, "hooks_dir": str(self.hooks), "log_lines": 20,
            "database": {"container": database_container, "user": "postgres", "name": DATABASE},
        }
        self.config = root / "dbdeck.yaml"
        self.events = root / "events.jsonl"
        self.config.write_text(yaml.safe_dump({
            "dbdeck": {"run_dir": str(root / "run"), "state_dir": str(root / "state")},
            "notify": {"command": ["sh", "-c", f"cat >> {self.events}; echo >> {self.events}"]},
            "deploy": {"server": server, "environments": {
                "production": profile,
                "staging": {**profile, "health_from": "server"},
            }},
        }))

    def run(self, *args, command="deploy", env=None, **kwargs):
        env = {"GITHUB_SHA": "", "GITHUB_REF_NAME": "", **(env or {})}
        return self.run_bin(*args, "--config", self.config, command=command, env=env, timeout=300, **kwargs)

    def deploy(self, version, env="production", *extra, fail_migration=False, unhealthy=False):
        (self.source / "VERSION").write_text(version + "\n")
        for flag, path in ((fail_migration, self.source / "migrations" / "FAIL"),
                           (unhealthy, self.source / "HEALTH_FAIL")):
            # written either way: production rsyncs without --delete, so a removed file would stay on the server
            path.write_text("1\n" if flag else "0\n")
        return self.run("--env", env, "--version", version, *extra)

    def serving(self):
        import urllib.request

        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/api/health", timeout=5) as response:
                return json.load(response)["version"]
        except OSError:
            return None

    def state(self):
        return json.loads((self.path / ".dbdeck" / "deploy-state.json").read_text())

    def tags(self):
        out = docker("image", "ls", "--format", "{{.Tag}}", self.image).stdout.split()
        return sorted(t for t in out if t != "<none>")

    def audit(self):
        return [json.loads(line) for line in (self.path / ".dbdeck" / "audit.log").read_text().splitlines()]

    def backups(self):
        directory = self.path / "backups"
        return sorted(p.name for p in directory.iterdir()) if directory.exists() else []

    def remove(self):
        docker("rm", "-f", self.container, check=False)
        for tag in self.tags():
            docker("rmi", "-f", f"{self.image}:{tag}", check=False)


def _psql(container, sql, database=DATABASE):
    return subprocess.run(["docker", "exec", "-i", container, "psql", "-U", "postgres", "-d", database, "-qAtX",
                           "-v", "ON_ERROR_STOP=1", "-c", sql], capture_output=True, text=True, check=True).stdout


@pytest.fixture(scope="module")
def app_database(crm_containers):
    container = crm_containers["prod"]
    _psql(container, f"DROP DATABASE IF EXISTS {DATABASE}", database="postgres")
    _psql(container, f"CREATE DATABASE {DATABASE}", database="postgres")
    _psql(container, "CREATE TABLE customers (id int PRIMARY KEY, name text); "
                     "INSERT INTO customers SELECT g, 'customer ' || g FROM generate_series(1, 100) g")
    return container


@pytest.fixture(scope="module")
def world(tmp_path_factory, sshd, app_database, dbdeck_bin_module):
    require("rsync", "rsync")
    require("docker-compose", "docker-compose")
    made = World(tmp_path_factory.mktemp("deploy"), sshd, app_database, dbdeck_bin_module, "deployapp")
    yield made
    made.remove()


@pytest.fixture(scope="module")
def dbdeck_bin_module():
    from tests.conftest import BIN

    def run(*args, command="dbdeck", env=None, cwd=None, input=None, timeout=120):
        return subprocess.run([str(BIN / command), *map(str, args)], capture_output=True, text=True,
                              env={**os.environ, **(env or {})}, cwd=cwd, input=input, timeout=timeout)

    return run


def _out(result):
    return result.stdout + result.stderr


@ON_WORLD
def test_dry_run_prints_every_remote_command_and_changes_nothing(world):
    before = sorted(p.relative_to(world.path) for p in world.path.rglob("*"))
    sshd_log = world.sshd.key.parent / "sshd.log"
    logins = sshd_log.read_text().count("Accepted publickey")
    assert logins > 0, "sshd does not log logins: this test could not see a connection"
    result = world.deploy("v0-dry", "production", "--dry-run")
    out = _out(result)
    assert result.returncode == 0, out
    assert sshd_log.read_text().count("Accepted publickey") == logins, "the dry run connected to the server"
    assert sorted(p.relative_to(world.path) for p in world.path.rglob("*")) == before
    assert docker("inspect", world.container, check=False).returncode != 0
    assert world.tags() == []
    for expected in ("would run: ssh", "pg_dump", "rsync", "build backend", "up -d --no-deps", "/app/migrate.py",
                     "would check: GET", "deploy.lock", "to roll back to", "docker logs --tail 20"):
        assert expected in out, f"{expected!r} missing from the dry run:\n{out}"
    assert "runner-secret" not in out
    assert "would notify: deploy.succeeded" in out and not world.events.exists()
    assert "the real run uses `docker-compose` (v1) where the server has no compose plugin" in out
    pinned = yaml.safe_load(world.config.read_text())
    pinned["deploy"]["environments"]["production"]["compose_command"] = "docker-compose"
    (world.root / "pinned.yaml").write_text(yaml.safe_dump(pinned))
    exact = world.run_bin("--env", "production", "--version", "v0-dry", "--dry-run", "--config",
                          world.root / "pinned.yaml", command="deploy", env={"GITHUB_SHA": ""}, timeout=300)
    assert exact.returncode == 0 and "docker-compose -f docker-compose.yml build backend" in _out(exact), _out(exact)
    assert "docker compose" not in _out(exact)


@ON_WORLD
def test_first_deploy_says_rollback_is_impossible_then_serves(world):
    (world.hooks / "pre-deploy").write_text(f"#!/bin/sh\nenv | grep ^DBDECK_DEPLOY_ | sort > {world.root}/pre.env\n")
    (world.hooks / "post-deploy").write_text(f"#!/bin/sh\nenv | grep ^DBDECK_DEPLOY_ | sort > {world.root}/post.env\n")
    for hook in ("pre-deploy", "post-deploy"):
        (world.hooks / hook).chmod(0o755)
    result = world.deploy("v1")
    out = _out(result)
    assert result.returncode == 0, out
    assert out.index("First deploy:") < out.index("Building Docker image...")
    assert "Health check OK!" in out
    assert world.serving() == "v1"
    assert world.state()["current"] == "v1"
    assert "DBDECK_DEPLOY_VERSION=v1" in (world.root / "post.env").read_text()
    assert "DBDECK_DEPLOY_OUTCOME=succeeded" in (world.root / "post.env").read_text()
    assert "DBDECK_DEPLOY_OUTCOME=starting" in (world.root / "pre.env").read_text()


@ON_WORLD
def test_second_deploy_serves_v2_keeps_v1_and_never_sends_env(world):
    subprocess.run(["git", "init", "-q", "-b", "main", str(world.source)], check=True)
    subprocess.run(["git", "-C", str(world.source), "remote", "add", "origin", "https://token@git.example/x"],
                   check=True)
    result = world.deploy("v2")
    assert result.returncode == 0, _out(result)
    assert "First deploy" not in _out(result)
    assert world.serving() == "v2"
    assert world.tags() == ["latest", "v1", "v2"]
    assert (world.path / ".env").read_text() == world.server_env
    assert not (world.path / ".env.local").exists()
    assert not (world.path / ".git").exists()  # the repository's history and remotes stay on the runner
    assert (world.path / "app.py").read_text() == (APP / "app.py").read_text()
    backups = world.backups()
    assert len(backups) == 2 and all(b.startswith("pre-deploy-") and b.endswith(".sql") for b in backups)
    for name in backups:
        assert stat.S_IMODE((world.path / "backups" / name).stat().st_mode) == 0o600
        assert "customer 42" in (world.path / "backups" / name).read_text()
    status = world.run("status", "--env", "production", "--format", "json")
    data = json.loads(status.stdout)
    assert data["current"] == "v2" and data["container"]["state"] == "running"
    assert [h["version"] for h in data["kept_versions"] if h["kept"]] == ["v2", "v1"]
    assert data["lock"] is None


@ON_WORLD
def test_failing_migration_rolls_back_to_v2(world):
    (world.hooks / "post-rollback").write_text(
        f"#!/bin/sh\nenv | grep ^DBDECK_DEPLOY_ | sort > {world.root}/rollback.env\n")
    (world.hooks / "post-rollback").chmod(0o755)
    result = world.deploy("v3", fail_migration=True)
    out = _out(result)
    assert result.returncode == 1, out
    assert "ERROR: Migration failed!" in out and "P3018" in out
    assert "Rollback completed. Please check migrations manually." in out
    assert "rolled back to v2" in out and "backup restore pre-deploy-" in out
    assert world.serving() == "v2"
    assert world.state()["current"] == "v2"
    assert "v3" not in world.tags()
    assert world.audit()[-1]["outcome"] == "rolled_back" and world.audit()[-1]["version"] == "v3"
    events = [json.loads(line) for line in world.events.read_text().splitlines() if line.strip()]
    assert events[-1]["kind"] == "deploy.rolled_back" and events[-1]["severity"] == "critical"
    assert events[-1]["details"]["version"] == "v3" and events[-1]["details"]["previous"] == "v2"
    hook_env = (world.root / "rollback.env").read_text()
    # the same meaning as after a manual rollback: VERSION serves now, PREVIOUS_VERSION was rolled away from
    assert "DBDECK_DEPLOY_VERSION=v2" in hook_env and "DBDECK_DEPLOY_PREVIOUS_VERSION=v3" in hook_env
    assert "DBDECK_DEPLOY_OUTCOME=rolled_back" in hook_env


@ON_WORLD
def test_never_healthy_rolls_back_and_shows_the_logs(world):
    result = world.deploy("v4", unhealthy=True)
    out = _out(result)
    assert result.returncode == 1, out
    assert "Attempt 6/6 - Status: 503" in out, out
    assert "Health check failed! Initiating rollback..." in out
    assert "Container logs before rollback:" in out and "sample backend v4 listening" in out
    assert "rolled back to v2, which is serving and healthy" in out
    assert world.serving() == "v2"
    assert world.state()["current"] == "v2"


@ON_WORLD
def test_lock_refuses_a_second_deploy_until_released(world):
    taken = world.run("lock", "acquire", "--env", "production", "--message", "db maintenance")
    assert taken.returncode == 0, _out(taken)
    refused = world.deploy("v5")
    assert refused.returncode == 75, _out(refused)
    assert "another deploy holds the lock" in refused.stderr and "db maintenance" in refused.stderr
    assert "deploy lock release --env production" in refused.stderr
    status = world.run("lock", "status", "--env", "production")
    assert status.returncode == 1 and "db maintenance" in status.stdout
    released = world.run("lock", "release", "--env", "production")
    assert released.returncode == 0 and "db maintenance" in released.stdout
    assert world.run("lock", "status", "--env", "production").returncode == 0
    assert world.serving() == "v2"


@ON_WORLD
def test_concurrent_deploy_is_refused_at_once(world):
    gate = world.root / "gate"
    (world.hooks / "pre-deploy").write_text(f"#!/bin/sh\nwhile [ ! -e {gate} ]; do sleep 0.1; done\n")
    outcome = {}
    first = threading.Thread(target=lambda: outcome.setdefault("first", world.deploy("v5")))
    first.start()
    try:
        lock = world.path / ".dbdeck" / "deploy.lock"
        deadline = time.monotonic() + 60
        while not lock.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert lock.exists()
        second = world.run("--env", "production", "--version", "v5b")
        assert second.returncode == 75, _out(second)
        assert "deploying v5 to production" in second.stderr
    finally:
        gate.write_text("go")
        first.join(300)
        (world.hooks / "pre-deploy").unlink()
    assert outcome["first"].returncode == 0, _out(outcome["first"])
    assert world.serving() == "v5"


@ON_WORLD
def test_old_versions_are_pruned_to_three_and_rollback_command(world):
    for version in ("v6", "v7"):
        result = world.deploy(version)
        assert result.returncode == 0, _out(result)
    assert world.tags() == ["latest", "v5", "v6", "v7"]
    back = world.run("rollback", "--env", "production")
    assert back.returncode == 0, _out(back)
    assert world.serving() == "v6" and world.state()["current"] == "v6"
    explicit = world.run("rollback", "v5", "--env", "production")
    assert explicit.returncode == 0, _out(explicit)
    assert world.serving() == "v5"
    missing = world.run("rollback", "v1", "--env", "production")
    assert missing.returncode == 1 and "v1 is not on the server" in missing.stderr
    assert world.serving() == "v5"
    # a deploy after a rollback: rolling back returns to what served before it (v5), not to v7
    result = world.deploy("v7b")
    assert result.returncode == 0, _out(result)
    assert "v5" in world.tags()  # kept through pruning: it is the rollback target
    back = world.run("rollback", "--env", "production")
    assert back.returncode == 0, _out(back)
    assert world.serving() == "v5" and world.state()["current"] == "v5"


@ON_WORLD
def test_backup_retention_keeps_exactly_five(world):
    backups = world.path / "backups"
    for day in range(1, 7):
        old = backups / f"pre-deploy-202001{day:02d}-120000.sql"
        old.write_text("-- old\n")
    result = world.deploy("v8")
    assert result.returncode == 0, _out(result)
    kept = [b for b in world.backups() if b.startswith("pre-deploy-")]
    assert len(kept) == 5
    assert not any(b.startswith("pre-deploy-2020") for b in kept), kept
    listed = world.run("list", "--env", "production", "--format", "json", command="backup")
    assert [row["name"] for row in json.loads(listed.stdout) if row["name"].startswith("pre-deploy-")] == \
        sorted(kept, reverse=True)


@ON_WORLD
def test_backup_restore_round_trip(world, app_database):
    made = world.run("create", "--env", "production", command="backup")
    assert made.returncode == 0, _out(made)
    name = json.loads(world.run("list", "--env", "production", "--format", "json", command="backup").stdout)[0]["name"]
    assert name.startswith("manual-")
    _psql(app_database, "DELETE FROM customers WHERE id > 10; UPDATE customers SET name = 'changed'")
    refused = world.run("restore", name, "--env", "production", command="backup")
    assert refused.returncode == 2 and "--yes" in refused.stderr
    assert _psql(app_database, "SELECT count(*) FROM customers").strip() == "10"
    bad = world.run("restore", "../../etc/passwd", "--env", "production", "--yes", command="backup")
    assert bad.returncode == 2, _out(bad)
    restored = world.run("restore", name, "--env", "production", "--yes", command="backup")
    assert restored.returncode == 0, _out(restored)
    assert _psql(app_database, "SELECT count(*), min(name) FROM customers").strip() == "100|customer 1"
    assert any(b.startswith("pre-restore-") for b in world.backups())


@ON_WORLD
def test_failed_backup_stops_production_before_anything_changes(world, tmp_path):
    config = yaml.safe_load(world.config.read_text())
    config["deploy"]["environments"]["production"]["database"]["container"] = "no-such-container"
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump(config))
    before = world.state()
    result = world.run_bin("--env", "production", "--version", "v9", "--config", broken, command="deploy",
                           env={"GITHUB_SHA": ""}, timeout=120)
    assert result.returncode == 1 and "backup failed, deploy stopped before changing anything" in result.stderr
    assert world.state() == before and world.serving() == before["current"]
    assert not (world.path / ".dbdeck" / "deploy.lock").exists()


@ON_WORLD
def test_unreachable_server_and_bad_input_are_clear_errors(world, tmp_path):
    from dbdeck.plugins.sandbox.servers import free_port

    config = yaml.safe_load(world.config.read_text())
    config["deploy"]["server"]["port"] = free_port()
    unreachable = tmp_path / "unreachable.yaml"
    unreachable.write_text(yaml.safe_dump(config))
    result = world.run_bin("--env", "production", "--version", "v10", "--config", unreachable, command="deploy",
                           env={"GITHUB_SHA": ""}, timeout=120)
    assert result.returncode == 1 and "cannot reach" in result.stderr and "Traceback" not in result.stderr
    bad_version = world.run("--env", "production", "--version", "v1;rm -rf /")
    assert bad_version.returncode == 2 and "cannot be an image tag" in bad_version.stderr
    unknown = world.run("--env", "qa")
    assert unknown.returncode == 2 and "no deploy environment 'qa'" in unknown.stderr
    malformed = tmp_path / "malformed.yaml"
    malformed.write_text("deploy:\n  environments:\n    production:\n      health_attempts: many\n")
    bad_config = world.run_bin("--env", "production", "--config", malformed, command="deploy")
    assert bad_config.returncode == 2 and "health_attempts" in bad_config.stderr


@pytest.fixture(scope="module")
def staging(tmp_path_factory, sshd, app_database, dbdeck_bin_module):
    made = World(tmp_path_factory.mktemp("staging"), sshd, app_database, dbdeck_bin_module, "stagingapp",
                 target="local")
    yield made
    made.remove()


@ON_STAGING
def test_staging_rsyncs_with_delete_on_this_machine_and_does_not_roll_back(staging):
    (staging.source / "obsolete.txt").write_text("old\n")
    (staging.path / "uploads").mkdir()
    (staging.path / "uploads" / "avatar.png").write_text("user data\n")
    first = staging.deploy("s1", "staging")
    assert first.returncode == 0, _out(first)
    assert "First deploy" not in _out(first)  # staging has no rollback, so nothing to warn about
    assert (staging.path / "obsolete.txt").exists()
    (staging.source / "obsolete.txt").unlink()
    second = staging.deploy("s2", "staging")
    assert second.returncode == 0, _out(second)
    assert not (staging.path / "obsolete.txt").exists()  # staging: --delete
    assert not (staging.path / "uploads").exists()  # not excluded on staging, as in the seed
    assert (staging.path / ".env").read_text() == staging.server_env  # .env survives --delete
    assert staging.backups() == []  # staging takes no backup
    broken = staging.deploy("s3", "staging", unhealthy=True)
    assert broken.returncode == 1 and "rollback is off for staging" in broken.stderr
    assert staging.state()["current"] == "s2"


@ON_WORLD
def test_production_rsync_keeps_files_created_on_the_server(world):
    (world.path / "uploads").mkdir(exist_ok=True)
    (world.path / "uploads" / "invoice.pdf").write_text("user upload\n")
    (world.path / "hand-made.txt").write_text("created on the server\n")
    result = world.deploy("v11")
    assert result.returncode == 0, _out(result)
    assert (world.path / "hand-made.txt").exists() and (world.path / "uploads" / "invoice.pdf").exists()


@pytest.fixture(scope="module")
def seed_server(tmp_path_factory, sshd, app_database, dbdeck_bin_module):
    """A server the seed's workflow deployed: the app runs, built by compose, with no dbdeck state."""
    made = World(tmp_path_factory.mktemp("seed"), sshd, app_database, dbdeck_bin_module, "seedapp")
    shutil.copytree(made.source, made.path, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".env*"))
    (made.path / "VERSION").write_text("seed-built\n")
    for command in (["build", "backend"], ["up", "-d", "--no-deps", "backend"]):
        subprocess.run(["docker-compose", "-f", "docker-compose.yml", *command], cwd=made.path, check=True,
                       capture_output=True)
    yield made
    made.remove()


@ON_SEED
def test_an_image_deployed_by_the_seed_scripts_is_adopted_for_rollback(seed_server):
    deadline = time.monotonic() + 30
    while seed_server.serving() != "seed-built" and time.monotonic() < deadline:
        time.sleep(0.3)
    assert seed_server.serving() == "seed-built"
    result = seed_server.deploy("v1", fail_migration=True)
    out = _out(result)
    assert result.returncode == 1, out
    assert "First deploy" not in out and "Saving current image for rollback..." in out
    assert "rolled back to pre-dbdeck-" in out
    assert seed_server.serving() == "seed-built"
    adopted = seed_server.state()["current"]
    assert adopted.startswith("pre-dbdeck-") and adopted in seed_server.tags()


def _without_dbdeck_image(world):
    config = yaml.safe_load(world.config.read_text())
    for profile in config["deploy"]["environments"].values():
        profile.pop("image")
    world.config.write_text(yaml.safe_dump(config))


@pytest.mark.parametrize("compose_names_it", [True, False], ids=["compose-image", "compose-v1-default-name"])
def test_the_built_image_is_the_one_compose_names(tmp_path, sshd, app_database, dbdeck_bin_module, compose_names_it):
    require("docker-compose", "docker-compose")
    world = World(tmp_path, sshd, app_database, dbdeck_bin_module, f"named{int(compose_names_it)}", target="local")
    _without_dbdeck_image(world)
    if not compose_names_it:
        compose = world.source / "docker-compose.yml"
        compose.write_text(compose.read_text().replace("    image: ${APP_IMAGE}\n", ""))
        world.image = f"{world.path.name}_backend"  # docker-compose v1: <project>_<service>, project = the directory
    try:
        for version in ("n1", "n2"):
            result = world.deploy(version)
            assert result.returncode == 0, _out(result)
            assert world.serving() == version
        assert world.tags() == ["latest", "n1", "n2"]
        back = world.run("rollback", "--env", "production")
        assert back.returncode == 0, _out(back)
        assert world.serving() == "n1"
    finally:
        world.remove()

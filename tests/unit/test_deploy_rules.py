"""deploy's rules without a server: profiles, compose detection (at the Runner boundary), ssh/rsync
command lines, versions, hooks, backup names. The real thing is tests/integration/test_deploy.py."""

import subprocess

import pytest

from dbdeck.config import load
from dbdeck.errors import ConfigError, DbdeckError, UsageError
from dbdeck.plugins.deploy import model
from dbdeck.plugins.deploy.deploy import Deployment, Hooks, resolve
from dbdeck.plugins.deploy.operations import _previous_version
from dbdeck.plugins.deploy.server import Server, backup_path, describe_holder
from dbdeck.plugins.deploy.target import LocalTarget, SshTarget
from dbdeck.config import ConfigSection
from dbdeck.plugins.deploy import SEED_ENVIRONMENT
from dbdeck.run import Result, Runner


def _config(tmp_path, text, environ=None):
    path = tmp_path / "dbdeck.yaml"
    path.write_text(text)
    return load(str(path), [ConfigSection("deploy", model.Deploy, env=SEED_ENVIRONMENT)], environ=environ or {})


def test_yaml_profile_is_merged_over_the_seed_profile(tmp_path):
    config = _config(tmp_path, "deploy:\n  environments:\n    production:\n      health_attempts: 10\n"
                               "    qa:\n      container: crm-backend-qa\n      port: 3003\n")
    deploy = config.section("deploy")
    production = deploy.profile("production")
    assert production.health_attempts == 10 and production.container == "crm-backend" and production.rollback
    assert deploy.profile("qa").container == "crm-backend-qa" and not deploy.profile("qa").backup
    assert deploy.names() == ["production", "qa", "staging"]
    # no default reaches outside the config: the seed's public URL is gone, the app's own port is used
    assert (production.health_url, production.health_from) == ("http://localhost:3001/api/health", "server")
    assert production.image is None  # asked from compose at deploy time, not guessed
    assert deploy.profile("qa").health_url == "http://localhost:3003/api/health"
    own = _config(tmp_path, "deploy:\n  environments:\n    production:\n      health_url: https://app.example/h\n")
    assert own.section("deploy").profile("production").health_from == "runner"


@pytest.mark.parametrize("text, key", [
    ("deploy:\n  environments:\n    production:\n      image: Not/Valid:tag\n", "image"),
    ("deploy:\n  environments:\n    production:\n      excludes: ['--delete-excluded']\n", "excludes"),
    ("deploy:\n  environments:\n    production:\n      colour: blue\n", "colour"),
    ("deploy:\n  environments:\n    qa:\n      port: 3003\n", "container"),
    ("deploy:\n  environments:\n    production:\n      health_url: ftp://x\n", "health_url"),
])
def test_bad_profiles_name_the_key(tmp_path, text, key):
    with pytest.raises(ConfigError, match=key):
        _config(tmp_path, text)


def test_seed_environment_variables_set_the_server(tmp_path):
    config = _config(tmp_path, "", environ={"VPS_HOST": "vps.example.com", "VPS_USER": "deployer",
                                            "VPS_PATH": "/srv/backend"})

    class App:
        pass

    app = App()
    app.config, app.runner = config, Runner(dry_run=True, echo=lambda line: None)
    context = resolve(app, "production")
    assert (context.server_settings.host, context.server_settings.user, context.path) == \
        ("vps.example.com", "deployer", "/srv/backend")
    without = _config(tmp_path, "")
    app.config = without
    assert resolve(app, "staging").path == "/root/deploy-backend-dev"
    with pytest.raises(UsageError, match="no deploy environment 'qa'"):
        resolve(app, "qa")


class FakeTarget(LocalTarget):
    """Answers shell snippets from a table instead of running them (the Runner boundary)."""

    def __init__(self, answers, path="/srv/deploy-backend"):
        super().__init__(Runner(), path)
        self.answers, self.scripts = answers, []

    def sh(self, script, **kwargs):
        self.scripts.append(script)
        for needle, (code, out) in self.answers.items():
            if needle in script:
                return Result(argv=["sh"], returncode=code, stdout=out)
        return Result(argv=["sh"], returncode=127, stdout="")


@pytest.mark.parametrize("answers, argv, image", [
    ({"docker compose version": (0, "2.24.6\n")}, "docker compose -f docker-compose.production.yml",
     "deploy-backend-backend"),
    ({"command -v docker-compose": (0, ""), "docker-compose version": (0, "1.29.2\n")},
     "docker-compose -f docker-compose.production.yml", "deploy-backend_backend"),
    ({"command -v docker-compose": (0, ""), "docker-compose version": (0, "v2.26.1\n")},
     "docker-compose -f docker-compose.production.yml", "deploy-backend-backend"),
])
def test_compose_flavour_and_default_image_name(answers, argv, image):
    profile = model.Deploy().profile("production").model_copy(update={"image": None})
    target = FakeTarget(answers)
    server = Server(target, profile, "production")
    assert server.compose() == argv
    # v1's `docker-compose version` is a Python program's start: asked only for the image name's guess
    assert not any("docker-compose version" in script for script in target.scripts)
    assert server.image() == image


def test_docker_compose_that_does_not_answer_its_version_is_a_clear_error():
    profile = model.Deploy().profile("production").model_copy(update={"image": None})
    server = Server(FakeTarget({"command -v docker-compose": (0, "")}), profile, "production")
    assert server.compose().startswith("docker-compose ")
    with pytest.raises(DbdeckError, match="docker-compose version` fails"):
        server.image()


def test_no_compose_at_all_is_a_clear_error():
    server = Server(FakeTarget({}), model.Deploy().profile("production"), "production")
    with pytest.raises(DbdeckError, match="install docker-compose"):
        server.compose()


def _ssh_target(dry_run=False, **server):
    settings = model.Server(host="vps.example.com", key_file="/keys/deploy", known_hosts="/keys/known", **server)
    return SshTarget(Runner(dry_run=dry_run, echo=lambda line: None), "/root/deploy-backend", settings)


def test_ssh_checks_the_host_key_and_rsync_uses_the_same_options():
    target = _ssh_target()
    options = target.ssh_options()
    assert "StrictHostKeyChecking=yes" in options and "UserKnownHostsFile=/keys/known" in options
    assert "BatchMode=yes" in options and options[:2] == ["-i", "/keys/deploy"]
    rsync = target.rsync_argv("/src/deploy-backend", ["-az"])
    assert rsync[-2:] == ["/src/deploy-backend/", "root@vps.example.com:/root/deploy-backend/"]
    assert rsync[rsync.index("-e") + 1].startswith("ssh -i /keys/deploy ")


def test_dry_run_opens_no_ssh_connection():
    target = _ssh_target(dry_run=True).open()
    assert target._control_dir is None
    assert "ControlMaster=auto" not in target.ssh_options()


def test_ssh_failure_is_reported_as_unreachable():
    from dbdeck.errors import CommandFailed

    explained = _ssh_target()._explain(CommandFailed("x", returncode=255, stderr="ssh: connect to host x port 22: "
                                                                                  "Connection refused\n"))
    assert "cannot reach root@vps.example.com:/root/deploy-backend over SSH: ssh: connect" in str(explained)


def test_missing_host_is_a_config_error():
    with pytest.raises(ConfigError, match="VPS_HOST"):
        SshTarget(Runner(), "/x", model.Server())


def test_env_files_are_excluded_even_when_a_profile_forgets_them(tmp_path):
    lines = []
    profile = model.Deploy().profile("staging").model_copy(update={"excludes": ["node_modules"],
                                                                   "source": tmp_path})
    (tmp_path / "docker-compose.yml").write_text("services: {}\n")

    class App:
        runner = Runner(dry_run=True, echo=lines.append)

    context = type("Context", (), {})()
    deployment = Deployment.__new__(Deployment)
    deployment.context, deployment.profile, deployment.runner, deployment.source = context, profile, App.runner, tmp_path
    context.path, context.say = "/srv/app", lines.append
    deployment.server = Server(LocalTarget(App.runner, "/srv/app"), profile, "staging")
    deployment._rsync()
    rsync = next(line for line in lines if "would run: rsync" in line)
    for pattern in ("node_modules", ".env", ".env.*", "backups", ".dbdeck"):
        assert f"--exclude {pattern}" in rsync or f"--exclude '{pattern}'" in rsync
    assert "--delete" in rsync


@pytest.mark.parametrize("bad", ["latest", "-rf", ".hidden", "v1;rm -rf /", "a" * 129, "v 1"])
def test_versions_must_be_image_tags(bad):
    with pytest.raises(ValueError):
        model.check_version(bad)


def test_a_source_on_another_branch_is_refused(tmp_path, monkeypatch):
    monkeypatch.delenv("GITHUB_REF_NAME", raising=False)
    monkeypatch.delenv("GITHUB_SHA", raising=False)
    source = tmp_path / "deploy-backend"
    source.mkdir()
    (source / "docker-compose.production.yml").write_text("services: {}\n")
    git = ["git", "-C", str(source), "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run([*git, "init", "-q", "-b", "feature"], check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "x"], check=True)
    profile = model.Deploy().profile("production").model_copy(update={"source": source})
    context = type("Context", (), {"environment": "production", "profile": profile,
                                   "runner": Runner(), "path": "/srv"})()
    with pytest.raises(UsageError, match="deploys branch main, but .* is on feature"):
        Deployment(context)._prechecks()
    allowed = Deployment(context, check_branch=False)
    allowed._prechecks()
    head = subprocess.run([*git, "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert allowed.version == head


def test_a_hook_that_is_not_executable_is_refused_before_anything_runs(tmp_path):
    (tmp_path / "pre-deploy").write_text("#!/bin/sh\n")
    with pytest.raises(ConfigError, match="not executable"):
        Hooks(tmp_path, Runner()).check()


def test_a_failing_pre_deploy_hook_stops_the_deploy(tmp_path):
    from dbdeck.plugins.deploy.deploy import DeployFailed

    hook = tmp_path / "pre-deploy"
    hook.write_text("#!/bin/sh\necho checking\necho 'tests are red' >&2\nexit 3\n")
    hook.chmod(0o755)
    with pytest.raises(DeployFailed, match="exit status 3: tests are red; nothing was changed"):
        Hooks(tmp_path, Runner(echo=lambda line: None)).run("pre-deploy", {}, must_succeed=True)
    assert Hooks(tmp_path, Runner(echo=lambda line: None)).run("pre-deploy", {}, must_succeed=False) is False


@pytest.mark.parametrize("name, expected", [
    ("pre-deploy-20260112-103300.sql", "backups/pre-deploy-20260112-103300.sql"),
    ("backups/manual-20260112-103300.dump", "backups/manual-20260112-103300.dump"),
])
def test_backup_names(name, expected):
    assert backup_path(name) == expected


@pytest.mark.parametrize("bad", ["../../etc/passwd", "backups/*.sql", "pre-deploy-x.sql", "/root/x.sql",
                                 "pre-deploy-20260112-103300.sql; rm -rf /"])
def test_backup_names_outside_the_pattern_are_refused(bad):
    with pytest.raises(UsageError):
        backup_path(bad)


def test_lock_holder_description_and_previous_version():
    assert "ci@runner, deploying abc to production since 2026" in describe_holder(
        '{"by": "ci@runner", "version": "abc", "environment": "production", "started": "2026-11-23T10:00:00"}')
    assert describe_holder("") == "unknown holder (empty lock file)"
    state = {"history": [{"version": "v3"}, {"version": "v2"}, {"version": "v1"}]}
    assert _previous_version(state, "v3") == "v2"
    assert _previous_version(state, "v2") == "v1"
    assert _previous_version(state, "v1") is None
    # deploy v1, v2, rollback -> v1, deploy v3: rolling back from v3 returns to v1, what served before it
    after = {"history": [{"version": "v3", "previous": "v1"}, {"version": "v2", "previous": "v1"},
                         {"version": "v1", "previous": None}]}
    assert _previous_version(after, "v3") == "v1"
    assert _previous_version(after, "v2") == "v1"

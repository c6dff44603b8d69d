"""Issue 29.5: what goes into a generated file (haproxy.cfg, Patroni's <node>.yml and env.conf) is checked
when the configuration is loaded, so a hostile or mistyped name or address never reaches one: it is
refused in one line, with exit 2, and nothing is written (no file, no generated secret)."""

from pathlib import Path

import pytest
import yaml

from .test_patroni_rules import _dbdeck


def _config(tmp_path, manager="patroni", nodes=None, **replication):
    node = lambda host, port: {"endpoint": {"host": host, "port": 5432, "user": "postgres",  # noqa: E731
                                            "password": "pw"}, "data_dir": f"/var/lib/pg/{host}",
                               "health_port": port}
    config = {"dbdeck": {"state_dir": str(tmp_path / "state")},
              "replication": {"manager": manager,
                              "nodes": nodes or {"pg1": node("10.0.0.1", 8008), "pg2": node("10.0.0.2", 8009)},
                              "replication_networks": ["10.0.0.0/24"],
                              "patroni": {"scope": "conecta", "etcd_hosts": ["10.0.0.5:2379"]}, **replication}}
    path = tmp_path / "dbdeck.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _load_error(config):
    """The configuration error a command would stop with, from the same loader, in this process (each case
    through the CLI too would cost a process start; the end-to-end cases below do that)."""
    from dbdeck.app import App
    from dbdeck.errors import ConfigError

    app = App()
    app.config_path = str(config)
    with pytest.raises(ConfigError) as refused:
        app.config.section("replication")
    return str(refused.value)


def _renders(tmp_path, config):
    """Both renderers, each refused the same way: exit 2, one line naming the problem, nothing written."""
    out = tmp_path / "out"
    results = [_dbdeck(config, "patroni", "render", "--no-check", "-o", str(out)),
               _dbdeck(config, "haproxy", "render", "--no-check", "-o", str(out / "haproxy.cfg"))]
    for result in results:
        assert result.returncode == 2, result.stdout + result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not out.exists()
    assert not (tmp_path / "state").exists(), "a refused render generated secrets"
    return [result.stderr for result in results]


def _nodes_named(name):
    node = {"endpoint": {"host": "10.0.0.1", "port": 5432, "user": "postgres", "password": "pw"},
            "data_dir": "/d", "health_port": 8008}
    return {name: node, "pg2": {**node, "endpoint": {**node["endpoint"], "host": "10.0.0.2"}}}


@pytest.mark.parametrize("name", ["../escape", "/abs"])
def test_a_node_name_that_is_a_path_writes_nothing_anywhere(tmp_path, name):
    for stderr in _renders(tmp_path, _config(tmp_path, nodes=_nodes_named(name))):
        assert "node name" in stderr and "letters, digits" in stderr
    assert not Path("/abs.yml").exists() and not (tmp_path / "escape.yml").exists()


@pytest.mark.parametrize("name", ["a b", "pg1\n#", ".", "..", "pg1#x", "-x"])
def test_a_node_name_that_is_no_plain_name_is_refused(tmp_path, name):
    message = _load_error(_config(tmp_path, nodes=_nodes_named(name)))
    assert "node name" in message and "letters, digits" in message and len(message.splitlines()) == 1


@pytest.mark.parametrize("where, value, message", [
    ("host", "10.0.0.1\n    server evil 192.0.2.1:5432", "not a host name"),
    ("host", "10.0.0.1 #", "not a host name"),
    ("app_address", "10.0.0.1:5432 backup", "expected HOST:PORT"),
    ("app_address", "10.0.0.1:5432\n    server x 1.2.3.4:1", "expected HOST:PORT"),
    ("app_address", "10.0.0.1:99999", "expected HOST:PORT"),
    ("replication_address", "a#b:5432", "expected HOST:PORT"),
    ("health_port", 70000, "between 1 and 65535"),
])
def test_a_node_address_that_would_change_a_generated_file_is_refused(tmp_path, where, value, message):
    config = _config(tmp_path)
    data = yaml.safe_load(config.read_text())
    node = data["replication"]["nodes"]["pg1"]
    (node["endpoint"] if where == "host" else node)[where] = value
    config.write_text(yaml.safe_dump(data))
    if where == "host" and "\n" in value:  # end to end: both renderers, exit 2, one line, nothing written
        for stderr in _renders(tmp_path, config):
            assert message in stderr and "pg1" in stderr, stderr
        return
    refused = _load_error(config)
    assert message in refused and "pg1" in refused and len(refused.splitlines()) == 1, refused


@pytest.mark.parametrize("section, key, value", [
    ("haproxy", "bind", "0.0.0.0\nlisten evil"),
    ("haproxy", "bind", "127.0.0.1 # x"),
    ("haproxy", "write_port", 0),
    ("health", "address", "127.0.0.1\n    server x 1.2.3.4:1"),
    ("health", "listen", "0.0.0.0 x"),
])
def test_a_bind_or_check_address_that_would_change_haproxy_cfg_is_refused(tmp_path, section, key, value):
    config = _config(tmp_path, manager="native", **{section: {key: value}})
    if section == "haproxy" and key == "bind" and "\n" in value:  # end to end
        result = _dbdeck(config, "haproxy", "render", "--no-check", "-o", str(tmp_path / "haproxy.cfg"))
        assert result.returncode == 2 and f"{section}.{key}" in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "haproxy.cfg").exists()
        return
    refused = _load_error(config)
    assert f"{section}.{key}" in refused and len(refused.splitlines()) == 1, refused


def test_plain_names_and_addresses_render_and_every_server_is_checked(tmp_path):
    config = _config(tmp_path, manager="native", health={"address": "fd00::5"},
                     haproxy={"bind": "::", "read_port": 5001})
    data = yaml.safe_load(config.read_text())
    data["replication"]["nodes"]["pg2"]["app_address"] = "[fd00::2]:5432"
    data["replication"]["nodes"]["db-2.example.org"] = data["replication"]["nodes"].pop("pg1")
    config.write_text(yaml.safe_dump(data))
    result = _dbdeck(config, "haproxy", "render", "-o", str(tmp_path / "haproxy.cfg"))
    assert result.returncode == 0, result.stderr
    servers = [line.split() for line in (tmp_path / "haproxy.cfg").read_text().splitlines()
               if line.strip().startswith("server ")]
    assert len(servers) == 4 and all(fields[3] == "check" for fields in servers), servers
    assert ["server", "pg2", "[fd00::2]:5432", "check", "addr", "[fd00::5]", "port", "8009"] in servers


def test_a_socket_directory_host_is_refused_where_haproxy_needs_a_tcp_address(tmp_path):
    config = _config(tmp_path)
    data = yaml.safe_load(config.read_text())
    data["replication"]["nodes"]["pg1"]["endpoint"]["host"] = "/var/run/postgresql"
    config.write_text(yaml.safe_dump(data))
    result = _dbdeck(config, "haproxy", "render", "--no-check")
    assert result.returncode == 2 and "pg1" in result.stderr and "TCP address" in result.stderr, result.stderr


def test_a_config_path_with_a_newline_stays_inside_the_header_comment(tmp_path):
    directory = tmp_path / "odd\nlisten evil"
    directory.mkdir()
    config = _config(directory, manager="native")
    result = _dbdeck(config, "haproxy", "render", "--no-check")
    assert result.returncode == 0, result.stderr
    assert "listen evil" not in [line.strip() for line in result.stdout.splitlines()]
    assert all(line.startswith("#") for line in result.stdout.split("\n\n")[0].splitlines())


def test_a_render_that_fails_its_checks_creates_no_secret_and_a_passing_one_stores_them(tmp_path):
    """Patroni's own checker refuses the files (a bin_dir that does not exist): nothing is written, not even
    the rewind and REST API passwords the render generated; the same render once it passes stores them."""
    config = _config(tmp_path)
    data = yaml.safe_load(config.read_text())
    for node in data["replication"]["nodes"].values():
        node["bindir"] = "/nonexistent/bin"
    config.write_text(yaml.safe_dump(data))
    out = tmp_path / "out"
    refused = _dbdeck(config, "patroni", "render", "-o", str(out))
    assert refused.returncode == 1 and "bin_dir" in refused.stderr, refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    assert not out.exists() and not (tmp_path / "state").exists()
    dry = _dbdeck(config, "--dry-run", "patroni", "render", "-o", str(out))
    assert dry.returncode == 1 and not out.exists() and not (tmp_path / "state").exists()

    for node in data["replication"]["nodes"].values():
        node.pop("bindir")
    config.write_text(yaml.safe_dump(data))
    written = _dbdeck(config, "patroni", "render", "-o", str(out))
    assert written.returncode == 0, written.stderr
    stored = sorted(path.name for path in (tmp_path / "state" / "replication").iterdir())
    assert stored == ["patroni-rest.password", "replicator.password", "rewind.password"], stored
    env = (out / "env.conf").read_text()
    assert (tmp_path / "state" / "replication" / "rewind.password").read_text().strip() in env

import subprocess

import pytest
from pydantic import SecretStr

from dbdeck.config import EndpointConfig
from dbdeck.endpoints import Endpoint
from dbdeck.errors import CommandFailed
from dbdeck.run import Runner

pytestmark = pytest.mark.integration


def container_endpoint(name, database="postgres", **extra):
    return Endpoint(name, EndpointConfig(container=name, user="postgres", database=database, **extra), Runner())


def test_seed_containers_answer_through_docker_exec(crm_containers):
    prod = container_endpoint(crm_containers["prod"])
    dev = container_endpoint(crm_containers["dev"])
    assert not prod.has_driver_access
    assert prod.query("SELECT current_user AS u, 2 + 2 AS four") == [{"u": "postgres", "four": 4}]
    assert prod.server_version() == dev.server_version()
    assert prod.identity() != dev.identity()
    network = subprocess.run(["docker", "inspect", "-f", "{{.HostConfig.NetworkMode}}", crm_containers["prod"]],
                             capture_output=True, text=True, check=True).stdout.strip()
    assert network == "none"


def test_pg_dump_through_the_container_keeps_the_password_out_of_argv(crm_containers, tmp_path):
    prod = container_endpoint(crm_containers["prod"], password=SecretStr("container-pw-not-in-argv"))
    prod.execute("CREATE TABLE IF NOT EXISTS docker_probe (id int); INSERT INTO docker_probe VALUES (42)")
    dump = tmp_path / "prod.dump"
    with open(dump, "wb") as out:
        result = prod.run_tool("pg_dump", "-Fc", "--table=docker_probe", stdout=out)
    assert "container-pw-not-in-argv" not in " ".join(result.argv)
    assert result.argv[:4] == ["docker", "exec", "-i", "-e"]
    listing = subprocess.run(["pg_restore", "--list", str(dump)], capture_output=True, text=True, check=True)
    assert "TABLE DATA public docker_probe" in listing.stdout


def test_missing_container_is_a_clear_error():
    ghost = container_endpoint("dbdeck-no-such-container")
    with pytest.raises(CommandFailed, match="No such container"):
        ghost.query("SELECT 1")

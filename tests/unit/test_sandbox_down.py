"""`sandbox down` removes the sandbox and its data, and nothing else."""

import json

from dbdeck.plugins.sandbox.sandbox import Sandbox
from dbdeck.run import Runner


def test_down_with_a_state_that_names_no_data_root_leaves_the_current_directory_alone(tmp_path, monkeypatch):
    box = tmp_path / "box"
    box.mkdir()
    (box / "state.json").write_text(json.dumps({"version": 1, "dir": str(box), "servers": {}}))
    elsewhere = tmp_path / "work"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("a user's file")
    monkeypatch.chdir(elsewhere)
    assert Sandbox(box, Runner()).down() is True
    assert not box.exists() and (elsewhere / "keep.txt").read_text() == "a user's file"

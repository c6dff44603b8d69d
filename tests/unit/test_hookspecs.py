import configparser
import inspect
from pathlib import Path

from dbdeck import hookspecs
from dbdeck.pluginmanager import describe, make_manager

ROOT = Path(__file__).resolve().parents[2]


def hookspec_functions():
    return [f for _, f in inspect.getmembers(hookspecs, inspect.isfunction)
            if hasattr(f, hookspecs.PROJECT + "_spec")]


def test_there_are_hookspecs():
    names = {f.__name__ for f in hookspec_functions()}
    assert {"register_commands", "config_section", "scheduled_jobs", "notify", "row_transformers"} <= names


def test_every_hookspec_is_documented():
    undocumented = [f.__name__ for f in hookspec_functions() if len((f.__doc__ or "").strip()) < 20]
    assert undocumented == []


def test_builtin_plugins_are_registered_and_declared_as_entry_points():
    manager = make_manager(load_entry_points=False)
    assert [name for name, _ in manager.list_name_plugin()] == list(hookspecs.DEFAULT_PLUGINS)
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    declared = parser["options.entry_points"]["dbdeck.plugins"]
    for module in hookspecs.DEFAULT_PLUGINS:
        assert module in declared, f"{module} missing from the dbdeck.plugins entry-point group"
        package = module.removeprefix("dbdeck.")
        assert package.replace("plugins.", "dbdeck.plugins.") in parser["options"]["packages"]


def test_describe_lists_versions():
    rows = describe(make_manager())
    assert {"sandbox"} <= {r["name"] for r in rows}
    assert all(r["version"] for r in rows)

"""The architecture's rules (../DESIGN.md), enforced: a change that breaks one fails here."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted([*(ROOT / "core").rglob("*.py"), *(ROOT / "plugins").rglob("*.py")])
# what plugins may use of the core: its public API. Not launch (console entry points) or pluginmanager.
PUBLIC_CORE = {"app", "cli", "config", "endpoints", "errors", "events", "faults", "history", "hookspecs", "httpserve",
               "lock", "log",
               "output", "quick", "run", "secrets", "state", "status", "__version__"}


def imports(path, package):
    """(module, names) for every import in a file of `package`, relative ones resolved to dbdeck.* names."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, module] if module else base)
            found.append((module, [alias.name for alias in node.names]))
    return found


def _package_of(path):
    relative = path.relative_to(ROOT)
    top = {"core": ["dbdeck"], "plugins": ["dbdeck", "plugins"]}[relative.parts[0]]
    return ".".join([*top, *relative.parts[1:-1]])


def test_the_files_are_found():
    assert len(SOURCES) > 40 and any(p.name == "run.py" for p in SOURCES)


def check_runs_no_programs(path, package):
    for module, names in imports(path, package):
        assert module.split(".")[0] not in ("subprocess", "sh"), f"{path.name} imports {module}: use dbdeck.run"
        assert not (module == "os" and {"system", "popen", "spawnv", "execv"} & set(names))


def check_plugin_imports(path, package):
    own = package.split(".")[2] if len(package.split(".")) > 2 else None
    for module, names in imports(path, package):
        parts = module.split(".")
        if parts[:2] == ["dbdeck", "plugins"] and len(parts) > 2:
            assert parts[2] == own, f"{path.name} ({package}) imports another plugin: {module}"
        elif parts[0] == "dbdeck":
            used = parts[1:2] or names
            for name in used:
                assert name in PUBLIC_CORE, f"{path.name} ({package}) uses dbdeck.{name}, not public core API"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_only_core_run_runs_programs(path):
    if path == ROOT / "core" / "run.py":
        return
    check_runs_no_programs(path, _package_of(path))


@pytest.mark.parametrize("path", [p for p in SOURCES if p.is_relative_to(ROOT / "plugins")],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_plugins_are_independent_and_use_only_the_public_core(path):
    check_plugin_imports(path, _package_of(path))


def test_the_rules_catch_a_violation(tmp_path):
    """The checks above can fail: a plugin file importing subprocess and another plugin is caught. The probe
    is read as a file of the notify plugin from a temporary directory, never written into plugins/ (where
    an interrupted run would leave it for the next run to trip over)."""
    bad = tmp_path / "_architecture_probe.py"
    bad.write_text("import subprocess\nfrom dbdeck.plugins.deploy import deploy\nfrom dbdeck import pluginmanager\n")
    with pytest.raises(AssertionError, match="use dbdeck.run"):
        check_runs_no_programs(bad, "dbdeck.plugins.notify")
    with pytest.raises(AssertionError, match="another plugin"):
        check_plugin_imports(bad, "dbdeck.plugins.notify")
    bad.write_text("from dbdeck import pluginmanager\nfrom ..notify import hooks\n")
    with pytest.raises(AssertionError, match="not public"):
        check_plugin_imports(bad, "dbdeck.plugins.notify")
    assert not list((ROOT / "plugins").rglob("_architecture_probe.py"))

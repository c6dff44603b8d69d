"""The plugin manager: registers the built-in plugins, then third-party ones from entry points."""

import importlib
import logging
import os
import re
import sys

import pluggy

from . import __version__, hookspecs

log = logging.getLogger("dbdeck.plugins")
ENTRY_POINT_GROUP = "dbdeck.plugins"
_OWN_DIST = re.compile(r"(?i)dbdeck-\d[^-]*\.(dist|egg)-info$")  # dbdeck's own: it declares the built-ins


def make_manager(load_entry_points=True):
    manager = pluggy.PluginManager(hookspecs.PROJECT)
    manager.add_hookspecs(hookspecs)
    for module_name in hookspecs.DEFAULT_PLUGINS:
        manager.register(importlib.import_module(module_name), name=module_name)
    if load_entry_points:
        _load_entry_points(manager)
    return manager


_shared = None


def shared_manager():
    """The process's plugin manager: the command lookup and the config loader register plugins once."""
    global _shared
    if _shared is None:
        _shared = make_manager()
    return _shared


def _third_party_may_declare_plugins():
    """Whether any installed distribution other than dbdeck itself names the plugin group in its
    entry_points.txt. importlib.metadata costs ~35 ms of every command's start (it imports the email
    package to read metadata), and almost every installation has no third-party plugin: so it is asked only
    when a plain look at the files finds one. Anything this look cannot read (a zip on sys.path) asks it."""
    marker = f"[{ENTRY_POINT_GROUP}]"
    for entry in sys.path:
        if not entry or not os.path.isdir(entry):
            if entry and os.path.exists(entry):
                return True
            continue
        try:
            names = os.listdir(entry)
        except OSError:
            continue
        for name in names:
            if not name.endswith((".dist-info", ".egg-info")) or _OWN_DIST.match(name):
                continue
            try:
                with open(os.path.join(entry, name, "entry_points.txt"), encoding="utf-8") as handle:
                    if marker in handle.read():
                        return True
            except OSError:
                continue
    return False


def _load_entry_points(manager):
    manager._dbdeck_dists = {}
    if not _third_party_may_declare_plugins():
        return
    from importlib import metadata

    for entry_point in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if entry_point.value in hookspecs.DEFAULT_PLUGINS or manager.has_plugin(entry_point.value):
            continue  # built-ins are declared as entry points too, for discoverability
        try:
            plugin = entry_point.load()
        except Exception as exc:  # a broken third-party plugin must not take every command down
            log.warning("plugin %s (%s) failed to load: %s", entry_point.name, entry_point.value, exc)
            continue
        manager.register(plugin, name=entry_point.value)
        manager._dbdeck_dists[entry_point.value] = entry_point.dist


def describe(manager):
    """One dict per loaded plugin: name, version, where it comes from, which hooks it implements."""
    dists = getattr(manager, "_dbdeck_dists", {})
    rows = []
    for name, plugin in manager.list_name_plugin():
        dist = dists.get(name)
        builtin = name in hookspecs.DEFAULT_PLUGINS
        hooks = sorted(h.name for h in manager.get_hookcallers(plugin) or ())
        rows.append({
            "name": name.rsplit(".", 1)[-1] if builtin else name,
            "module": name,
            "version": __version__ if builtin else (dist.version if dist else getattr(plugin, "__version__", "?")),
            "source": "built-in" if builtin else (f"{dist.name}" if dist else "entry point"),
            "hooks": hooks,
        })
    return rows


class HookFailure:
    """One plugin's hook implementation that raised: which plugin, which hook, and the error in one line."""

    def __init__(self, plugin, hook, error):
        self.plugin, self.hook, self.error = plugin, hook, error

    @property
    def message(self):
        from . import secrets

        first = (str(self.error).strip().splitlines() or [""])[0]
        text = f"plugin {self.plugin}: its {self.hook} hook failed: {type(self.error).__name__}: {first}"
        return secrets.mask(text.rstrip(": "))

    def __repr__(self):
        return f"HookFailure({self.message!r})"


def call_guarded(manager, name, **kwargs):
    """Call every plugin's implementation of hook `name` one by one, as pluggy would (same order), so that
    one that raises cannot take the others' answers down. Returns ([(plugin name, result), ...],
    [HookFailure, ...]). For the hooks documented as "must not raise": a third-party plugin may."""
    caller = getattr(manager.hook, name)
    results, failures = [], []
    for impl in reversed(caller.get_hookimpls()):
        try:
            result = impl.function(*[kwargs[arg] for arg in impl.argnames])
        except Exception as exc:  # noqa: BLE001 - whatever a plugin raises becomes its own failure row
            failure = HookFailure(_short_name(impl.plugin_name), name, exc)
            log.debug("%s", failure.message, exc_info=True)
            failures.append(failure)
            continue
        if result is not None:
            results.append((_short_name(impl.plugin_name), result))
    return results, failures


def _short_name(plugin_name):
    return plugin_name.rsplit(".", 1)[-1] if plugin_name in hookspecs.DEFAULT_PLUGINS else plugin_name

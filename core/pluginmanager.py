"""The plugin manager: registers the built-in plugins, then third-party ones from entry points."""

import importlib
import logging
from importlib import metadata

import pluggy

from . import __version__, hookspecs

log = logging.getLogger("dbdeck.plugins")
ENTRY_POINT_GROUP = "dbdeck.plugins"


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


def _load_entry_points(manager):
    manager._dbdeck_dists = {}
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

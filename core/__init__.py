"""dbdeck: database operations suite (core package).

The core is deliberately small: configuration, endpoints, the external-command runner,
job locks, logging and the plugin manager. Every command lives in a plugin.
"""

__version__ = "0.1.0"

"""Sandbox plugin: `dbdeck sandbox up|status|down`, throwaway local servers for the demo and tests."""

from dbdeck.hookspecs import hookimpl


@hookimpl
def register_commands(cli):
    from .commands import sandbox

    cli.add_command(sandbox)

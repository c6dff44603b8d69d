"""dbdeck's built-in plugins, one package per command family (see DESIGN.md)."""

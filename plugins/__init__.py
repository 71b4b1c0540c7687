"""Plugins: pluggy hooks and the registry of passes (built-in and third-party alike)."""
from fxpress.plugins.hookspecs import ENTRY_POINT_GROUP, hookimpl, hookspec
from fxpress.plugins.manager import load_registry, plugins_disabled

__all__ = ["load_registry", "plugins_disabled", "hookimpl", "hookspec", "ENTRY_POINT_GROUP"]

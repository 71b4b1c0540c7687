"""Plugins: pluggy hooks and the registry of passes (built-in and third-party alike)."""
from fxpress.plugins.manager import load_registry, plugins_disabled
from fxpress.plugins.spec import ENTRY_POINT_GROUP, hookimpl, hookspec

__all__ = ["load_registry", "plugins_disabled", "hookimpl", "hookspec", "ENTRY_POINT_GROUP"]

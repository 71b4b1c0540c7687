"""Builds the pass registry: built-ins first, then every ``fxpress`` entry point.

Each plugin is loaded and asked to register on its own: one that fails to import, raises
in ``register_passes``, registers something that is not a pass, or takes a name that is
already taken yields a :class:`~fxpress.errors.PluginError` naming the plugin and its
distribution (kept in ``registry.errors``); the others still load.
``FXPRESS_DISABLE_PLUGINS=1`` (or ``entry_points=False``) loads the built-ins only.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import os
from typing import Any, Iterable

import pluggy

from fxpress.errors import PluginError
from fxpress.passes.base import Pass, PassInfo, PassRegistry
from fxpress.plugins import builtin, hookspecs

BUILTIN = "builtin"


def plugins_disabled() -> bool:
    return os.environ.get("FXPRESS_DISABLE_PLUGINS", "").strip().lower() in ("1", "true", "yes", "on")


def plugin_manager(entry_points: bool | None = None, extra_plugins: Iterable[Any] = ()
                   ) -> tuple[pluggy.PluginManager, dict[str, str | None], list[PluginError]]:
    """A pluggy manager with the built-ins, the entry points and ``extra_plugins`` registered."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.register(builtin, name=BUILTIN)
    dists: dict[str, str | None] = {BUILTIN: "fxpress"}
    errors: list[PluginError] = []
    if entry_points is None:
        entry_points = not plugins_disabled()
    if entry_points:
        importlib.invalidate_caches()  # see packages installed since the last scan
        for ep in importlib.metadata.entry_points(group=hookspecs.ENTRY_POINT_GROUP):
            dist = ep.dist.name if ep.dist is not None else None
            if ep.name in dists:
                errors.append(PluginError(ep.name, dist, "a plugin of that name is already loaded"))
                continue
            try:
                plugin = ep.load()
            except KeyboardInterrupt:
                raise
            except BaseException as e:  # even SystemExit: a plugin's import must not end fxpress
                errors.append(PluginError(ep.name, dist, f"failed to import {ep.value!r}: "
                                          f"{type(e).__name__}: {e}"))
                continue
            try:
                pm.register(plugin, name=ep.name)
            except Exception as e:
                errors.append(PluginError(ep.name, dist, f"is not a valid plugin: {e}"))
                continue
            dists[ep.name] = dist
    for i, plugin in enumerate(extra_plugins):
        name = getattr(plugin, "__name__", None) or f"extra-{i}"
        pm.register(plugin, name=name)
        dists[name] = None
    return pm, dists, errors


def load_registry(entry_points: bool | None = None, extra_plugins: Iterable[Any] = ()) -> PassRegistry:
    """Ask every plugin to register its passes; return name -> :class:`PassInfo`.

    >>> reg = load_registry(entry_points=False)
    >>> reg["prune"].plugin
    'builtin'
    """
    pm, dists, errors = plugin_manager(entry_points, extra_plugins)
    registry = PassRegistry()
    registry.errors = errors
    for impl in pm.hook.register_passes.get_hookimpls():  # registration order: built-ins first
        plugin = impl.plugin_name
        dist = dists.get(plugin)
        mine: dict[str, PassInfo] = {}

        def register(cls: Any, _plugin: str = plugin, _dist: str | None = dist,
                     _mine: dict = mine) -> None:
            if not (isinstance(cls, type) and issubclass(cls, Pass)):
                raise PluginError(_plugin, _dist, f"register() takes a Pass subclass, got {cls!r}")
            name = getattr(cls, "name", "")
            if not isinstance(name, str) or not name:
                raise PluginError(_plugin, _dist, f"{cls.__qualname__} has no registry name")
            if name in registry or name in _mine:
                owner = registry[name].plugin if name in registry else _plugin
                raise PluginError(_plugin, _dist, f"pass name '{name}' is already registered by "
                                  f"plugin '{owner}'; rename the pass")
            _mine[name] = PassInfo(cls, _plugin, _dist)

        try:
            impl.function(register=register)
        except PluginError as e:
            errors.append(e)
            continue
        except Exception as e:
            errors.append(PluginError(plugin, dist, f"register_passes raised {type(e).__name__}: {e}"))
            continue
        registry.update(mine)
    return registry

"""The hooks a plugin implements (pluggy project name ``fxpress``).

A plugin is a module (or object) listed in the ``fxpress`` entry-point group::

    # pyproject.toml of a third-party package
    [project.entry-points.fxpress]
    mypasses = "mypasses.plugin"

    # mypasses/plugin.py
    import fxpress

    @fxpress.hookimpl
    def register_passes(register):
        register(MyPass)
"""
from __future__ import annotations

import pluggy

PROJECT = "fxpress"
ENTRY_POINT_GROUP = "fxpress"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_passes(register):
    """Register pass classes by calling ``register(PassClass)`` once per pass."""

"""The one import name of the pack outside ComfyUI: ``comfyui_disentangle``.

:func:`register` puts a package ``comfyui_disentangle`` into ``sys.modules`` whose ``__path__`` is
the pack root, WITHOUT running the root ``__init__.py`` (that file imports ComfyUI's ``nodes``).
After it, ``import comfyui_disentangle.core.ddim`` or ``from comfyui_disentangle.harness import host``
works with or without ComfyUI, and every module inside uses its relative imports as in ComfyUI.

The pack's own folder is never put on ``sys.path``: ComfyUI has a top-level ``nodes`` module, and
the pack's ``nodes/`` must stay ``comfyui_disentangle.nodes``.

Only the standard library is used, so a script can run this file by path before the alias exists
(``tests/conftest.py``, ``bench/_pack_alias.py``, ``scripts/_pack_alias.py``)::

    runpy.run_path(os.path.join(PACK_ROOT, "harness", "alias.py"))["register"]()

:func:`harness.host.start_host` then makes the modules ComfyUI loads for the pack folder the same
objects as these (one copy of every class).
"""
import importlib.machinery
import os
import sys
import types

PACK_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE_NAME = "comfyui_disentangle"


def register():
    """Register (once) and return the ``comfyui_disentangle`` package of this pack root."""
    mod = sys.modules.get(PACKAGE_NAME)
    if mod is not None:
        if list(getattr(mod, "__path__", [])) != [PACK_ROOT]:
            raise RuntimeError(f"{PACKAGE_NAME} is already the package at {list(getattr(mod, '__path__', []))}, "
                               f"not {PACK_ROOT}")
        return mod
    spec = importlib.machinery.ModuleSpec(PACKAGE_NAME, None, is_package=True)
    spec.submodule_search_locations = [PACK_ROOT]
    mod = types.ModuleType(PACKAGE_NAME, "ComfyUI-Disentangle (the pack root as a package; __init__.py not run)")
    mod.__spec__ = spec
    mod.__path__ = [PACK_ROOT]
    mod.__package__ = PACKAGE_NAME
    mod.__file__ = None
    sys.modules[PACKAGE_NAME] = mod
    return mod


register()

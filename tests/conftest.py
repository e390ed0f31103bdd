"""pytest setup for ComfyUI-Disentangle.

* ``comfyui_disentangle`` is registered as a package whose ``__path__`` is the pack root, WITHOUT
  running the pack's ``__init__.py`` (which imports ComfyUI): harness/alias.py, the one alias of the
  pack. ``import comfyui_disentangle.core.x`` and ``from comfyui_disentangle import harness`` work
  from any test, with or without ComfyUI.
* ``host`` (session fixture): skips loudly unless COMFYUI_PATH names a ComfyUI work tree, else
  starts headless ComfyUI on CPU, loads the pack through ``nodes.load_custom_node`` and returns the
  pack module ComfyUI registered (see harness/host.py).
* The terminal summary says whether the ComfyUI suite ran, against which ComfyUI version, or why not.
"""
import os
import runpy
import sys
import types

import pytest

PACK_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
runpy.run_path(os.path.join(PACK_ROOT, "harness", "alias.py"))  # registers comfyui_disentangle


def _shield_pack_init():
    """pytest imports ``<pack root>/__init__.py`` (``Package.setup`` of the root package) before
    every test under it; that file imports ComfyUI. Pre-register a placeholder under the module
    name pytest computes for it, so pytest finds it in sys.modules and never executes the pack's
    ``__init__.py`` (ComfyUI loads the pack itself, in start_host).

    This only helps when this conftest is imported before that happens, i.e. when ``tests/`` has
    NO ``__init__.py`` (with one, pytest names this file ``<pack>.tests.conftest`` and imports the
    pack's ``__init__.py`` first).
    """
    init = os.path.join(PACK_ROOT, "__init__.py")
    if not os.path.isfile(init):
        return
    names = {os.path.basename(PACK_ROOT)}
    try:
        from pathlib import Path
        from _pytest.pathlib import resolve_pkg_root_and_module_name
        names.add(resolve_pkg_root_and_module_name(Path(init))[1])
    except Exception:
        pass
    try:  # a root folder that is no Python name (e.g. "ComfyUI-Disentangle"): pytest's importlib fallback name
        from pathlib import Path
        from _pytest.pathlib import module_name_from_path
        names.add(module_name_from_path(Path(init), Path(PACK_ROOT)))
    except Exception:
        pass
    for name in names:
        if not name or name in sys.modules:
            continue
        shield = types.ModuleType(name, "placeholder for the pack root registered by tests/conftest.py; "
                                        "the pack's __init__.py was NOT run (see harness/alias.py)")
        shield.__file__ = init
        shield.__path__ = [PACK_ROOT]
        shield.__package__ = name
        sys.modules[name] = shield


def _share_cpu_threads_between_workers():
    """Under pytest-xdist (``-n K``) each worker gets cpu_count/K intra-op threads (torch and, through
    OMP_NUM_THREADS, the processes a test starts): K workers of cpu_count spinning threads each
    oversubscribe the CPU so badly on a 16-core GPU machine that CPU-only tests ran past their timeout."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    if workers <= 1 or "PYTEST_XDIST_WORKER" not in os.environ:
        return
    threads = str(max(1, (os.cpu_count() or 1) // workers))
    os.environ.setdefault("OMP_NUM_THREADS", threads)
    os.environ.setdefault("MKL_NUM_THREADS", threads)
    try:
        import torch
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    except ImportError:
        pass


_shield_pack_init()
_share_cpu_threads_between_workers()

from comfyui_disentangle import harness  # noqa: E402  (needs the alias above)
from comfyui_disentangle.harness import host as _host  # noqa: E402


@pytest.fixture(scope="session")
def host():
    """The pack module as loaded by ComfyUI (skips loudly without COMFYUI_PATH)."""
    harness.require_host()
    return harness.start_host()


@pytest.fixture(scope="session")
def comfy_server():
    """ComfyUI's own HTTP server (main.py on 127.0.0.1) with the pack, in a fresh base directory
    (harness/server.py); skips loudly when it cannot start here."""
    from comfyui_disentangle.harness.server import ComfyServer, server_problem
    problem = server_problem()
    if problem:
        pytest.skip(f"ComfyUI server tests SKIPPED: {problem}")
    server = ComfyServer().start()
    yield server
    server.stop()


def pytest_report_header(config):
    problem = harness.host_problem()
    if problem is None:
        return (f"ComfyUI host: {harness.comfyui_path()} (version {harness.comfyui_version() or 'unknown'}); "
                f"pack root {PACK_ROOT}")
    return f"ComfyUI host: NONE ({problem}) -> ComfyUI integration tests will be SKIPPED"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    tr = terminalreporter
    skipped_host = 0
    skipped_other = {}  # the server and browser tests' own skip reasons
    for rep in tr.stats.get("skipped", []):
        longrepr = getattr(rep, "longrepr", None)
        text = str(longrepr[2]) if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
        if "ComfyUI integration tests SKIPPED" in text:
            skipped_host += 1
        elif "ComfyUI server tests SKIPPED" in text or "end-to-end tests SKIPPED" in text:
            reason = text.split("Skipped: ")[-1]
            skipped_other[reason] = skipped_other.get(reason, 0) + 1
    for reason, count in skipped_other.items():
        tr.write_sep("!", f"{count} tests {reason}", red=True, bold=True)

    where = "headless, GPU" if os.environ.get("DISENTANGLE_HOST_GPU") == "1" else "headless, --cpu"
    xdist_controller = bool(getattr(config.option, "numprocesses", None)) and "PYTEST_XDIST_WORKER" not in os.environ
    if harness.host_started():
        info = _host._STATE
        tr.write_sep("=", f"ComfyUI integration suite RAN against ComfyUI {info.get('version') or '?'} "
                          f"at {info.get('root')} ({where})", green=True, bold=True)
    elif xdist_controller and harness.host_problem() is None:
        # the host lives in the workers (each starts its own); this process only collects their reports
        tr.write_sep("=", f"ComfyUI integration tests ran in the xdist workers, each with its own headless ComfyUI "
                          f"{harness.comfyui_version() or '?'} at {harness.comfyui_path()} ({where}); "
                          f"{skipped_host} skipped for want of the host", green=not skipped_host, bold=True)
    elif harness.host_problem() is not None:
        tr.write_sep("!", f"ComfyUI integration suite SKIPPED ({skipped_host} tests): "
                          f"{harness.host_problem()}", red=True, bold=True)
        tr.write_line(harness.SKIP_REASON, red=True, bold=True)
    elif "error" in _host._STATE:
        first = _host._STATE["error"].splitlines()[0]
        tr.write_sep("!", "ComfyUI integration suite FAILED TO START (details in the errors above)", red=True, bold=True)
        tr.write_line(first, red=True, bold=True)
    else:
        tr.write_sep("-", f"ComfyUI integration suite not exercised (no selected test used the host; "
                          f"COMFYUI_PATH={harness.comfyui_path()}, "
                          f"ComfyUI {harness.comfyui_version() or '?'})", yellow=True)

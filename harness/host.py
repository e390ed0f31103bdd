"""The one bootstrap of a headless ComfyUI with the pack, for tests, benches and scripts.

Nothing here imports ComfyUI at module import time: the pure-core tests import this package
without ComfyUI installed. Everything ComfyUI-related happens in :func:`start_host` and later.
Tests start it on the CPU; benches and scripts through :func:`start_comfy` (GPU unless ``cpu``,
with main.py's arguments such as ``--lowvram``).

ComfyUI is found through the ``COMFYUI_PATH`` environment variable (a ComfyUI work tree). No
ComfyUI code lives in this repository; it is imported from there at run time.

What :func:`start_host` does mirrors ``ComfyUI/main.py`` (minus the HTTP server):

* ``sys.argv`` = ``main.py --cpu --preview-method none --dont-print-server`` (plus the words in the
  optional env var ``COMFYUI_TEST_ARGS``), then ``comfy.options.enable_args_parsing()`` and the
  imports, so ``comfy.cli_args.args`` is what ``python main.py --cpu`` would give;
* ``nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False)`` (the stock
  ``comfy_extras`` nodes: SamplerCustom, KSamplerSelect, FlipSigmas, ...);
* input/output/temp/user directories of ``folder_paths`` point into a fresh temp dir;
* the pack is loaded exactly as ComfyUI loads a custom node folder:
  ``await nodes.load_custom_node(PACK_ROOT, ignore=<stock node names>)`` between
  ``hook_breaker_ac10a0.save_functions()`` and ``restore_functions()``; its submodules are the
  ``comfyui_disentangle`` modules of harness/alias.py under a second name (one copy of each class,
  so ``comfyui_disentangle.nodes.x`` and what ComfyUI registered agree);
* the progress-bar hook of ``main.hijack_progress`` is installed against a server stub.

The tiny models are in harness/models.py, the prompt runner in harness/runner.py, the UI-format
reader in harness/ui_format.py.
"""
from __future__ import annotations

import asyncio
import importlib
import logging
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

from .alias import PACK_ROOT, PACKAGE_NAME

SKIP_REASON = (
    "ComfyUI integration tests SKIPPED: set COMFYUI_PATH to a ComfyUI work tree "
    "(a folder with nodes.py, execution.py, folder_paths.py and comfy/) to run the pack inside "
    "real headless ComfyUI, e.g. COMFYUI_PATH=/path/to/ComfyUI pytest"
)

# ComfyUI command line used by start_host (what `python main.py <these>` would parse).
BASE_ARGS = ["--cpu", "--preview-method", "none", "--dont-print-server"]

_STATE: dict = {}          # filled by start_host


# --------------------------------------------------------------------------------------------
# Locating ComfyUI
# --------------------------------------------------------------------------------------------

def comfyui_path() -> str | None:
    """The ComfyUI work tree named by the COMFYUI_PATH env var (absolute), or None if unset."""
    p = os.environ.get("COMFYUI_PATH", "").strip()
    return os.path.abspath(os.path.expanduser(p)) if p else None


def host_problem() -> str | None:
    """Why the host cannot run (a sentence), or None if COMFYUI_PATH looks like ComfyUI."""
    p = comfyui_path()
    if p is None:
        return "COMFYUI_PATH is not set"
    missing = [n for n in ("nodes.py", "execution.py", "folder_paths.py", "comfy") if not os.path.exists(os.path.join(p, n))]
    if missing:
        return f"COMFYUI_PATH={p} is not a ComfyUI work tree (missing {', '.join(missing)})"
    return None


def host_available() -> bool:
    """True when COMFYUI_PATH points at something that looks like a ComfyUI work tree."""
    return host_problem() is None


def comfyui_version() -> str | None:
    """ComfyUI's version string read from COMFYUI_PATH/comfyui_version.py (without importing)."""
    p = comfyui_path()
    if p is None:
        return None
    try:
        text = Path(p, "comfyui_version.py").read_text()
    except OSError:
        return None
    m = re.search(r"__version__\s*=\s*['\"]([^'\"]+)['\"]", text)
    return m.group(1) if m else None


def require_host() -> None:
    """pytest.skip the calling test, with a loud reason, when no usable COMFYUI_PATH is set."""
    problem = host_problem()
    if problem is not None:
        import pytest
        pytest.skip(f"{SKIP_REASON} [{problem}]")


def host_started() -> bool:
    """True once start_host() has completed in this process."""
    return "pack" in _STATE


# --------------------------------------------------------------------------------------------
# Starting ComfyUI
# --------------------------------------------------------------------------------------------

class ServerStub:
    """The part of ``server.PromptServer`` that PromptExecutor, the progress handlers and stock
    nodes use. Every message is recorded in ``messages`` as (event, data)."""

    def __init__(self):
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.sockets_metadata = {}
        self.messages = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))

    def send_progress_text(self, text, node_id, sid=None):
        self.messages.append(("progress_text", {"node_id": node_id, "text": text}))

    def queue_updated(self):
        pass


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records = []

    def emit(self, record):
        try:
            self.records.append(record.getMessage())
        except Exception:  # pragma: no cover
            self.records.append(str(record.msg))


def start_host(gpu: bool | None = None, extra_args: list[str] | None = None):
    """Start headless ComfyUI once per process and load the pack; return the pack's module.

    ``gpu``: ComfyUI's own device management instead of ``--cpu`` (default: the env var
    ``DISENTANGLE_HOST_GPU=1``; tests run on the CPU). ``extra_args``: more of main.py's arguments
    (e.g. ``--lowvram``, ``--reserve-vram 2``), after those of the env var ``COMFYUI_TEST_ARGS``.
    Idempotent (cached: the first call's arguments hold). Raises RuntimeError (with ComfyUI's
    logged traceback) if the pack fails to load, and if COMFYUI_PATH is unusable.
    """
    if "pack" in _STATE:
        return _STATE["pack"]
    if "error" in _STATE:
        raise RuntimeError(_STATE["error"])
    problem = host_problem()
    if problem is not None:
        raise RuntimeError(f"{SKIP_REASON} [{problem}]")
    try:
        return _start_host(os.environ.get("DISENTANGLE_HOST_GPU") == "1" if gpu is None else bool(gpu),
                           list(extra_args or []))
    except Exception as e:
        _STATE["error"] = f"start_host() failed: {type(e).__name__}: {e}"
        raise


def start_comfy(cpu: bool = False, extra_args: list[str] | None = None):
    """start_host for a bench or a script: on the GPU unless ``cpu``, ``extra_args`` as main.py's
    arguments; exits with a sentence when COMFYUI_PATH names no ComfyUI. Returns the
    ``comfyui_disentangle`` package (``pack.nodes.lambda_optim``, ...)."""
    problem = host_problem()
    if problem is not None:
        sys.exit(f"set COMFYUI_PATH to a ComfyUI work tree ({problem})")
    start_host(gpu=not cpu, extra_args=extra_args)
    return sys.modules[PACKAGE_NAME]


def _start_host(gpu: bool, extra_args: list[str]):
    root = comfyui_path()
    for k, v in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("HF_HUB_DISABLE_TELEMETRY", "1"),
                 ("DO_NOT_TRACK", "1"), ("TOKENIZERS_PARALLELISM", "false")):
        os.environ.setdefault(k, v)

    base_args = [a for a in BASE_ARGS if a != "--cpu"] if gpu else BASE_ARGS
    if "comfy.cli_args" in sys.modules and not gpu:
        mod = sys.modules["comfy.cli_args"]
        if not getattr(mod.args, "cpu", False):
            raise RuntimeError("comfy was imported before start_host() without --cpu; start_host() must do "
                               "the first ComfyUI import of the process")
    if root in sys.path:
        sys.path.remove(root)
    sys.path.insert(0, root)

    saved_argv = sys.argv
    extra = os.environ.get("COMFYUI_TEST_ARGS", "").split() + extra_args
    sys.argv = [os.path.join(root, "main.py"), *base_args, *extra]
    try:
        import comfy.options
        comfy.options.enable_args_parsing()
        import comfy.cli_args  # noqa: F401  (parses sys.argv)
        import folder_paths
        import comfy.utils
        import comfy.model_management
        import execution
        import nodes
    finally:
        sys.argv = saved_argv

    if not os.path.realpath(nodes.__file__).startswith(os.path.realpath(root)):
        raise RuntimeError(f"'import nodes' resolved to {nodes.__file__}, not ComfyUI's nodes.py in {root}")

    tmp = tempfile.mkdtemp(prefix="comfyui_disentangle_host_")
    dirs = {n: os.path.join(tmp, n) for n in ("input", "output", "temp", "user")}
    for d in dirs.values():
        os.makedirs(d, exist_ok=True)
    folder_paths.set_input_directory(dirs["input"])
    folder_paths.set_output_directory(dirs["output"])
    folder_paths.set_temp_directory(dirs["temp"])
    folder_paths.set_user_directory(dirs["user"])
    import atexit
    if not os.environ.get("COMFYUI_TEST_KEEP_TMP"):
        atexit.register(shutil.rmtree, tmp, True)
    atexit.register(_shutdown)

    server = ServerStub()
    _install_progress_hook(server)

    import hook_breaker_ac10a0
    hook_breaker_ac10a0.save_functions()
    try:
        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
        stock = set(nodes.NODE_CLASS_MAPPINGS)

        sys_module_name = PACK_ROOT.replace(".", "_x_")  # how nodes.load_custom_node names a folder module
        _share_pack_modules(sys_module_name)
        cap = _Capture()
        root_logger = logging.getLogger()
        root_logger.addHandler(cap)
        try:
            ok = asyncio.run(nodes.load_custom_node(PACK_ROOT, ignore=stock, module_parent="custom_nodes"))
        finally:
            root_logger.removeHandler(cap)
    finally:
        hook_breaker_ac10a0.restore_functions()

    pack = sys.modules.get(sys_module_name)
    if not ok or pack is None:
        logged = "\n".join(cap.records) or "(nothing logged)"
        raise RuntimeError(f"ComfyUI failed to load the pack {PACK_ROOT} through nodes.load_custom_node "
                           f"(returned {ok!r}). ComfyUI logged:\n{logged}")

    # Stock nodes that import `server` (not importable in every test venv) read PromptServer.instance.
    srv_mod = sys.modules.get("server")
    if srv_mod is not None and getattr(srv_mod, "PromptServer", None) is not None \
            and not hasattr(srv_mod.PromptServer, "instance"):
        srv_mod.PromptServer.instance = server

    _STATE.update(root=root, tmp=tmp, dirs=dirs, server=server, pack=pack, pack_module_name=sys_module_name,
                  load_log=list(cap.records), version=comfyui_version(), gpu=gpu)
    from .models import register_test_nodes
    register_test_nodes()
    return pack


def _share_pack_modules(sys_module_name: str) -> None:
    """Import the pack's ``nodes`` package under the alias (ComfyUI is importable now) and register
    every ``comfyui_disentangle.*`` module also under the name ComfyUI is about to give the pack
    folder, so that the root ``__init__.py`` ComfyUI runs imports these same modules: one copy of
    every class, whichever name a test, a bench or ComfyUI uses."""
    importlib.import_module(PACKAGE_NAME + ".nodes")
    prefix = PACKAGE_NAME + "."
    for name, module in list(sys.modules.items()):
        if name.startswith(prefix):
            sys.modules.setdefault(sys_module_name + "." + name[len(prefix):], module)


def _shutdown():
    """Drop every model reference while modules are still intact (ModelPatcher.__del__ needs them)."""
    import gc
    from . import models, runner
    models.clear_model_cache()
    runner.LAST_RUN.clear()
    try:
        import comfy.model_management
        comfy.model_management.unload_all_models()
    except Exception:  # pragma: no cover
        pass
    gc.collect()


def pack_module(relname: str = ""):
    """The pack's module ComfyUI registered (``relname`` ""), or its submodule, e.g.
    pack_module("nodes.inversion"), the same object as ``comfyui_disentangle.nodes.inversion``;
    starts the host first."""
    pack = start_host()
    return importlib.import_module(PACKAGE_NAME + "." + relname) if relname else pack


def _install_progress_hook(server):
    """Same hook as ComfyUI main.hijack_progress, against the stub server."""
    import comfy.utils
    import comfy.model_management
    from comfy_execution.progress import get_progress_state
    from comfy_execution.utils import get_executing_context

    def hook(value, total, preview_image, prompt_id=None, node_id=None):
        ctx = get_executing_context()
        if prompt_id is None and ctx is not None:
            prompt_id = ctx.prompt_id
        if node_id is None and ctx is not None:
            node_id = ctx.node_id
        comfy.model_management.throw_exception_if_processing_interrupted()
        if prompt_id is None:
            prompt_id = server.last_prompt_id
        if node_id is None:
            node_id = server.last_node_id
        get_progress_state().update_progress(node_id, value, total, preview_image)
        server.send_sync("progress", {"value": value, "max": total, "prompt_id": prompt_id, "node": node_id},
                         server.client_id)

    comfy.utils.set_progress_bar_global_hook(hook)


def device_name() -> str:
    """The CUDA device's name, or "CPU"."""
    import torch
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"


def server_stub() -> ServerStub:
    """The stub of ComfyUI's PromptServer the host runs prompts against (its messages, last node id)."""
    start_host()
    return _STATE["server"]


def host_info() -> dict:
    """root, tmp dir, folder dirs, version, pack module name, warnings logged while loading the pack."""
    start_host()
    return {k: v for k, v in _STATE.items() if k not in ("pack", "server")}

"""ComfyUI's own HTTP server with the pack, as a user runs it: ``python main.py`` in a subprocess on
127.0.0.1, the pack linked into a fresh ``--base-directory`` (its own custom_nodes, models, input,
output, user folders), nothing of the user's ComfyUI folders touched.

    with ComfyServer() as server:
        info = server.get_json("/object_info")
        history = server.run_prompt(api_prompt)

It needs ``COMFYUI_PATH`` (a ComfyUI work tree) and the packages ComfyUI's ``main.py`` imports to
start, among them the pinned web frontend (``comfyui-frontend-package``) and ``requests``;
:func:`server_problem` says what is missing. Only the standard library is used here.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from . import host
from .alias import PACK_ROOT as _PACK_ROOT

PACK_ROOT = Path(_PACK_ROOT)
PACK_FOLDER_NAME = "ComfyUI-Disentangle"  # the folder name a `git clone` into custom_nodes gives
SERVER_START_MODULES = ("comfyui_frontend_package", "requests", "aiohttp", "alembic", "sqlalchemy")


def comfyui_path() -> Path | None:
    p = host.comfyui_path()
    return Path(p).resolve() if p else None


def server_problem(python: str | None = None) -> str | None:
    """Why ComfyUI's server cannot start here (a sentence), or None."""
    root = comfyui_path()
    if root is None:
        return "COMFYUI_PATH is not set"
    if not (root / "main.py").is_file():
        return f"COMFYUI_PATH={root} has no main.py"
    if python is None or python == sys.executable:
        missing = [m for m in SERVER_START_MODULES if importlib.util.find_spec(m) is None]
        if missing:
            return (f"ComfyUI's server needs {', '.join(missing)} in this Python "
                    f"(pip install -r {root / 'requirements.txt'} requests)")
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_args(base_dir: Path, port: int, gpu: bool = False) -> list[str]:
    """``main.py`` arguments: localhost only, a fresh base directory, no browser, CPU unless ``gpu``."""
    args = ["--listen", "127.0.0.1", "--port", str(port), "--base-directory", str(base_dir),
            "--disable-auto-launch", "--preview-method", "auto"]
    return args if gpu else ["--cpu", *args]


class ComfyServer:
    """``main.py`` in a subprocess; ``base_dir`` (default: a fresh temp folder) holds all its folders."""

    def __init__(self, base_dir: str | os.PathLike | None = None, python: str | None = None,
                 gpu: bool | None = None, keep: bool = False):
        self.owned = base_dir is None
        self.base_dir = Path(tempfile.mkdtemp(prefix="comfyui_disentangle_server_") if base_dir is None else base_dir)
        self.python = python or sys.executable
        self.gpu = os.environ.get("DISENTANGLE_HOST_GPU") == "1" if gpu is None else gpu
        self.keep = keep or bool(os.environ.get("COMFYUI_TEST_KEEP_TMP"))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.client_id = uuid.uuid4().hex
        self.process: subprocess.Popen | None = None
        self.log_path = self.base_dir / "server.log"
        self.start_seconds = None

    # folders -------------------------------------------------------------------------------
    @property
    def input_dir(self) -> Path:
        return self.base_dir / "input"

    @property
    def output_dir(self) -> Path:
        return self.base_dir / "output"

    @property
    def models_dir(self) -> Path:
        return self.base_dir / "models"

    def _prepare(self) -> None:
        for name in ("custom_nodes", "input", "output", "temp", "user", "models"):
            (self.base_dir / name).mkdir(parents=True, exist_ok=True)
        link = self.base_dir / "custom_nodes" / PACK_FOLDER_NAME
        if not link.exists():
            link.symlink_to(PACK_ROOT, target_is_directory=True)

    # life cycle ----------------------------------------------------------------------------
    def start(self, timeout: float = 240.0) -> "ComfyServer":
        problem = server_problem(self.python)
        if problem:
            raise RuntimeError(f"cannot start ComfyUI's server: {problem}")
        self._prepare()
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", DO_NOT_TRACK="1",
                   PYTHONUNBUFFERED="1")
        root = comfyui_path()
        t0 = time.perf_counter()
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen([self.python, str(root / "main.py"), *server_args(self.base_dir, self.port, self.gpu)],
                                            cwd=root, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI's server exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                self.get_json("/system_stats", timeout=2)
                self.start_seconds = time.perf_counter() - t0
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"ComfyUI's server did not answer within {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        if self.owned and not self.keep:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no server log)"

    # HTTP ----------------------------------------------------------------------------------
    def get_json(self, path: str, timeout: float = 30):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return json.loads(r.read().decode("utf-8"))

    def get_bytes(self, path: str, timeout: float = 30) -> bytes:
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return r.read()

    def post_json(self, path: str, data, timeout: float = 30):
        request = urllib.request.Request(self.url + path, data=json.dumps(data).encode("utf-8"),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as r:
                return json.loads(r.read().decode("utf-8") or "null")
        except urllib.error.HTTPError as e:  # ComfyUI answers a refused prompt with 400 and a JSON body
            body = e.read().decode("utf-8", errors="replace")
            raise PromptRefused(f"POST {path} → {e.code}: {body}") from e

    # prompts -------------------------------------------------------------------------------
    def queue_prompt(self, prompt: dict) -> str:
        """POST /prompt as the frontend does; returns the prompt id. Raises PromptRefused when the server
        refuses it, and also when it accepts it with node errors (it would then run only part of it)."""
        answer = self.post_json("/prompt", {"prompt": prompt, "client_id": self.client_id})
        if answer.get("node_errors"):
            raise PromptRefused(f"the server dropped outputs with errors: {json.dumps(answer['node_errors'])[:2000]}")
        return answer["prompt_id"]

    def wait_for(self, prompt_id: str, timeout: float = 600.0) -> dict:
        """The /history entry of a prompt once it has finished; AssertionError if it failed."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.get_json(f"/history/{prompt_id}").get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None and \
                    entry["status"].get("status_str") in ("success", "error"):
                status = entry["status"]
                if status.get("status_str") != "success":
                    raise AssertionError(f"prompt failed: {json.dumps(status.get('messages'))[:4000]}")
                return entry
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI's server exited while running:\n{self.log_tail()}")
            time.sleep(0.25)
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout:.0f} s")

    def run_prompt(self, prompt: dict, timeout: float = 600.0) -> dict:
        return self.wait_for(self.queue_prompt(prompt), timeout)

    def output_files(self, entry: dict) -> list[Path]:
        """Paths of the images a /history entry lists (SaveImage: output/, PreviewImage: temp/)."""
        paths = []
        for out in entry.get("outputs", {}).values():
            for image in out.get("images", []) or []:
                folder = self.base_dir / image.get("type", "output")
                paths.append(folder / image.get("subfolder", "") / image["filename"])
        return paths


class PromptRefused(RuntimeError):
    """The server refused a prompt, or accepted it while dropping outputs with errors."""

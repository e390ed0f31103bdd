"""The README's main-job command, `scripts/demo`, run cold as a user runs it: a fresh process, a fresh
output folder, ComfyUI's own server started from scratch, every shipped workflow on the toy world,
offline (no hub download may be tried). It uses this test's Python (DISENTANGLE_PYTHON) instead of
making a virtual environment. Skipped loudly when ComfyUI's server cannot start here."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from comfyui_disentangle.harness.server import PACK_ROOT, server_problem

WORKFLOWS = sorted(f[:-5] for f in os.listdir(PACK_ROOT / "workflows") if f.endswith(".json") and f != "index.json")


def test_demo_command_runs_every_workflow_offline_in_a_fresh_folder(tmp_path):
    problem = server_problem()
    if problem:
        pytest.skip(f"ComfyUI server tests SKIPPED: {problem}")
    out = tmp_path / "fresh" / "out"
    env = dict(os.environ, DISENTANGLE_PYTHON=sys.executable, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               # any attempt to reach the network fails at once instead of hanging
               HTTP_PROXY="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9", NO_PROXY="127.0.0.1,localhost")
    run = subprocess.run([str(PACK_ROOT / "scripts" / "demo"), "--out", str(out)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=1500)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-6000:]
    assert "Failed to download" not in log, log[-3000:]
    for name in WORKFLOWS:
        assert re.search(rf"^{name}\.json: [\d.]+ s, [1-9]\d* images", run.stdout, re.M), f"{name} did not run:\n{log[-4000:]}"
        assert any(p.name.startswith(name + "_") and p.stat().st_size > 0 for p in out.iterdir()), name
    assert (out / "contact_sheet.png").stat().st_size > 0
    assert re.search(r"\*\*all, cold\*\* \| \*\*\d+\*\*", run.stdout)

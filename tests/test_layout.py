"""The layers and homes of the code (README, "Code layout"), read from the import statements:
core/ never imports ComfyUI or the pack's other packages; nodes/ reaches the toy world only in
nodes/toy_world.py and never evaluation/ or the harness; bench/ and scripts/ never import tests/;
each σ schedule comes from nodes/comfy_boundary.py."""
from __future__ import annotations

import ast
import os

import pytest

from comfyui_disentangle import harness

ROOT = harness.PACK_ROOT
COMFY_TOP = {"comfy", "comfy_extras", "comfy_execution", "comfy_api", "nodes", "folder_paths", "execution",
             "latent_preview", "server", "node_helpers"}


def python_files(folder: str) -> list[str]:
    out = []
    for base, _, files in os.walk(os.path.join(ROOT, folder)):
        out += [os.path.join(base, f) for f in files if f.endswith(".py")]
    return sorted(out)


def imports(path: str) -> list[tuple[int, str]]:
    """(level, absolute-or-relative module) of every import in the file, function bodies included."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(0, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.level, node.module or ""))
            if node.level and not node.module:
                found += [(node.level, a.name) for a in node.names]
    return found


def pack_target(path: str, level: int, module: str) -> str | None:
    """The pack-root-relative dotted module a relative import names (None for absolute ones)."""
    if level:
        here = os.path.relpath(os.path.dirname(path), ROOT).split(os.sep)
        base = here[: len(here) - (level - 1)] if level > 1 else here
        return ".".join([p for p in base if p != "."] + ([module] if module else []))
    if module.startswith(harness.PACKAGE_NAME + "."):
        return module[len(harness.PACKAGE_NAME) + 1:]
    return None


@pytest.mark.parametrize("path", python_files("core"), ids=os.path.basename)
def test_core_imports_no_comfyui_and_no_other_layer(path):
    for level, module in imports(path):
        assert module.split(".")[0] not in COMFY_TOP or level, (path, module)
        target = pack_target(path, level, module)
        assert target is None or target.startswith("core"), (path, target)


@pytest.mark.parametrize("path", python_files("nodes"), ids=os.path.basename)
def test_nodes_reach_toy_world_only_in_its_loader_and_never_evaluation_or_harness(path):
    for level, module in imports(path):
        target = pack_target(path, level, module) or ""
        assert not target.startswith(("evaluation", "harness", "tests", "bench", "scripts")), (path, target)
        if target.startswith("toy_world"):
            assert os.path.basename(path) == "toy_world.py", (path, target)


@pytest.mark.parametrize("folder", ["bench", "scripts", "harness", "toy_world", "evaluation"])
def test_nothing_outside_tests_imports_tests(folder):
    for path in python_files(folder):
        for level, module in imports(path):
            target = pack_target(path, level, module) or module
            assert not target.startswith("tests") and module != "conftest", (path, module)


def test_sigma_schedules_come_from_the_boundary_only():
    """calculate_sigmas and KSampler(...).sigmas appear in nodes/ only in nodes/comfy_boundary.py."""
    for path in python_files("nodes"):
        text = open(path, encoding="utf-8").read()
        if os.path.basename(path) != "comfy_boundary.py":
            assert "calculate_sigmas(" not in text and "samplers.KSampler(" not in text, path

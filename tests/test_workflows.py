"""Every shipped workflow loads (UI format) and runs through ComfyUI's own executor, headless,
with a tiny model substituted for the checkpoint. Skipped loudly without COMFYUI_PATH."""
from __future__ import annotations

import json
import os

import pytest

from comfyui_disentangle import harness
from comfyui_disentangle.scripts.build_workflows import render_all

WORKFLOW_DIR = os.path.join(harness.PACK_ROOT, "workflows")
WORKFLOWS = sorted(f for f in os.listdir(WORKFLOW_DIR) if f.endswith(".json") and f != "index.json")  # index: templates

pytestmark = pytest.mark.usefixtures("host")

# CPU-sized run: the shipped files use 512² and 50 steps; the test keeps their structure and
# shrinks sizes and step counts consistently (every step-valued input scales with `steps`).
SHRINK = {"steps": 10, "expected_steps": 10, "switch_step": 4, "step": 5, "iterations": 2, "neutral_steps": 4,
          "rediffusion_steps": 3}


def shrink(prompt: dict, image_name: str) -> dict:
    for node in prompt.values():
        inputs = node["inputs"]
        for key, value in SHRINK.items():
            if key in inputs and not isinstance(inputs[key], list):
                inputs[key] = value
        if node["class_type"] == "LoadImage":
            inputs["image"] = image_name
        if node["class_type"] == "EmptyLatentImage":
            inputs["width"] = inputs["height"] = 64
        if node["class_type"] == "DisentangleLoadClipLoss":  # offline: the toy CLIP-loss model stands in for ViT-B-32
            node["class_type"] = "DisentangleLoadToyClipLoss"
            node["inputs"] = {"clip_name": "toy_world_clip.safetensors"}
    return prompt


def test_workflow_folder_is_not_empty():
    assert {"ddim_inversion_reconstruct.json", "lambda_schedule_mix.json"} <= set(WORKFLOWS)


def test_shipped_workflows_match_the_builder():
    import nodes
    rendered = render_all(nodes.NODE_CLASS_MAPPINGS)
    for name, text in rendered.items():
        with open(os.path.join(WORKFLOW_DIR, name), encoding="utf-8") as f:
            assert f.read() == text, f"{name} is stale: run `python scripts/build_workflows.py`"


@pytest.mark.parametrize("name", WORKFLOWS)
def test_workflow_runs_headless(name, tmp_path):
    import folder_paths
    folder_paths.add_model_folder_path("lambda_schedules", str(tmp_path), is_default=True)
    folder_paths.add_model_folder_path("avi", str(tmp_path), is_default=True)
    with open(os.path.join(WORKFLOW_DIR, name), encoding="utf-8") as f:
        workflow = json.load(f)
    prompt = harness.substitute_checkpoints(harness.ui_to_api(workflow), kind="sd1")
    prompt = shrink(prompt, harness.write_test_image("workflow_test.png", size=64))
    history = harness.run_prompt(prompt)
    images = harness.output_images(history)
    assert images, f"{name} produced no image"
    assert all(os.path.getsize(p) > 0 for p in images)


@pytest.mark.parametrize("name", WORKFLOWS)
def test_no_workflow_runs_part_of_itself_when_a_file_is_missing(name):
    """ComfyUI's server runs the outputs that validate and drops the others, reporting success. As
    shipped, in a ComfyUI without the user's checkpoint, CLIP-loss file or input image, each workflow
    must validate whole or be refused whole (every output depends on every file the user supplies)."""
    import asyncio
    import execution
    with open(os.path.join(WORKFLOW_DIR, name), encoding="utf-8") as f:
        prompt = harness.ui_to_api(json.load(f))
    valid, error, good, node_errors = asyncio.run(execution.validate_prompt("drop-check", prompt, None))
    outputs = [i for i, n in prompt.items() if getattr(__import__("nodes").NODE_CLASS_MAPPINGS[n["class_type"]],
                                                         "OUTPUT_NODE", False)]
    if node_errors:
        assert not valid and not good, f"{name}: would run {sorted(good)} of outputs {sorted(outputs)} and drop the rest"
    else:
        assert valid and sorted(good) == sorted(outputs)
    needs_files = any(n["class_type"] in ("CheckpointLoaderSimple", "LoadImage") for n in prompt.values())
    assert bool(node_errors) == needs_files, f"{name}: {node_errors}"

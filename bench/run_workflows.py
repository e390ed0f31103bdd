"""Run every shipped workflow headlessly through ComfyUI's own executor and collect the images.

    COMFYUI_PATH=/path/to/ComfyUI python bench/run_workflows.py [--checkpoint NAME] [--out DIR]

Without --checkpoint, a tiny random-weight SD1-architecture model (tests/comfy_host.py) replaces
CheckpointLoaderSimple and sizes/steps are shrunk to CPU scale: this checks the wiring, not the
pictures. With --checkpoint NAME (a file in ComfyUI's models/checkpoints), the workflows run as
shipped, at full size, with that checkpoint.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

TESTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")
sys.path.insert(0, TESTS)
import conftest  # noqa: E402,F401  (registers the comfyui_disentangle package alias)
from comfyui_disentangle.tests import comfy_host  # noqa: E402
from comfyui_disentangle.tests.test_workflows import WORKFLOW_DIR, WORKFLOWS, shrink  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="a checkpoint in models/checkpoints (default: tiny random model)")
    parser.add_argument("--out", default="out/workflows", help="folder for the output images")
    args = parser.parse_args()
    if not comfy_host.host_available():
        sys.exit(comfy_host.SKIP_REASON)
    if args.checkpoint and "--cpu" in comfy_host.BASE_ARGS:
        comfy_host.BASE_ARGS.remove("--cpu")  # a real checkpoint runs on the GPU ComfyUI picks
    comfy_host.start_host()
    os.makedirs(args.out, exist_ok=True)
    for name in WORKFLOWS:
        with open(os.path.join(WORKFLOW_DIR, name), encoding="utf-8") as f:
            prompt = comfy_host.ui_to_api(json.load(f))
        if args.checkpoint:
            for node in prompt.values():
                if node["class_type"] == "CheckpointLoaderSimple":
                    node["inputs"]["ckpt_name"] = args.checkpoint
        else:
            prompt = shrink(comfy_host.substitute_checkpoints(prompt, kind="sd1"),
                            comfy_host.write_test_image("workflow_test.png", size=64))
        t0 = time.perf_counter()
        history = comfy_host.run_prompt(prompt)
        images = comfy_host.output_images(history)
        for k, path in enumerate(images):
            shutil.copy(path, os.path.join(args.out, f"{os.path.splitext(name)[0]}_{k}.png"))
        print(f"{name}: ran in {time.perf_counter() - t0:.1f} s, {len(images)} image(s) → {args.out}")


if __name__ == "__main__":
    main()

"""Run every shipped workflow headlessly through ComfyUI's own executor; write the images and a
contact sheet.

    COMFYUI_PATH=/path/to/ComfyUI python bench/run_workflows.py [--checkpoint NAME] [--out DIR]

By default everything runs offline on the pack's toy world (weights/): the toy-world workflows as
shipped, and in the others "Load Toy World Checkpoint" stands in for the checkpoint loader, 128×128
for the image size and a factor-world scene for the loaded image (their prompts then mean little to
the toy model: those runs check the wiring). With --checkpoint NAME (a file in ComfyUI's
models/checkpoints), the workflows with a checkpoint loader run as shipped, on the GPU, with it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

TESTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")
sys.path.insert(0, TESTS)
import conftest  # noqa: E402,F401  (registers the comfyui_disentangle package alias)
from comfyui_disentangle.tests import comfy_host  # noqa: E402
from comfyui_disentangle.tests.test_workflows import WORKFLOW_DIR, WORKFLOWS  # noqa: E402

SCENE_IMAGE = "factor_world_scene.png"


def on_toy_world(prompt: dict) -> dict:
    """Swap the checkpoint for the toy world, sizes for 128×128, loaded images for a scene."""
    for node in prompt.values():
        inputs = node["inputs"]
        if node["class_type"] == "CheckpointLoaderSimple":
            node["class_type"], node["inputs"] = "DisentangleLoadToyWorld", {"checkpoint": "toy_world"}
        elif node["class_type"] == "EmptyLatentImage":
            inputs["width"] = inputs["height"] = 128
        elif node["class_type"] == "LoadImage":
            inputs["image"] = SCENE_IMAGE
    return prompt


def write_scene_image() -> None:
    """A 128×128 factor-world scene in ComfyUI's input folder (for LoadImage)."""
    import folder_paths
    import torch
    from PIL import Image
    from comfyui_disentangle.core import factor_world as fw
    image = fw.render_at(torch.tensor([[4, 6, 0, 5, 0, 7]]), 128)[0]
    Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype("uint8")).save(
        os.path.join(folder_paths.get_input_directory(), SCENE_IMAGE))


def contact_sheet(entries: list[tuple[str, str]], path: str, cell: int = 192) -> None:
    """One PNG with every output image, labelled with its workflow."""
    from PIL import Image, ImageDraw
    cols = 4
    rows = (len(entries) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * cell, rows * (cell + 18)), (24, 24, 28))
    draw = ImageDraw.Draw(sheet)
    for k, (label, image_path) in enumerate(entries):
        x, y = (k % cols) * cell, (k // cols) * (cell + 18)
        image = Image.open(image_path).convert("RGB")
        image.thumbnail((cell - 8, cell - 8))
        sheet.paste(image, (x + 4, y + 4))
        draw.text((x + 4, y + cell - 2), label[: cell // 6], fill=(220, 220, 230))
    sheet.save(path)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="a checkpoint in models/checkpoints (default: the toy world)")
    parser.add_argument("--out", default="out/workflows", help="folder for the output images")
    args = parser.parse_args()
    if not comfy_host.host_available():
        sys.exit(comfy_host.SKIP_REASON)
    if args.checkpoint and "--cpu" in comfy_host.BASE_ARGS:
        comfy_host.BASE_ARGS.remove("--cpu")  # a real checkpoint runs on the GPU ComfyUI picks
    t_start = time.perf_counter()
    comfy_host.start_host()
    write_scene_image()
    os.makedirs(args.out, exist_ok=True)
    import folder_paths  # saved λ schedules go to the output folder, not the user's models folder
    folder_paths.add_model_folder_path("lambda_schedules", os.path.abspath(os.path.join(args.out, "lambda_schedules")),
                                       is_default=True)
    entries = []
    for name in WORKFLOWS:
        with open(os.path.join(WORKFLOW_DIR, name), encoding="utf-8") as f:
            prompt = comfy_host.ui_to_api(json.load(f))
        loaders = [n for n in prompt.values() if n["class_type"] == "CheckpointLoaderSimple"]
        if args.checkpoint:
            if not loaders:
                continue
            for node in loaders:
                node["inputs"]["ckpt_name"] = args.checkpoint
        else:
            prompt = on_toy_world(prompt)
        t0 = time.perf_counter()
        history = comfy_host.run_prompt(prompt)
        stem = os.path.splitext(name)[0]
        for k, source in enumerate(comfy_host.output_images(history)):
            target = os.path.join(args.out, f"{stem}_{k}.png")
            with open(source, "rb") as src, open(target, "wb") as dst:
                dst.write(src.read())
            entries.append((f"{stem} {k}", target))
        print(f"{name}: {time.perf_counter() - t0:.1f} s")
    sheet = os.path.join(args.out, "contact_sheet.png")
    contact_sheet(entries, sheet)
    print(f"{len(entries)} images and {sheet} in {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()

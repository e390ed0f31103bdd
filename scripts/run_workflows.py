"""The pack's main job: run every shipped workflow through ComfyUI's own server, as a user's queue does
(``main.py`` on 127.0.0.1, POST /prompt), and write the images, a contact sheet and the time each took.

    COMFYUI_PATH=/path/to/ComfyUI python scripts/run_workflows.py [--out DIR] [--checkpoint NAME] [--thumbnails]

By default everything runs offline on the pack's toy world (weights/): the toy-world workflows as
shipped; in the others "Load Toy World Checkpoint" stands in for the checkpoint loader, the toy CLIP
loss model for open_clip's ViT-B/32, 128×128 for the image size and a factor-world scene for the loaded
image (their prompts then mean little to the toy model: those runs check the wiring). Nothing is
downloaded. With --checkpoint NAME (a file in models/checkpoints of the ComfyUI at COMFYUI_PATH), the
workflows with a checkpoint loader run as shipped with it, on the GPU ComfyUI picks.

--thumbnails writes each workflow's saved images as its template thumbnail workflows/<name>.jpg (ComfyUI's
template browser shows them); re-run it after a workflow's output changes. --via executor runs the
prompts in this process through ComfyUI's executor instead of the server (no web frontend needed).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time

PACK = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
import _pack_alias  # noqa: E402,F401  (registers comfyui_disentangle: harness/alias.py)
from comfyui_disentangle import harness  # noqa: E402
from comfyui_disentangle.harness import server as comfy_server  # noqa: E402

WORKFLOW_DIR = os.path.join(PACK, "workflows")
WORKFLOWS = sorted(f for f in os.listdir(WORKFLOW_DIR) if f.endswith(".json") and f != "index.json")
SCENE_IMAGE = "factor_world_scene.png"
TOY_CLIP_LOSS = {"class_type": "DisentangleLoadToyClipLoss", "inputs": {"clip_name": "toy_world_clip.safetensors"}}


SD_WIRING_ITERATIONS = 2


def on_toy_world(prompt: dict) -> dict:
    """Swap the checkpoint for the toy world, open_clip's model for the toy CLIP loss model, sizes for
    128×128, loaded images for a scene: the whole prompt then runs offline. A workflow made for an SD
    checkpoint then only checks its wiring, so its λ optimisation runs SD_WIRING_ITERATIONS iterations."""
    made_for_sd = any(n["class_type"] == "CheckpointLoaderSimple" for n in prompt.values())
    for node in prompt.values():
        inputs = node["inputs"]
        if node["class_type"] == "CheckpointLoaderSimple":
            node["class_type"], node["inputs"] = "DisentangleLoadToyWorld", {"checkpoint": "toy_world"}
        elif node["class_type"] == "DisentangleLoadClipLoss":
            node.update(json.loads(json.dumps(TOY_CLIP_LOSS)))
        elif node["class_type"] == "EmptyLatentImage":
            inputs["width"] = inputs["height"] = 128
        elif node["class_type"] == "LoadImage":
            inputs["image"] = SCENE_IMAGE
        elif node["class_type"] == "DisentangleOptimizeLambda" and made_for_sd:
            inputs["iterations"] = min(inputs["iterations"], SD_WIRING_ITERATIONS)
    return prompt


def write_scene_image(folder: str) -> None:
    """A 128×128 factor-world scene (for LoadImage) in ComfyUI's input folder."""
    import torch
    from PIL import Image
    from comfyui_disentangle.toy_world import factor_world as fw
    image = fw.render_at(torch.tensor([[4, 6, 0, 5, 0, 7]]), 128)[0]
    Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype("uint8")).save(os.path.join(folder, SCENE_IMAGE))


def contact_sheet(entries: list[tuple[str, str]], path: str, cell: int = 192) -> None:
    """One PNG with every output image, labelled with its workflow."""
    from PIL import Image, ImageDraw
    cols = 4
    rows = max(1, (len(entries) + cols - 1) // cols)
    sheet = Image.new("RGB", (cols * cell, rows * (cell + 18)), (24, 24, 28))
    draw = ImageDraw.Draw(sheet)
    for k, (label, image_path) in enumerate(entries):
        x, y = (k % cols) * cell, (k // cols) * (cell + 18)
        image = Image.open(image_path).convert("RGB")
        image.thumbnail((cell - 8, cell - 8))
        sheet.paste(image, (x + 4, y + 4))
        draw.text((x + 4, y + cell - 2), label[: cell // 6], fill=(220, 220, 230))
    sheet.save(path)


def thumbnail(images: list[str], path: str, side: int = 512) -> None:
    """A square JPEG of a workflow's saved images in a grid (a batch of 2n as two rows of n), letterboxed."""
    from PIL import Image
    n = len(images)
    cols = n if n <= 3 else (n // 2 if n % 2 == 0 and n <= 8 else math.ceil(math.sqrt(n)))
    rows = math.ceil(n / cols)
    cell = side // max(cols, rows)
    sheet = Image.new("RGB", (side, side), (24, 24, 28))
    top, left = (side - rows * cell) // 2, (side - cols * cell) // 2
    for k, image_path in enumerate(images):
        image = Image.open(image_path).convert("RGB").resize((cell - 4, cell - 4), Image.Resampling.LANCZOS)
        sheet.paste(image, (left + (k % cols) * cell + 2, top + (k // cols) * cell + 2))
    sheet.save(path, "JPEG", quality=90, comment=b"ComfyUI-Disentangle: the workflow's own output on the toy world "
                                                  b"(scripts/run_workflows.py --thumbnails)")


class ServerRunner:
    """Prompts through ComfyUI's HTTP server (harness/server.py), in a fresh base directory."""

    def __init__(self, gpu: bool):
        self.server = comfy_server.ComfyServer(gpu=gpu)

    def start(self) -> None:
        self.server.start()
        write_scene_image(str(self.server.input_dir))
        self.input_types = {name: d["input"] for name, d in self.server.get_json("/object_info").items()}

    def to_api(self, workflow: dict) -> dict:
        return harness.ui_to_api(workflow, self.input_types)

    def run(self, prompt: dict) -> list[tuple[str, str]]:
        entry = self.server.run_prompt(prompt, timeout=3600)
        return [("output" if self.server.output_dir in p.parents else "temp", str(p))
                for p in self.server.output_files(entry)]

    def stop(self) -> None:
        self.server.stop()


class ExecutorRunner:
    """Prompts through ComfyUI's executor in this process (harness/host.py)."""

    def __init__(self, gpu: bool):
        if gpu and "--cpu" in harness.BASE_ARGS:
            harness.BASE_ARGS.remove("--cpu")

    def start(self) -> None:
        harness.start_host()
        import folder_paths
        write_scene_image(folder_paths.get_input_directory())

    def to_api(self, workflow: dict) -> dict:
        return harness.ui_to_api(workflow)

    def run(self, prompt: dict) -> list[tuple[str, str]]:
        import folder_paths
        history = harness.run_prompt(prompt)
        output = os.path.realpath(folder_paths.get_output_directory())
        return [("output" if os.path.realpath(p).startswith(output) else "temp", p)
                for p in harness.output_images(history)]

    def stop(self) -> None:
        pass


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="a checkpoint in models/checkpoints (default: the toy world, offline)")
    parser.add_argument("--out", default=os.path.join(PACK, "out", "workflows"), help="folder for the images")
    parser.add_argument("--via", choices=("server", "executor"), default="server")
    parser.add_argument("--only", nargs="*", help="workflow names to run (default: all)")
    parser.add_argument("--thumbnails", action="store_true", help="write workflows/<name>.jpg from the saved images")
    args = parser.parse_args(argv)
    problem = comfy_server.server_problem() if args.via == "server" else harness.host_problem()
    if problem:
        print(f"cannot run the workflows: {problem}", file=sys.stderr)
        return 2
    gpu = bool(args.checkpoint) or os.environ.get("DISENTANGLE_HOST_GPU") == "1"
    runner = (ServerRunner if args.via == "server" else ExecutorRunner)(gpu)
    t_start = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    runner.start()
    started = time.perf_counter() - t_start
    print(f"ComfyUI ready ({args.via}) in {started:.1f} s", flush=True)
    entries, rows = [], []
    try:
        for name in WORKFLOWS:
            stem = os.path.splitext(name)[0]
            if args.only and stem not in args.only and name not in args.only:
                continue
            with open(os.path.join(WORKFLOW_DIR, name), encoding="utf-8") as f:
                prompt = runner.to_api(json.load(f))
            loaders = [n for n in prompt.values() if n["class_type"] == "CheckpointLoaderSimple"]
            if args.checkpoint:
                if not loaders:
                    continue
                for node in loaders:
                    node["inputs"]["ckpt_name"] = args.checkpoint
            else:
                prompt = on_toy_world(prompt)
            t0 = time.perf_counter()
            images = runner.run(prompt)
            seconds = time.perf_counter() - t0
            saved = []
            for k, (kind, source) in enumerate(images):
                target = os.path.join(args.out, f"{stem}_{k}.png")
                shutil.copyfile(source, target)
                entries.append((f"{stem} {k}", target))
                if kind == "output":
                    saved.append(target)
            if args.thumbnails and saved:
                thumbnail(saved, os.path.join(WORKFLOW_DIR, f"{stem}.jpg"))
            rows.append((name, seconds, len(images), "toy world" if not args.checkpoint else args.checkpoint))
            print(f"{name}: {seconds:.1f} s, {len(images)} images", flush=True)
    finally:
        runner.stop()
    total = time.perf_counter() - t_start
    sheet = os.path.join(args.out, "contact_sheet.png")
    if entries:
        contact_sheet(entries, sheet)
    print(f"\n| workflow | s | images |\n|---|---|---|")
    for name, seconds, count, _ in rows:
        print(f"| {name} | {seconds:.1f} | {count} |")
    print(f"| ComfyUI start-up | {started:.1f} | |")
    print(f"| **all, cold** | **{total:.0f}** | {len(entries)} |")
    print(f"\n{len(entries)} images and {sheet} in {total:.0f} s (cold, {args.via}, {os.cpu_count()} CPU cores)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

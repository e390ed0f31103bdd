"""Writes the shipped workflows in ComfyUI's UI format (what the frontend saves and drag-and-drop loads),
and the template index (titles, descriptions, order) of ComfyUI's template browser.

Widget values are ordered from each node class's own INPUT_TYPES, so the files match what the
frontend would write. Nodes are added stage by stage (``Workflow.stage``); the layout is automatic
(:func:`layout`): each stage is a group whose nodes stand in columns by dependency, stages are packed
into columns and rows so that the whole graph, at the saved view, fits a 1920×1080 screen. Node sizes
are at least what the frontend computes for them (:func:`frontend_size`), so no two nodes overlap
however a workflow's graph changes. Regenerate after changing a node's inputs or a workflow:

    COMFYUI_PATH=/path/to/ComfyUI python scripts/build_workflows.py

and ``tests/test_workflows.py`` checks that the shipped files equal what this script makes.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import uuid

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
SEED_NAMES = {"seed", "noise_seed"}

# The frontend's (LiteGraph's) metrics: a node's title bar stands above its pos; a body row per slot.
TITLE_H, SLOT_H, WIDGET_H, MULTILINE_H = 30, 20, 24, 54
NODE_GAP, COLUMN_GAP, STAGE_GAP = 40, 36, 40          # free space between boxes (title bars included; the
                                                      # frontend draws a node's source badge above its title)
GROUP_PAD, GROUP_TITLE_H = 16, 44                     # a group's inner margin and its title band
# On a 1920×1080 screen the frontend's canvas is 1856×1002 (below its top bar, right of its side bar); its
# minimap and canvas tools cover the bottom-right corner. The saved view puts the graph, in canvas pixels,
# in one of these regions (x, y, width, height): above the minimap, or left of it. Below a zoom of 8/14
# the frontend draws nodes without their text.
CANVAS_W, CANVAS_H = 1856, 1002
VIEWS = ((12, 12, 1832, 718), (12, 12, 1532, 978))
MAX_SCALE, MIN_READABLE_SCALE = 1.0, 8 / 14  # LiteGraph.Canvas.MinFontSizeForLOD 8 px over 14 px text
ROW_TOLERANCE = 0.9  # a layout in fewer rows wins when its zoom is at least this share of the largest

# Nodes that show a live preview while they run (sampling steps, the λ optimisation's edit): the frontend
# draws it below their widgets and grows the node to fit, so their boxes keep room for it.
PREVIEW_NODES = {"KSampler", "KSamplerAdvanced", "SamplerCustom", "SamplerCustomAdvanced", "DisentangleAVICapture",
                 "DisentangleDDIMInversion", "DisentangleOptimizeLambda", "DisentangleTrainDisDiff"}
PREVIEW_H = 220  # the frontend grows such a node by 212 for its preview (1.27.10)

STAGE_COLORS = {"input": "#3f789e", "method": "#b58b2a", "output": "#8A8", "note": "#444"}

SD15_CHECKPOINT = {
    "name": "v1-5-pruned-emaonly-fp16.safetensors", "directory": "checkpoints",
    "url": "https://huggingface.co/Comfy-Org/stable-diffusion-v1-5-archive/resolve/main/"
           "v1-5-pruned-emaonly-fp16.safetensors?download=true",
}
OPENAI_VIT_B32 = {  # OpenAI's ViT-B/32 (the paper's CLIP loss model) as an open_clip safetensors state dict
    "name": "ViT-B-32-quickgelu-openai.safetensors", "directory": "clip_loss",
    "url": "https://huggingface.co/timm/vit_base_patch32_clip_224.openai/resolve/main/open_clip_model.safetensors?download=true",
}


def _input_specs(node_class):
    spec = node_class.INPUT_TYPES()
    for section in ("required", "optional"):
        for name, value in spec.get(section, {}).items():
            kind = value[0]
            options = value[1] if len(value) > 1 and isinstance(value[1], dict) else {}
            yield name, kind, options, section


def _is_widget(kind, options) -> bool:
    return (isinstance(kind, (list, tuple)) or kind in WIDGET_TYPES) and not options.get("forceInput", False)


def _default(kind, options):
    if "default" in options:
        return options["default"]
    if isinstance(kind, (list, tuple)):
        return kind[0] if kind else ""
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}.get(kind)


def _has_control(name, kind, options) -> bool:
    return bool(options.get("control_after_generate")) or (kind == "INT" and name in SEED_NAMES)


def frontend_size(node_class, title: str) -> tuple[int, int]:
    """At least the [width, height] the frontend computes for a fresh node of this class (its
    ``computeSize``): one body row per slot (inputs and outputs side by side), one per widget
    (multiline text taller), the seed's control widget and the upload button counted; the width fits
    the title. Measured on comfyui-frontend-package 1.27.10."""
    links, widgets = 0, []
    for name, kind, options, _ in _input_specs(node_class):
        if not _is_widget(kind, options):
            links += 1
            continue
        widgets.append(MULTILINE_H if kind == "STRING" and options.get("multiline") else WIDGET_H)
        if _has_control(name, kind, options):
            widgets.append(WIDGET_H)
        if options.get("image_upload"):
            widgets.append(WIDGET_H)
    rows = max(links, len(node_class.RETURN_TYPES), 1)
    height = rows * SLOT_H + sum(widgets) + (14 if widgets else 6)
    width = max(210 if widgets else 140, 8 * len(title) + 50)
    return width, height


def note_height(text: str, width: int) -> int:
    """Height that shows a Note's text without scrolling (its 10 px monospace font: 6.1 px a character,
    13 px a line, measured in the frontend)."""
    per_line = max(10, int((width - 24) / 6.1))
    lines = sum(max(1, math.ceil(len(par) / per_line)) for par in text.split("\n"))
    return max(30 + 13 * lines, SLOT_H + MULTILINE_H + 14)  # the frontend's least: one row and the text box


def group_title_width(title: str) -> int:
    """Width of a group's title at its 24 px font (about 12 px a character)."""
    return 12 * len(title) + 24


class Stage:
    def __init__(self, title: str, kind: str):
        self.title, self.kind, self.nodes = title, kind, []


class Workflow:
    """Nodes are added with their inputs: a value sets a widget, ``(node, slot)`` makes a link.

    ``stage(title)`` opens a group; the nodes added after it belong to it. ``pos`` arguments are
    accepted and ignored (the layout is automatic)."""

    def __init__(self, node_classes: dict):
        self.node_classes = node_classes
        self.nodes: list[dict] = []
        self.links: list[list] = []
        self.stages: list[Stage] = []

    def stage(self, title: str, kind: str = "method", note: str | None = None) -> None:
        self.stages.append(Stage(title, kind))
        if note:
            self.note(note)

    def _current_stage(self) -> Stage:
        if not self.stages:
            self.stage("Workflow")
        return self.stages[-1]

    def _link(self, src_slot, node_id, target_slot, kind) -> int:
        src, slot = src_slot
        link_id = len(self.links) + 1
        self.links.append([link_id, src, slot, node_id, target_slot, kind])
        self.nodes[src - 1]["outputs"][slot]["links"].append(link_id)
        return link_id

    def add(self, class_type: str, pos=None, title: str | None = None, node_size=None, models=None, **inputs) -> int:
        cls = self.node_classes[class_type]
        node_id = len(self.nodes) + 1
        node_inputs, widgets = [], []
        for name, kind, options, section in _input_specs(cls):
            value = inputs.pop(name, None)
            if _is_widget(kind, options) and isinstance(value, tuple):  # a widget fed by a link (widget input)
                link_id = self._link(value, node_id, len(node_inputs), kind)
                node_inputs.append({"name": name, "type": kind, "widget": {"name": name}, "link": link_id})
                value = None
            if _is_widget(kind, options):
                widgets.append(_default(kind, options) if value is None else value)
                if _has_control(name, kind, options):
                    widgets.append("fixed")
                if options.get("image_upload"):
                    widgets.append("image")  # the frontend's upload button stores a value too
                continue
            if value is None and section == "optional":
                continue
            link_id = None if value is None else self._link(value, node_id, len(node_inputs), kind)
            node_inputs.append({"name": name, "type": kind, "link": link_id})
        if inputs:
            raise KeyError(f"{class_type} has no inputs {sorted(inputs)}")
        names = getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES
        least = frontend_size(cls, title or class_type)
        if class_type in PREVIEW_NODES:
            least = (least[0], least[1] + PREVIEW_H)
        size = node_size or (280 if widgets else max(least[0], 170), 0)
        node = {
            "id": node_id,
            "type": class_type,
            "pos": [0, 0],
            "size": [max(size[0], least[0]), max(size[1], least[1])],
            "flags": {},
            "order": node_id - 1,
            "mode": 0,
            "inputs": node_inputs,
            "outputs": [{"name": n, "type": t, "links": []} for n, t in zip(names, cls.RETURN_TYPES)],
            "properties": {"Node name for S&R": class_type, **({"models": list(models)} if models else {})},
            "widgets_values": widgets,
        }
        if title:
            node["title"] = title
        self.nodes.append(node)
        self._current_stage().nodes.append(node_id)
        return node_id

    def note(self, text: str, pos=None, node_size=None) -> None:
        node_id = len(self.nodes) + 1
        width = (node_size or (420, 0))[0]
        self.nodes.append({
            "id": node_id, "type": "Note", "pos": [0, 0], "size": [width, note_height(text, width)],
            "flags": {}, "order": node_id - 1, "mode": 0, "inputs": [], "outputs": [], "properties": {},
            "widgets_values": [text],
        })
        self._current_stage().nodes.append(node_id)

    def to_dict(self, name: str) -> dict:
        groups, ds = layout(self)
        return {
            "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"comfyui-disentangle/{name}")),
            "revision": 0,
            "last_node_id": len(self.nodes),
            "last_link_id": len(self.links),
            "nodes": self.nodes,
            "links": self.links,
            "groups": groups,
            "config": {},
            "extra": {"ds": ds},
            "version": 0.4,
        }


# --------------------------------------------------------------------------------------------
# Layout
# --------------------------------------------------------------------------------------------

def _stage_block(w: Workflow, stage: Stage, downward: bool = False) -> dict:
    """A stage's nodes by dependency inside the stage, in columns left to right (or, ``downward``, in rows
    top to bottom), notes first, across the top; returns the block's size, each node's offset from the
    block's top-left corner and the notes' sizes."""
    by_id = {n["id"]: n for n in w.nodes}
    sources = {}
    for _, src, _, dst, _, _ in w.links:
        sources.setdefault(dst, set()).add(src)
    members = [i for i in stage.nodes if by_id[i]["type"] != "Note"]
    notes = [i for i in stage.nodes if by_id[i]["type"] == "Note"]
    depth = {}
    for i in members:  # insertion order is a topological order (links point to earlier nodes)
        depth[i] = 1 + max((depth[s] for s in sources.get(i, ()) if s in depth), default=-1)
    levels = [[i for i in members if depth[i] == d] for d in range(max(depth.values(), default=-1) + 1)]

    def box(i):
        return by_id[i]["size"][0], TITLE_H + by_id[i]["size"][1]

    if downward:  # a row per level, its nodes side by side
        content_w = max((sum(box(i)[0] for i in lv) + COLUMN_GAP * (len(lv) - 1) for lv in levels), default=0)
    else:  # a column per level, its nodes stacked
        content_w = sum(max(box(i)[0] for i in lv) for lv in levels) + COLUMN_GAP * max(len(levels) - 1, 0)
    note_w = max([content_w, 320] if levels else [by_id[i]["size"][0] for i in notes])
    note_w = max(note_w, group_title_width(stage.title))
    offsets, note_sizes, y = {}, {}, GROUP_TITLE_H
    for i in notes:
        note_sizes[i] = [note_w, note_height(by_id[i]["widgets_values"][0], note_w)]
        offsets[i] = (GROUP_PAD, y + TITLE_H)
        y += TITLE_H + note_sizes[i][1] + NODE_GAP
    top, bottom = y, y
    if downward:
        for lv in levels:
            x = GROUP_PAD
            for i in lv:
                offsets[i] = (x, y + TITLE_H)
                x += box(i)[0] + COLUMN_GAP
            y += max(box(i)[1] for i in lv) + NODE_GAP
        bottom = y
    else:
        x = GROUP_PAD
        for lv in levels:
            y = top
            for i in lv:
                offsets[i] = (x, y + TITLE_H)
                y += box(i)[1] + NODE_GAP
            bottom = max(bottom, y)
            x += max(box(i)[0] for i in lv) + COLUMN_GAP
    width = max(content_w, note_w if notes else 0, group_title_width(stage.title)) + 2 * GROUP_PAD
    height = bottom - NODE_GAP + GROUP_PAD
    return {"stage": stage, "w": width, "h": height, "offsets": offsets, "notes": note_sizes, "downward": downward}


def _pack(blocks: list[dict], slot_h: float, row_w: float):
    """Blocks stacked into slots (top to bottom, at most slot_h tall), slots into rows (left to right, at
    most row_w wide); returns each block's (x, y), the total size and the number of rows."""
    slots, current = [], []
    for b in blocks:
        if current and sum(c["h"] for c in current) + STAGE_GAP * len(current) + b["h"] > slot_h:
            slots.append(current)
            current = []
        current.append(b)
    slots.append(current)
    places, x, y, row_h, total_w, rows = [], 0, 0, 0, 0, 1
    for slot in slots:
        slot_w = max(b["w"] for b in slot)
        slot_height = sum(b["h"] for b in slot) + STAGE_GAP * (len(slot) - 1)
        if x > 0 and x + slot_w > row_w:
            x, y, row_h, rows = 0, y + row_h + STAGE_GAP, 0, rows + 1
        sy = y
        for b in slot:
            places.append((x, sy))
            sy += b["h"] + STAGE_GAP
        total_w = max(total_w, x + slot_w)
        row_h = max(row_h, slot_height)
        x += slot_w + STAGE_GAP
    return places, total_w, y + row_h, rows


def view_scale(width: float, height: float) -> float:
    return max(fit_view(width, height)[0], 0.0)


def fit_view(width: float, height: float) -> tuple[float, tuple]:
    """The largest zoom (at most MAX_SCALE) that shows a width × height graph whole, and its region."""
    return max((min(MAX_SCALE, vw / width, vh / height), (vx, vy, vw, vh)) for vx, vy, vw, vh in VIEWS)


def layout(w: Workflow) -> tuple[list[dict], dict]:
    """Place every node: each stage a group laid out left to right or downward, the groups packed (over all
    slot heights and row widths) so that the whole graph fits the view at the largest zoom, or, within
    ROW_TOLERANCE of it and still readable, with the fewest stages below the top row (stages then read left
    to right) and the fewest laid out downward; returns the groups and the saved view (``extra.ds``)."""
    stages = [s for s in w.stages if s.nodes]
    options = [(_stage_block(w, s, False), _stage_block(w, s, True)) for s in stages]
    candidates = []
    for choice in itertools.product((0, 1), repeat=len(stages)):
        blocks = [options[k][c] for k, c in enumerate(choice)]
        if any(c and options[k][0]["w"] == options[k][1]["w"] for k, c in enumerate(choice)):
            continue  # downward changes nothing for this stage
        heights = {sum(b["h"] for b in blocks[i:j]) + STAGE_GAP * (j - i - 1)
                   for i, j in itertools.combinations(range(len(blocks) + 1), 2)}
        widths = {sum(b["w"] for b in blocks[i:j]) + STAGE_GAP * (j - i - 1)
                  for i, j in itertools.combinations(range(len(blocks) + 1), 2)}
        for slot_h in sorted(heights):
            for row_w in sorted(widths):
                places, total_w, total_h, rows = _pack(blocks, slot_h, row_w)
                below = sum(1 for _, y in places if y > 0)  # stages not at the top: breaks of the reading order
                candidates.append((view_scale(total_w, total_h), (below, rows, sum(choice)), blocks, places,
                                   total_w, total_h))
    top = max(c[0] for c in candidates)
    floor = max(top * ROW_TOLERANCE, MIN_READABLE_SCALE) if top >= MIN_READABLE_SCALE else top
    good = [c for c in candidates if c[0] >= floor]
    _, _, blocks, places, total_w, total_h = min(good, key=lambda c: (c[1], -round(c[0], 3), c[5], c[4]))
    by_id = {n["id"]: n for n in w.nodes}
    groups = []
    for k, (b, (x, y)) in enumerate(zip(blocks, places)):
        for i, (dx, dy) in b["offsets"].items():
            by_id[i]["pos"] = [x + dx, y + dy]
        for i, size in b["notes"].items():
            by_id[i]["size"] = size
        groups.append({"id": k + 1, "title": b["stage"].title, "bounding": [x, y, b["w"], b["h"]],
                       "color": STAGE_COLORS.get(b["stage"].kind, STAGE_COLORS["method"]), "font_size": 24,
                       "flags": {}})
    scale, (vx, vy, vw, vh) = fit_view(total_w, total_h)  # canvas pixel = (graph + offset) · scale
    offset = [round(vx / scale + (vw / scale - total_w) / 2, 1), round(vy / scale + (vh / scale - total_h) / 2, 1)]
    return groups, {"scale": round(scale, 4), "offset": offset}


def node_boxes(workflow: dict) -> dict[int, tuple[float, float, float, float]]:
    """Each node's box on the canvas, title bar included: (x, y, width, height)."""
    return {n["id"]: (n["pos"][0], n["pos"][1] - TITLE_H, n["size"][0], n["size"][1] + TITLE_H)
            for n in workflow["nodes"]}


def overlapping(boxes: dict) -> list[tuple]:
    """Pairs of ids whose boxes overlap."""
    def hit(a, b):
        return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]
    return [(i, j) for (i, a), (j, b) in itertools.combinations(boxes.items(), 2) if hit(a, b)]


# --------------------------------------------------------------------------------------------
# Workflows
# --------------------------------------------------------------------------------------------

def invert_and_reconstruct(w, loader, pos, neg, image, encoded, refine_iterations, prefix, save_size):
    """DDIM Inversion → stock KSamplerAdvanced → decode → the image next to its reconstruction."""
    w.stage("3 · Invert: DDIM Inversion", note="The image's latent is run backwards to noise x_T. Keep steps, "
            "scheduler (ddim_uniform), cfg and the prompt equal here and in the sampler.")
    inv = w.add("DisentangleDDIMInversion", node_size=(330, 0), model=(loader, 0), positive=(pos, 0),
                latent=(encoded, 0), steps=50, cfg=1.0, scheduler="ddim_uniform", refine_iterations=refine_iterations)
    w.stage("4 · Reconstruct: KSamplerAdvanced", note="Stock KSamplerAdvanced with add_noise disable, sampler ddim, start_at_step 0, from the inverted noise.")
    sampler = w.add("KSamplerAdvanced", node_size=(320, 0), model=(loader, 0), positive=(pos, 0),
                    negative=(neg, 0), latent_image=(inv, 0), add_noise="disable", noise_seed=0, steps=50,
                    cfg=1.0, sampler_name="ddim", scheduler="ddim_uniform", start_at_step=0,
                    end_at_step=10000, return_with_leftover_noise="disable")
    dec = w.add("VAEDecode", samples=(sampler, 0), vae=(loader, 2))
    w.stage("5 · Result: image | reconstruction", kind="output")
    both = w.add("ImageBatch", image1=(image, 0), image2=(dec, 0))
    w.add("SaveImage", node_size=save_size, images=(both, 0), filename_prefix=prefix)
    return inv


def mix_and_compare(w, loader, neutral, styled, neg, size, batch, seed, cfg, prefix, save_size):
    """Switch-at-20-of-50 λ mixing and the neutral prompt alone, same seeds, saved side by side."""
    w.stage("2 · λ schedule and mixing",
            note="c_t = λ_t·c1 + (1−λ_t)·c0. λ = 0 (neutral prompt) for the first 20 of 50 steps, which lay out the image; λ = 1 (styled "
                 "prompt) after, which add the attribute (Wu et al. 2023, Sec. 3.2).")
    sched = w.add("DisentangleLambdaSwitch", steps=50, switch_step=20, value_before=0.0, value_after=1.0)
    mix = w.add("DisentangleMixConditioning", neutral=(neutral, 0), styled=(styled, 0), schedule=(sched, 0))
    latent = w.add("EmptyLatentImage", width=size, height=size, batch_size=batch)
    w.stage("3 · Sample: edited and neutral", note="Stock KSampler, the same seed with the λ-mixed and with the neutral conditioning.")
    sampling = dict(latent_image=(latent, 0), seed=seed, steps=50, cfg=cfg, sampler_name="ddim",
                    scheduler="ddim_uniform", denoise=1.0, negative=(neg, 0), model=(loader, 0))
    edit = w.add("KSampler", title="Edited (λ-mixed)", positive=(mix, 0), **sampling)
    plain = w.add("KSampler", title="Neutral (same seed)", positive=(neutral, 0), **sampling)
    dec_edit = w.add("VAEDecode", samples=(edit, 0), vae=(loader, 2))
    dec_plain = w.add("VAEDecode", samples=(plain, 0), vae=(loader, 2))
    return sched, dec_plain, dec_edit


def ddim_inversion_reconstruct(node_classes) -> dict:
    w = Workflow(node_classes)
    w.stage("1 · Model and image", kind="input",
            note="Needs a Stable Diffusion 1.5 checkpoint (ComfyUI offers the download when it is missing) and a "
                 "512×512 image in ComfyUI's input folder.")
    ckpt = w.add("CheckpointLoaderSimple", ckpt_name=SD15_CHECKPOINT["name"], models=[SD15_CHECKPOINT])
    image = w.add("LoadImage", node_size=(320, 320), image="example.png")
    w.stage("2 · Prompt and encoding", kind="input")
    pos = w.add("CLIPTextEncode", title="Neutral prompt", node_size=(360, 110), clip=(ckpt, 1), text="a photo")
    neg = w.add("CLIPTextEncode", title="Negative prompt", node_size=(360, 110), clip=(ckpt, 1), text="")
    enc = w.add("VAEEncode", pixels=(image, 0), vae=(ckpt, 2))
    inv = invert_and_reconstruct(w, ckpt, pos, neg, image, enc, refine_iterations=0,
                                 prefix="disentangle/ddim_reconstruct", save_size=(420, 300))
    w.stage("6 · Halfway along the trajectory", kind="output")
    mid = w.add("DisentangleTrajectoryLatent", trajectory=(inv, 1), step=25, expected_steps=50)
    mid_dec = w.add("VAEDecode", samples=(mid, 0), vae=(ckpt, 2))
    w.add("PreviewImage", node_size=(300, 300), images=(mid_dec, 0))
    return w.to_dict("ddim_inversion_reconstruct")


def lambda_schedule_mix(node_classes) -> dict:
    w = Workflow(node_classes)
    w.stage("1 · Model and prompts", kind="input",
            note="Needs a Stable Diffusion 1.5 checkpoint (ComfyUI offers the download when it is missing).")
    ckpt = w.add("CheckpointLoaderSimple", ckpt_name=SD15_CHECKPOINT["name"], models=[SD15_CHECKPOINT])
    neutral = w.add("CLIPTextEncode", title="Neutral prompt (c0)", node_size=(360, 110), clip=(ckpt, 1),
                    text="a photo of a house in a field")
    styled = w.add("CLIPTextEncode", title="Styled prompt (c1)", node_size=(360, 110), clip=(ckpt, 1),
                   text="a photo of a house in a field, snowy winter")
    neg = w.add("CLIPTextEncode", title="Negative prompt", node_size=(360, 110), clip=(ckpt, 1), text="")
    sched, dec_plain, dec_edit = mix_and_compare(w, ckpt, neutral, styled, neg, size=512, batch=1, seed=42, cfg=7.5,
                                                 prefix="disentangle/lambda_mix", save_size=(440, 300))
    w.stage("4 · Result: neutral | edit; λ", kind="output",
            note="Saved: the neutral prompt (left) and the edit (right), same seed. Plot: λ over diffusion time, a dot per step of this checkpoint's scheduler. Save λ Schedule "
                 "keeps a schedule for reuse (toy_world_lambda_optimize shows it).")
    both = w.add("ImageBatch", image1=(dec_plain, 0), image2=(dec_edit, 0))
    w.add("SaveImage", node_size=(440, 300), images=(both, 0), filename_prefix="disentangle/lambda_mix")
    plot = w.add("DisentangleLambdaPlot", schedule=(sched, 0), steps=50, scheduler="ddim_uniform",
                 width=512, height=256, model=(ckpt, 0))
    w.add("PreviewImage", node_size=(420, 240), images=(plot, 0))
    return w.to_dict("lambda_schedule_mix")


TOY_NEUTRAL = "a large red cube on a green floor in front of a blue wall"
TOY_STYLED = "a large yellow cube on a green floor in front of a blue wall"
TOY_NOTE = "Offline: the pack's toy world (a small text-to-image model of one object on a floor in front of a wall)."


def toy_world_inversion(node_classes) -> dict:
    w = Workflow(node_classes)
    w.stage("1 · Toy world and a scene", kind="input", note=TOY_NOTE + " The scene is rendered with known factors.")
    toy = w.add("DisentangleLoadToyWorld", checkpoint="toy_world")
    scene = w.add("DisentangleFactorWorldScene", floor_hue="green", wall_hue="blue",
                  object_hue="red", scale="large", shape="cube", orientation="facing front", size=128)
    w.stage("2 · Prompt and encoding", kind="input")
    pos = w.add("CLIPTextEncode", title="Prompt (the scene's caption)", node_size=(360, 110), clip=(toy, 1),
                text=TOY_NEUTRAL + ", facing front")
    neg = w.add("CLIPTextEncode", title="Negative prompt", node_size=(360, 110), clip=(toy, 1), text="")
    enc = w.add("VAEEncode", pixels=(scene, 0), vae=(toy, 2))
    invert_and_reconstruct(w, toy, pos, neg, scene, enc, refine_iterations=2,
                           prefix="disentangle/toy_inversion", save_size=(420, 300))
    return w.to_dict("toy_world_inversion")


def toy_world_lambda_mix(node_classes) -> dict:
    w = Workflow(node_classes)
    w.stage("1 · Toy world and prompts", kind="input", note=TOY_NOTE)
    toy = w.add("DisentangleLoadToyWorld", checkpoint="toy_world")
    neutral = w.add("CLIPTextEncode", title="Neutral prompt (c0)", node_size=(360, 110), clip=(toy, 1), text=TOY_NEUTRAL)
    styled = w.add("CLIPTextEncode", title="Styled prompt (c1)", node_size=(360, 110), clip=(toy, 1), text=TOY_STYLED)
    neg = w.add("CLIPTextEncode", title="Negative prompt", node_size=(360, 110), clip=(toy, 1), text="")
    _, dec_plain, dec_edit = mix_and_compare(w, toy, neutral, styled, neg, size=128, batch=4, seed=7, cfg=5.0,
                                             prefix="disentangle/toy_lambda_mix", save_size=(520, 300))
    w.stage("4 · Result: neutral | edited", kind="output",
            note="Four seeds with the neutral prompt (first four) and λ-mixed (last four): the cube turns yellow; floor, wall, size, shape and turn stay.")
    both = w.add("ImageBatch", image1=(dec_plain, 0), image2=(dec_edit, 0))
    w.add("SaveImage", node_size=(520, 300), images=(both, 0), filename_prefix="disentangle/toy_lambda_mix")
    return w.to_dict("toy_world_lambda_mix")


def toy_world_lambda_optimize(node_classes) -> dict:
    w = Workflow(node_classes)
    w.stage("1 · Toy world and CLIP loss", kind="input", note=TOY_NOTE)
    toy = w.add("DisentangleLoadToyWorld", checkpoint="toy_world")
    loss = w.add("DisentangleLoadToyClipLoss", clip_name="toy_world_clip.safetensors")
    w.stage("2 · Learn λ: Optimize λ Schedule",
            note="Learns λ_1…λ_20. Directional CLIP loss + β × perceptual term, Adam over the 20 weights, gradients through every "
                 "sampler step (Wu et al. 2023, Sec. 3.3). The progress bar ticks per step; the preview shows the "
                 "edit after each iteration.")
    opt = w.add("DisentangleOptimizeLambda", node_size=(380, 0), model=(toy, 0), vae=(toy, 2), clip=(toy, 1),
                clip_loss_model=(loss, 0), neutral_text=TOY_NEUTRAL, styled_text=TOY_STYLED, negative_text="",
                seed=7, steps=20, cfg=5.0, iterations=10, learning_rate=0.05, beta=0.03, neutral_steps=8,
                styled_weight=1.0, width=128, height=128)
    w.stage("3 · Decode both images")
    dec_edit = w.add("VAEDecode", samples=(opt, 1), vae=(toy, 2))
    dec_plain = w.add("VAEDecode", samples=(opt, 2), vae=(toy, 2))
    w.stage("4 · Result, λ schedule, loss", kind="output",
            note="Saved: the neutral prompt (left) and the optimised edit (right). The schedule is saved to models/lambda_schedules: Load λ Schedule + Mix Conditioning replay it "
                 "on other seeds or images.")
    both = w.add("ImageBatch", image1=(dec_plain, 0), image2=(dec_edit, 0))
    w.add("SaveImage", node_size=(420, 300), images=(both, 0), filename_prefix="disentangle/toy_lambda_optimized")
    plot = w.add("DisentangleLambdaPlot", schedule=(opt, 0), steps=20, scheduler="ddim_uniform",
                 width=512, height=256, model=(toy, 0))
    w.add("PreviewImage", title="λ schedule", node_size=(420, 240), images=(plot, 0))
    w.add("PreviewImage", title="Loss per iteration", node_size=(420, 240), images=(opt, 3))
    w.add("DisentangleLambdaSave", schedule=(opt, 0), filename_prefix="toy_red_to_yellow", format="json")
    return w.to_dict("toy_world_lambda_optimize")


def toy_world_real_image_edit(node_classes) -> dict:
    w = Workflow(node_classes)
    w.stage("1 · Toy world, loss model, image", kind="input", note=TOY_NOTE + " The 'real' image is a rendered scene.")
    toy = w.add("DisentangleLoadToyWorld", checkpoint="toy_world")
    loss = w.add("DisentangleLoadToyClipLoss", clip_name="toy_world_clip.safetensors")
    scene = w.add("DisentangleFactorWorldScene", floor_hue="green", wall_hue="blue",
                  object_hue="red", scale="large", shape="cube", orientation="facing front", size=128)
    w.stage("2 · Invert the image", note="DDIM Inversion with the neutral prompt, 20 steps, as Optimize λ samples.")
    pos = w.add("CLIPTextEncode", title="Neutral prompt", node_size=(360, 110), clip=(toy, 1), text=TOY_NEUTRAL)
    enc = w.add("VAEEncode", pixels=(scene, 0), vae=(toy, 2))
    inv = w.add("DisentangleDDIMInversion", node_size=(330, 0), model=(toy, 0), positive=(pos, 0),
                latent=(enc, 0), steps=20, cfg=1.0, scheduler="ddim_uniform", refine_iterations=2)
    w.stage("3 · Learn λ along the trajectory",
            note="Real-image edit (Wu et al. Sec. 3.4): the first 12 of 20 steps are corrected to pass through the "
                 "inversion trajectory, the last 8 re-diffuse freely.")
    opt = w.add("DisentangleOptimizeLambda", node_size=(380, 0), model=(toy, 0), vae=(toy, 2), clip=(toy, 1),
                clip_loss_model=(loss, 0), neutral_text=TOY_NEUTRAL, styled_text=TOY_STYLED, negative_text="",
                seed=0, steps=20, cfg=5.0, iterations=10, learning_rate=0.05, beta=0.03, neutral_steps=4,
                styled_weight=1.1, width=128, height=128, trajectory=(inv, 1), rediffusion_steps=8)
    dec = w.add("VAEDecode", samples=(opt, 1), vae=(toy, 2))
    w.stage("4 · Result: image | edit; loss", kind="output", note="Saved: the image (left) and the edit (right).")
    both = w.add("ImageBatch", image1=(scene, 0), image2=(dec, 0))
    w.add("SaveImage", node_size=(420, 300), images=(both, 0), filename_prefix="disentangle/toy_real_image_edit")
    w.add("PreviewImage", title="Loss per iteration", node_size=(420, 240), images=(opt, 3))
    return w.to_dict("toy_world_real_image_edit")


def lambda_real_image_edit(node_classes) -> dict:
    w = Workflow(node_classes)
    w.stage("1 · Model, CLIP loss model, image", kind="input",
            note="Needs a Stable Diffusion 1.5 checkpoint and OpenAI's ViT-B/32 as an open_clip safetensors file in "
                 "models/clip_loss (ComfyUI offers both downloads when they are missing), and a 512×512 image. "
                 "Connect Load Perceptual Loss (LPIPS) to perceptual_model for the paper's content term.")
    ckpt = w.add("CheckpointLoaderSimple", ckpt_name=SD15_CHECKPOINT["name"], models=[SD15_CHECKPOINT])
    loss = w.add("DisentangleLoadClipLoss", clip_name=OPENAI_VIT_B32["name"], model_name="ViT-B-32-quickgelu",
                 pretrained="openai", models=[OPENAI_VIT_B32])
    image = w.add("LoadImage", node_size=(320, 320), image="example.png")
    neutral_text, styled_text = "a photo of a person", "a photo of a smiling person"
    w.stage("2 · Invert the image", note="DDIM Inversion with the neutral prompt, 50 steps, as Optimize λ samples.")
    pos = w.add("CLIPTextEncode", title="Neutral prompt", node_size=(360, 110), clip=(ckpt, 1), text=neutral_text)
    enc = w.add("VAEEncode", pixels=(image, 0), vae=(ckpt, 2))
    inv = w.add("DisentangleDDIMInversion", node_size=(330, 0), model=(ckpt, 0), positive=(pos, 0),
                latent=(enc, 0), steps=50, cfg=1.0, scheduler="ddim_uniform", refine_iterations=2)
    w.stage("3 · Learn λ along the trajectory",
            note="Wu et al. Sec. 3.4: the first 30 of 50 steps pass through the image's trajectory, the last 20 "
                 "re-diffuse (t* = 10, styled weight 1.1, as the paper).")
    opt = w.add("DisentangleOptimizeLambda", node_size=(380, 0), model=(ckpt, 0), vae=(ckpt, 2),
                clip=(ckpt, 1), clip_loss_model=(loss, 0), neutral_text=neutral_text, styled_text=styled_text,
                negative_text="", seed=0, steps=50, cfg=7.5, iterations=10, learning_rate=0.05, beta=0.05,
                neutral_steps=10, styled_weight=1.1, width=512, height=512, trajectory=(inv, 1), rediffusion_steps=20)
    dec = w.add("VAEDecode", samples=(opt, 1), vae=(ckpt, 2))
    w.stage("4 · Result: image | edit; loss", kind="output",
            note="Saved: the image (left) and the edit (right). The learned schedule is saved to models/lambda_schedules for other images.")
    both = w.add("ImageBatch", image1=(image, 0), image2=(dec, 0))
    w.add("SaveImage", node_size=(420, 300), images=(both, 0), filename_prefix="disentangle/real_image_edit")
    w.add("PreviewImage", title="Loss per iteration", node_size=(420, 240), images=(opt, 3))
    w.add("DisentangleLambdaSave", schedule=(opt, 0), filename_prefix="smile", format="json")
    return w.to_dict("lambda_real_image_edit")


def avi_attribute_edit(node_classes) -> dict:
    w = Workflow(node_classes)
    w.stage("1 · Toy world, prompts, size", kind="input", note=TOY_NOTE + " With SD, use your checkpoint and prompts.")
    toy = w.add("DisentangleLoadToyWorld", checkpoint="toy_world")
    pos = w.add("CLIPTextEncode", title="Original prompt", node_size=(360, 110), clip=(toy, 1), text=TOY_NEUTRAL)
    target = w.add("CLIPTextEncode", title="Target prompt", node_size=(360, 110), clip=(toy, 1), text=TOY_STYLED)
    neg = w.add("CLIPTextEncode", title="Negative prompt", node_size=(360, 110), clip=(toy, 1), text="")
    latent = w.add("EmptyLatentImage", width=128, height=128, batch_size=1)
    sampling = dict(steps=50, cfg=5.0, sampler_name="ddim", scheduler="ddim_uniform")
    w.stage("2 · For comparison", note="The original prompt and the target prompt outright, same seed as the edit.")
    plain = w.add("KSampler", title="Original (same seed)", model=(toy, 0), seed=7,
                  positive=(pos, 0), negative=(neg, 0), latent_image=(latent, 0), denoise=1.0, **sampling)
    dec = w.add("VAEDecode", samples=(plain, 0), vae=(toy, 2))
    naive = w.add("KSampler", title="Target prompt outright (same seed)",
                  model=(toy, 0), seed=7, positive=(target, 0), negative=(neg, 0), latent_image=(latent, 0), denoise=1.0,
                  **sampling)
    dec_naive = w.add("VAEDecode", samples=(naive, 0), vae=(toy, 2))
    # T_x 0.2: the toy model commits the object's colour late (bench/avi_premises.py, README); z is the default
    # "target's x̂0 at x and at t_early (fast)", at x's own step (Δτ unused); every input at its default
    w.stage("3 · Capture x and z",
            note="x: the red cube prompt at T_x = 0.2T. z (the default z_source): x with the yellow cube prompt's "
                 "clean-image change, predicted at x and at t_early 0.9T within x's own sampling (the yellow prompt "
                 "alone, half a step each), so the whole edit costs one sampling + 1 step. The late prediction "
                 "carries what is still open at T_x (the cube's colour); "
                 "the early one what the model commits before (a floor or wall colour: edit the prompts' floor or "
                 "wall colour instead and the same settings work, README).")
    cap = w.add("DisentangleAVICapture", node_size=(340, 0), model=(toy, 0), positive=(pos, 0),
                target=(target, 0), negative=(neg, 0), latent_image=(latent, 0), seed=7, t_x=0.2, delta_tau=-0.3,
                z_source="target's x̂0 at x and at t_early (fast)", **sampling)
    w.stage("4 · Integrate (ρ) and resume",
            note="ρ is the strength of the edit: 0 gives the original back exactly, 1 the full edit, and in between "
                 "the edit grows steadily with ρ (0.5: half the change; the cube turns orange on its way to yellow). "
                 "AVI Integrate adds to x γ·ρ times the strongest singular direction of z − x per latent channel "
                 "(γ = 2.25: the original prompt pulls the colour back during the resume; a floor or wall colour gets "
                 "γ·early_weight); ŷ resumes with the ORIGINAL prompt in stock KSamplerAdvanced from AVI Capture's resume "
                 "step. Move the ρ slider and queue again: only Integrate and the resume re-run. The paper's "
                 "Algorithm 1 (with AVI Train Φ) is the integration option 'Algorithm 1 (paper)'; on the toy world it "
                 "does not change the image visibly.")
    edits = []
    for rho in (0.5, 1.0):
        y = w.add("DisentangleAVIIntegrate", title=f"AVI Integrate (ρ = {rho})", x=(cap, 0),
                  z=(cap, 1), rho=rho, k=0, singular_values="x's own (no Φ)",
                  integration="x + top-k directions of z − x")
        res = w.add("KSamplerAdvanced", title=f"Resume (ρ = {rho})", node_size=(320, 0),
                    model=(toy, 0), positive=(pos, 0), negative=(neg, 0), latent_image=(y, 0), add_noise="disable",
                    noise_seed=0, start_at_step=(cap, 2), end_at_step=10000, return_with_leftover_noise="disable",
                    **sampling)
        edits.append(w.add("VAEDecode", samples=(res, 0), vae=(toy, 2)))
    w.stage("5 · Result: four images", kind="output",
            note="Saved left to right: the original, ρ = 0.5, ρ = 1, the target prompt outright.")
    both = w.add("ImageBatch", image1=(dec, 0), image2=(edits[0], 0))
    three = w.add("ImageBatch", image1=(both, 0), image2=(edits[1], 0))
    four = w.add("ImageBatch", image1=(three, 0), image2=(dec_naive, 0))
    w.add("SaveImage", node_size=(440, 200), images=(four, 0), filename_prefix="disentangle/avi_attribute_edit")
    return w.to_dict("avi_attribute_edit")


DISDIFF_FILE = "toy_world_disdiff.safetensors"


def disdiff_partial_condition(node_classes) -> dict:
    w = Workflow(node_classes)
    w.stage("1 · Toy world, DisDiff, target", kind="input", note=TOY_NOTE)
    toy = w.add("DisentangleLoadToyWorld", checkpoint="toy_world")
    dis = w.add("DisentangleLoadDisDiff", disdiff_name=DISDIFF_FILE)
    scene = w.add("DisentangleFactorWorldScene", title="Target image", floor_hue="green", wall_hue="blue",
                  object_hue="red", scale="large", shape="cube", orientation="facing front", size=128)
    w.add("PreviewImage", node_size=(260, 260), images=(scene, 0))
    w.stage("2 · Encode the target's factors", note="DisDiff Encode: one learned code per factor.")
    empty = w.add("CLIPTextEncode", title="Empty prompt (the unconditional model)", node_size=(360, 110), clip=(toy, 1),
                  text="")
    enc = w.add("VAEEncode", pixels=(scene, 0), vae=(toy, 2))
    codes = w.add("DisentangleDisDiffEncode", disdiff=(dis, 0), latent=(enc, 0))
    w.stage("3 · Sample with factor 0 imposed",
            note="Four seeds, with and without factor 0 of the target. DisDiff eq. 6: stock KSampler on a MODEL patched with the gradient field of the chosen factors. "
                 "The factors are learned without labels: in the shipped model factor 0 holds the wall's colour, "
                 "factor 2 mixes the object's colour, size and shape. Find the others with the swap workflow; try "
                 "'all' (reconstruction) or several ('0,2').")
    patched = w.add("DisentangleDisDiffPartialCondition", node_size=(340, 0), model=(toy, 0),
                    disdiff=(dis, 0), factors=(codes, 0), condition_on="0", strengths="1.0")
    batch = w.add("RepeatLatentBatch", samples=(enc, 0), amount=4)
    cond = w.add("KSampler", title="Conditioned on the chosen factors", model=(patched, 0), seed=11,
                 steps=50, cfg=1.0, sampler_name="ddim", scheduler="ddim_uniform", positive=(empty, 0),
                 negative=(empty, 0), latent_image=(batch, 0), denoise=1.0)
    free = w.add("KSampler", title="Unconditioned (same seeds)", model=(toy, 0), seed=11, steps=50,
                 cfg=1.0, sampler_name="ddim", scheduler="ddim_uniform", positive=(empty, 0), negative=(empty, 0),
                 latent_image=(batch, 0), denoise=1.0)
    d_cond = w.add("VAEDecode", samples=(cond, 0), vae=(toy, 2))
    d_free = w.add("VAEDecode", samples=(free, 0), vae=(toy, 2))
    w.stage("4 · Result: plain | conditioned", kind="output", note="The plain model (first four), conditioned on factor 0 (last four), same seeds: the target's wall colour.")
    both = w.add("ImageBatch", image1=(d_free, 0), image2=(d_cond, 0))
    w.add("SaveImage", node_size=(520, 300), images=(both, 0), filename_prefix="disentangle/disdiff_partial")
    return w.to_dict("disdiff_partial_condition")


def disdiff_swap_factors(node_classes) -> dict:
    w = Workflow(node_classes)
    w.stage("1 · Toy world, DisDiff, two images", kind="input", note=TOY_NOTE)
    toy = w.add("DisentangleLoadToyWorld", checkpoint="toy_world")
    dis = w.add("DisentangleLoadDisDiff", disdiff_name=DISDIFF_FILE)
    src = w.add("DisentangleFactorWorldScene", title="Source image", floor_hue="green", wall_hue="blue",
                object_hue="red", scale="large", shape="cube", orientation="facing front", size=128)
    tgt = w.add("DisentangleFactorWorldScene", title="Second image (gives the swapped factors)",
                floor_hue="orange", wall_hue="purple", object_hue="yellow", scale="small", shape="sphere",
                orientation="turned left", size=128)
    w.stage("2 · Encode both; swap factor 0",
            note="Both images are encoded into learned factor codes; the source's code 0 (in the shipped model: the wall's colour) is replaced by the second image's. Change 'swap' to see what each learned factor holds (the factors are learned without labels and are not all cleanly separated).")
    empty = w.add("CLIPTextEncode", title="Empty prompt (the unconditional model)", node_size=(360, 110), clip=(toy, 1),
                  text="")
    e_src = w.add("VAEEncode", pixels=(src, 0), vae=(toy, 2))
    e_tgt = w.add("VAEEncode", pixels=(tgt, 0), vae=(toy, 2))
    z_src = w.add("DisentangleDisDiffEncode", disdiff=(dis, 0), latent=(e_src, 0))
    z_tgt = w.add("DisentangleDisDiffEncode", disdiff=(dis, 0), latent=(e_tgt, 0))
    swapped = w.add("DisentangleDisDiffSwapFactors", factors=(z_src, 0), other=(z_tgt, 0), swap="0")
    w.stage("3 · Sample with all factors", note="Stock KSampler with all factors imposed: the source's, and with one swapped.")
    rec_model = w.add("DisentangleDisDiffPartialCondition", node_size=(340, 0), title="All factors of the source",
                      model=(toy, 0), disdiff=(dis, 0), factors=(z_src, 0), condition_on="all", strengths="1.0")
    swap_model = w.add("DisentangleDisDiffPartialCondition", node_size=(340, 0), title="All factors, one swapped",
                       model=(toy, 0), disdiff=(dis, 0), factors=(swapped, 0), condition_on="all", strengths="1.0")
    rec = w.add("KSampler", title="Reconstruction", model=(rec_model, 0), seed=5, steps=50, cfg=1.0,
                sampler_name="ddim", scheduler="ddim_uniform", positive=(empty, 0), negative=(empty, 0),
                latent_image=(e_src, 0), denoise=1.0)
    swp = w.add("KSampler", title="Swapped factor", model=(swap_model, 0), seed=5, steps=50, cfg=1.0,
                sampler_name="ddim", scheduler="ddim_uniform", positive=(empty, 0), negative=(empty, 0),
                latent_image=(e_src, 0), denoise=1.0)
    d_rec = w.add("VAEDecode", samples=(rec, 0), vae=(toy, 2))
    d_swp = w.add("VAEDecode", samples=(swp, 0), vae=(toy, 2))
    w.stage("4 · Result: four images", kind="output", note="Saved: the source, the second image, the reconstruction, the swapped one.")
    inputs = w.add("ImageBatch", image1=(src, 0), image2=(tgt, 0))
    outputs = w.add("ImageBatch", image1=(d_rec, 0), image2=(d_swp, 0))
    every = w.add("ImageBatch", image1=(inputs, 0), image2=(outputs, 0))
    w.add("SaveImage", node_size=(520, 220), images=(every, 0), filename_prefix="disentangle/disdiff_swap")
    return w.to_dict("disdiff_swap_factors")


WORKFLOWS = {
    "disdiff_partial_condition.json": disdiff_partial_condition,
    "disdiff_swap_factors.json": disdiff_swap_factors,
    "ddim_inversion_reconstruct.json": ddim_inversion_reconstruct,
    "lambda_schedule_mix.json": lambda_schedule_mix,
    "lambda_real_image_edit.json": lambda_real_image_edit,
    "toy_world_inversion.json": toy_world_inversion,
    "toy_world_lambda_mix.json": toy_world_lambda_mix,
    "toy_world_lambda_optimize.json": toy_world_lambda_optimize,
    "toy_world_real_image_edit.json": toy_world_real_image_edit,
    "avi_attribute_edit.json": avi_attribute_edit,
}


# ComfyUI's template browser, from first steps to advanced: (workflow, title, one-line description, needs SD 1.5).
# The frontend turns '-' and '_' of a custom template's description into spaces: the descriptions use neither.
TEMPLATES = (
    ("toy_world_lambda_mix", "First steps: λ mixing (toy world)",
     "Start here, offline: mix a neutral and a styled prompt per step (λ), and a red cube turns yellow while the "
     "scene stays.", False),
    ("toy_world_inversion", "DDIM inversion (toy world)",
     "Offline: invert a rendered scene to noise with DDIM Inversion and rebuild it with stock KSamplerAdvanced.", False),
    ("toy_world_lambda_optimize", "Learn a λ schedule (toy world)",
     "Offline: learn the per step weights λ with the directional CLIP loss; plot, save and replay them.", False),
    ("toy_world_real_image_edit", "Edit an image with a learned λ (toy world)",
     "Offline: edit an existing image, learning λ along its inversion trajectory with rediffusion.", False),
    ("avi_attribute_edit", "AVI: attribute vector integration (toy world)",
     "Offline: capture x and z, integrate with strength ρ and resume: the red cube turns yellow (Wang et al. 2024).", False),
    ("disdiff_swap_factors", "DisDiff: swap a learned factor (toy world)",
     "Offline: encode two images into learned DisDiff factors and swap one of them.", False),
    ("disdiff_partial_condition", "DisDiff: keep chosen factors (toy world)",
     "Offline: sample new images that keep chosen learned factors of a target image (DisDiff eq. 6).", False),
    ("lambda_schedule_mix", "λ mixing on SD 1.5 (checkpoint needed)",
     "Needs a Stable Diffusion 1.5 checkpoint. A house in a field turns snowy by λ mixing, same seed.", True),
    ("ddim_inversion_reconstruct", "DDIM inversion on SD 1.5 (checkpoint needed)",
     "Needs a Stable Diffusion 1.5 checkpoint. Invert your own image with DDIM and reconstruct it.", True),
    ("lambda_real_image_edit", "Edit your photo with λ on SD 1.5 (checkpoint needed)",
     "Needs a Stable Diffusion 1.5 checkpoint and OpenAI's CLIP ViT B/32. Learn λ that makes the person in your "
     "photo smile.", True),
)
TEMPLATE_CATEGORY = "Disentangle: edit one attribute"


def template_index() -> list[dict]:
    """``workflows/index.json`` in the format of the frontend's own template index (one category).
    web/js/templates.js shows it in the template browser (moduleName: the pack's folder, set there)."""
    templates = []
    for name, title, description, needs_sd in TEMPLATES:
        templates.append({
            "name": name, "title": title, "description": description, "mediaType": "image", "mediaSubtype": "jpg",
            "tags": ["Needs SD 1.5 checkpoint"] if needs_sd else ["Offline", "Toy world"],
            "models": ["SD1.5"] if needs_sd else ["Toy world"],
        })
    return [{"moduleName": "ComfyUI-Disentangle", "title": TEMPLATE_CATEGORY, "type": "image", "templates": templates}]


def render_all(node_classes) -> dict[str, str]:
    files = {name: json.dumps(make(node_classes), indent=1, ensure_ascii=False) + "\n" for name, make in WORKFLOWS.items()}
    files["index.json"] = json.dumps(template_index(), indent=1, ensure_ascii=False) + "\n"
    return files


if __name__ == "__main__":
    import _pack_alias  # noqa: F401,E402  (registers comfyui_disentangle: harness/alias.py)
    from comfyui_disentangle.harness import start_host  # noqa: E402 (needs COMFYUI_PATH)

    start_host()
    import nodes  # noqa: E402
    out_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "workflows")
    for name, text in render_all(nodes.NODE_CLASS_MAPPINGS).items():
        with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
            f.write(text)
        print("wrote", name)

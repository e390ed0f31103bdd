"""Writes the shipped workflows in ComfyUI's UI format (what the frontend saves and drag-and-drop loads).

Widget values are ordered from each node class's own INPUT_TYPES, so the files match what the
frontend would write. Regenerate after changing a node's inputs:

    COMFYUI_PATH=/path/to/ComfyUI python tests/workflow_builder.py

and ``tests/test_workflows.py`` checks that the shipped files equal what this script makes.
"""
from __future__ import annotations

import json
import os
import uuid

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
SEED_NAMES = {"seed", "noise_seed"}


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


class Workflow:
    """Nodes are added with their inputs: a value sets a widget, ``(node, slot)`` makes a link."""

    def __init__(self, node_classes: dict):
        self.node_classes = node_classes
        self.nodes: list[dict] = []
        self.links: list[list] = []

    def add(self, class_type: str, pos, title: str | None = None, node_size=(320, 130), **inputs) -> int:
        cls = self.node_classes[class_type]
        node_id = len(self.nodes) + 1
        node_inputs, widgets = [], []
        for name, kind, options, section in _input_specs(cls):
            value = inputs.pop(name, None)
            if _is_widget(kind, options) and isinstance(value, tuple):  # a widget fed by a link (widget input)
                src, slot = value
                link_id = len(self.links) + 1
                self.links.append([link_id, src, slot, node_id, len(node_inputs), kind])
                self.nodes[src - 1]["outputs"][slot]["links"].append(link_id)
                node_inputs.append({"name": name, "type": kind, "widget": {"name": name}, "link": link_id})
                value = None
            if _is_widget(kind, options):
                widgets.append(_default(kind, options) if value is None else value)
                if options.get("control_after_generate") or (kind == "INT" and name in SEED_NAMES):
                    widgets.append("fixed")
                if options.get("image_upload"):
                    widgets.append("image")  # the frontend's upload button stores a value too
                continue
            if value is None and section == "optional":
                continue
            link_id = None
            if value is not None:
                src, slot = value
                link_id = len(self.links) + 1
                self.links.append([link_id, src, slot, node_id, len(node_inputs), kind])
                self.nodes[src - 1]["outputs"][slot]["links"].append(link_id)
            node_inputs.append({"name": name, "type": kind, "link": link_id})
        if inputs:
            raise KeyError(f"{class_type} has no inputs {sorted(inputs)}")
        names = getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES
        node = {
            "id": node_id,
            "type": class_type,
            "pos": list(pos),
            "size": list(node_size),
            "flags": {},
            "order": node_id - 1,
            "mode": 0,
            "inputs": node_inputs,
            "outputs": [{"name": n, "type": t, "links": []} for n, t in zip(names, cls.RETURN_TYPES)],
            "properties": {"Node name for S&R": class_type},
            "widgets_values": widgets,
        }
        if title:
            node["title"] = title
        self.nodes.append(node)
        return node_id

    def note(self, text: str, pos, node_size=(420, 160)) -> None:
        self.nodes.append({
            "id": len(self.nodes) + 1, "type": "Note", "pos": list(pos), "size": list(node_size), "flags": {},
            "order": len(self.nodes), "mode": 0, "inputs": [], "outputs": [], "properties": {},
            "widgets_values": [text],
        })

    def to_dict(self, name: str) -> dict:
        return {
            "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"comfyui-disentangle/{name}")),
            "revision": 0,
            "last_node_id": len(self.nodes),
            "last_link_id": len(self.links),
            "nodes": self.nodes,
            "links": self.links,
            "groups": [],
            "config": {},
            "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}},
            "version": 0.4,
        }


def invert_and_reconstruct(w, loader, pos, neg, image, encoded, refine_iterations, prefix, save_size):
    """DDIM Inversion → stock KSamplerAdvanced → decode → the image next to its reconstruction."""
    inv = w.add("DisentangleDDIMInversion", (740, 40), node_size=(330, 240), model=(loader, 0), positive=(pos, 0),
                latent=(encoded, 0), steps=50, cfg=1.0, scheduler="ddim_uniform", refine_iterations=refine_iterations)
    sampler = w.add("KSamplerAdvanced", (1110, 40), node_size=(320, 340), model=(loader, 0), positive=(pos, 0),
                    negative=(neg, 0), latent_image=(inv, 0), add_noise="disable", noise_seed=0, steps=50,
                    cfg=1.0, sampler_name="ddim", scheduler="ddim_uniform", start_at_step=0,
                    end_at_step=10000, return_with_leftover_noise="disable")
    dec = w.add("VAEDecode", (1470, 40), samples=(sampler, 0), vae=(loader, 2))
    both = w.add("ImageBatch", (1470, 160), image1=(image, 0), image2=(dec, 0))
    w.add("SaveImage", (1720, 40), node_size=save_size, images=(both, 0), filename_prefix=prefix)
    return inv


def mix_and_compare(w, loader, neutral, styled, neg, size, batch, seed, cfg, prefix, save_size):
    """Switch-at-20-of-50 λ mixing and the neutral prompt alone, same seeds, saved side by side."""
    sched = w.add("DisentangleLambdaSwitch", (20, 520), steps=50, switch_step=20, value_before=0.0, value_after=1.0)
    mix = w.add("DisentangleMixConditioning", (740, 20), neutral=(neutral, 0), styled=(styled, 0), schedule=(sched, 0))
    latent = w.add("EmptyLatentImage", (740, 200), width=size, height=size, batch_size=batch)
    sampling = dict(latent_image=(latent, 0), seed=seed, steps=50, cfg=cfg, sampler_name="ddim",
                    scheduler="ddim_uniform", denoise=1.0, negative=(neg, 0), model=(loader, 0))
    edit = w.add("KSampler", (1100, 20), title="Edited (λ-mixed)", node_size=(320, 270), positive=(mix, 0), **sampling)
    plain = w.add("KSampler", (1100, 330), title="Neutral (same seed)", node_size=(320, 270), positive=(neutral, 0),
                  **sampling)
    dec_edit = w.add("VAEDecode", (1460, 20), samples=(edit, 0), vae=(loader, 2))
    dec_plain = w.add("VAEDecode", (1460, 330), samples=(plain, 0), vae=(loader, 2))
    both = w.add("ImageBatch", (1460, 160), image1=(dec_plain, 0), image2=(dec_edit, 0))
    w.add("SaveImage", (1700, 20), node_size=save_size, images=(both, 0), filename_prefix=prefix)
    return sched


def ddim_inversion_reconstruct(node_classes) -> dict:
    w = Workflow(node_classes)
    ckpt = w.add("CheckpointLoaderSimple", (20, 200), ckpt_name="v1-5-pruned-emaonly.safetensors")
    pos = w.add("CLIPTextEncode", (380, 40), title="Neutral prompt", clip=(ckpt, 1), text="a photo")
    neg = w.add("CLIPTextEncode", (380, 240), title="Negative prompt", clip=(ckpt, 1), text="")
    image = w.add("LoadImage", (20, 420), node_size=(320, 320), image="example.png")
    enc = w.add("VAEEncode", (380, 440), pixels=(image, 0), vae=(ckpt, 2))
    inv = invert_and_reconstruct(w, ckpt, pos, neg, image, enc, refine_iterations=0,
                                 prefix="disentangle/ddim_reconstruct", save_size=(400, 420))
    mid = w.add("DisentangleTrajectoryLatent", (740, 340), trajectory=(inv, 1), step=25, expected_steps=50)
    mid_dec = w.add("VAEDecode", (1110, 440), samples=(mid, 0), vae=(ckpt, 2))
    w.add("PreviewImage", (1470, 420), node_size=(300, 300), images=(mid_dec, 0))
    w.note(
        "DDIM Inversion → KSamplerAdvanced reconstructs the image.\n"
        "Keep steps, scheduler (ddim_uniform), sampler (ddim), cfg and the neutral prompt equal in both nodes, "
        "and add_noise disabled. The saved image shows the original next to the reconstruction; "
        "the preview shows the latent halfway along the inversion trajectory.",
        (20, 760),
    )
    return w.to_dict("ddim_inversion_reconstruct")


def lambda_schedule_mix(node_classes) -> dict:
    w = Workflow(node_classes)
    ckpt = w.add("CheckpointLoaderSimple", (20, 200), ckpt_name="v1-5-pruned-emaonly.safetensors")
    neutral = w.add("CLIPTextEncode", (380, 20), title="Neutral prompt (c0)", clip=(ckpt, 1),
                    text="a photo of a house in a field")
    styled = w.add("CLIPTextEncode", (380, 220), title="Styled prompt (c1)", clip=(ckpt, 1),
                   text="a photo of a house in a field, snowy winter")
    neg = w.add("CLIPTextEncode", (380, 420), title="Negative prompt", clip=(ckpt, 1), text="")
    sched = mix_and_compare(w, ckpt, neutral, styled, neg, size=512, batch=1, seed=42, cfg=7.5,
                            prefix="disentangle/lambda_mix", save_size=(400, 420))
    plot = w.add("DisentangleLambdaPlot", (380, 620), schedule=(sched, 0), steps=50, scheduler="ddim_uniform",
                 width=512, height=256, model=(ckpt, 0))
    w.add("PreviewImage", (740, 620), node_size=(400, 260), images=(plot, 0))
    w.add("DisentangleLambdaSave", (20, 760), schedule=(sched, 0), filename_prefix="lambda_schedule", format="json")
    w.note(
        "Neutral prompt for the first 20 of 50 steps (layout), styled prompt after (attribute): "
        "c_t = λ_t·c1 + (1−λ_t)·c0 (Wu et al. 2023). Left: neutral prompt only; right: the edit, same seed.",
        (20, 900),
    )
    return w.to_dict("lambda_schedule_mix")


TOY_NEUTRAL = "a large red cube on a green floor in front of a blue wall"
TOY_STYLED = "a large yellow cube on a green floor in front of a blue wall"


def toy_world_inversion(node_classes) -> dict:
    w = Workflow(node_classes)
    toy = w.add("DisentangleLoadToyWorld", (20, 200), checkpoint="toy_world")
    scene = w.add("DisentangleFactorWorldScene", (20, 420), floor_hue="green", wall_hue="blue",
                  object_hue="red", scale="large", shape="cube", orientation="facing front", size=128)
    pos = w.add("CLIPTextEncode", (380, 40), title="Prompt (the scene's caption)", clip=(toy, 1), text=TOY_NEUTRAL + ", facing front")
    neg = w.add("CLIPTextEncode", (380, 240), title="Negative prompt", clip=(toy, 1), text="")
    enc = w.add("VAEEncode", (380, 440), pixels=(scene, 0), vae=(toy, 2))
    invert_and_reconstruct(w, toy, pos, neg, scene, enc, refine_iterations=2,
                           prefix="disentangle/toy_inversion", save_size=(400, 300))
    w.note("Runs offline with the pack's toy world: a rendered scene with known factors is inverted and "
           "reconstructed by stock KSamplerAdvanced (left: the scene, right: the reconstruction).", (20, 720))
    return w.to_dict("toy_world_inversion")


def toy_world_lambda_mix(node_classes) -> dict:
    w = Workflow(node_classes)
    toy = w.add("DisentangleLoadToyWorld", (20, 200), checkpoint="toy_world")
    neutral = w.add("CLIPTextEncode", (380, 20), title="Neutral prompt (c0)", clip=(toy, 1), text=TOY_NEUTRAL)
    styled = w.add("CLIPTextEncode", (380, 220), title="Styled prompt (c1)", clip=(toy, 1), text=TOY_STYLED)
    neg = w.add("CLIPTextEncode", (380, 420), title="Negative prompt", clip=(toy, 1), text="")
    mix_and_compare(w, toy, neutral, styled, neg, size=128, batch=4, seed=7, cfg=5.0,
                    prefix="disentangle/toy_lambda_mix", save_size=(400, 300))
    w.note("Offline λ mixing on the toy world: the same four seeds with the neutral prompt (first four) and "
           "with neutral → styled after 20 of 50 steps (last four): the cube turns yellow, the scene stays.",
           (20, 700))
    return w.to_dict("toy_world_lambda_mix")


def toy_world_lambda_optimize(node_classes) -> dict:
    w = Workflow(node_classes)
    toy = w.add("DisentangleLoadToyWorld", (20, 200), checkpoint="toy_world")
    loss = w.add("DisentangleLoadToyClipLoss", (20, 420), clip_name="toy_world_clip.safetensors")
    opt = w.add("DisentangleOptimizeLambda", (380, 40), node_size=(360, 560), model=(toy, 0), vae=(toy, 2), clip=(toy, 1),
                clip_loss_model=(loss, 0), neutral_text=TOY_NEUTRAL, styled_text=TOY_STYLED, negative_text="",
                seed=7, steps=20, cfg=5.0, iterations=10, learning_rate=0.05, beta=0.03, neutral_steps=8,
                styled_weight=1.0, width=128, height=128)
    dec_edit = w.add("VAEDecode", (800, 40), samples=(opt, 1), vae=(toy, 2))
    dec_plain = w.add("VAEDecode", (800, 180), samples=(opt, 2), vae=(toy, 2))
    both = w.add("ImageBatch", (800, 320), image1=(dec_plain, 0), image2=(dec_edit, 0))
    w.add("SaveImage", (1060, 40), node_size=(400, 300), images=(both, 0), filename_prefix="disentangle/toy_lambda_optimized")
    plot = w.add("DisentangleLambdaPlot", (800, 460), schedule=(opt, 0), steps=20, scheduler="ddim_uniform",
                 width=512, height=256, model=(toy, 0))
    w.add("PreviewImage", (1060, 400), node_size=(400, 260), images=(plot, 0))
    w.add("DisentangleLambdaSave", (380, 640), schedule=(opt, 0), filename_prefix="toy_red_to_yellow", format="json")
    w.note("Learns the 20 λ weights that turn the red cube yellow and keep the scene (directional CLIP loss + "
           "β × perceptual term, Adam, Wu et al. 2023), offline on the toy world. Left: neutral prompt; right: "
           "the optimised edit; the learned schedule is plotted and saved for other seeds or images.", (20, 640))
    return w.to_dict("toy_world_lambda_optimize")


def toy_world_real_image_edit(node_classes) -> dict:
    w = Workflow(node_classes)
    toy = w.add("DisentangleLoadToyWorld", (20, 200), checkpoint="toy_world")
    loss = w.add("DisentangleLoadToyClipLoss", (20, 420), clip_name="toy_world_clip.safetensors")
    scene = w.add("DisentangleFactorWorldScene", (20, 560), floor_hue="green", wall_hue="blue",
                  object_hue="red", scale="large", shape="cube", orientation="facing front", size=128)
    pos = w.add("CLIPTextEncode", (380, 40), title="Neutral prompt", clip=(toy, 1), text=TOY_NEUTRAL)
    enc = w.add("VAEEncode", (380, 240), pixels=(scene, 0), vae=(toy, 2))
    inv = w.add("DisentangleDDIMInversion", (380, 360), node_size=(330, 240), model=(toy, 0), positive=(pos, 0),
                latent=(enc, 0), steps=20, cfg=1.0, scheduler="ddim_uniform", refine_iterations=2)
    opt = w.add("DisentangleOptimizeLambda", (760, 40), node_size=(360, 600), model=(toy, 0), vae=(toy, 2), clip=(toy, 1),
                clip_loss_model=(loss, 0), neutral_text=TOY_NEUTRAL, styled_text=TOY_STYLED, negative_text="",
                seed=0, steps=20, cfg=5.0, iterations=10, learning_rate=0.05, beta=0.03, neutral_steps=4,
                styled_weight=1.1, width=128, height=128, trajectory=(inv, 1), rediffusion_steps=8)
    dec = w.add("VAEDecode", (1160, 40), samples=(opt, 1), vae=(toy, 2))
    both = w.add("ImageBatch", (1160, 160), image1=(scene, 0), image2=(dec, 0))
    w.add("SaveImage", (1400, 40), node_size=(400, 300), images=(both, 0), filename_prefix="disentangle/toy_real_image_edit")
    w.note("Real-image edit (Wu et al. Sec. 3.4), offline: the scene is inverted; the λ-mixed sampling is "
           "corrected to pass through the inversion trajectory for the first 12 of 20 steps and re-diffuses "
           "freely for the last 8. Left: the image; right: the edit.", (20, 800))
    return w.to_dict("toy_world_real_image_edit")


def lambda_real_image_edit(node_classes) -> dict:
    w = Workflow(node_classes)
    ckpt = w.add("CheckpointLoaderSimple", (20, 200), ckpt_name="v1-5-pruned-emaonly.safetensors")
    loss = w.add("DisentangleLoadClipLoss", (20, 360), clip_name="open_clip cache (downloads if missing)",
                 model_name="ViT-B-32", pretrained="openai")
    image = w.add("LoadImage", (20, 560), node_size=(320, 320), image="example.png")
    neutral_text, styled_text = "a photo of a person", "a photo of a smiling person"
    pos = w.add("CLIPTextEncode", (380, 40), title="Neutral prompt", clip=(ckpt, 1), text=neutral_text)
    enc = w.add("VAEEncode", (380, 240), pixels=(image, 0), vae=(ckpt, 2))
    inv = w.add("DisentangleDDIMInversion", (380, 360), node_size=(330, 240), model=(ckpt, 0), positive=(pos, 0),
                latent=(enc, 0), steps=50, cfg=1.0, scheduler="ddim_uniform", refine_iterations=2)
    opt = w.add("DisentangleOptimizeLambda", (760, 40), node_size=(360, 600), model=(ckpt, 0), vae=(ckpt, 2),
                clip=(ckpt, 1), clip_loss_model=(loss, 0), neutral_text=neutral_text, styled_text=styled_text,
                negative_text="", seed=0, steps=50, cfg=7.5, iterations=10, learning_rate=0.05, beta=0.05,
                neutral_steps=10, styled_weight=1.1, width=512, height=512, trajectory=(inv, 1), rediffusion_steps=20)
    dec = w.add("VAEDecode", (1160, 40), samples=(opt, 1), vae=(ckpt, 2))
    both = w.add("ImageBatch", (1160, 160), image1=(image, 0), image2=(dec, 0))
    w.add("SaveImage", (1400, 40), node_size=(400, 300), images=(both, 0), filename_prefix="disentangle/real_image_edit")
    w.add("DisentangleLambdaSave", (760, 680), schedule=(opt, 0), filename_prefix="smile", format="json")
    w.note("Real-image edit (Wu et al. Sec. 3.4): Load Image → DDIM Inversion (neutral prompt) → Optimize λ Schedule "
           "with the trajectory: the first 30 of 50 steps pass through the image's trajectory, the last 20 re-diffuse "
           "(t* = 10, styled weight 1.1, as the paper). Use a 512×512 image. The CLIP loss model comes from open_clip's "
           "cache (online) or a file in models/clip_loss; connect Load Perceptual Loss (LPIPS) for the paper's content "
           "term. Left: the image; right: the edit. The learned schedule is saved for other images.", (20, 920))
    return w.to_dict("lambda_real_image_edit")


def avi_attribute_edit(node_classes) -> dict:
    w = Workflow(node_classes)
    toy = w.add("DisentangleLoadToyWorld", (20, 200), checkpoint="toy_world")
    pos = w.add("CLIPTextEncode", (380, 20), title="Original prompt", clip=(toy, 1), text=TOY_NEUTRAL)
    target = w.add("CLIPTextEncode", (380, 220), title="Target prompt", clip=(toy, 1), text=TOY_STYLED)
    neg = w.add("CLIPTextEncode", (380, 420), title="Negative prompt", clip=(toy, 1), text="")
    latent = w.add("EmptyLatentImage", (380, 620), width=128, height=128, batch_size=1)
    sampling = dict(steps=50, cfg=5.0, sampler_name="ddim", scheduler="ddim_uniform")
    # T_x 0.2: the toy model commits the object's colour late (bench/avi_premises.py, README); z is the default
    # "target's x̂0 at x (fast)", at x's own step (Δτ unused)
    cap = w.add("DisentangleAVICapture", (740, 20), node_size=(340, 400), model=(toy, 0), positive=(pos, 0),
                target=(target, 0), negative=(neg, 0), latent_image=(latent, 0), seed=7, t_x=0.2, delta_tau=-0.3,
                z_source="target's x̂0 at x (fast)", **sampling)
    edits = []
    for row, rho in enumerate((0.5, 1.0)):
        y = w.add("DisentangleAVIIntegrate", (1120, 20 + 330 * row), node_size=(340, 260), title=f"AVI Integrate (ρ = {rho})",
                  x=(cap, 0), z=(cap, 1), rho=rho, k=0, singular_values="x's own (no Φ)",
                  integration="x + top-k directions of z − x", gain=3.0)
        res = w.add("KSamplerAdvanced", (1500, 20 + 330 * row), title=f"Resume (ρ = {rho})", node_size=(320, 300),
                    model=(toy, 0), positive=(pos, 0), negative=(neg, 0), latent_image=(y, 0), add_noise="disable",
                    noise_seed=0, start_at_step=(cap, 2), end_at_step=10000, return_with_leftover_noise="disable",
                    **sampling)
        edits.append(w.add("VAEDecode", (1860, 20 + 330 * row), samples=(res, 0), vae=(toy, 2)))
    plain = w.add("KSampler", (1120, 700), title="Original (same seed)", node_size=(320, 270), model=(toy, 0), seed=7,
                  positive=(pos, 0), negative=(neg, 0), latent_image=(latent, 0), denoise=1.0, **sampling)
    dec = w.add("VAEDecode", (1860, 700), samples=(plain, 0), vae=(toy, 2))
    naive = w.add("KSampler", (1120, 1010), title="Target prompt outright (same seed)", node_size=(320, 270),
                  model=(toy, 0), seed=7, positive=(target, 0), negative=(neg, 0), latent_image=(latent, 0), denoise=1.0,
                  **sampling)
    dec_naive = w.add("VAEDecode", (1860, 1010), samples=(naive, 0), vae=(toy, 2))
    both = w.add("ImageBatch", (2100, 20), image1=(dec, 0), image2=(edits[0], 0))
    three = w.add("ImageBatch", (2100, 160), image1=(both, 0), image2=(edits[1], 0))
    four = w.add("ImageBatch", (2100, 300), image1=(three, 0), image2=(dec_naive, 0))
    w.add("SaveImage", (2340, 20), node_size=(560, 300), images=(four, 0), filename_prefix="disentangle/avi_attribute_edit")
    w.note("Attribute Vector Integration, offline on the toy world: AVI Capture takes x (red cube prompt) at T_x = 0.2T "
           "and z, x with the yellow cube prompt's clean-image estimate (one extra UNet step). AVI Integrate adds to x "
           "ρ·γ times the strongest singular direction of z − x per latent channel, and ŷ resumes with the ORIGINAL prompt "
           "in stock KSamplerAdvanced from the resume step. ρ is the strength: 0 gives the original back, 0.5 half the "
           "change, 1 the full edit; γ = 3 amplifies it, because the original prompt pulls the colour back during the "
           "resume. Saved left to right: the original, ρ = 0.5, ρ = 1, and the target prompt outright (same seed). Move "
           "ρ and queue again: only Integrate and the resume re-run. T_x must come after the model has laid out the "
           "scene and before it commits the edited attribute: on the toy world 0.2T for the object's colour, 0.76T with "
           "z from the seed (Δτ = 0) for the floor or wall (README). The paper's Algorithm 1 (with AVI Train Φ) is the "
           "integration option 'Algorithm 1 (paper)'; on the toy world it does not change the image visibly.",
           (20, 760), node_size=(560, 300))
    return w.to_dict("avi_attribute_edit")


DISDIFF_FILE = "toy_world_disdiff.safetensors"


def disdiff_partial_condition(node_classes) -> dict:
    w = Workflow(node_classes)
    toy = w.add("DisentangleLoadToyWorld", (20, 200), checkpoint="toy_world")
    dis = w.add("DisentangleLoadDisDiff", (20, 420), disdiff_name=DISDIFF_FILE)
    scene = w.add("DisentangleFactorWorldScene", (20, 560), title="Target image", floor_hue="green", wall_hue="blue",
                  object_hue="red", scale="large", shape="cube", orientation="facing front", size=128)
    empty = w.add("CLIPTextEncode", (380, 40), title="Empty prompt (the unconditional model)", clip=(toy, 1), text="")
    enc = w.add("VAEEncode", (380, 240), pixels=(scene, 0), vae=(toy, 2))
    codes = w.add("DisentangleDisDiffEncode", (380, 360), disdiff=(dis, 0), latent=(enc, 0))
    patched = w.add("DisentangleDisDiffPartialCondition", (700, 40), node_size=(340, 180), model=(toy, 0),
                    disdiff=(dis, 0), factors=(codes, 0), condition_on="2", strengths="1.0")
    batch = w.add("RepeatLatentBatch", (700, 260), samples=(enc, 0), amount=4)
    cond = w.add("KSampler", (1080, 40), title="Conditioned on the chosen factors", model=(patched, 0), seed=11,
                 steps=50, cfg=1.0, sampler_name="ddim", scheduler="ddim_uniform", positive=(empty, 0),
                 negative=(empty, 0), latent_image=(batch, 0), denoise=1.0)
    free = w.add("KSampler", (1080, 360), title="Unconditioned (same seeds)", model=(toy, 0), seed=11, steps=50,
                 cfg=1.0, sampler_name="ddim", scheduler="ddim_uniform", positive=(empty, 0), negative=(empty, 0),
                 latent_image=(batch, 0), denoise=1.0)
    d_cond = w.add("VAEDecode", (1420, 40), samples=(cond, 0), vae=(toy, 2))
    d_free = w.add("VAEDecode", (1420, 180), samples=(free, 0), vae=(toy, 2))
    both = w.add("ImageBatch", (1420, 320), image1=(d_free, 0), image2=(d_cond, 0))
    w.add("SaveImage", (1660, 40), node_size=(420, 320), images=(both, 0), filename_prefix="disentangle/disdiff_partial")
    w.add("PreviewImage", (380, 560), node_size=(260, 260), images=(scene, 0))
    w.note("DisDiff partial-condition sampling (eq. 6), offline on the toy world: stock KSampler on a MODEL patched "
           "with the gradient field of the chosen learned factors of the target image. First four: the plain model; "
           "last four: the same seeds conditioned on factor 2 only, which keeps that factor of the target and lets "
           "the others vary. The factors are learned without labels: find which index is which with the swap "
           "workflow, and try 'all' (reconstruction) or several ('0,2').", (20, 860), node_size=(560, 180))
    return w.to_dict("disdiff_partial_condition")


def disdiff_swap_factors(node_classes) -> dict:
    w = Workflow(node_classes)
    toy = w.add("DisentangleLoadToyWorld", (20, 200), checkpoint="toy_world")
    dis = w.add("DisentangleLoadDisDiff", (20, 420), disdiff_name=DISDIFF_FILE)
    src = w.add("DisentangleFactorWorldScene", (20, 560), title="Source image", floor_hue="green", wall_hue="blue",
                object_hue="red", scale="large", shape="cube", orientation="facing front", size=128)
    tgt = w.add("DisentangleFactorWorldScene", (20, 860), title="Second image (gives the swapped factors)",
                floor_hue="orange", wall_hue="cyan", object_hue="yellow", scale="small", shape="sphere",
                orientation="turned left", size=128)
    empty = w.add("CLIPTextEncode", (380, 40), title="Empty prompt (the unconditional model)", clip=(toy, 1), text="")
    e_src = w.add("VAEEncode", (380, 240), pixels=(src, 0), vae=(toy, 2))
    e_tgt = w.add("VAEEncode", (380, 360), pixels=(tgt, 0), vae=(toy, 2))
    z_src = w.add("DisentangleDisDiffEncode", (380, 480), disdiff=(dis, 0), latent=(e_src, 0))
    z_tgt = w.add("DisentangleDisDiffEncode", (380, 620), disdiff=(dis, 0), latent=(e_tgt, 0))
    swapped = w.add("DisentangleDisDiffSwapFactors", (700, 480), factors=(z_src, 0), other=(z_tgt, 0), swap="2")
    rec_model = w.add("DisentangleDisDiffPartialCondition", (700, 40), node_size=(340, 180), title="All factors of the source",
                      model=(toy, 0), disdiff=(dis, 0), factors=(z_src, 0), condition_on="all", strengths="1.0")
    swap_model = w.add("DisentangleDisDiffPartialCondition", (700, 260), node_size=(340, 180), title="All factors, one swapped",
                       model=(toy, 0), disdiff=(dis, 0), factors=(swapped, 0), condition_on="all", strengths="1.0")
    rec = w.add("KSampler", (1080, 40), title="Reconstruction", model=(rec_model, 0), seed=5, steps=50, cfg=1.0,
                sampler_name="ddim", scheduler="ddim_uniform", positive=(empty, 0), negative=(empty, 0),
                latent_image=(e_src, 0), denoise=1.0)
    swp = w.add("KSampler", (1080, 360), title="Swapped factor", model=(swap_model, 0), seed=5, steps=50, cfg=1.0,
                sampler_name="ddim", scheduler="ddim_uniform", positive=(empty, 0), negative=(empty, 0),
                latent_image=(e_src, 0), denoise=1.0)
    d_rec = w.add("VAEDecode", (1420, 40), samples=(rec, 0), vae=(toy, 2))
    d_swp = w.add("VAEDecode", (1420, 180), samples=(swp, 0), vae=(toy, 2))
    inputs = w.add("ImageBatch", (1420, 320), image1=(src, 0), image2=(tgt, 0))
    outputs = w.add("ImageBatch", (1420, 460), image1=(d_rec, 0), image2=(d_swp, 0))
    every = w.add("ImageBatch", (1420, 600), image1=(inputs, 0), image2=(outputs, 0))
    w.add("SaveImage", (1660, 40), node_size=(440, 320), images=(every, 0), filename_prefix="disentangle/disdiff_swap")
    w.note("DisDiff factor swap, offline on the toy world: both images are encoded into learned factor codes; "
           "the source's code 2 is replaced by the second image's, and stock KSampler samples with all factors "
           "imposed. Saved: source, second image, reconstruction, swapped. Change 'swap' to see what each learned "
           "factor holds (object colour, floor, wall, size, shape, turn).", (20, 1160), node_size=(560, 160))
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


def render_all(node_classes) -> dict[str, str]:
    return {name: json.dumps(make(node_classes), indent=1, ensure_ascii=False) + "\n" for name, make in WORKFLOWS.items()}


if __name__ == "__main__":
    import sys
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import conftest  # noqa: F401,E402  (registers the comfyui_disentangle package alias)
    from comfyui_disentangle.tests.comfy_host import start_host  # noqa: E402 (needs COMFYUI_PATH)

    start_host()
    import nodes  # noqa: E402
    out_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "workflows")
    for name, text in render_all(nodes.NODE_CLASS_MAPPINGS).items():
        with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
            f.write(text)
        print("wrote", name)

"""Tests of the ComfyUI host harness (harness/host.py) against real, headless ComfyUI on CPU.

They skip loudly unless COMFYUI_PATH names a ComfyUI work tree.
"""
import os

import pytest

from comfyui_disentangle import harness as ch
from comfyui_disentangle.harness import models


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------

def stock_prompt(kind, text="a photo of a red cube", size=32, steps=4, seed=1, prefix="harness"):
    return {
        "1": {"class_type": "TinyCheckpointLoader", "inputs": {"ckpt_name": "tiny", "kind": kind}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": text}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
            "seed": seed, "steps": steps, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": f"{prefix}_{kind}"}},
    }


def check_saved_image(history, node_id, size):
    from PIL import Image
    images = history["outputs"][node_id]["images"]
    assert len(images) == 1
    paths = ch.output_images({"outputs": {node_id: history["outputs"][node_id]}})
    assert os.path.isfile(paths[0]), paths
    with Image.open(paths[0]) as im:
        assert im.size == (size, size)
        assert im.mode == "RGB"


# --------------------------------------------------------------------------------------------
# host start-up and pack loading
# --------------------------------------------------------------------------------------------

def test_require_host_skips_loudly_without_comfyui_path(monkeypatch):
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    assert not ch.host_available()
    with pytest.raises(pytest.skip.Exception, match="ComfyUI integration tests SKIPPED: set COMFYUI_PATH"):
        ch.require_host()
    monkeypatch.setenv("COMFYUI_PATH", "/nonexistent/ComfyUI")
    with pytest.raises(pytest.skip.Exception, match="not a ComfyUI work tree"):
        ch.require_host()


def test_pack_loads_through_load_custom_node(host):
    import sys
    import nodes
    import comfy.cli_args
    import comfy.model_management as mm

    # --cpu unless the suite runs on a GPU machine as users run the pack (DISENTANGLE_HOST_GPU=1)
    on_gpu = os.environ.get("DISENTANGLE_HOST_GPU") == "1"
    assert bool(comfy.cli_args.args.cpu) is not on_gpu
    assert (mm.get_torch_device().type != "cpu") is on_gpu
    assert os.path.realpath(nodes.__file__) == os.path.realpath(os.path.join(ch.comfyui_path(), "nodes.py"))

    # the module ComfyUI registered for the pack folder
    assert host is sys.modules[ch.PACK_ROOT.replace(".", "_x_")]
    assert os.path.realpath(host.__file__) == os.path.realpath(os.path.join(ch.PACK_ROOT, "__init__.py"))
    assert isinstance(host.NODE_CLASS_MAPPINGS, dict)
    assert nodes.LOADED_MODULE_DIRS[nodes.get_module_name(ch.PACK_ROOT)] == os.path.abspath(ch.PACK_ROOT)
    for name, cls in host.NODE_CLASS_MAPPINGS.items():
        assert nodes.NODE_CLASS_MAPPINGS[name] is cls, f"pack node {name} not registered (name clash with a stock node?)"

    # stock comfy_extras nodes and the test nodes are there
    for name in ("SamplerCustom", "FlipSigmas", "KSamplerSelect", "BasicScheduler", "CLIPTextEncodeSDXL",
                 "TinyCheckpointLoader", "TinySDXLConditioning"):
        assert name in nodes.NODE_CLASS_MAPPINGS, name

    # folder_paths points into the harness temp dir
    import folder_paths
    info = ch.host_info()
    assert folder_paths.get_output_directory() == info["dirs"]["output"]
    assert folder_paths.get_input_directory() == info["dirs"]["input"]
    assert ch.start_host() is host  # idempotent
    assert ch.pack_module() is host
    assert ch.pack_module("nodes") is sys.modules[host.__name__ + ".nodes"]


# --------------------------------------------------------------------------------------------
# tiny models through stock nodes
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["sd1", "sd1_v", "sdxl"])
def test_stock_txt2img_prompt_runs(host, kind):
    import torch
    import comfy.model_base
    import comfy.model_sampling

    prompt = stock_prompt(kind)
    history = ch.run_prompt(prompt)
    check_saved_image(history, "7", 32)

    out = ch.last_outputs()
    model, clip, vae = out["1"]
    # the tiny models went through ComfyUI's model management like real ones
    import comfy.model_management as mm
    loaded = mm.loaded_models()
    assert any(m.model is model.model for m in loaded)
    assert any(m.model is clip.patcher.model for m in loaded)
    assert model.model.model_type == (comfy.model_base.ModelType.V_PREDICTION if kind == "sd1_v"
                                      else comfy.model_base.ModelType.EPS)
    if kind == "sd1_v":
        assert isinstance(model.model.model_sampling, comfy.model_sampling.V_PREDICTION)
    if kind == "sdxl":
        assert isinstance(model.model, comfy.model_base.SDXL)

    cond = out["2"][0]
    ctx = models.UNET_SDXL["context_dim"] if kind == "sdxl" else models.UNET_SD1["context_dim"]
    assert cond[0][0].shape == (1, 77, ctx)
    pooled = cond[0][1]["pooled_output"]
    assert pooled.shape == (1, models.CLIP_TINY_XL_G["projection_dim"] if kind == "sdxl" else models.CLIP_TINY_L["hidden_size"])

    latent = out["5"][0]["samples"]
    assert latent.shape == (1, models.LATENT_CHANNELS, 32 // models.VAE_DOWNSCALE, 32 // models.VAE_DOWNSCALE)
    assert torch.isfinite(latent).all()
    image = out["6"][0]
    assert image.shape == (1, 32, 32, 3)
    assert torch.isfinite(image).all()

    # deterministic: the same prompt in a fresh executor gives the same latent
    out2 = ch.run_prompt_outputs(prompt)
    assert torch.equal(out2["5"][0]["samples"], latent)
    # and the seed matters
    out3 = ch.run_prompt_outputs(stock_prompt(kind, seed=2))
    assert not torch.equal(out3["5"][0]["samples"], latent)


def test_sdxl_with_sdxl_text_encode_and_handmade_conditioning(host):
    import torch
    prompt = {
        "1": {"class_type": "TinyCheckpointLoader", "inputs": {"ckpt_name": "tiny", "kind": "sdxl"}},
        "2": {"class_type": "CLIPTextEncodeSDXL", "inputs": {  # a V3 stock node
            "clip": ["1", 1], "width": 256, "height": 256, "crop_w": 0, "crop_h": 0,
            "target_width": 256, "target_height": 256, "text_g": "a cube", "text_l": "a red cube"}},
        "3": {"class_type": "TinySDXLConditioning", "inputs": {"seed": 3, "width": 256, "height": 256}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 32, "height": 32, "batch_size": 2}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
            "seed": 0, "steps": 3, "cfg": 4.0, "sampler_name": "ddim", "scheduler": "ddim_uniform", "denoise": 1.0}},
    }
    out = ch.run_prompt_outputs(prompt, outputs=["5"])  # a non-output node as the target
    pos, neg = out["2"][0][0], out["3"][0][0]
    assert pos[0].shape == neg[0].shape == (1, 77, 96)
    assert pos[1]["pooled_output"].shape == neg[1]["pooled_output"].shape == (1, 64)
    assert pos[1]["width"] == 256
    assert out["5"][0]["samples"].shape == (2, 4, 4, 4)
    assert torch.isfinite(out["5"][0]["samples"]).all()


def test_load_image_vae_round_trip(host):
    import torch
    name = ch.write_test_image("harness_in.png", size=64)
    prompt = {
        "1": {"class_type": "TinyCheckpointLoader", "inputs": {"ckpt_name": "tiny"}},
        "2": {"class_type": "LoadImage", "inputs": {"image": name}},
        "3": {"class_type": "VAEEncode", "inputs": {"pixels": ["2", 0], "vae": ["1", 2]}},
        "4": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["1", 2]}},
        "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "harness_rt"}},
    }
    history = ch.run_prompt(prompt)
    check_saved_image(history, "5", 64)
    out = ch.last_outputs()
    pixels = out["2"][0]
    assert pixels.shape == (1, 64, 64, 3)
    assert abs(float(pixels[0, 0, 0, 0])) < 0.01 and float(pixels[0, 12, 12, 0]) > 0.85  # gradient / red square
    latent = out["3"][0]["samples"]
    assert latent.shape == (1, 4, 8, 8)
    # VAE calibrated like SD: raw latent std ~ 1/scale_factor, so ~1 in model space
    assert 0.5 < float(latent.std()) * 0.18215 < 2.0


# --------------------------------------------------------------------------------------------
# error reporting
# --------------------------------------------------------------------------------------------

def test_validation_error_is_reported(host):
    prompt = stock_prompt("sd1", steps=0)
    with pytest.raises(AssertionError, match=r"(?s)rejected.*KSampler.*steps"):
        ch.run_prompt(prompt)
    bad = stock_prompt("sd1")
    bad["5"]["class_type"] = "NoSuchNode"
    with pytest.raises(AssertionError, match="NoSuchNode does not exist"):
        ch.run_prompt(bad)


def test_execution_error_is_reported(host, monkeypatch):
    import nodes

    class Boom:
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"samples": ("LATENT",)}}
        RETURN_TYPES = ("LATENT",)
        FUNCTION = "go"
        CATEGORY = "testing"

        def go(self, samples):
            raise ValueError("kaboom from the test node")

    monkeypatch.setitem(nodes.NODE_CLASS_MAPPINGS, "HarnessBoom", Boom)
    prompt = {
        "1": {"class_type": "EmptyLatentImage", "inputs": {"width": 32, "height": 32, "batch_size": 1}},
        "2": {"class_type": "HarnessBoom", "inputs": {"samples": ["1", 0]}},
    }
    with pytest.raises(AssertionError) as err:
        ch.run_prompt(prompt, outputs=["2"])
    text = str(err.value)
    assert "node 2 (HarnessBoom)" in text and "ValueError" in text and "kaboom from the test node" in text
    assert "in go" in text  # ComfyUI's traceback


# --------------------------------------------------------------------------------------------
# UI workflow -> API prompt
# --------------------------------------------------------------------------------------------

def _inp(name, typ, link=None, widget=False):
    d = {"name": name, "type": typ, "link": link}
    if widget:
        d["widget"] = {"name": name}
    return d


def ui_workflow():
    """A frontend-style workflow: Reroute, Note, bypassed LoraLoader, muted PreviewImage,
    PrimitiveNode feeding a converted widget, V3 PrimitiveInt feeding the KSampler seed."""
    links = [
        # id, from, slot, to, slot, type
        [1, 1, 0, 18, 0, "MODEL"],
        [2, 1, 1, 18, 1, "CLIP"],
        [3, 18, 1, 10, 0, "CLIP"],       # bypassed lora -> reroute
        [4, 10, 0, 2, 0, "CLIP"],        # reroute -> positive encode
        [5, 18, 1, 3, 0, "CLIP"],        # bypassed lora -> negative encode
        [6, 18, 0, 5, 0, "MODEL"],       # bypassed lora -> KSampler model
        [7, 2, 0, 5, 1, "CONDITIONING"],
        [8, 3, 0, 5, 2, "CONDITIONING"],
        [9, 4, 0, 5, 3, "LATENT"],
        [10, 5, 0, 6, 0, "LATENT"],
        [11, 1, 2, 6, 1, "VAE"],
        [12, 6, 0, 7, 0, "IMAGE"],
        [13, 6, 0, 13, 0, "IMAGE"],      # to the muted preview
        [14, 14, 0, 5, 5, "INT"],        # PrimitiveNode -> KSampler steps (converted widget)
        [15, 15, 0, 5, 4, "INT"],        # PrimitiveInt (real V3 node) -> KSampler seed
        [16, 16, 0, 17, 0, "IMAGE"],
        [17, 1, 2, 17, 1, "VAE"],
    ]
    nodes = [
        {"id": 1, "type": "CheckpointLoaderSimple", "mode": 0, "inputs": [],
         "outputs": [{"name": "MODEL", "type": "MODEL", "links": [1]}, {"name": "CLIP", "type": "CLIP", "links": [2]},
                     {"name": "VAE", "type": "VAE", "links": [11, 17]}],
         "widgets_values": ["sd15.safetensors"]},
        {"id": 18, "type": "LoraLoader", "mode": 4,
         "inputs": [_inp("model", "MODEL", 1), _inp("clip", "CLIP", 2)],
         "outputs": [{"name": "MODEL", "type": "MODEL", "links": [6]}, {"name": "CLIP", "type": "CLIP", "links": [3, 5]}],
         "widgets_values": ["some_lora.safetensors", 1.0, 1.0]},
        {"id": 10, "type": "Reroute", "mode": 0, "inputs": [_inp("", "*", 3)],
         "outputs": [{"name": "", "type": "CLIP", "links": [4]}]},
        {"id": 11, "type": "Note", "mode": 0, "inputs": [], "outputs": [], "widgets_values": ["a note, ignored"]},
        {"id": 2, "type": "CLIPTextEncode", "mode": 0, "inputs": [_inp("clip", "CLIP", 4)],
         "widgets_values": ["a photo of a red cube"]},
        {"id": 3, "type": "CLIPTextEncode", "mode": 0, "inputs": [_inp("clip", "CLIP", 5)], "widgets_values": [""]},
        {"id": 4, "type": "EmptyLatentImage", "mode": 0, "inputs": [], "widgets_values": [32, 32, 1]},
        {"id": 5, "type": "KSampler", "mode": 0,
         "inputs": [_inp("model", "MODEL", 6), _inp("positive", "CONDITIONING", 7), _inp("negative", "CONDITIONING", 8),
                    _inp("latent_image", "LATENT", 9), _inp("seed", "INT", 15, widget=True),
                    _inp("steps", "INT", 14, widget=True), _inp("cfg", "FLOAT", None, widget=True)],
         "widgets_values": [123, "randomize", 3, 6.5, "euler", "normal", 1.0]},
        {"id": 14, "type": "PrimitiveNode", "mode": 0, "inputs": [],
         "outputs": [{"name": "INT", "type": "INT", "links": [14], "widget": {"name": "steps"}}],
         "widgets_values": [3, "fixed"]},
        {"id": 15, "type": "PrimitiveInt", "mode": 0, "inputs": [], "widgets_values": [7, "fixed"]},
        {"id": 6, "type": "VAEDecode", "mode": 0, "inputs": [_inp("samples", "LATENT", 10), _inp("vae", "VAE", 11)],
         "widgets_values": []},
        {"id": 7, "type": "SaveImage", "mode": 0, "inputs": [_inp("images", "IMAGE", 12)], "widgets_values": ["ui_rt"]},
        {"id": 13, "type": "PreviewImage", "mode": 2, "inputs": [_inp("images", "IMAGE", 13)], "widgets_values": []},
        {"id": 16, "type": "LoadImage", "mode": 0, "inputs": [], "widgets_values": ["harness_ui.png", "image"]},
        {"id": 17, "type": "VAEEncode", "mode": 0, "inputs": [_inp("pixels", "IMAGE", 16), _inp("vae", "VAE", 17)],
         "widgets_values": []},
        {"id": 19, "type": "TinySDXLConditioning", "mode": 0, "inputs": [],  # legacy 'seed' INT: control value follows
         "widgets_values": [5, "increment", 512, 768]},
        {"id": 20, "type": "MarkdownNote", "mode": 0, "inputs": [], "widgets_values": ["# doc"]},
    ]
    return {"last_node_id": 20, "last_link_id": 17, "nodes": nodes, "links": links, "groups": [], "version": 0.4}


EXPECTED_API = {
    "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd15.safetensors"}},
    "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of a red cube", "clip": ["1", 1]}},
    "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
    "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 32, "height": 32, "batch_size": 1}},
    "5": {"class_type": "KSampler", "inputs": {
        "model": ["1", 0], "seed": ["15", 0], "steps": 3, "cfg": 6.5, "sampler_name": "euler",
        "scheduler": "normal", "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "denoise": 1.0}},
    "15": {"class_type": "PrimitiveInt", "inputs": {"value": 7}},
    "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
    "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "ui_rt"}},
    "16": {"class_type": "LoadImage", "inputs": {"image": "harness_ui.png"}},
    "17": {"class_type": "VAEEncode", "inputs": {"pixels": ["16", 0], "vae": ["1", 2]}},
    "19": {"class_type": "TinySDXLConditioning", "inputs": {"seed": 5, "width": 512, "height": 768}},
}


def test_ui_to_api_matches_expected(host):
    api = ch.ui_to_api(ui_workflow())
    assert api == EXPECTED_API


def test_ui_to_api_dict_links_and_dict_widgets(host):
    wf = ui_workflow()
    wf["links"] = [{"id": l[0], "origin_id": l[1], "origin_slot": l[2], "target_id": l[3], "target_slot": l[4],
                    "type": l[5]} for l in wf["links"]]
    for n in wf["nodes"]:
        if n["type"] == "EmptyLatentImage":
            n["widgets_values"] = {"width": 32, "height": 32, "batch_size": 1}
    assert ch.ui_to_api(wf) == EXPECTED_API


def test_ui_workflow_executes_after_checkpoint_substitution(host):
    ch.write_test_image("harness_ui.png", size=64)
    api = ch.substitute_checkpoints(ch.ui_to_api(ui_workflow()), kind="sd1")
    assert api["1"] == {"class_type": "TinyCheckpointLoader",
                        "inputs": {"ckpt_name": "sd15.safetensors", "kind": "sd1", "weight_seed": 0}}
    history = ch.run_prompt(api)
    assert set(history["outputs"]) == {"7"}  # the muted preview is gone; 16/17/19 feed no output
    check_saved_image(history, "7", 32)
    out = ch.last_outputs()
    assert out["15"] == (7,)
    assert out["5"][0]["samples"].shape == (1, 4, 4, 4)
    assert "17" not in out and "19" not in out  # not needed by any output, so not executed

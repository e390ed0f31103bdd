"""The headless ComfyUI host the tests, the benches and the scripts share (no ComfyUI import here).

* ``alias``: the one import name of the pack, ``comfyui_disentangle`` (the pack root as a package,
  its ``__init__.py`` not run);
* ``host``: the one bootstrap: ComfyUI from ``COMFYUI_PATH``, headless, with the pack loaded as
  ComfyUI loads a custom node folder (``start_host``; ``start_comfy`` for benches and scripts);
* ``models``: tiny and random models from ComfyUI's own classes, one random-weight initialiser;
* ``ui_format``: the UI-format workflow reader (frontend JSON → API prompt);
* ``runner``: running one node (``call``) or an API prompt (``run_prompt``) in the host;
* ``server``: ComfyUI's own HTTP server in a subprocess, as a user runs it;
* ``reconstruction``: invert → reconstruct through stock nodes, shared by tests and benches.

The names below are the public API of host, models, ui_format and runner in one place:
``from comfyui_disentangle import harness; harness.run_prompt(...)``.
"""
from .alias import PACK_ROOT, PACKAGE_NAME
from .host import (BASE_ARGS, SKIP_REASON, ServerStub, comfyui_path, comfyui_version, device_name, host_available,
                   host_info, host_problem, host_started, pack_module, require_host, server_stub, start_comfy,
                   start_host)
from .models import (KINDS, SD15_UNET, SDXL_UNET, clear_model_cache, compute_dtype, conditioning, fp32_copy,
                     init_random_weights, pattern_image, random_disdiff, random_sd1_clip, random_sd15, random_sd_vae,
                     random_sdxl, random_sdxl_clip, register_test_nodes, sdxl_conditioning, substitute_checkpoints,
                     tiny_models, tiny_sd1, tiny_sdxl)
from .runner import LAST_RUN, call, last_outputs, output_images, run_prompt, run_prompt_outputs, write_test_image
from .ui_format import ui_to_api

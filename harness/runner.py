"""Running nodes and API prompts in the headless host (harness/host.py): :func:`call` one node as
the executor does, :func:`run_prompt` a whole prompt through ComfyUI's PromptExecutor, its outputs
and saved images, and a test image in ComfyUI's input folder."""
from __future__ import annotations

import asyncio
import copy
import os
import uuid

from .host import _STATE, start_host
from .models import pattern_image

LAST_RUN: dict = {}        # executor, prompt, prompt_id, server of the latest run_prompt


def call(name, **inputs):
    """Run a registered node (stock or ours) as the executor does: inside inference mode."""
    import torch
    import nodes
    n = nodes.NODE_CLASS_MAPPINGS[name]()
    with torch.inference_mode():
        out = getattr(n, n.FUNCTION)(**inputs)
    return out["result"] if isinstance(out, dict) else out


# --------------------------------------------------------------------------------------------
# Running prompts
# --------------------------------------------------------------------------------------------

def _format_validation(error, node_errors) -> str:
    lines = []
    if error:
        lines.append(f"{error.get('type')}: {error.get('message')}: {error.get('details')}")
    for nid, ne in (node_errors or {}).items():
        for r in ne.get("errors", []):
            extra = dict(r.get("extra_info") or {})
            tb = extra.pop("traceback", None)
            lines.append(f"  node {nid} ({ne.get('class_type')}): {r.get('message')}: {r.get('details')} {extra}")
            if tb:
                lines.append("".join(tb))
    return "\n".join(lines)


def run_prompt(prompt: dict, outputs: list | None = None, extra_data: dict | None = None) -> dict:
    """Validate and execute an API prompt in the headless host; return executor.history_result.

    ``outputs``: node ids to execute (default: every output node, as ComfyUI's queue does). Listing
    non-output nodes is allowed (each is validated with execution.validate_inputs). A fresh
    PromptExecutor (classic cache) runs each call. Raises AssertionError with ComfyUI's validation
    text, or with the failing node id/type, exception and traceback. Must not be called from a
    running asyncio loop (PromptExecutor.execute uses asyncio.run).
    """
    start_host()
    import execution
    import hook_breaker_ac10a0

    prompt = copy.deepcopy(prompt)
    prompt_id = str(uuid.uuid4())
    if outputs is None:
        valid, error, good, node_errors = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
        if not valid or node_errors:
            raise AssertionError("ComfyUI rejected the prompt:\n" + _format_validation(error, node_errors))
        execute_outputs = list(good)
    else:
        execute_outputs = [str(o) for o in outputs]
        missing = [o for o in execute_outputs if o not in prompt]
        if missing:
            raise AssertionError(f"outputs {missing} are not nodes of the prompt")

        async def _validate():
            validated, errs = {}, {}
            for o in execute_outputs:
                await execution.validate_inputs(prompt_id, prompt, o, validated)
            for nid, res in validated.items():
                if res[0] is not True and len(res[1]) > 0:
                    errs[nid] = {"errors": res[1], "class_type": prompt[nid]["class_type"]}
            return errs
        node_errors = asyncio.run(_validate())
        if node_errors:
            raise AssertionError("ComfyUI rejected the prompt:\n" + _format_validation(None, node_errors))

    server = _STATE["server"]
    server.messages = []
    server.last_prompt_id = prompt_id
    executor = execution.PromptExecutor(server)
    LAST_RUN.clear()
    LAST_RUN.update(executor=executor, prompt=prompt, prompt_id=prompt_id, server=server,
                    outputs=execute_outputs)
    try:
        executor.execute(prompt, prompt_id, extra_data=dict(extra_data or {}), execute_outputs=execute_outputs)
    finally:
        hook_breaker_ac10a0.restore_functions()  # the prompt worker does this after each prompt

    events = {e for e, _ in executor.status_messages}
    for event, data in executor.status_messages:
        if event == "execution_error":
            tb = "".join(data.get("traceback") or [])
            raise AssertionError(
                f"node {data.get('node_id')} ({data.get('node_type')}) failed: "
                f"{data.get('exception_type')}: {str(data.get('exception_message', '')).strip()}\n"
                f"Traceback (ComfyUI):\n{tb}")
        if event == "execution_interrupted":
            raise AssertionError(f"execution interrupted at node {data.get('node_id')} ({data.get('node_type')})")
    if not executor.success or "execution_success" not in events:
        raise AssertionError(f"execution did not succeed; status messages: {executor.status_messages}")
    return executor.history_result


def last_outputs() -> dict:
    """node id -> tuple of output values of the latest run_prompt (nodes that ran or were cached).

    ComfyUI stores each output as a list over the node's internal list-mapping; singletons are
    unwrapped, outputs flagged in OUTPUT_IS_LIST (or mapped over several items) stay lists."""
    if not LAST_RUN:
        raise RuntimeError("no prompt has been run")
    import nodes
    ex, prompt = LAST_RUN["executor"], LAST_RUN["prompt"]
    result = {}
    for nid, node in prompt.items():
        data = ex.caches.outputs.get(nid)
        if data is None:
            continue
        cls = nodes.NODE_CLASS_MAPPINGS.get(node["class_type"])
        is_list = getattr(cls, "OUTPUT_IS_LIST", None) or ()
        vals = []
        for i, v in enumerate(data):
            flagged = i < len(is_list) and bool(is_list[i])
            vals.append(v[0] if (not flagged and isinstance(v, list) and len(v) == 1) else v)
        result[nid] = tuple(vals)
    return result


def run_prompt_outputs(prompt: dict, outputs: list | None = None, extra_data: dict | None = None) -> dict:
    """run_prompt, then return every node's output values: {node id: tuple of outputs}."""
    run_prompt(prompt, outputs=outputs, extra_data=extra_data)
    return last_outputs()


def output_images(history: dict) -> list:
    """Absolute paths of the images listed in a history_result (SaveImage/PreviewImage 'images')."""
    import folder_paths
    paths = []
    for out in history.get("outputs", {}).values():
        for img in out.get("images", []) or []:
            base = folder_paths.get_directory_by_type(img.get("type", "output")) or folder_paths.get_output_directory()
            paths.append(os.path.join(base, img.get("subfolder", ""), img["filename"]))
    return paths


def write_test_image(name: str = "disentangle_test.png", size: int = 64) -> str:
    """Write a deterministic RGB PNG (the pattern_image) into ComfyUI's input directory so stock
    LoadImage finds it; return ``name`` (the LoadImage ``image`` value)."""
    start_host()
    import numpy as np
    from PIL import Image
    import folder_paths
    path = os.path.join(folder_paths.get_input_directory(), name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray((pattern_image(size) * 255).round().astype(np.uint8), "RGB").save(path)
    return name

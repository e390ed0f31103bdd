"""The UI-format (frontend-saved) workflow reader: :func:`ui_to_api` turns a workflow into the
API prompt ComfyUI's executor runs. The writer of the shipped workflows, the same format the other
way, is scripts/build_workflows.py."""
from __future__ import annotations

from .host import start_host


# --------------------------------------------------------------------------------------------
# UI workflow -> API prompt
# --------------------------------------------------------------------------------------------

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
UI_ONLY_TYPES = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
UPLOAD_FLAGS = ("image_upload", "video_upload", "animated_image_upload", "audio_upload")
MODE_MUTED, MODE_BYPASS = 2, 4
_PRIMITIVE = object()


def _is_widget(typ, opts) -> bool:
    if opts.get("forceInput") or opts.get("rawLink"):
        return False
    return isinstance(typ, (list, tuple)) or typ in WIDGET_TYPES


def _has_control(name, typ, opts) -> bool:
    cag = opts.get("control_after_generate")
    if cag is None:  # frontend: `spec.control_after_generate ?? ['seed','noise_seed'].includes(name)` for INT
        return typ == "INT" and name in ("seed", "noise_seed")
    return bool(cag)


def _norm_links(workflow) -> dict:
    links = {}
    for link in workflow.get("links", []) or []:
        if isinstance(link, dict):
            lid, o, os_, t, ts, typ = (link["id"], link["origin_id"], link["origin_slot"], link["target_id"],
                                       link["target_slot"], link.get("type"))
        else:
            lid, o, os_, t, ts, typ = link[:6]
        links[lid] = (o, os_, t, ts, typ)
    return links


def ui_to_api(workflow: dict, input_types: dict | None = None) -> dict:
    """Convert a frontend-saved (UI format) workflow to an API prompt {id: {class_type, inputs}}.

    ``input_types``: class_type → its INPUT_TYPES dict (e.g. each node's "input" of a server's
    /object_info), to convert without starting the host; default: the host's node classes.

    Widget values are matched to INPUT_TYPES order (required then optional, link-only types
    skipped), skipping the control_after_generate value stored after seed-like widgets and the
    value of the synthetic image-upload widget (end of the required widgets). Links override
    widget values. Muted (mode 2) nodes are dropped, bypassed (mode 4) nodes pass a same-type
    input through (same slot first, then the first input of that type), Reroutes resolve to their
    source, PrimitiveNode links keep the target's widget value, Note/MarkdownNote are ignored.
    Subgraphs and group nodes are not supported.
    """
    if input_types is None:
        start_host()
        import nodes as comfy_nodes
        classes = comfy_nodes.NODE_CLASS_MAPPINGS
        input_types = {name: cls.INPUT_TYPES() for name, cls in classes.items()
                       if name in {n.get("type") for n in workflow.get("nodes", [])}}

    by_id = {n["id"]: n for n in workflow.get("nodes", [])}
    links = _norm_links(workflow)
    subgraph_ids = {sg.get("id") for sg in (workflow.get("definitions", {}) or {}).get("subgraphs", []) or []}

    def resolve(link_id, want_type, depth=0):
        if depth > 1000:
            raise ValueError("link cycle in workflow")
        if link_id is None or link_id not in links:
            return None
        o, os_, _, _, _ = links[link_id]
        src = by_id.get(o)
        if src is None:
            return None
        stype, mode = src.get("type"), src.get("mode", 0)
        if stype == "Reroute":
            ins = src.get("inputs") or []
            return resolve(ins[0].get("link") if ins else None, want_type, depth + 1)
        if stype == "PrimitiveNode":
            return _PRIMITIVE
        if stype in UI_ONLY_TYPES or mode == MODE_MUTED:
            return None
        if mode == MODE_BYPASS:
            ins = src.get("inputs") or []
            for i in [os_] + list(range(len(ins))):
                if 0 <= i < len(ins) and ins[i].get("type") == want_type:
                    return resolve(ins[i].get("link"), want_type, depth + 1)
            return None
        return [str(o), os_]

    prompt = {}
    for node in workflow.get("nodes", []):
        ntype, mode = node.get("type"), node.get("mode", 0)
        if ntype in UI_ONLY_TYPES or mode in (MODE_MUTED, MODE_BYPASS):
            continue
        if ntype in subgraph_ids:
            raise NotImplementedError(f"node {node['id']}: subgraph nodes are not supported by ui_to_api")
        spec = input_types.get(ntype)
        if spec is None:
            raise KeyError(f"node {node['id']}: unknown node type {ntype!r} (not in nodes.NODE_CLASS_MAPPINGS)")
        values = node.get("widgets_values", [])
        if values is None:
            values = []
        ui_inputs = {i["name"]: i for i in node.get("inputs", []) or []}
        inputs, idx, done = {}, 0, set()
        for section in ("required", "optional"):
            sec = spec.get(section, {}) or {}
            for name, s in sec.items():
                typ = s[0]
                opts = s[1] if len(s) > 1 and isinstance(s[1], dict) else {}
                if _is_widget(typ, opts):
                    if isinstance(values, dict):
                        if name in values:
                            inputs[name] = values[name]
                    else:
                        if idx < len(values):
                            inputs[name] = values[idx]
                        idx += 1 + (1 if _has_control(name, typ, opts) else 0)
                ui_in = ui_inputs.get(name)
                if ui_in is not None and ui_in.get("link") is not None:
                    src = resolve(ui_in["link"], ui_in.get("type"))
                    if src is _PRIMITIVE or src is None:
                        pass  # keep the widget value (if any)
                    else:
                        inputs[name] = src
                done.add(name)
            if section == "required" and not isinstance(values, dict) and \
                    any(len(s) > 1 and isinstance(s[1], dict) and any(s[1].get(f) for f in UPLOAD_FLAGS) for s in sec.values()):
                idx += 1
        for name, ui_in in ui_inputs.items():  # dynamic inputs not declared in INPUT_TYPES
            if name not in done and ui_in.get("link") is not None:
                src = resolve(ui_in["link"], ui_in.get("type"))
                if src is not None and src is not _PRIMITIVE:
                    inputs[name] = src
        prompt[str(node["id"])] = {"class_type": ntype, "inputs": inputs}
    return prompt

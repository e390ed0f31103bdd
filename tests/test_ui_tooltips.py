"""Every input and output of every node of the pack has a tooltip, as ComfyUI's own server reports
them in /object_info (what the frontend shows on hover), and the parameters named in the papers
carry the paper's name. Runs against ComfyUI's real HTTP server (harness/server.py)."""
from __future__ import annotations

import pytest

# (node, input) → the paper's name for it, which its tooltip must contain.
PAPER_NAMES = {
    ("DisentangleMixConditioning", "neutral"): "c0",
    ("DisentangleMixConditioning", "styled"): "c1",
    ("DisentangleMixConditioning", "schedule"): "λ",
    ("DisentangleOptimizeLambda", "beta"): "β",
    ("DisentangleOptimizeLambda", "neutral_steps"): "t*",
    ("DisentangleOptimizeLambda", "styled_weight"): "λ",
    ("DisentangleOptimizeLambda", "rediffusion_steps"): "re-diffusion",
    ("DisentangleOptimizeLambda", "clip_loss_model"): "directional CLIP loss",
    ("DisentangleLambdaSwitch", "value_before"): "λ",
    ("DisentangleLambdaSwitch", "value_after"): "λ",
    ("DisentangleLambdaConstant", "value"): "λ",
    ("DisentangleAVICapture", "t_x"): "T_x",
    ("DisentangleAVICapture", "delta_tau"): "Δτ",
    ("DisentangleAVITrain", "lambda_1"): "λ1",
    ("DisentangleAVITrain", "lambda_2"): "λ2",
    ("DisentangleAVITrain", "lambda_3"): "λ3",
    ("DisentangleAVITrain", "lambda_4"): "λ4",
    ("DisentangleAVITrain", "samples_per_pair"): "N",
    ("DisentangleAVITrain", "k"): "k",
    ("DisentangleAVIIntegrate", "rho"): "ρ",
    ("DisentangleAVIIntegrate", "k"): "k",
    ("DisentangleTrainDisDiff", "num_factors"): "N",
    ("DisentangleDisDiffPartialCondition", "condition_on"): "S",
    ("DisentangleDisDiffPartialCondition", "strengths"): "w_c",
}


@pytest.fixture(scope="module")
def pack_nodes(comfy_server):
    info = comfy_server.get_json("/object_info")
    nodes = {name: d for name, d in info.items() if "ComfyUI-Disentangle" in d.get("python_module", "")}
    assert len(nodes) >= 28, f"only {len(nodes)} of the pack's nodes in /object_info"
    return nodes


def _inputs(node: dict):
    for section in ("required", "optional"):
        for name, spec in (node["input"].get(section) or {}).items():
            options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            yield name, options


def test_every_input_has_a_tooltip(pack_nodes):
    missing = [f"{node}.{name}" for node, d in sorted(pack_nodes.items()) for name, options in _inputs(d)
               if not str(options.get("tooltip", "")).strip()]
    total = sum(1 for d in pack_nodes.values() for _ in _inputs(d))
    assert not missing, f"{len(missing)} of {total} inputs have no tooltip: {missing}"


def test_every_output_has_a_tooltip(pack_nodes):
    missing = []
    for node, d in sorted(pack_nodes.items()):
        tips = d.get("output_tooltips") or []
        for k, name in enumerate(d["output_name"]):
            if k >= len(tips) or not str(tips[k] or "").strip():
                missing.append(f"{node}.{name}")
    assert not missing, f"outputs without a tooltip: {missing}"


def test_paper_parameters_carry_the_papers_names(pack_nodes):
    wrong = []
    for (node, name), symbol in PAPER_NAMES.items():
        options = dict(_inputs(pack_nodes[node])).get(name)
        assert options is not None, f"{node} has no input {name}"
        if symbol not in options.get("tooltip", ""):
            wrong.append(f"{node}.{name} should name {symbol!r}: {options.get('tooltip')!r}")
    assert not wrong, "\n".join(wrong)

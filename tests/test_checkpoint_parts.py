"""scripts/checkpoint_parts.py: a resumable DisDiff checkpoint split into files that fit the device's
$OUT limit and joined back is the same checkpoint (tensors bit for bit, metadata exactly), and
training resumes from the joined file as from the original."""
import importlib.util
import os

import pytest
import torch

from comfyui_disentangle.core import disdiff as dd
from comfyui_disentangle.core import disdiff_train as dtrain
from comfyui_disentangle.tests.core_helpers import C, H, TinyFrozen, disdiff_schedule

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("checkpoint_parts", os.path.join(ROOT, "scripts", "checkpoint_parts.py"))
parts_tool = importlib.util.module_from_spec(spec)
spec.loader.exec_module(parts_tool)


def test_plan_keeps_whole_tensors_within_the_limit():
    sizes = {"a": 4, "b": 4, "c": 9, "d": 1, "e": 2}
    plan = parts_tool.plan_parts(sizes, 8)
    assert plan == [["a", "b"], ["c"], ["d", "e"]]
    assert [n for group in plan for n in group] == list(sizes)


def _trained_checkpoint(tmp_path, steps):
    frozen = TinyFrozen()
    latents = torch.randn(16, C, H, H, generator=torch.Generator().manual_seed(0))
    ab, _ = disdiff_schedule()
    config = dd.make_config(latents, frozen, num_factors=3, code_dim=8, encoder_width=64)
    path = str(tmp_path / "run.safetensors")
    torch.manual_seed(0)
    dtrain.train_disdiff(latents, frozen, ab, config=config, steps=steps, batch_size=4, log_every=2, seed=3,
                         checkpoint_path=path, checkpoint_every=steps)
    return path, (latents, frozen, ab, config)


def test_split_join_restores_the_checkpoint_and_training_resumes_from_it(tmp_path):
    from safetensors import safe_open
    path, (latents, frozen, ab, config) = _trained_checkpoint(tmp_path, steps=2)
    size = os.path.getsize(path)
    max_mib = 1.0 + size / 3 / (1 << 20)          # headroom 1 MiB + a third of the data: several parts
    files = parts_tool.split(path, str(tmp_path / "out"), max_mib=max_mib)
    assert len(files) >= 3 and all(os.path.getsize(f) <= max_mib * (1 << 20) for f in files)
    joined = parts_tool.join(list(reversed(files)), str(tmp_path / "joined.safetensors"))
    with safe_open(path, framework="pt") as a, safe_open(joined, framework="pt") as b:
        assert a.metadata() == b.metadata() and sorted(a.keys()) == sorted(b.keys())
        for k in a.keys():
            assert torch.equal(a.get_tensor(k), b.get_tensor(k)), k
    # training resumed from the joined parts = training resumed from the original
    results = []
    for start in (path, joined):
        torch.manual_seed(0)
        model, _ = dtrain.train_disdiff(latents, frozen, ab, config=config, steps=4, batch_size=4, log_every=2,
                                        seed=3, checkpoint_path=start, checkpoint_every=100, resume=True)
        results.append(model.state_dict())
    for k in results[0]:
        assert torch.equal(results[0][k], results[1][k]), k


def test_join_refuses_missing_foreign_and_mixed_parts(tmp_path):
    from safetensors.torch import save_file
    path, _ = _trained_checkpoint(tmp_path, steps=1)
    size = os.path.getsize(path)
    files = parts_tool.split(path, str(tmp_path / "a"), max_mib=1.0 + size / 3 / (1 << 20))
    with pytest.raises(ValueError, match="missing"):
        parts_tool.join(files[1:], str(tmp_path / "x.safetensors"))
    other = parts_tool.split(path, str(tmp_path / "b"), max_mib=1.0 + size / 3 / (1 << 20))
    with pytest.raises(ValueError, match="different checkpoints"):
        parts_tool.join([files[0]] + other[1:], str(tmp_path / "x.safetensors"))
    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not a checkpoint part"):
        parts_tool.join([str(tmp_path / "plain.safetensors")], str(tmp_path / "x.safetensors"))
    assert not os.path.exists(tmp_path / "x.safetensors")

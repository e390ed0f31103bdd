"""Worker of tests/test_core_disdiff.py's data-parallel test (not a test itself).

    python tests/disdiff_ddp_worker.py CHECKPOINT STEPS [--resume]                        # one process
    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/disdiff_ddp_worker.py CHECKPOINT STEPS

Trains the tiny DisDiff of the core tests with core's ``train_disdiff`` (global batch 4) and writes
CHECKPOINT; under torchrun each process joins a gloo group first and trains on its half of the batch.
"""
import os
import runpy
import sys

PACK_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    path, steps, resume = sys.argv[1], int(sys.argv[2]), "--resume" in sys.argv
    runpy.run_path(os.path.join(PACK_ROOT, "harness", "alias.py"))  # registers comfyui_disentangle
    import torch
    import torch.distributed as dist
    from comfyui_disentangle.core import disdiff as dd
    from comfyui_disentangle.core import disdiff_train as dtrain
    from comfyui_disentangle.tests.core_helpers import C, H, TinyFrozen, disdiff_schedule

    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)   # so that Adam's g/√v on near-zero gradients does not amplify rounding
    if "RANK" in os.environ:
        dist.init_process_group("gloo")
    torch.manual_seed(0)
    frozen = TinyFrozen()
    ab, _ = disdiff_schedule()
    latents = torch.randn(16, C, H, H, generator=torch.Generator().manual_seed(1))
    config = dd.make_config(latents, frozen, num_factors=3, code_dim=4, encoder_width=16)
    _, history = dtrain.train_disdiff(latents, frozen, ab, config=config, steps=steps, batch_size=4, lr=1e-3,
                                      warmup=2, seed=3, log_every=1, checkpoint_path=path, resume=resume)
    if not dist.is_initialized() or dist.get_rank() == 0:
        with open(path + ".losses", "w") as f:
            f.write(" ".join(f"{h['loss']:.9g}" for h in history))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

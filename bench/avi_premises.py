"""The three premises of AVI (Wang et al. 2024, Sec. 3.2.1 and 4), measured on the toy world.

    COMFYUI_PATH=/path/to/ComfyUI python bench/avi_premises.py [--edits 64] [--out out/avi_premises]

For every text-controlled factor, ``--edits`` scenes (seeded as bench/avi_diagnose.py) are sampled twice
from the same noise: with the original caption and with the caption naming a new value of that factor
(50 steps ddim / ddim_uniform, cfg 5). Every latent along both trajectories is kept in the paper's space
(the model input x_t, per channel a 16×16 matrix, r = 16). Then:

1. *Small neighbourhood* (Sec. 4.3): the geodesic (Grassmann) distance d = sqrt(Σθ²) between the spans
   of the top p = 4 left singular vectors (the paper's p) of x_t and x_{t+1}, of x_t and the final
   latent, and of the original and target latents at the same step, next to two random 4-dimensional
   subspaces of R^16. The paper reports ≈ 4.3e-4 for SD 2.1.
2. *Attributes in singular vectors and values* (Sec. 4.1–4.2): at a step s, the original latent's
   singular values are scaled (component i by 0 or 2), or the latent is rebuilt from the original's
   vectors with the target's values (and the reverse), and sampling resumes from s with the ORIGINAL
   prompt, as AVI does. The factor classifiers say which factors moved, and whether the target value
   appeared.
3. *Mobility in order* (Sec. 4.2): |⟨u_i v_iᵀ, u'_j v'_jᵀ⟩| between the components of AVI's x (original,
   T_x = 0.8T) and z (target, T_x + Δτ = 0.5T), and between the original at T_x and at 0.5T: does
   component i of x reappear at place j of z (the paper: the top places descend and the tail ascends,
   which Algorithm 1's reversal relies on)? And per factor: where in z's spectrum the difference between
   the target and the original latents lives (energy of target − original on the target's components,
   same step), and where in the spectrum of the difference itself.
4. *When the factor is committed*: the target prompt's trajectory up to step s, then the original
   prompt: how often the target value survives (the ceiling for any latent handed over at step s).

PNG plots go to ``--out``; the script prints one table per premise. CPU: about 15 minutes for 64 seeds
of five factors on 2 cores (trajectories are cached in ``--out``).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import _pack_alias  # noqa: E402,F401  (registers comfyui_disentangle: harness/alias.py)
from plots import heatmaps, line_plot  # noqa: E402
from comfyui_disentangle import harness as comfy_host  # noqa: E402
from comfyui_disentangle.harness import call  # noqa: E402
from quality import encode_batch, load_yardstick, print_table  # noqa: E402

TEXT_FACTORS = ("floor_hue", "wall_hue", "object_hue", "scale", "shape")
P = 4  # the paper's subspace dimension


# --------------------------------------------------------------------------------------------
# Trajectories in paper space
# --------------------------------------------------------------------------------------------

class World:
    """The toy world's model and judge, the sampling settings, and paper-space maps per step."""

    def __init__(self, steps: int, cfg: float):
        self.judge, self.model, self.clip, self.vae = load_yardstick()
        self.avi = comfy_host.pack_module("nodes.avi")
        self.steps, self.cfg = steps, cfg
        import comfy.utils
        comfy.utils.PROGRESS_BAR_ENABLED = False
        self.sigmas = self.avi.sampling_sigmas(self.model, steps, "ddim", "ddim_uniform")
        self.maps = [self.avi.paper_space_map(self.model, float(s), 4) for s in self.sigmas]

    def step_at(self, t_fraction: float) -> int:
        return self.avi.step_at_time(self.model, self.sigmas, t_fraction, 0, self.steps)

    def to_paper(self, latent, step):
        a, b = self.maps[step]
        return latent * a + b

    def from_paper(self, paper, step):
        a, b = self.maps[step]
        return (paper - b) / a

    def trajectory(self, positive, negative, n: int, seed: int):
        """Paper-space latents at every step 0..steps of one ddim sampling [steps + 1, n, 4, 16, 16]."""
        import comfy.sample
        import torch
        empty = torch.zeros(n, 4, 16, 16)
        noise = comfy.sample.prepare_noise(empty, seed)
        sampling = self.model.get_model_object("model_sampling")
        states = []

        def callback(i, x0, x, total):
            states.append(sampling.calculate_input(self.sigmas[i], x.float().cpu()))

        out = comfy.sample.sample(self.model, noise, self.steps, self.cfg, "ddim", "ddim_uniform", positive, negative,
                                  empty, callback=callback, disable_pbar=True, seed=seed)
        states.append(self.to_paper(out.float(), self.steps))
        return torch.stack(states)

    def finish(self, paper, step, positive, negative):
        """Resume a paper-space latent from ``step`` with stock KSamplerAdvanced; the decoded images."""
        if step >= self.steps:
            latent = {"samples": self.from_paper(paper, self.steps)}
        else:
            latent = call("KSamplerAdvanced", model=self.model, add_noise="disable", noise_seed=0, steps=self.steps,
                          cfg=self.cfg, sampler_name="ddim", scheduler="ddim_uniform", positive=positive,
                          negative=negative, latent_image={"samples": self.from_paper(paper, step)},
                          start_at_step=step, end_at_step=10000, return_with_leftover_noise="disable")[0]
        return call("VAEDecode", samples=latent, vae=self.vae)[0].movedim(-1, 1).clamp(0, 1)


def cached(path: str, make):
    """A tensor from a safetensors file, or made and saved there."""
    import safetensors.torch
    if os.path.isfile(path):
        return safetensors.torch.load_file(path)["t"]
    t = make()
    safetensors.torch.save_file({"t": t.contiguous()}, path)
    return t


class Edits:
    """One factor's edit set: scenes, target values, prompts and both trajectories (cached on disk)."""

    def __init__(self, world: World, factor: str, n: int, seed: int, cache: str):
        import torch
        from comfyui_disentangle.toy_world import factor_world as fw
        self.world, self.factor, self.col = world, factor, fw.FACTOR_NAMES.index(factor)
        g = torch.Generator().manual_seed(seed)
        self.factors = fw.sample_factors(n, generator=g)
        size = fw.FACTOR_SIZES[self.col]
        self.target = (self.factors[:, self.col] + torch.randint(1, size, (n,), generator=g)) % size
        edited = self.factors.clone()
        edited[:, self.col] = self.target
        clip = world.clip
        self.positive = encode_batch(clip, fw.full_caption(self.factors))
        self.styled = encode_batch(clip, fw.full_caption(edited))
        self.negative = encode_batch(clip, [""] * n)
        self.seed = seed
        # the scenes (hence the original trajectory) are the same for every factor: one file for it
        tag = f"{n}_seed{seed}_{world.steps}steps_cfg{world.cfg}"
        self.orig = cached(os.path.join(cache, f"trajectory_original_{tag}.safetensors"),
                           lambda: world.trajectory(self.positive, self.negative, n, seed))
        self.tgt = cached(os.path.join(cache, f"trajectory_target_{factor}_{tag}.safetensors"),
                          lambda: world.trajectory(self.styled, self.negative, n, seed))
        self._original_pred = None

    def original_prediction(self):
        if self._original_pred is None:
            self._original_pred = self.world.judge.predict(self.world.finish(self.orig[-1], self.world.steps,
                                                                             self.positive, self.negative))
        return self._original_pred

    def judge(self, images):
        """(target reached, each factor changed [6], all others kept) against the original generation."""
        p0, p1 = self.original_prediction(), self.world.judge.predict(images)
        changed = (p1 != p0).float().mean(0)
        others = [k for k in range(p0.shape[1]) if k != self.col]
        return (float((p1[:, self.col] == self.target).float().mean()), changed.tolist(),
                float((p1[:, others] == p0[:, others]).all(1).float().mean()))


# --------------------------------------------------------------------------------------------
# Premise 1: small neighbourhood
# --------------------------------------------------------------------------------------------

def random_subspace_distance(n: int, p: int, samples: int = 4096, seed: int = 0) -> float:
    import torch
    core = comfy_host.pack_module("core.avi")
    g = torch.Generator().manual_seed(seed)
    a = torch.linalg.qr(torch.randn(samples, n, p, generator=g, dtype=torch.float64))[0]
    b = torch.linalg.qr(torch.randn(samples, n, p, generator=g, dtype=torch.float64))[0]
    return float(core.grassmann_distance(a, b).mean())


def neighbourhood(edits: list[Edits], out: str, s_x: int, s_z: int):
    core = comfy_host.pack_module("core.avi")
    steps = edits[0].world.steps
    series_next, series_final, series_pair = {}, {}, {}
    rows = []
    for e in edits:
        u_o = core.channel_svd(e.orig)[0][..., :P]
        u_t = core.channel_svd(e.tgt)[0][..., :P]
        d_next = core.grassmann_distance(u_o[:-1], u_o[1:]).mean((1, 2))          # [steps]
        d_final = core.grassmann_distance(u_o, u_o[-1:].expand_as(u_o)).mean((1, 2))
        d_pair = core.grassmann_distance(u_o, u_t).mean((1, 2))
        series_next[e.factor] = (list(range(steps)), d_next.tolist())
        series_final[e.factor] = (list(range(steps + 1)), d_final.tolist())
        series_pair[e.factor] = (list(range(steps + 1)), d_pair.tolist())
        d_avi = float(core.grassmann_distance(u_o[s_x], u_t[s_z]).mean())
        rows.append([e.factor, float(d_next.mean()), float(d_next.min()), float(d_next.max()), float(d_final[s_x]),
                     float(d_pair[s_x]), float(d_pair[-1]), d_avi])
    rand = random_subspace_distance(16, P)
    hl = {"two random 4-dim subspaces": rand, "paper, SD 2.1: 4.3e-4": 4.3e-4}
    line_plot(os.path.join(out, "p1_grassmann_consecutive_steps.png"),
              "Premise 1: geodesic distance, top-4 left singular subspaces of x_t and x_t+1 (original prompt)",
              "step t (0 = noise, 50 = clean)", "d", series_next, hl, ylim=(0, rand * 1.1))
    line_plot(os.path.join(out, "p1_grassmann_to_final.png"),
              "Premise 1: geodesic distance of x_t's top-4 subspace to the final latent's", "step t", "d", series_final, hl,
              ylim=(0, rand * 1.1))
    line_plot(os.path.join(out, "p1_grassmann_original_vs_target.png"),
              "Premise 1: original vs target prompt (same seed, same step), top-4 subspaces", "step t", "d", series_pair,
              hl, ylim=(0, rand * 1.1))
    print_table(f"Premise 1, small neighbourhood: geodesic distance sqrt(Σθ²) between top-{P} left singular subspaces "
                f"(16×16 channels; mean over seeds and channels). Two random {P}-dim subspaces of R^16: {rand:.3f}; "
                f"the paper (SD 2.1): 4.3e-4",
                ["factor", "x_t vs x_t+1, mean", "min", "max", f"x at T_x (step {s_x}) vs final",
                 f"original vs target at step {s_x}", "original vs target, final", f"AVI pair: x (step {s_x}) vs z (step {s_z})"],
                rows)
    return rand


# --------------------------------------------------------------------------------------------
# Premise 3: mobility in order, and where the attribute lives in the spectrum
# --------------------------------------------------------------------------------------------

def mobility(edits: list[Edits], out: str, s_x: int, s_z: int):
    import torch
    core = comfy_host.pack_module("core.avi")
    r = 16
    panels, rows = {}, []
    e0 = edits[0]
    svd = {}

    def svd_of(e, which, step):
        key = (e.factor, which, step)
        if key not in svd:
            svd[key] = core.channel_svd((e.orig if which == "orig" else e.tgt)[step])
        return svd[key]

    def alignment(e, a, b):
        ua, _, va = svd_of(e, *a)
        ub, _, vb = svd_of(e, *b)
        return core.component_alignment(ua, va, ub, vb).abs()            # [n, C, r, r]

    pairs = {f"x (orig, step {s_x}) vs z (target, step {s_z}) — AVI's pair": (("orig", s_x), ("tgt", s_z)),
             f"orig step {s_x} vs orig step {s_z}": (("orig", s_x), ("orig", s_z)),
             f"orig step {s_z} vs orig step 40": (("orig", s_z), ("orig", 40)),
             f"orig vs target, step {s_z}": (("orig", s_z), ("tgt", s_z))}
    for label, (a, b) in pairs.items():
        al = torch.cat([alignment(e, a, b) for e in edits]).flatten(0, 1)   # [n·C, r, r]
        panels[label] = al.mean(0)
        best = al.argmax(-1).float()                                        # where component i went
        idx = torch.arange(r).float()
        diag = al.diagonal(dim1=-2, dim2=-1).mean(0)
        anti = al.flip(-1).diagonal(dim1=-2, dim2=-1).mean(0)
        rows.append([label, float(diag[:4].mean()), float(diag[4:].mean()), float(anti.mean()),
                     float((best - idx).abs().mean()), float((best[:, :4] - idx[:4]).mean()),
                     float((best[:, 8:] - idx[8:]).mean()), float(al.max(-1).values.mean())])
    heatmaps(os.path.join(out, "p3_component_alignment.png"),
             "Premise 3: |<u_i v_i', u_j v_j'>| (row i of the first latent, column j of the second), mean over seeds and "
             "channels, all factors", panels, "j (second latent's component, 0 = strongest)", "i (first latent's component)")
    print_table("Premise 3, mobility in order: alignment |<u_i v_iᵀ, u'_j v'_jᵀ>| of rank-one components between two "
                "latents (1 = the same component). 'best j − i': where component i of the first reappears in the second "
                "(positive = descends); Algorithm 1's reversal assumes i ↔ r−1−i (anti-diagonal)",
                ["latents", "diagonal i=j, top 4", "diagonal, rest", "anti-diagonal (i ↔ 15−i)", "mean |best j − i|",
                 "top 4: mean best j − i", "tail (8–15): mean best j − i", "best alignment, mean"], rows)

    # where the attribute difference lives: energy of target − original on the target's components, per step
    rows, spectra = [], {}
    check_steps = [s_x, s_z, 40, e0.world.steps]
    for e in edits:
        for step in check_steps:
            u, s, vh = svd_of(e, "tgt", step)
            d = e.tgt[step] - e.orig[step]
            c2 = core.spectrum_coefficients(d, u, vh).pow(2)                 # [n, C, r]
            frac = c2 / d.pow(2).sum((-2, -1), keepdim=False).unsqueeze(-1).clamp_min(1e-12)
            share = frac.mean((0, 1))
            ds = torch.linalg.svdvals(d.double()).pow(2)
            top = (ds[..., :2].sum(-1) / ds.sum(-1).clamp_min(1e-12)).mean()
            rel = float((d.pow(2).sum((-2, -1)) / e.tgt[step].pow(2).sum((-2, -1))).sqrt().mean())
            if step == s_z:
                spectra[e.factor] = (list(range(r)), share.tolist())
            rows.append([e.factor, step, rel, float(share[:4].sum()), float(share[8:].sum()), float(share.sum()),
                         float(top)])
    line_plot(os.path.join(out, "p3_difference_spectrum.png"),
              f"Premise 3: share of ||target - original||² on the target's component i (step {s_z}, same seed)",
              "component i of the target latent (0 = strongest)", "share", spectra)
    # the difference across the AVI pair, per factor: energy of z − x on z's components
    pair_spectra = {}
    for e in edits:
        u, s, vh = svd_of(e, "tgt", s_z)
        d = e.tgt[s_z] - e.orig[s_x]
        c2 = core.spectrum_coefficients(d, u, vh).pow(2)
        pair_spectra[e.factor] = (list(range(r)), (c2 / d.pow(2).sum((-2, -1)).unsqueeze(-1)).mean((0, 1)).tolist())
    line_plot(os.path.join(out, "p3_pair_difference_spectrum.png"),
              f"Premise 3: share of ||z - x||² on z's component i (AVI's pair: x step {s_x}, z step {s_z})",
              "component i of z (0 = strongest)", "share", pair_spectra)
    print_table("Premise 3, where the attribute lives: D = target − original latent at the same step (same seed). "
                "‖D‖/‖target‖; share of ‖D‖² on the target's components 0–3 and 8–15 (the half Algorithm 1 takes from z "
                "is z's weakest 8, reversed); the rest of ‖D‖² lies off the target's own components; share of ‖D‖² in "
                "D's own top 2 singular directions",
                ["factor", "step", "‖D‖/‖target‖", "share on target comps 0–3", "share on comps 8–15",
                 "share on all 16 comps", "share in D's top-2 directions"], rows)


# --------------------------------------------------------------------------------------------
# Premise 2: attributes in singular vectors and values (resumed with the original prompt)
# --------------------------------------------------------------------------------------------

def vectors_and_values(edits: list[Edits], out: str, steps_at: list[int], scale_indices: list[int]):
    import torch
    from comfyui_disentangle.toy_world import factor_world as fw
    core = comfy_host.pack_module("core.avi")
    world = edits[0].world
    rows = []
    curves = {}
    for e in edits:
        if not e.factor.endswith("_hue"):
            continue
        for s in steps_at:
            ux, sx, vx = core.channel_svd(e.orig[s])
            uz, sz, vz = core.channel_svd(e.tgt[s])
            variants = {
                "target's latent itself (ceiling)": e.tgt[s],
                "original's vectors, target's values": core.compose(ux, sz, vx),
                "target's vectors, original's values": core.compose(uz, sx, vz),
            }
            for label, paper in variants.items():
                reached, changed, kept = e.judge(world.finish(paper.float(), s, e.positive, e.negative))
                rows.append([e.factor, s, label, reached, kept])
            if e.factor == "object_hue":
                for i in scale_indices:
                    for gain in (0.0, 2.0):
                        sv = sx.clone()
                        sv[..., i] *= gain
                        reached, changed, kept = e.judge(world.finish(core.compose(ux, sv, vx).float(), s, e.positive,
                                                                      e.negative))
                        rows.append([e.factor, s, f"original, singular value {i} × {gain:g}", reached, kept,
                                     ", ".join(f"{n} {c:.2f}" for n, c in zip(fw.FACTOR_NAMES, changed))])
    print_table("Premise 2, attributes in singular vectors and values: latents rebuilt at step s and finished with the "
                "ORIGINAL prompt (as AVI does); target value reached / all other factors kept vs the original generation; "
                "for the scaled singular values, how often each factor changed",
                ["factor", "step s", "latent handed over", "target reached", "others kept", "factors changed"],
                [r + [""] * (6 - len(r)) for r in rows])
    return rows


# --------------------------------------------------------------------------------------------
# When each factor is committed
# --------------------------------------------------------------------------------------------

def commitment(edits: list[Edits], out: str, commit_steps: list[int]):
    world = edits[0].world
    series, rows = {}, []
    for e in edits:
        reached = []
        for s in commit_steps:
            r, _, kept = e.judge(world.finish(e.tgt[s], s, e.positive, e.negative))
            reached.append(r)
            rows.append([e.factor, s, r, kept])
        series[e.factor] = (commit_steps, reached)
    line_plot(os.path.join(out, "commit_steps.png"),
              "When the factor is committed: target prompt to step s, then the original prompt — target reached",
              "step s handed over (0 = noise, 50 = clean)", "target reached", series, ylim=(0, 1))
    print_table("When each factor is committed: the target prompt's latent at step s, finished with the original prompt",
                ["factor", "step s", "target reached", "others kept"], rows)
    return series


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--edits", type=int, default=64)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--cfg", type=float, default=5.0)
    parser.add_argument("--factors", nargs="*", default=list(TEXT_FACTORS))
    parser.add_argument("--out", default=os.path.join(comfy_host.PACK_ROOT, "out", "avi_premises"))
    parser.add_argument("--commit-steps", type=int, nargs="*", default=[5, 9, 12, 15, 20, 30, 39, 45, 48])
    parser.add_argument("--vector-steps", type=int, nargs="*", default=[12, 39])
    parser.add_argument("--scale-indices", type=int, nargs="*", default=[0, 1, 2, 15])
    parser.add_argument("--skip", nargs="*", default=[], choices=["neighbourhood", "mobility", "values", "commit"])
    args = parser.parse_args()
    if not comfy_host.host_available():
        sys.exit(comfy_host.SKIP_REASON)
    comfy_host.start_host()
    import torch
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    with torch.inference_mode():
        world = World(args.steps, args.cfg)
        s_x, s_z = world.step_at(0.8), world.step_at(0.5)
        edits = [Edits(world, name, args.edits, 3, args.out) for name in args.factors]
        print(f"trajectories: {time.time() - t0:.0f} s; AVI's x at step {s_x}, z at step {s_z}")
        if "neighbourhood" not in args.skip:
            neighbourhood(edits, args.out, s_x, s_z)
        if "mobility" not in args.skip:
            mobility(edits, args.out, s_x, s_z)
        if "commit" not in args.skip:
            commitment(edits, args.out, args.commit_steps)
        if "values" not in args.skip:
            vectors_and_values(edits, args.out, args.vector_steps, args.scale_indices)
    import comfy.model_management as mm
    print(f"\n{args.edits} seeds per factor, {args.steps} steps ddim, cfg {args.cfg}; "
          f"{mm.get_torch_device_name(mm.get_torch_device())}, {time.time() - t0:.0f} s; plots in {args.out}")


if __name__ == "__main__":
    main()

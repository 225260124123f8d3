"""Per-step cost of Omni-ID injection vs the plain model, and peak memory.

  python bench/omni_id_bench.py [--full | --geometry dry] [--families sd15,sdxl,flux] [--steps N] [--rounds R]
                                [--size PX] [--out bench/results/omni_id_<device>[_full].json]

Geometries (bench/builders.py): tiny stand-ins (default), ``dry`` (real layouts at tiny widths, the GPU script's CPU
dry run) or ``--full`` (the real SD1.5 / SDXL / FLUX.1-dev architectures with random weights; fp16 SD and bf16 FLUX
on a GPU, fp32 on the CPU; FLUX needs ~30 GB in bf16). The identity is 256 tokens of width 1280 at full size (the
paper's encoder output). Timings: the median of per-step times between sampler callbacks (cond + uncond
batched; FLUX at cfg 1, one row) after one warm-up step, wall time on CUDA and process CPU time on one thread on
the CPU (--threads); plain and Omni-ID runs alternate for ``--rounds`` rounds so
a change of machine load hits both, and the fastest round's median is kept (the least disturbed). Peak memory on
CUDA: ``torch.cuda.max_memory_allocated`` during each sampling run (the maximum over rounds).
"""
import argparse
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "scripts"))
import embedded_comfy  # noqa: E402,F401  (boots ComfyUI and loads the pack)

import torch  # noqa: E402
import comfy.model_management as mm  # noqa: E402
import comfy.sample  # noqa: E402

import builders  # noqa: E402
from idportrait.guidance import ip_adapter as IP  # noqa: E402
from idportrait.guidance.patching import apply_injector  # noqa: E402


def step_times(model, family, geometry, steps, size):
    """Median seconds per step of one sampling run (after the first step): wall and this process's CPU time; and
    the CUDA peak bytes."""
    dev = mm.get_torch_device()
    times, cpu = [], []

    def cb(*a):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter())
        cpu.append(time.process_time())
    cond = builders.conditioning(family, geometry, seed=0)
    lat = torch.zeros(1, 16 if family == "flux" else 4, size // 8, size // 8)
    noise = comfy.sample.prepare_noise(lat, 0)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    out = comfy.sample.sample(model, noise, steps + 1, 1.0 if family == "flux" else 5.0, "euler", "simple", cond, cond,
                              lat, callback=cb, disable_pbar=True)
    if not torch.isfinite(out).all():
        raise RuntimeError(f"{family}: the sampled latent is not finite")
    def med(ts):
        diffs = [b - a for a, b in zip(ts, ts[1:])]
        return statistics.median(diffs[1:] if len(diffs) > 2 else diffs)
    peak = torch.cuda.max_memory_allocated() if dev.type == "cuda" else None
    return med(times), med(cpu), peak


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--full", action="store_true", help="same as --geometry full")
    ap.add_argument("--geometry", choices=builders.GEOMETRIES, default="tiny")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved plain / Omni-ID repetitions")
    ap.add_argument("--out")
    ap.add_argument("--families", default="sd15,flux", help="comma list (FLUX full size needs ~30 GB in bf16)")
    ap.add_argument("--size", type=int, default=0, help="image size (default 512 SD1.5 / 1024 SDXL, FLUX full, 128)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (CPU timings are process CPU time)")
    a = ap.parse_args()
    geometry = "full" if a.full else a.geometry
    full = geometry == "full"
    dev = mm.get_torch_device()
    if dev.type == "cpu":
        torch.set_num_threads(a.threads)
    cuda = dev.type == "cuda"
    results = {"device": str(torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu"), "geometry": geometry,
               "full_size": full, "steps": a.steps, "rounds": a.rounds,
               "torch_threads": None if cuda else torch.get_num_threads(),
               "sampler": "euler/simple, cfg 5 (SD) / 1 (FLUX)",
               "note": ("step_s: the fastest round's median s/step, wall time on CUDA, this process's CPU time on "
                        "the CPU (one thread: a busy shared machine inflates wall time, not CPU time); rounds "
                        "alternate plain and Omni-ID"), "runs": []}
    out = a.out or os.path.join(HERE, "results", f"omni_id_{'gpu' if dev.type == 'cuda' else 'cpu'}"
                                                 f"{'_full' if full else ''}.json")
    for family in a.families.split(","):
        model = builders.diffusion_model(family, geometry)
        size = a.size or (((512 if family == "sd15" else 1024) if full else 128))
        ctx_dim = builders.dims(family, geometry)[0]
        token_dim = builders.omni_id_config(geometry).token_dim
        tokens = torch.randn(1, 256, token_dim, generator=torch.Generator().manual_seed(3))
        adapter = builders.identity_adapter(model, family, token_dim, ctx_dim)
        patched = apply_injector(model, IP.IdentityInjector(adapter, tokens, family, weight=1.0))
        variants = {"plain": model, "omni_id": patched}
        step = {n: [] for n in variants}
        wall = {n: [] for n in variants}
        peak = {n: [] for n in variants}
        for _ in range(a.rounds):   # interleaved: noise on a shared machine hits both variants alike
            for name, m in variants.items():
                w, c, p = step_times(m, family, geometry, a.steps, size)
                step[name].append(w if cuda else c)
                wall[name].append(w)
                peak[name].append(p)
        plain, with_id = min(step["plain"]), min(step["omni_id"])
        results["runs"].append({"family": family, "size": size, "parameters": builders.count_parameters(
            model.model.diffusion_model), "dtype": str(model.model.get_dtype()), "plain_step_s": plain,
            "omni_id_step_s": with_id, "ratio": with_id / plain, "plain_step_s_rounds": step["plain"],
            "omni_id_step_s_rounds": step["omni_id"], "plain_wall_s_rounds": wall["plain"],
            "omni_id_wall_s_rounds": wall["omni_id"],
            **{f"peak_mem_{n}": (max(peak[n]) if cuda else None) for n in variants}})
        print(json.dumps(results["runs"][-1]), flush=True)
        builders.write_json(out, results)
        del model, patched, variants, adapter
        builders.release()
    print("wrote", out)


if __name__ == "__main__":
    main()

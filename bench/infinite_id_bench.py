"""Per-step cost of Infinite-ID's two streams vs plain CFG sampling (tiny models on CPU; full-size when a GPU is lent).

  python bench/infinite_id_bench.py [--full | --geometry dry] [--steps N] [--repeats R] [--families sdxl,flux]
                                    [--out bench/results/infinite_id_<device>.json]

Variants, each sampled with CFG (cond + uncond batched; FLUX: cfg 1 = cond only, as FLUX is used):
  plain           the model alone
  infinite_id     both streams in one model call every step, mixed attention in all blocks + merge (defaults)
  end_at_0.5      the same with end_at = 0.5: after half the steps the identity stream is not run
  merge_only      mixed attention off: no identity stream, only the merge in the text stream
Timings: median over the steps of one run of the wall time (and of this process's CPU time) between sampler
callbacks, then the fastest of the repeats; variants are interleaved within each repeat. Two streams double the batch, so up to ~2x per step is the expected cost; mixed
attention adds a second, twice-as-long self-attention for the text rows on top.

--full builds the real SDXL (320 ch, 70 transformer blocks, ctx 2048) and FLUX.1-dev (3072 hidden, 19+38 blocks)
architectures with random weights (bench/builders.py; fp16 SDXL and bf16 FLUX on a GPU, ~30 GB for FLUX); SD1.5 is
skipped at full size (the paper's model is SDXL). ``--geometry dry``: the same layouts at tiny widths. Peak memory
on CUDA: torch.cuda.max_memory_allocated during sampling (weights included), the maximum over repeats.
"""
import argparse
import collections
import json
import os
import platform
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "scripts"))
sys.path.insert(0, HERE)
import embedded_comfy  # noqa: E402,F401  (boots ComfyUI and loads the pack)

import torch  # noqa: E402
import comfy.model_management as mm  # noqa: E402
import comfy.sample  # noqa: E402

import builders  # noqa: E402
from idportrait.guidance import infinite_id as I  # noqa: E402
from idportrait.guidance.run_state import Trace  # noqa: E402
tm = builders.tm

VARIANTS = {
    "plain": None,
    "infinite_id": {},
    "end_at_0.5": {"end_percent": 0.5},
    "merge_only": {"mix_weight": 0.0},
}


def step_time(model, family, geometry, steps, size):
    """Median wall s/step, median CPU s/step of this process, mean wall s/step (after the first step) of one run."""
    dev = mm.get_torch_device()
    stamps = []

    def cb(*a):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        stamps.append((time.perf_counter(), time.process_time()))
    lat = torch.zeros(1, tm.latent_channels(family), size // 8, size // 8)
    noise = comfy.sample.prepare_noise(lat, 0)
    cfg = 1.0 if family == "flux" else 5.0
    out = comfy.sample.sample(model, noise, steps + 1, cfg, "euler", "simple", builders.conditioning(family, geometry, 1),
                              builders.conditioning(family, geometry, 2), lat, callback=cb, disable_pbar=True)
    if not torch.isfinite(out).all():
        raise RuntimeError(f"{family}: the sampled latent is not finite")
    wall = [b[0] - a[0] for a, b in zip(stamps, stamps[1:])]
    cpu = [b[1] - a[1] for a, b in zip(stamps, stamps[1:])]
    return statistics.median(wall), statistics.median(cpu), statistics.fmean(wall)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--full", action="store_true", help="same as --geometry full")
    ap.add_argument("--geometry", choices=builders.GEOMETRIES, default="tiny")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--families", default="sd15,sdxl,flux")
    ap.add_argument("--size", type=int, help="image size in px (default 128 tiny, 1024 full)")
    ap.add_argument("--out")
    a = ap.parse_args()
    geometry = "full" if a.full else a.geometry
    a.full = geometry == "full"
    dev = mm.get_torch_device()
    results = {"device": str(torch.cuda.get_device_name(0) if dev.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})"),
               "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
               "load_average_at_start": os.getloadavg(), "torch": torch.__version__, "full_size": a.full,
               "geometry": geometry, "steps": a.steps, "sampler": "euler", "cfg": "5 (sd15/sdxl), 1 (flux)", "repeats": a.repeats, "runs": []}
    out = a.out or os.path.join(HERE, "results",
                                f"infinite_id_{'gpu' if dev.type == 'cuda' else 'cpu'}{'_full' if a.full else ''}.json")
    for family in a.families.split(","):
        if a.full and family == "sd15":
            continue
        model = builders.diffusion_model(family, geometry)
        size = a.size or (1024 if a.full else 128)
        token_dim = builders.omni_id_config(geometry).token_dim
        adapter = builders.identity_adapter(model, family, token_dim, builders.dims(family, geometry)[0])
        tokens = torch.randn(1, 256, token_dim, generator=torch.Generator().manual_seed(3))
        run = {"family": family, "size_px": size, "dtype": str(model.model.get_dtype()),
               "parameters": builders.count_parameters(model.model.diffusion_model)}
        models = {name: model if opts is None else I.apply_infinite_id(model, adapter, tokens, **opts)
                  for name, opts in VARIANTS.items()}
        walls = {name: [] for name in VARIANTS}
        cpus = {name: [] for name in VARIANTS}
        means = {name: [] for name in VARIANTS}
        calls_per_run = {}
        for _ in range(a.repeats):   # variants interleaved, so a change of machine load hits all of them alike
            for name, m in models.items():
                if dev.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                with Trace() as trace:   # the model calls of one sampling run, by kind (opt-in trace)
                    w, c, mean = step_time(m, family, geometry, a.steps, size)
                calls_per_run[name] = dict(collections.Counter(e["kind"] for e in trace.of("infinite_id.call")))
                walls[name].append(w)
                cpus[name].append(c)
                means[name].append(mean)
                if dev.type == "cuda":
                    run[f"{name}_peak_mem_bytes"] = max(run.get(f"{name}_peak_mem_bytes", 0),
                                                        torch.cuda.max_memory_allocated())
        for name in VARIANTS:
            # the fastest repeat: the least disturbed by other processes on a shared machine
            run[f"{name}_step_s"] = min(walls[name])
            run[f"{name}_cpu_step_s"] = min(cpus[name])
            run[f"{name}_mean_step_s"] = min(means[name])   # differs from the median when steps differ (end_at)
            if VARIANTS[name] is not None:
                run[f"{name}_model_calls_per_run"] = calls_per_run[name]
        for name in VARIANTS:
            if name != "plain":
                run[f"{name}_vs_plain"] = run[f"{name}_step_s"] / run["plain_step_s"]
                run[f"{name}_cpu_vs_plain"] = run[f"{name}_cpu_step_s"] / run["plain_cpu_step_s"]
                run[f"{name}_mean_vs_plain"] = run[f"{name}_mean_step_s"] / run["plain_mean_step_s"]
        results["runs"].append(run)
        print(json.dumps(run), flush=True)
        builders.write_json(out, results)
        del model, models, adapter
        builders.release()
    results["load_average_at_end"] = os.getloadavg()
    builders.write_json(out, results)
    print("wrote", out)


if __name__ == "__main__":
    main()

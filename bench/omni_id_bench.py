"""Per-step cost of Omni-ID injection vs the plain model (tiny models on CPU; full-size when a GPU is lent).

  python bench/omni_id_bench.py [--full] [--steps N] [--out bench/results/omni_id_<device>.json]

--full builds full-size randomly initialised SD1.5 (320 ch, ctx 768) and FLUX.1 (3072 hidden, 19+38 blocks)
architectures with ComfyUI's classes (needs a GPU with ~40 GB for FLUX in bf16). Timings are the median of
per-step wall times of the diffusion model call (cond+uncond batched), after one warm-up step.
"""
import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
import embedded_comfy  # noqa: E402,F401  (boots ComfyUI and loads the pack)

import torch  # noqa: E402
import comfy.model_management as mm  # noqa: E402

from idportrait.guidance import ip_adapter as IP  # noqa: E402
from idportrait.guidance.patching import apply_injector  # noqa: E402
from idportrait.stand_ins import models as tm  # noqa: E402


def full_model(family, dtype):
    return tm.full_size_model(family, dtype)


def adapter_for(model, family, token_dim):
    dm = model.model.diffusion_model
    if family == "flux":
        a = IP.FluxIdentityAdapter(token_dim, dm.hidden_size, len(dm.double_blocks), len(dm.single_blocks))
    else:
        ctx = 768 if dm.model_channels == 320 else tm.TEXT_WIDTH
        a = IP.SDIdentityAdapter(token_dim, ctx, IP.SDIdentityAdapter.inner_dims_of(dm))
    return tm.randomize_(a, 1)


def step_times(model, family, steps, size, ctx_dim, vec_dim, dtype):
    times = []
    dev = mm.get_torch_device()

    def cb(*a):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter())
    g = torch.Generator().manual_seed(0)
    cond = [[torch.randn(1, 77 if family != "flux" else 256, ctx_dim, generator=g),
             {"pooled_output": torch.randn(1, vec_dim, generator=g), "guidance": 3.5} if family == "flux" else {}]]
    lat = torch.zeros(1, 16 if family == "flux" else 4, size // 8, size // 8)
    import comfy.sample
    noise = comfy.sample.prepare_noise(lat, 0)
    comfy.sample.sample(model, noise, steps + 1, 1.0 if family == "flux" else 5.0, "euler", "simple", cond, cond, lat,
                        callback=cb, disable_pbar=True)
    diffs = [b - a for a, b in zip(times, times[1:])]
    return statistics.median(diffs[1:] if len(diffs) > 2 else diffs)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--out")
    ap.add_argument("--families", default="sd15,flux", help="comma list (FLUX full size needs ~48 GB in fp32)")
    ap.add_argument("--size", type=int, default=0, help="image size (default 512 SD / 1024 FLUX full, 128 tiny)")
    a = ap.parse_args()
    dev = mm.get_torch_device()
    dtype = torch.bfloat16 if (a.full and dev.type == "cuda") else torch.float32
    results = {"device": str(torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu"), "full_size": a.full,
               "dtype": str(dtype), "runs": []}
    for family in a.families.split(","):
        model = full_model(family, dtype) if a.full else tm.tiny_model(family, 0)
        size = a.size or ((512 if family == "sd15" else 1024) if a.full else 128)
        ctx_dim, vec_dim = ((768, 768) if family == "sd15" else (4096, 768)) if a.full else (tm.TEXT_WIDTH, tm.TEXT_WIDTH)
        token_dim = 1280 if a.full else 32
        tokens = torch.randn(1, 256, token_dim)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        plain = step_times(model, family, a.steps, size, ctx_dim, vec_dim, dtype)
        peak_plain = torch.cuda.max_memory_allocated() if dev.type == "cuda" else None
        inj = IP.IdentityInjector(adapter_for(model, family, token_dim), tokens, family, weight=1.0)
        patched = apply_injector(model, inj)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        with_id = step_times(patched, family, a.steps, size, ctx_dim, vec_dim, dtype)
        peak_id = torch.cuda.max_memory_allocated() if dev.type == "cuda" else None
        results["runs"].append({"family": family, "size": size, "plain_step_s": plain, "omni_id_step_s": with_id,
                                "ratio": with_id / plain, "peak_mem_plain": peak_plain, "peak_mem_omni_id": peak_id})
        print(json.dumps(results["runs"][-1]))
        del model, patched
    out = a.out or os.path.join(os.path.dirname(__file__), "results",
                                f"omni_id_{'gpu' if dev.type == 'cuda' else 'cpu'}{'_full' if a.full else ''}.json")
    with open(out, "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()

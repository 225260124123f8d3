"""Per-step cost of FlashFace (released layout and training-free extension) vs plain two-way CFG, and peak memory.

  python bench/flashface_bench.py [--full] [--steps N] [--size PX] [--rounds R] [--in-process]
                                  [--out bench/results/flashface_<device>.json]

Default: tiny random-weight models on the CPU (the FlashFace layout at widths /10; the SD1.5 stand-in for the
training-free mode). --full: full-size random-weight SD1.5 FlashFace (main + reference UNet, 1.65 B parameters,
fp16 on a GPU, fp32 on the CPU) at 512x512; the issue's target is ≤ 1.6x plain two-way CFG per step with 4
references in the three-way phase. A first run times the unavoidable pieces alone (main UNet on 2 and 3 rows,
reference UNet on 4 faces): their ratio is the floor of any faithful implementation ("floor" in the JSON).

On the CPU each configuration runs in its own process so that its peak memory is its own (peak RSS). On CUDA (or
with --in-process) they share one process and one model, and peak memory is torch.cuda.max_memory_allocated during
each sampling run (weights included). Time per step is the wall time between sampler callbacks after one
warm-up step (Euler, cond and uncond batched; the three-way phase adds the reference row to the batch). The
configurations run interleaved for several rounds; the ratios use the fastest step seen per configuration, which
is the least disturbed by other processes on a shared machine (the medians are in the JSON too). CPU runs use one
thread (--threads) for the same reason.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
CONFIGS = {
    # name: (layout, number of references, launch)  launch 1000 = three-way at every step, -1 = never
    "flashface_plain_cfg": ("flashface", 0, None),
    "flashface_1ref_three_way": ("flashface", 1, 1000.0),
    "flashface_4ref_three_way": ("flashface", 4, 1000.0),
    "flashface_4ref_two_way_phase": ("flashface", 4, -1.0),
    "flashface_1face_padded_to_4_three_way": ("flashface", -4, 1000.0),   # the released padding, encoded once
    "training_free_sd15_plain_cfg": ("training_free", 0, None),
    "training_free_sd15_1ref_three_way": ("training_free", 1, 1000.0),
    "training_free_sd15_4ref_three_way": ("training_free", 4, 1000.0),
}


def _components(model, refs_latents, ctx_dim, size, steps, dev):
    """Seconds per call of the pieces one three-way step cannot avoid: the main UNet on 2 rows (plain
    CFG) and on 3 rows, and the reference UNet on the 4 faces. Their ratio is the floor of any faithful
    implementation (it leaves out the reference-attention modules themselves)."""
    import torch
    import comfy.model_management as mm
    from idportrait.guidance import flashface as FF
    ref_patcher = model.get_additional_models_with_key(FF.REF_UNET_KEY)[0]
    mm.load_models_gpu([model, ref_patcher])   # a sampler loads the attached reference UNet itself; here we must
    main = model.model.diffusion_model
    ref = ref_patcher.model.diffusion_model
    dtype = next(main.parameters()).dtype
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, size // 8, size // 8, generator=g).to(dev, dtype)
    ctx = torch.randn(4, 77, ctx_dim, generator=g).to(dev, dtype)
    r = refs_latents.to(dev, dtype)

    def timed(fn):
        best = []
        for _ in range(steps + 1):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.no_grad():
                fn()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            best.append(time.perf_counter() - t0)
        return min(best[1:])
    t = torch.full((4,), 500.0, device=dev)
    out = {"main_unet_2_rows_s": timed(lambda: main(x[:2], t[:2], context=ctx[:2], transformer_options={})),
           "main_unet_3_rows_s": timed(lambda: main(x, t[:3], context=ctx[:3], transformer_options={})),
           "reference_unet_4_faces_s": timed(lambda: ref(r, t, context=ctx, transformer_options={}))}
    out["floor_ratio"] = (out["main_unet_3_rows_s"] + out["reference_unet_4_faces_s"]) / out["main_unet_2_rows_s"]
    return out


def _setup(full, threads):
    """Boot ComfyUI and build the FlashFace model (and, tiny only, the SD1.5 stand-in for the training-free mode)."""
    sys.path.insert(0, os.path.join(os.path.dirname(HERE), "scripts"))
    import embedded_comfy  # noqa: F401  (boots ComfyUI and loads the pack)
    import torch
    if threads:
        torch.set_num_threads(threads)
    import comfy.model_management as mm
    import builders
    tm = builders.tm
    ctx_dim = 768 if full else tm.TEXT_WIDTH
    return {"dev": mm.get_torch_device(), "ctx_dim": ctx_dim, "full": full,
            "flashface": builders.flashface_model("full" if full else "dry"),
            "training_free": None if full else tm.tiny_model("sd15", 0)}


def _run(name, ctx, steps, size):
    import torch
    import comfy.sample
    from idportrait.guidance import flashface as FF

    dev, ctx_dim = ctx["dev"], ctx["ctx_dim"]
    layout, n_refs, launch = CONFIGS[name] if name != "components" else ("flashface", 0, None)
    if layout == "training_free" and ctx["full"]:
        raise SystemExit("the training-free configurations run on the tiny stand-in only")
    model = ctx[layout]
    g = torch.Generator().manual_seed(1)   # the same references and prompts for every configuration
    if name == "components":
        return {"config": name, "layout": layout, "device": str(dev),
                **_components(model, torch.randn(4, 4, 28, 28, generator=g), ctx_dim, size, steps, dev)}
    if n_refs:
        refs = (FF.FlashFaceReferences.single(torch.randn(n_refs, 4, 28, 28, generator=g)) if n_refs > 0 else
                FF.FlashFaceReferences.single(torch.randn(1, 4, 28, 28, generator=g)).padded(-n_refs))   # 224 px
        guidance = FF.Guidance(launch=launch)
        model = (FF.apply_flashface(model, refs, guidance) if layout == "flashface"
                 else FF.apply_training_free(model, refs, guidance))
    cond = [[torch.randn(1, 77, ctx_dim, generator=g), {}]]
    neg = [[torch.randn(1, 77, ctx_dim, generator=g), {}]]
    lat = torch.zeros(1, 4, size // 8, size // 8)
    noise = comfy.sample.prepare_noise(lat, 0)
    times = []

    def cb(*a):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter())
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    res = comfy.sample.sample(model, noise, steps + 1, 7.5, "euler", "simple", cond, neg, lat, callback=cb,
                              disable_pbar=True)
    total = time.perf_counter() - t0
    if not torch.isfinite(res).all():
        raise RuntimeError(f"{name}: the sampled latent is not finite")
    diffs = [b - a for a, b in zip(times, times[1:])]
    out = {"config": name, "layout": layout, "references": abs(n_refs), "distinct_faces": 1 if n_refs < 0 else n_refs,
           "launch": launch, "steps_timed": len(diffs),
           "s_per_step_median": statistics.median(diffs), "s_per_step_min": min(diffs), "s_per_step_all": diffs,
           "total_s": total,
           "device": str(dev)}
    if dev.type == "cuda":
        out["peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
        out["peak_mem_kind"] = "torch.cuda.max_memory_allocated (weights included)"
    else:
        out["peak_mem_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        out["peak_mem_kind"] = "process peak RSS (includes ComfyUI itself)"
    return out


def _one(name, full, steps, size, threads):
    print("RESULT " + json.dumps(_run(name, _setup(full, threads), steps, size)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--full", action="store_true", help="full-size SD1.5 FlashFace at 512 px (GPU)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 6 tiny, 10 full)")
    ap.add_argument("--size", type=int, default=None, help="image side in pixels (default 256 tiny, 512 full)")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved repetitions of every configuration")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--only", default=None, help="comma-separated configurations (default: all)")
    ap.add_argument("--geometry", choices=("tiny", "dry", "full"), default="tiny",
                    help="full = --full; dry = tiny (the tiny FlashFace is already the real layout at widths / 10)")
    ap.add_argument("--in-process", action="store_true", help="every configuration in this process (default on CUDA)")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.full = args.full or args.geometry == "full"
    steps = args.steps or (10 if args.full else 6)
    size = args.size or (512 if args.full else 256)
    if args.one:
        _one(args.one, args.full, steps, size, args.threads)
        return
    names = [n for n in CONFIGS if not (args.full and n.startswith("training_free"))]
    if args.only:
        names = [n for n in names if n in args.only.split(",")]

    cuda = os.environ.get("IDP_COMFY_DEVICE", "cpu") == "auto"   # embedded_comfy lets ComfyUI pick the GPU
    ctx = _setup(args.full, args.threads) if (args.in_process or cuda) else None

    def spawn(name):
        if ctx is not None:
            return _run(name, ctx, steps, size)
        cmd = [sys.executable, os.path.abspath(__file__), "--one", name, "--steps", str(steps), "--size", str(size),
               "--threads", str(args.threads)] + (["--full"] if args.full else [])
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            sys.stderr.write(proc.stderr[-4000:])
            raise SystemExit(f"{name} failed")
        return json.loads(line[len("RESULT "):])
    components = spawn("components")
    print("components " + json.dumps(components), flush=True)
    runs = {n: [] for n in names}
    for rnd in range(args.rounds):
        for name in names:
            runs[name].append(spawn(name))
            r = runs[name][-1]
            print(f"round {rnd + 1} {name:38s} min {r['s_per_step_min'] * 1000:8.1f} ms/step  median "
                  f"{r['s_per_step_median'] * 1000:8.1f}  peak {r['peak_mem_mb']:7.0f} MB", flush=True)
    results = {}
    for name, rs in runs.items():
        all_steps = [d for r in rs for d in r["s_per_step_all"]]
        results[name] = {**{k: v for k, v in rs[0].items() if k not in ("s_per_step_all", "total_s")},
                         "s_per_step_min": min(all_steps), "s_per_step_median": statistics.median(all_steps),
                         "s_per_step_all": all_steps, "peak_mem_mb": max(r["peak_mem_mb"] for r in rs)}
    ratios, ratios_median = {}, {}
    for layout, plain in (("flashface", "flashface_plain_cfg"), ("training_free", "training_free_sd15_plain_cfg")):
        if plain in results:
            base, base_med = results[plain]["s_per_step_min"], results[plain]["s_per_step_median"]
            for n, r in results.items():
                if r["layout"] == layout and n != plain:
                    ratios[n] = r["s_per_step_min"] / base
                    ratios_median[n] = r["s_per_step_median"] / base_med
    device = results[names[0]]["device"]
    report = {"size_px": size, "steps_timed": steps, "full": args.full, "device": device,
              "reference_px": 224, "sampler": "euler/simple, cfg 7.5",
              "note": ("tiny random-weight models on a shared CPU: absolute times are noisy; compare the ratios"
                       if not args.full else f"full-size random-weight SD1.5 FlashFace, "
                       f"{'fp16' if 'cuda' in device else 'fp32'}"),
              "threads": args.threads, "rounds": args.rounds, "in_process": ctx is not None,
              "ratio_to_plain_two_way_cfg": ratios, "ratio_of_medians": ratios_median,
              "target_4ref_three_way_ratio": 1.6,
              "floor": {**components, "explains": (
                  "a three-way step runs the main UNet on 3 rows (cond with references, cond, uncond) and the "
                  "reference UNet on the 4 faces; floor_ratio = (3 rows + reference pass) / 2 rows, before any "
                  "reference attention")},
              "results": results}
    out = args.out or os.path.join(HERE, "results", f"flashface_{'cuda' if 'cuda' in device else 'cpu'}"
                                                     f"{f'_full_sd15_{size}' if args.full else ''}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=1)
    for n, r in ratios.items():
        print(f"{n:38s} {r:5.2f}x plain")
    print(f"floor of the released algorithm (3 rows + reference pass, no reference attention): "
          f"{components['floor_ratio']:.2f}x")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

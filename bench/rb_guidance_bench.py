"""Per-step cost of RB-Guidance: a guided step vs a plain CFG step, and peak memory.

  python bench/rb_guidance_bench.py [--full | --geometry dry] [--steps N] [--size PX] [--rounds R] [--in-process]
                                    [--families sd15,sdxl,flux] [--out FILE]

Configurations per family: plain (p = 0, which is the plain sampler bit for bit), guided at the default feature
point ("auto": the forward stops at 1/16 resolution) and guided at a late point (the forward runs almost to the
end), to show what the truncation saves. Step times are measured between sampler callbacks over the guided steps,
excluding the first guided step (which also runs the once-per-run reference pass), and over the same steps of the
plain run. The configurations alternate for ``--rounds`` rounds (noise on a shared machine hits all of them) and the
fastest round's median is kept.

CPU (default): each configuration runs in a fresh subprocess, so peak memory is its own: the process's peak RSS
growth during sampling (polled every millisecond; tiny models: mostly allocator noise), and, exactly, the bytes
autograd keeps for the backward of one truncated forward (``autograd_saved_bytes``); step time is the median
*process CPU time* on one thread (--threads), which a busy shared machine does not inflate the way it inflates wall
time (wall medians are reported too). CUDA (or ``--in-process``): one process per family, one model shared by the
configurations; median wall time; ``torch.cuda.max_memory_allocated`` during sampling (weights included) and the
allocated bytes before it. --full: the real SD1.5 / SDXL / FLUX.1-dev architectures with random weights (fp16 SD and
bf16 FLUX on a GPU) at 512 / 1024 / 1024 px; ``dry``: their layouts at tiny widths.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "scripts"))
sys.path.insert(0, HERE)


class _RssPeak:
    """Peak resident memory growth while the block runs (Linux /proc), polled every millisecond."""

    def __enter__(self):
        import threading
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.base = self._rss()
        self.peak_rss = self.base
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._poll, daemon=True)
        self._t.start()
        return self

    def _rss(self):
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _poll(self):
        while not self._stop.wait(0.001):
            self.peak_rss = max(self.peak_rss, self._rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak_rss = max(self.peak_rss, self._rss())
        self.peak = self.peak_rss - self.base


def late_point(family, model):
    from idportrait.guidance import rb_guidance as RG
    dm = model.model.diffusion_model
    if family == "flux":
        return f"single:{len(dm.single_blocks) - 1}"
    return f"up:{len(RG.unet_upsample_blocks(dm)) - 1}"


def prepare(family, geometry, size, threads):
    """Model, VAE, conditioning and identity of one family (the expensive part, shared by the configurations)."""
    import embedded_comfy  # noqa: F401  (boots ComfyUI, loads the pack)
    import torch
    import comfy.model_management as mm
    import builders
    from idportrait.guidance import rb_guidance as RG
    tm = builders.tm

    dev = mm.get_torch_device()
    if dev.type == "cpu":
        torch.set_num_threads(threads)
    with torch.inference_mode():   # as a ComfyUI loader node would build them
        model = builders.diffusion_model(family, geometry)
        vae = tm.tiny_vae(family)   # the VAE only encodes the reference once; its size does not matter here
    g = torch.Generator().manual_seed(0)
    pos = builders.conditioning(family, geometry, seed=1)
    neg = builders.conditioning(family, geometry, seed=2)
    ref = torch.rand(1, 256, 256, 3, generator=g)
    ref_mask = torch.zeros(1, 256, 256)
    ref_mask[:, 48:208, 64:192] = 1
    region = torch.zeros(1, size, size)
    region[:, size // 8: size * 5 // 8, size // 4: size * 3 // 4] = 1
    ident = RG.RBIdentity(ref, reference_mask=ref_mask, region_mask=region)
    return {"family": family, "model": model, "vae": vae, "pos": pos, "neg": neg, "identity": ident, "size": size,
            "dev": dev}


def run_config(ctx, point, p, steps):
    import torch
    import comfy.model_management as mm
    import comfy.sample
    import comfy.samplers
    from idportrait.guidance import rb_guidance as RG

    family, model, dev, size = ctx["family"], ctx["model"], ctx["dev"], ctx["size"]
    if point == "late":
        point = late_point(family, model)
    guider = RG.RBGuider(model, [ctx["identity"]], ctx["vae"], RG.RBSettings(p=p, u=0.95, feature_point=point))
    guider.set_conds(ctx["pos"], ctx["neg"])
    guider.set_cfg(1.0 if family == "flux" else 5.0)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", steps)
    lat = torch.zeros(1, 16 if family == "flux" else 4, size // 8, size // 8)
    times, cpu = [], []

    def cb(*a):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter())
        cpu.append(time.process_time())
    mm.load_models_gpu([model])
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() if dev.type == "cuda" else None
    rss = _RssPeak()
    noise = comfy.sample.prepare_noise(lat, 0)
    with torch.inference_mode(), rss:
        cb()
        out = guider.sample(noise, lat, comfy.samplers.sampler_object("euler"), sigmas, callback=lambda *a: cb(),
                            disable_pbar=True, seed=0)
    if not torch.isfinite(out).all():
        raise RuntimeError(f"{family} {point} p={p}: the sampled latent is not finite")
    step_s = [b - a for a, b in zip(times, times[1:])]
    step_cpu = [b - a for a, b in zip(cpu, cpu[1:])]
    window = RG.guided_sigma_window(model, 0.95)
    guided = [i for i, s in enumerate(sigmas[:-1].tolist()) if s <= window * (1 + 1e-6)]
    use = guided[1:] or guided
    peak = torch.cuda.max_memory_allocated() if dev.type == "cuda" else rss.peak
    main_s = step_s if dev.type == "cuda" else step_cpu
    return {"family": family, "feature_point": guider.point.name, "p": p,
            "step_s": statistics.median(main_s[i] for i in use),
            "step_wall_median_s": statistics.median(step_s[i] for i in use),
            "autograd_saved_bytes": max([t.saved_bytes for t in guider.trace if t.guided], default=0),
            "peak_mem_bytes": peak, "mem_before_bytes": before,
            "peak_mem_kind": "cuda_max_allocated" if dev.type == "cuda" else "cpu_rss_growth_during_sampling",
            "guided_steps": len(guided) if p else 0}


CONFIGS = (("plain", "auto", 0.0), ("guided", "auto", 8.5), ("guided_late", "late", 8.5))


def summarize(fam, rows):
    """rows: {config: [result per round]} -> one record; the fastest round of each configuration."""
    best = {n: min(rs, key=lambda r: r["step_s"]) for n, rs in rows.items()}
    peak = {n: max(r["peak_mem_bytes"] for r in rs) for n, rs in rows.items()}
    pl, gd, late = best["plain"], best["guided"], best["guided_late"]
    return {"family": fam, "plain_step_s": pl["step_s"], "guided_step_s": gd["step_s"],
            "plain_step_wall_median_s": pl["step_wall_median_s"], "guided_step_wall_median_s": gd["step_wall_median_s"],
            "ratio": gd["step_s"] / pl["step_s"], "feature_point": gd["feature_point"],
            "late_point": late["feature_point"], "guided_late_step_s": late["step_s"],
            "ratio_late": late["step_s"] / pl["step_s"],
            "peak_mem_plain": peak["plain"], "peak_mem_guided": peak["guided"], "peak_mem_guided_late": peak["guided_late"],
            "mem_before_sampling": pl["mem_before_bytes"],
            "autograd_saved_bytes": gd["autograd_saved_bytes"], "autograd_saved_bytes_late": late["autograd_saved_bytes"],
            "peak_mem_kind": pl["peak_mem_kind"], "guided_steps": gd["guided_steps"],
            "step_s_rounds": {n: [r["step_s"] for r in rs] for n, rs in rows.items()}}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--full", action="store_true", help="same as --geometry full")
    ap.add_argument("--geometry", choices=("tiny", "dry", "full"), default="tiny")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--size", type=int, default=0, help="image side in pixels (default 128 tiny, 512/1024 full)")
    ap.add_argument("--families", default="sd15,sdxl,flux")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=1, help="interleaved repetitions of the three configurations")
    ap.add_argument("--in-process", action="store_true", help="all configurations in this process (default on CUDA)")
    ap.add_argument("--out")
    ap.add_argument("--one", nargs=3, metavar=("FAMILY", "POINT", "P"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    geometry = "full" if a.full else a.geometry
    full = geometry == "full"

    def size_of(fam):
        return a.size or ((512 if fam == "sd15" else 1024) if full else 128)
    if a.one:
        fam, point, p = a.one
        ctx = prepare(fam, geometry, size_of(fam), a.threads)
        print("RESULT " + json.dumps(run_config(ctx, point, float(p), a.steps)), flush=True)
        return
    import torch
    cuda = torch.cuda.is_available() and os.environ.get("IDP_COMFY_DEVICE", "cpu") == "auto"
    in_process = a.in_process or cuda
    results = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "geometry": geometry, "full_size": full,
               "steps": a.steps, "rounds": a.rounds, "threads": None if cuda else a.threads, "in_process": in_process,
               "note": ("step_s: fastest round's median per-step process CPU time (CPU, 1 thread) or wall time (CUDA) "
                        "over the guided steps after the first; p=0 is the plain sampler; peak_mem: CUDA max allocated "
                        "(weights included) or CPU peak RSS growth during sampling"),
               "runs": []}
    out = a.out or os.path.join(HERE, "results", f"rb_guidance_{'gpu' if cuda else 'cpu'}{'_full' if full else ''}.json")
    for fam in a.families.split(","):
        rows = {name: [] for name, _, _ in CONFIGS}
        ctx = prepare(fam, geometry, size_of(fam), a.threads) if in_process else None
        for _ in range(a.rounds):
            for name, point, p in CONFIGS:
                if in_process:
                    rows[name].append(run_config(ctx, point, p, a.steps))
                    continue
                cmd = [sys.executable, os.path.abspath(__file__), "--one", fam, point, str(p), "--steps", str(a.steps),
                       "--threads", str(a.threads), "--geometry", geometry] + (["--size", str(a.size)] if a.size else [])
                stdout = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
                rows[name].append(json.loads(next(ln[7:] for ln in stdout.splitlines() if ln.startswith("RESULT "))))
        rec = summarize(fam, rows)
        rec["size"] = size_of(fam)
        if ctx is not None:
            import builders   # needs ComfyUI, which only an in-process run has booted here
            rec["parameters"] = builders.count_parameters(ctx["model"].model.diffusion_model)
            rec["dtype"] = str(ctx["model"].model.get_dtype())
            del ctx
            builders.release()
        results["runs"].append(rec)
        print(json.dumps(rec), flush=True)
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:   # after every family: a run stopped at its time limit keeps what it measured
            json.dump(results, f, indent=2)
    print("wrote", out)


if __name__ == "__main__":
    main()

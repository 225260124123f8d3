"""Per-step cost of RB-Guidance: a guided step vs a plain CFG step, and peak memory.

  python bench/rb_guidance_bench.py [--full] [--steps N] [--size PX] [--out FILE]

Each configuration runs in a fresh subprocess (``--one``), so peak memory is per configuration: on CUDA
``torch.cuda.max_memory_allocated``; on CPU the process's peak RSS (``ru_maxrss``) minus the RSS after the
model is built and loaded. Step times are measured between sampler callbacks over the guided steps,
excluding the first guided step (which also runs the once-per-run reference pass), and over the same
steps of a run with p = 0 (which is the plain sampler, bit for bit). On CUDA: median wall time. On CPU
(one thread, --threads): median *process CPU time* per step, which a busy shared machine does not
inflate the way it inflates wall time (wall medians are reported too). CPU memory: peak RSS during
sampling minus RSS before it, polled every millisecond (tiny models: mostly allocator noise), and, exactly,
the bytes autograd keeps for the backward of one truncated forward (``autograd_saved_bytes``).

Configurations per family: the default feature point ("auto", the forward stops at 1/16 resolution) and a
late point (the forward runs almost to the end), to show what the truncation saves. --full builds full-size
random-weight SD1.5/SDXL/FLUX architectures with ComfyUI's classes (GPU sized; bf16 on CUDA).
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


def full_model(family, dtype):
    from idportrait.stand_ins import models as tm
    return tm.full_size_model(family, dtype)


def one(family, point, p, steps, size, full, threads):
    import embedded_comfy  # noqa: F401  (boots ComfyUI, loads the pack)
    import torch
    import comfy.model_management as mm
    import comfy.sample
    import comfy.samplers
    from idportrait.guidance import rb_guidance as RG
    from idportrait.stand_ins import models as tm

    dev = mm.get_torch_device()
    if dev.type == "cpu":
        torch.set_num_threads(threads)
    dtype = torch.bfloat16 if (full and dev.type == "cuda") else torch.float32
    with torch.inference_mode():   # as a ComfyUI loader node would build them
        model = full_model(family, dtype) if full else tm.tiny_model(family, 0)
        vae = tm.tiny_vae(family)   # the VAE only encodes the reference once; its size does not matter here
    if point == "late":
        point = late_point(family, model)
    lat_ch = 16 if family == "flux" else 4
    ctx_dim, vec_dim = ((768, 768) if family == "sd15" else (2048, 1280) if family == "sdxl" else (4096, 768)) \
        if full else (tm.TEXT_WIDTH, tm.TEXT_WIDTH)
    g = torch.Generator().manual_seed(0)
    tokens = 256 if (full and family == "flux") else 77
    extra = lambda: {"pooled_output": torch.randn(1, vec_dim, generator=g)} if family != "sd15" else {}  # noqa: E731
    pos = [[torch.randn(1, tokens, ctx_dim, generator=g), {**extra(), **({"guidance": 3.5} if family == "flux" else {})}]]
    neg = [[torch.randn(1, tokens, ctx_dim, generator=g), {**extra(), **({"guidance": 3.5} if family == "flux" else {})}]]
    lat = torch.zeros(1, lat_ch, size // 8, size // 8)
    ref = torch.rand(1, 256, 256, 3, generator=g)
    ref_mask = torch.zeros(1, 256, 256)
    ref_mask[:, 48:208, 64:192] = 1
    region = torch.zeros(1, size, size)
    region[:, size // 8: size * 5 // 8, size // 4: size * 3 // 4] = 1
    ident = RG.RBIdentity(ref, reference_mask=ref_mask, region_mask=region)
    guider = RG.RBGuider(model, [ident], vae, RG.RBSettings(p=p, u=0.95, feature_point=point))
    guider.set_conds(pos, neg)
    guider.set_cfg(1.0 if family == "flux" else 5.0)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", steps)
    times, cpu = [], []

    def cb(*a):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter())
        cpu.append(time.process_time())
    mm.load_models_gpu([model])
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rss = _RssPeak()
    noise = comfy.sample.prepare_noise(lat, 0)
    with torch.inference_mode(), rss:
        cb()
        guider.sample(noise, lat, comfy.samplers.sampler_object("euler"), sigmas, callback=lambda *a: cb(), disable_pbar=True,
                      seed=0)
    step_s = [b - a for a, b in zip(times, times[1:])]
    step_cpu = [b - a for a, b in zip(cpu, cpu[1:])]
    window = RG.guided_sigma_window(model, 0.95)
    guided = [i for i, s in enumerate(sigmas[:-1].tolist()) if s <= window * (1 + 1e-6)]
    use = guided[1:] or guided
    peak = torch.cuda.max_memory_allocated() if dev.type == "cuda" else rss.peak
    main_s = step_s if dev.type == "cuda" else step_cpu
    return {"family": family, "feature_point": guider.point.name, "p": p, "step_s": statistics.median(main_s[i] for i in use),
            "step_wall_median_s": statistics.median(step_s[i] for i in use),
            "autograd_saved_bytes": max([t.saved_bytes for t in guider.trace if t.guided], default=0),
            "peak_mem_bytes": peak, "peak_mem_kind": "cuda_max_allocated" if dev.type == "cuda" else "cpu_rss_growth_during_sampling",
            "guided_steps": len(guided) if p else 0}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--size", type=int, default=0, help="image side in pixels (default 128 tiny, 512/1024 full)")
    ap.add_argument("--families", default="sd15,sdxl,flux")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out")
    ap.add_argument("--one", nargs=3, metavar=("FAMILY", "POINT", "P"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        fam, point, p = a.one
        size = a.size or ((512 if fam == "sd15" else 1024) if a.full else 128)
        print("RESULT " + json.dumps(one(fam, point, float(p), a.steps, size, a.full, a.threads)), flush=True)
        return
    import torch
    cuda = torch.cuda.is_available()
    results = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "full_size": a.full, "steps": a.steps,
               "threads": None if cuda else a.threads,
               "note": ("step_s: median per-step process CPU time (CPU, 1 thread) or wall time (CUDA) over the guided "
                        "steps after the first; p=0 is the plain sampler; peak_mem: CUDA max allocated or CPU peak RSS "
                        "growth during sampling"),
               "runs": []}
    for fam in a.families.split(","):
        row = {}
        for name, point, p in (("plain", "auto", 0.0), ("guided", "auto", 8.5), ("guided_late", "late", 8.5)):
            cmd = [sys.executable, os.path.abspath(__file__), "--one", fam, point, str(p), "--steps", str(a.steps),
                   "--threads", str(a.threads)]
            cmd += (["--full"] if a.full else []) + (["--size", str(a.size)] if a.size else [])
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            row[name] = json.loads(next(line[7:] for line in out.splitlines() if line.startswith("RESULT ")))
        rec = {"family": fam, "plain_step_s": row["plain"]["step_s"], "guided_step_s": row["guided"]["step_s"],
               "plain_step_wall_median_s": row["plain"]["step_wall_median_s"],
               "guided_step_wall_median_s": row["guided"]["step_wall_median_s"],
               "ratio": row["guided"]["step_s"] / row["plain"]["step_s"], "feature_point": row["guided"]["feature_point"],
               "late_point": row["guided_late"]["feature_point"], "guided_late_step_s": row["guided_late"]["step_s"],
               "ratio_late": row["guided_late"]["step_s"] / row["plain"]["step_s"],
               "peak_mem_plain": row["plain"]["peak_mem_bytes"], "peak_mem_guided": row["guided"]["peak_mem_bytes"],
               "peak_mem_guided_late": row["guided_late"]["peak_mem_bytes"],
               "autograd_saved_bytes": row["guided"]["autograd_saved_bytes"],
               "autograd_saved_bytes_late": row["guided_late"]["autograd_saved_bytes"], "peak_mem_kind": row["plain"]["peak_mem_kind"]}
        results["runs"].append(rec)
        print(json.dumps(rec), flush=True)
    out = a.out or os.path.join(HERE, "results", f"rb_guidance_{'gpu' if cuda else 'cpu'}{'_full' if a.full else ''}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()

"""What an RB-Guidance reference costs by its size: a phone photo against a 512 px one.

  python bench/rb_reference_bench.py [--sizes 256,512,1024,2048,4096] [--old-sizes 256,512,1024] [--ensemble N]
                                     [--out FILE]

The reference is a real face photo (scikit-image's astronaut) resized to each side, with no mask connected, so
the face tools detect the face as they do for a user's photo. Per size, in a fresh subprocess (so peak memory is
per configuration): the guider is built and its references prepared (detection, crop to the face, VAE), then a
64x64 generation samples 4 steps with guidance from the first step, which runs the once-per-run reference pass.
Reported (medians of --repeats fresh processes, run interleaved): wall and process CPU seconds of preparation +
sampling, the image size the VAE saw, and the peak RSS growth (CPU) or CUDA max allocated. ``old`` rows run the same with the working-size fit turned off (the VAE and
the reference pass see the whole photo, as before), for the sizes in --old-sizes. Tiny stand-in SD1.5 model and
VAE (the issue's setting: the cost that grows with the photo is the VAE and the reference pass, at any model size).
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


def one(side, fit, ensemble, threads):
    import embedded_comfy  # noqa: F401  (boots ComfyUI, loads the pack)
    import numpy as np
    import torch
    from PIL import Image

    import comfy.model_management as mm
    import comfy.sample
    import comfy.samplers
    import stand_in_files
    from idportrait.guidance import rb_guidance as RG
    from idportrait.guidance.run_state import Trace
    from idportrait.stand_ins import models as tm
    from rb_guidance_bench import _RssPeak

    dev = mm.get_torch_device()
    if dev.type == "cpu":
        torch.set_num_threads(threads)
    with torch.inference_mode():
        model, vae = tm.tiny_model("sd15", 0), tm.tiny_vae("sd15")
    ctx = tm.TEXT_WIDTH
    g = torch.Generator().manual_seed(0)
    pos = [[torch.randn(1, 77, ctx, generator=g), {}]]
    neg = [[torch.randn(1, 77, ctx, generator=g), {}]]
    photo = Image.fromarray(stand_in_files.face_photo()).resize((side, side), Image.BICUBIC)
    ref = torch.from_numpy(np.asarray(photo, dtype=np.float32) / 255.0)[None]
    lat = torch.zeros(1, 4, 8, 8)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", 4)
    mm.load_models_gpu([model])
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rss = _RssPeak()
    wall0, cpu0 = time.perf_counter(), time.process_time()
    with torch.inference_mode(), rss, Trace() as t:
        ident = RG.RBIdentity(ref, region_box=(0.2, 0.2, 0.8, 0.8))
        guider = RG.RBGuider(model, [ident], vae, RG.RBSettings(p=8.5, u=1.0, ensemble=ensemble))
        if not fit:
            guider.reference_size = 10 ** 9   # the behaviour before the working-size fit
        guider.set_conds(pos, neg)
        guider.set_cfg(5.0)
        guider.prepare_references()
        prep_wall = time.perf_counter() - wall0
        guider.sample(comfy.sample.prepare_noise(lat, 0), lat, comfy.samplers.sampler_object("euler"), sigmas,
                      disable_pbar=True, seed=0)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    peak = torch.cuda.max_memory_allocated() if dev.type == "cuda" else rss.peak
    return {"side": side, "fit": fit, "ensemble": ensemble, "vae_input": list(t.of("rb.reference_encoded")[0]["shape"]),
            "prepare_wall_s": prep_wall, "total_wall_s": wall, "total_cpu_s": cpu, "peak_mem_bytes": peak,
            "peak_mem_kind": "cuda_max_allocated" if dev.type == "cuda" else "cpu_rss_growth",
            "reference_draws": t.count("rb.reference_draw")}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="256,512,1024,2048,4096")
    ap.add_argument("--old-sizes", default="256,512,1024", help="sizes also run without the fit ('' for none)")
    ap.add_argument("--ensemble", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3, help="fresh processes per configuration (medians reported)")
    ap.add_argument("--out")
    ap.add_argument("--one", nargs=2, metavar=("SIDE", "FIT"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print("RESULT " + json.dumps(one(int(a.one[0]), a.one[1] == "1", a.ensemble, a.threads)), flush=True)
        return
    import torch
    cuda = torch.cuda.is_available()
    runs = [(int(s), True) for s in a.sizes.split(",") if s] + [(int(s), False) for s in a.old_sizes.split(",") if s]
    results = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "ensemble": a.ensemble,
               "threads": None if cuda else a.threads, "output": "64x64, 4 steps, guided from the first",
               "note": ("fit=true: the photo is cropped around the detected face and resized to at most the model's "
                        "working size (SD1.5: 512) before the VAE; fit=false: the whole photo, as before. Times are "
                        "preparation (detection, crop, VAE) plus sampling, which includes the reference pass"),
               "runs": []}
    samples = {r: [] for r in runs}
    for _ in range(a.repeats):   # interleaved, so machine noise hits every size alike
        for side, fit in runs:
            cmd = [sys.executable, os.path.abspath(__file__), "--one", str(side), "1" if fit else "0",
                   "--ensemble", str(a.ensemble), "--threads", str(a.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            samples[(side, fit)].append(json.loads(next(line[7:] for line in out.splitlines()
                                                        if line.startswith("RESULT "))))
    for key in runs:
        rec = dict(samples[key][0])
        for k in ("prepare_wall_s", "total_wall_s", "total_cpu_s", "peak_mem_bytes"):
            rec[k] = statistics.median(r[k] for r in samples[key])
        rec["repeats"] = a.repeats
        results["runs"].append(rec)
        print(json.dumps(rec), flush=True)
    out = a.out or os.path.join(HERE, "results", f"rb_reference_{'gpu' if cuda else 'cpu'}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()

"""Training throughput and peak memory of the Omni-ID trainer's stages (tiny models on CPU; full size on a GPU).

  python bench/train_bench.py [--full | --geometry dry] [--steps N] [--threads 1] [--out bench/results/train_<device>.json]

Per stage: the trainer's own modules (engine.build_stage: trunk + encoder + MTD decoder, or + the frozen
ComfyUI base with the identity projections) and one AdamW step per batch; the data pipeline and the VAE
are left out (synthetic batches, target latents pre-cached as with ``base.cache_latents``).
Reported: identities/s and target images/s (steady state, after warm-up steps), and peak memory of the
stage: CUDA ``max_memory_allocated`` on a GPU; on a CPU the peak resident set size above the level
before the stage was built (sampled every 5 ms).

--full uses the paper's sizes with random weights: a CLIP-H-sized ViT trunk (32 layers, width 1280, 224 px),
the Omni-ID encoder (256 x 1280), the MTD decoder (6 CA + 2 SA, width 1024) at 448 px, and for stage 2 a
FLUX.1-dev-sized DiT (19 + 38 blocks, 3072 wide, bf16) at 512 px with random T5-sized conditioning
(needs a GPU with ~60 GB; not run on CPU). The flow stage's step is also compared with one plain no-grad FLUX call
over the same targets (``ratio_to_plain_forward``). ``--geometry dry`` runs that code path at tiny widths (FLUX's
layout at 2 + 4 blocks) on any device: the GPU script's CPU dry run.
"""
import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import embedded_comfy  # noqa: E402,F401  (boots ComfyUI and loads the pack as `idportrait`)

import psutil  # noqa: E402
import torch  # noqa: E402

import comfy.model_management as mm  # noqa: E402
from idportrait.omni_encoder.train import synthetic as S  # noqa: E402
from idportrait.omni_encoder.train.data import collate_identities  # noqa: E402
from idportrait.omni_encoder.train.engine import build_loader, build_stage, param_groups  # noqa: E402
from idportrait.omni_encoder.train.data import load_records  # noqa: E402


class PeakRSS:
    def __init__(self):
        self.proc, self.peak, self.base, self._stop = psutil.Process(), 0, 0, False

    def __enter__(self):
        self.base = self.peak = self.proc.memory_info().rss
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()
        return self

    def _run(self):
        while not self._stop:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc):
        self._stop = True
        self.t.join()


def measure(cfg, steps, device, batch_fn=None, stage_fn=None):
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    with PeakRSS() as rss:
        torch.manual_seed(0)
        stage = stage_fn() if stage_fn else build_stage(cfg, device)
        module = stage.module.to(device)
        opt = torch.optim.AdamW(param_groups(module, stage.trunk, cfg), lr=cfg.optim.lr)
        batch = batch_fn(stage) if batch_fn else _batch(cfg)
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        amp = torch.autocast(device.type, dtype=torch.bfloat16) if cfg.engine.mixed_precision == "bf16" else None
        times = []
        for i in range(steps + 2):
            t0 = time.perf_counter()
            if amp is not None:
                with amp:
                    loss = module(batch)["loss"]
            else:
                loss = module(batch)["loss"]
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()
            if i >= 2:
                times.append(time.perf_counter() - t0)
    step = statistics.median(times)
    b, r = batch["targets"].shape[:2]
    peak = torch.cuda.max_memory_allocated() if cuda else rss.peak - rss.base
    return {"stage": cfg.stage, "family": cfg.base.family if cfg.stage != "mtd" else None,
            "encoder": cfg.encoder_config.encoder_type, "trunk_trainable": cfg.trunk.trainable,
            "identities_per_step": b, "targets_per_identity": r, "resolution": cfg.target_resolution,
            "step_s": step, "identities_per_s": b / step, "target_images_per_s": b * r / step,
            "peak_memory_bytes": int(peak), "peak_memory": "cuda max_memory_allocated" if cuda else "RSS above baseline",
            "final_loss": float(loss)}


_DS = {}


def _batch(cfg):
    if cfg.data.root not in _DS:
        ds, _, _ = build_loader(cfg, load_records(cfg.data))
        _DS[cfg.data.root] = ds
    ds = _DS[cfg.data.root]
    return collate_identities([ds[(0, i)] for i in range(cfg.optim.batch_size)])


def tiny_runs(steps, root, out):
    runs = []
    specs = [("mtd", "flux", {}, {"trainable": True}), ("flow", "flux", {}, {"trainable": True}),
             ("flow", "sd15", {}, {"trainable": True}),
             ("adapter", "flux", {"encoder_type": "clip"}, {"trainable": False})]
    for stage, fam, enc, trunk in specs:
        cfg = S.tiny_config(stage, root, out, family=fam, encoder=dict(S.TINY_ENCODER, **enc), trunk=trunk,
                            optim={"batch_size": 2}, data={"num_inputs": [3, 3]})
        runs.append(measure(cfg, steps, mm.get_torch_device()))
        print(json.dumps(runs[-1]))
    return runs


SIZES = {   # --full: the paper's; dry: the same code path at tiny widths (the GPU script's CPU dry run)
    "full": {"trunk": {"width": 1280, "layers": 32, "heads": 16}, "trunk_px": 224, "encoder": {}, "mtd_res": 448,
             "mtd": {"dim": 1024, "heads": 16}, "mtd_batch": 4, "flow_res": 512, "dataset_px": 512},
    "dry": {"trunk": {"width": 64, "layers": 2, "heads": 2}, "trunk_px": S.TINY_TRUNK_SIZE, "encoder": S.TINY_ENCODER,
            "mtd_res": 56, "mtd": {"dim": 32, "heads": 2}, "mtd_batch": 2, "flow_res": 64, "dataset_px": 64,
            "flux_depth": (2, 4)},
}


def plain_forward_s(patcher, batch, res, ctx_dim, vec_dim, steps, dev):
    """Seconds of one plain (no-grad) FLUX call over the same batch of targets: the sampling cost a training step
    is compared with."""
    dtype = patcher.model.get_dtype()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(batch, 16, res // 8, res // 8, generator=g).to(dev, dtype)
    ctx = torch.randn(batch, 256, ctx_dim, generator=g).to(dev, dtype)
    y = torch.randn(batch, vec_dim, generator=g).to(dev, dtype)
    sigma = torch.full((batch,), 0.5, device=dev)
    guidance = torch.full((batch,), 3.5, device=dev)
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        with torch.no_grad():
            patcher.model.apply_model(x, sigma, c_crossattn=ctx, y=y, guidance=guidance)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def full_runs(steps, root, out, geometry="full"):
    """Paper-size architectures with random weights (GPU only), or their code path at tiny widths (dry)."""
    import builders
    from idportrait.omni_encoder.train import trunk as TR
    from idportrait.omni_encoder.train.engine import Stage
    from idportrait.omni_encoder.train.flow import DiffusionDecoder, FlowStage, IdentityEncoding, build_adapter
    from idportrait.omni_encoder.baselines import build_encoder
    dev = mm.get_torch_device()
    z = SIZES[geometry]
    precision = "bf16" if dev.type == "cuda" else "no"
    runs = []
    orig = TR.tiny_clip_vision
    TR.tiny_clip_vision = lambda seed=0, image_size=224, **kw: orig(seed, z["trunk_px"], **z["trunk"])
    try:
        enc = dict(z["encoder"])   # full: the paper's encoder (OmniIDConfig defaults: 256 x 1280, CLIP-H tokens)
        data = {"num_inputs": [3, 3], "input_resolution": z["trunk_px"]}
        trunk = {"trainable": True, "image_size": z["trunk_px"]}
        engine = {"mixed_precision": precision, "gradient_checkpointing": True}
        cfg = S.tiny_config("mtd", root, out, resolution=z["mtd_res"], encoder=enc, mtd=z["mtd"], trunk=trunk,
                            data=data, optim={"batch_size": z["mtd_batch"]}, engine=engine)
        runs.append(measure(cfg, steps, dev))
        print(json.dumps(runs[-1]), flush=True)
        res = z["flow_res"]
        cfg = S.tiny_config("flow", root, out, resolution=res, encoder=enc, family="flux", trunk=trunk, data=data,
                            optim={"batch_size": 1}, engine=engine)
        ctx_dim, vec_dim = builders.dims("flux", geometry)
        built = {}

        def stage_fn():
            dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
            patcher = builders.diffusion_model("flux", geometry, dtype=dtype, depth=z.get("flux_depth"))
            built["patcher"] = patcher
            trunk_m = TR.build_trunk(cfg.trunk, dev)
            encoder = build_encoder(cfg.encoder_config)
            adapter = build_adapter("flux", patcher.model.diffusion_model, encoder.output_dim)
            cond = {"cross_attn": torch.randn(1, 256, ctx_dim), "pooled": torch.randn(1, vec_dim)}
            dec = DiffusionDecoder(patcher, None, None, "flux", adapter, cfg.base, dev, res, checkpointing=True,
                                   prompt_cond=cond)
            module = FlowStage(IdentityEncoding(encoder, trunk_m), adapter, dec)
            return Stage(module, encoder, trunk_m, adapter, "flux")

        def batch_fn(stage):
            b = _batch(cfg)
            keys = [f"bench{i}" for i in range(b["targets"].shape[0] * b["targets"].shape[1])]
            b["target_keys"] = keys
            for k in keys:
                stage.module.decoder.latent_cache[k] = torch.randn(16, res // 8, res // 8)
            return b

        run = measure(cfg, steps, dev, batch_fn=batch_fn, stage_fn=stage_fn)
        n = run["identities_per_step"] * run["targets_per_identity"]
        run["plain_forward_s"] = plain_forward_s(built["patcher"], n, res, ctx_dim, vec_dim, steps, dev)
        run["ratio_to_plain_forward"] = run["step_s"] / run["plain_forward_s"]
        run["plain_forward_note"] = (f"one no-grad FLUX call over the same {n} targets at {res} px: a training step "
                                     "costs this many sampling-step model calls")
        runs.append(run)
        print(json.dumps(runs[-1]), flush=True)
    finally:
        TR.tiny_clip_vision = orig
    return runs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--full", action="store_true", help="same as --geometry full (needs a GPU)")
    ap.add_argument("--geometry", choices=("tiny", "dry", "full"), default="tiny",
                    help="dry: the --full code path at tiny widths, on any device")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--out", default=None)
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU intra-op threads (default 1: on a shared machine several OpenMP threads per process "
                         "spin-wait and make tiny-model timings meaningless)")
    args = ap.parse_args()
    geometry = "full" if args.full else args.geometry
    args.full = geometry == "full"
    dev = mm.get_torch_device()
    if dev.type == "cpu" and args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.full and dev.type != "cuda":
        raise SystemExit("--full needs a GPU")
    with tempfile.TemporaryDirectory() as tmp:
        root = os.path.join(tmp, "ds")
        S.make_identity_dataset(root, identities=4, images=8, size=SIZES["full"]["dataset_px"] if args.full else 64)
        if geometry == "tiny":
            runs = tiny_runs(args.steps, root, os.path.join(tmp, "run"))
        else:
            runs = full_runs(args.steps, root, os.path.join(tmp, "run"), geometry)
    res = {"device": str(torch.cuda.get_device_name(0) if dev.type == "cuda" else dev), "geometry": geometry,
           "full_size": args.full, "torch": torch.__version__, "threads": torch.get_num_threads(),
           "cpu_count": os.cpu_count(), "load_average": os.getloadavg(), "python": platform.python_version(),
           "note": "shared machine: timings vary with load; compare runs on the same machine only", "runs": runs}
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"train_{'gpu' if dev.type == 'cuda' else 'cpu'}{'_full' if args.full else ''}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(res, f, indent=2)
    print(out)


if __name__ == "__main__":
    main()

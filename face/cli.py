"""Identity metrics over folders of generated images: the papers' evaluation protocol as a command.

    python -m face.cli evaluate --generated out/ours --generated out/baseline --references refs/ \\
        --insightface-root ComfyUI/models --pack antelopev2 --clip clip-vit-large-patch14/ \\
        --prompts omniportrait --subject woman --out results.json --plot results.png
    python -m face.cli prompts --subject man          # the 30 OmniPortrait evaluation prompts

Run from the repository root (the folder holding face/). Folder layout:

* one identity: ``--references DIR`` holds that person's photos; ``--generated DIR`` the images.
* several identities: ``--references DIR`` holds one subfolder per identity and every ``--generated DIR``
  the subfolders of the same names.
* ``--generated`` may be given several times (one per method); the methods are then also ranked by
  Infinite-ID's z-score combination of ID similarity and CLIP-I.
* ``--target PATH``: a ground-truth image (or folder, same subfolder rule) for Sim_Target, Paste and
  pose error.
* prompts (CLIP-T): ``--prompts omniportrait`` (OmniPortrait Table 3, 30 prompts, "woman/man" replaced by
  ``--subject``) or a text file with one prompt per line. A generated file whose name starts with a
  number (``007_seed1.png``) gets prompt number 007; otherwise files in name order get consecutive
  prompts, ``--images-per-prompt`` each.

ArcFace metrics need a user-supplied insightface pack (never downloaded); CLIP metrics need a local
Hugging Face CLIP folder (config.json, weights, tokenizer files), loaded with transformers offline.
Without them those metrics are skipped and the JSON says why.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from typing import Optional, Sequence

import numpy as np
import torch

from . import detect, evaluate
from .types import FaceError, uint8_to_image

log = logging.getLogger("face.cli")

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

# OmniPortrait Table 3 (5 prompts per category), verbatim with "woman/man" -> {subject}.
OMNIPORTRAIT_PROMPTS: dict[str, list[str]] = {
    "Pose": [
        "A {subject} posing like a tourist in front of the Eiffel Tower",
        "A {subject} performing a yoga tree pose",
        "A {subject} sitting cross-legged on the floor, smiling",
        "A {subject} jumping in the air with joy",
        "A {subject} looking back over their shoulder",
    ],
    "Clothing": [
        "A {subject} wearing a police uniform",
        "A {subject} wearing a formal business suit",
        "A {subject} wearing a traditional kimono",
        "A {subject} in a superhero costume, crying disappointedly",
        "A {subject} wearing a chef\u2019s white uniform",
    ],
    "Background": [
        "A {subject} on the beach",
        "A {subject} standing in a snowy forest, looking very angry",
        "A {subject} floating in outer space",
        "A {subject} standing in a crowded city street",
        "A {subject} inside an ancient library",
    ],
    "Action": [
        "A {subject} holding a piece of cake",
        "A {subject} playing an acoustic guitar",
        "A {subject} riding a bicycle, with sweat on face.",
        "A {subject} drinking a cup of coffee",
        "A {subject} taking a selfie with a phone",
    ],
    "Lighting": [
        "A {subject} wearing a Christmas hat in a bright scene",
        "A {subject} wearing glasses illuminated by cinematic neon lights",
        "A {subject} standing in the golden hour sunlight",
        "A {subject} in a dark room with dramatic shadows",
        "A {subject} under the moonlight",
    ],
    "Style": [
        "A painting of a {subject} in the style of Vincent Van Gogh",
        "An oil painting of a {subject}",
        "A pencil sketch of a {subject}",
        "A 3D render of a {subject} in Pixar style",
        "A pop art style portrait of a {subject}",
    ],
}


def omniportrait_prompts(subject: str = "woman", category: Optional[str] = None) -> list[str]:
    """The 30 evaluation prompts (or one category's 5) with the subject filled in."""
    cats = [category] if category else list(OMNIPORTRAIT_PROMPTS)
    for c in cats:
        if c not in OMNIPORTRAIT_PROMPTS:
            raise FaceError(f"unknown category {c!r}; one of {list(OMNIPORTRAIT_PROMPTS)}")
    return [p.format(subject=subject) for c in cats for p in OMNIPORTRAIT_PROMPTS[c]]


# ------------------------------------------------------------------------------------------ files

def list_images(path: str) -> list[str]:
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} does not exist")
    return sorted(os.path.join(path, f) for f in os.listdir(path) if f.lower().endswith(IMAGE_EXTS))


def load_image(path: str) -> torch.Tensor:
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        return uint8_to_image(np.asarray(ImageOps.exif_transpose(im).convert("RGB")))


def identities(references: str, generated: Sequence[str], target: Optional[str]) -> dict[str, dict]:
    """{identity: {"references": dir, "generated": [dir per method], "target": path|None}}."""
    subdirs = sorted(d for d in os.listdir(references) if os.path.isdir(os.path.join(references, d)))
    if list_images(references) or not subdirs:
        return {os.path.basename(os.path.normpath(references)) or "identity":
                {"references": references, "generated": list(generated), "target": target}}
    out = {}
    for d in subdirs:
        gens = [os.path.join(g, d) for g in generated]
        missing = [g for g in gens if not os.path.isdir(g)]
        if missing:
            raise FileNotFoundError(f"identity {d!r} has references but no generated folder {missing[0]}")
        t = None
        if target:
            t = os.path.join(target, d) if os.path.isdir(os.path.join(target, d)) else target
        out[d] = {"references": os.path.join(references, d), "generated": gens, "target": t}
    return out


_NUMBERED = re.compile(r"^(\d+)(?=[_\-. ]|$)")


def prompts_for_files(files: Sequence[str], prompts: Sequence[str], images_per_prompt: Optional[int]) -> list[str]:
    """Prompt of each generated file: by leading number in its name, else consecutive groups in name order."""
    names = [os.path.basename(f) for f in files]
    nums = [_NUMBERED.match(n) for n in names]
    if all(nums):
        idx = [int(m.group(1)) for m in nums]
        bad = [n for n, i in zip(names, idx) if i >= len(prompts)]
        if bad:
            raise FaceError(f"{bad[0]}: prompt number out of range (have {len(prompts)} prompts)")
        return [prompts[i] for i in idx]
    k = images_per_prompt or (len(files) // len(prompts) if len(files) % len(prompts) == 0 else 0)
    if not k or len(files) != k * len(prompts):
        raise FaceError(f"cannot pair {len(files)} images with {len(prompts)} prompts: name the files "
                         f"'<prompt number>_...png' or give --images-per-prompt so images = prompts x k")
    return [prompts[i // k] for i in range(len(files))]


def read_prompts(spec: Optional[str], subject: str) -> Optional[list[str]]:
    if not spec:
        return None
    if spec == "omniportrait":
        return omniportrait_prompts(subject)
    with open(spec, encoding="utf-8") as f:
        return [ln.strip() for ln in f if ln.strip()]


def subject_of(spec: str, identity: str) -> str:
    """--subject 'woman' or 'alice=woman,bob=man' (identities not listed default to 'person')."""
    if "=" not in spec:
        return spec
    pairs = dict(p.split("=", 1) for p in spec.split(",") if "=" in p)
    return pairs.get(identity, "person")


# ------------------------------------------------------------------------------------------ CLIP (transformers)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class HFClip:
    """A local Hugging Face CLIP folder (CLIPModel + tokenizer), offline; image and text embeddings."""

    def __init__(self, path: str, device: str = "cpu"):
        try:
            from transformers import AutoTokenizer, CLIPModel
        except ImportError as e:
            raise SystemExit(f"--clip needs the transformers package ({e})")
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise SystemExit(f"--clip {path}: expected a Hugging Face CLIP folder with config.json, the weights and "
                             f"tokenizer files (e.g. a local copy of openai/clip-vit-large-patch14)")
        self.model = CLIPModel.from_pretrained(path, local_files_only=True).eval().to(device)
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.device = device
        self.size = int(self.model.config.vision_config.image_size)
        self.name = f"transformers CLIP {os.path.basename(os.path.normpath(path))}"

    @staticmethod
    def _features(out) -> torch.Tensor:
        # transformers 4.x returns the projected tensor, 5.x an output whose pooler_output is projected
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """IMAGE [N,H,W,3] -> normalised [N,3,S,S]: shortest side to S (bicubic), centre crop (CLIP's own)."""
        import torch.nn.functional as F

        x = images[..., :3].permute(0, 3, 1, 2).float()
        h, w = x.shape[-2:]
        s = self.size / min(h, w)
        nh, nw = max(self.size, round(h * s)), max(self.size, round(w * s))
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        top, left = (nh - self.size) // 2, (nw - self.size) // 2
        x = x[..., top:top + self.size, left:left + self.size]
        mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
        return (x - mean) / std

    @torch.no_grad()
    def image(self, images: torch.Tensor) -> torch.Tensor:
        px = self.preprocess(images).to(self.device)
        return self._features(self.model.get_image_features(pixel_values=px)).float().cpu()

    @torch.no_grad()
    def text(self, prompts: list[str]) -> torch.Tensor:
        tok = self.tokenizer(list(prompts), padding="max_length", truncation=True,
                             max_length=self.model.config.text_config.max_position_embeddings, return_tensors="pt")
        tok = {k: v.to(self.device) for k, v in tok.items() if k in ("input_ids", "attention_mask")}
        return self._features(self.model.get_text_features(**tok)).float().cpu()


# ------------------------------------------------------------------------------------------ evaluate

def build_embedders(args) -> evaluate.Embedders:
    from . import insightface_loader as ifl

    pack = None
    if args.insightface_root:
        pack = ifl.load_insightface(args.insightface_root, args.pack, provider=args.provider,
                                    det_size=args.det_size)
    use_if = args.detector == "insightface" or (args.detector == "auto" and pack is not None)
    if use_if and pack is None:
        raise SystemExit("--detector insightface needs --insightface-root")
    detector = detect.InsightFaceDetector(pack) if use_if else detect.RetinaFaceDetector(
        providers=ifl.resolve_providers(args.provider))
    id_embed = None
    if pack is not None and pack.model("recognition") is not None:
        id_embed = lambda crops: ifl.arcface_embeddings(pack, crops)  # noqa: E731
    clip = HFClip(args.clip, args.device) if args.clip else None
    return evaluate.Embedders(
        detector=detector, id_embed=id_embed,
        clip_image=clip.image if clip else None, clip_text=clip.text if clip else None,
        id_model=(f"insightface {pack.name} ({pack.task_files.get('recognition', '?')})" if id_embed else ""),
        clip_model=clip.name if clip else "")


def _aggregate(per_identity: dict[str, dict]) -> tuple[dict, dict]:
    """Mean over identities of each identity's mean, and the std across identities (Omni-ID Table I)."""
    keys = list(dict.fromkeys(k for r in per_identity.values() for k in r["mean"]))
    mean, std = {}, {}
    for k in keys:
        v = np.array([r["mean"][k] for r in per_identity.values() if r["mean"].get(k) is not None], float)
        mean[k] = float(v.mean()) if v.size else None
        std[k] = float(v.std()) if v.size else None
    return mean, std


def run_evaluate(args) -> dict:
    emb = build_embedders(args)
    ids = identities(args.references, args.generated, args.target)
    methods = [os.path.basename(os.path.normpath(g)) or g for g in args.generated]
    if len(set(methods)) != len(methods):
        methods = [f"{i}:{m}" for i, m in enumerate(methods)]
    out = {"protocol": {
        "generated": list(args.generated), "references": args.references, "target": args.target,
        "prompts": args.prompts, "subject": args.subject, "missing_face": args.missing_face,
        "detector": type(emb.detector).__name__, "id_model": emb.id_model, "clip_model": emb.clip_model,
        "face_selection": "largest face per image",
        "definitions": evaluate.DEFINITIONS},
        "methods": {}}
    for mi, method in enumerate(methods):
        per_id = {}
        for ident, spec in ids.items():
            gen_files = list_images(spec["generated"][mi])
            ref_files = list_images(spec["references"])
            if not gen_files or not ref_files:
                raise SystemExit(f"identity {ident!r}: no images in {spec['generated'][mi] if not gen_files else spec['references']}")
            tgt_files = list_images(spec["target"]) if spec["target"] else []
            prompts = read_prompts(args.prompts, subject_of(args.subject, ident))
            file_prompts = prompts_for_files(gen_files, prompts, args.images_per_prompt) if prompts else None
            print(f"[{method}] {ident}: {len(gen_files)} generated, {len(ref_files)} references", file=sys.stderr)
            res = evaluate.evaluate([load_image(f) for f in gen_files], [load_image(f) for f in ref_files], emb,
                                    target=[load_image(f) for f in tgt_files] or None, prompts=file_prompts,
                                    missing_face=args.missing_face)
            for rec, f in zip(res["per_image"], gen_files):
                rec["file"] = os.path.relpath(f, spec["generated"][mi])
            res["reference_files"] = [os.path.basename(f) for f in ref_files]
            per_id[ident] = res
        mean, std = _aggregate(per_id)
        out["methods"][method] = {"identities": per_id, "mean": mean, "std_across_identities": std}
    flat = {m: {"mean": r["mean"]} for m, r in out["methods"].items()}
    out["zscore_id_clip"] = evaluate.combine_methods(flat)
    return out


def plot_groups(result: dict) -> tuple[dict, str]:
    """What the plot shows: methods (if several), else identities (if several), else images."""
    methods = result["methods"]
    if len(methods) > 1:
        groups = {m: dict(r["mean"]) for m, r in methods.items()}
        for m, z in result["zscore_id_clip"].items():
            groups[m]["zscore_id_clip"] = z
        return groups, "mean per method"
    (m, r), = methods.items()
    if len(r["identities"]) > 1:
        return {i: v["mean"] for i, v in r["identities"].items()}, f"{m}: mean per identity"
    (ident, res), = r["identities"].items()
    return ({rec.get("file", f"#{rec['index']}"): {k: rec.get(k) for k in res["metrics"]}
             for rec in res["per_image"]}, f"{m} / {ident}: per image")


def save_plot(result: dict, path: str) -> None:
    from PIL import Image

    groups, title = plot_groups(result)
    img = evaluate.chart(groups, title=title, width=max(768, 90 * len(groups)))
    Image.fromarray((img[0].numpy() * 255 + 0.5).astype(np.uint8)).save(path)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m face.cli", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Metrics: " + "; ".join(f"{k}: {v}" for k, v in evaluate.DEFINITIONS.items()))
    sub = ap.add_subparsers(dest="command", required=True)

    pp = sub.add_parser("prompts", help="print the OmniPortrait Table 3 evaluation prompts, one per line")
    pp.add_argument("--subject", default="person", help="replaces 'woman/man' (default: person)")
    pp.add_argument("--category", choices=list(OMNIPORTRAIT_PROMPTS), help="only this category's 5 prompts")
    pp.add_argument("--numbered", action="store_true", help="prefix each line with its 3-digit prompt number")

    ev = sub.add_parser("evaluate", help="score generated images against references (writes JSON + a plot)",
                        formatter_class=argparse.RawDescriptionHelpFormatter, description=__doc__)
    ev.add_argument("--generated", action="append", required=True,
                    help="folder of generated images (repeat for several methods)")
    ev.add_argument("--references", required=True, help="folder of reference photos (or one subfolder per identity)")
    ev.add_argument("--target", help="ground-truth image or folder: Sim_Target, Paste and pose error")
    ev.add_argument("--insightface-root", help="ComfyUI's models folder (or models/insightface) holding "
                                               "insightface/models/<pack>; enables the ArcFace metrics")
    ev.add_argument("--pack", default="antelopev2", help="insightface pack name (antelopev2, buffalo_l)")
    ev.add_argument("--provider", default="CPU", help="onnxruntime provider: CPU, CUDA, ...")
    ev.add_argument("--det-size", type=int, default=640, help="insightface detector size")
    ev.add_argument("--detector", choices=["auto", "retinaface", "insightface"], default="auto",
                    help="face detector: the pack's (auto when a pack is given) or the offline RetinaFace "
                         "(OmniPortrait's protocol detects with RetinaFace)")
    ev.add_argument("--clip", help="local Hugging Face CLIP folder: enables CLIP-I and CLIP-T")
    ev.add_argument("--device", default="cpu", help="torch device for CLIP (cpu, cuda)")
    ev.add_argument("--prompts", help="'omniportrait' (Table 3, 30 prompts) or a text file, one prompt per line")
    ev.add_argument("--subject", default="person",
                    help="fills 'woman/man' in the built-in prompts: a word, or id1=woman,id2=man per identity")
    ev.add_argument("--images-per-prompt", type=int, help="consecutive images per prompt (unnumbered files)")
    ev.add_argument("--missing-face", choices=["exclude", "zero"], default="exclude",
                    help="generated images without a face: left out of means (default) or scored 0")
    ev.add_argument("--out", default="face_metrics.json", help="JSON output path")
    ev.add_argument("--plot", default=None, help="bar chart PNG path (default: next to --out)")
    ev.add_argument("-v", "--verbose", action="store_true")

    args = ap.parse_args(argv)
    if args.command == "prompts":
        for i, p in enumerate(omniportrait_prompts(args.subject, args.category)):
            print(f"{i:03d} {p}" if args.numbered else p)
        return 0
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    result = run_evaluate(args)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1, ensure_ascii=False)
    plot = args.plot or os.path.splitext(args.out)[0] + ".png"
    save_plot(result, plot)
    for m, r in result["methods"].items():
        shown = ", ".join(f"{k} {v:.4f}" for k, v in r["mean"].items() if v is not None)
        print(f"{m}: {shown or 'no metric computed'}")
    print(f"wrote {args.out} and {plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

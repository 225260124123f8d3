"""Writes example_workflows/*.json (ComfyUI UI format) from the graph descriptions below.

  python scripts/build_examples.py            (needs the embedded ComfyUI: COMFY_ROOT or ~/.cache/idportrait-comfy)

Each workflow uses ComfyUI's real loader nodes and the file names users have, a Note on what to download
and where, and per-loader ``properties.idportrait_stand_in`` entries that CI (tests/test_example_workflows.py)
uses to swap in the tiny stand-in models. ``properties.idportrait_stand_in_file`` asks the test to write a
tiny weight file in the real format under that loader's file name.
"""
from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(HERE, "example_workflows")

CLIP_H = "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"
CLIP_H_URL = "https://huggingface.co/h94/IP-Adapter/resolve/main/models/image_encoder/model.safetensors"
CI_SIZE = {"width": 128, "height": 128}


def tiny(family, slot=None, **extra):
    st = {"class_type": "IDP_TinyModels", "inputs": {"family": family, "weights_seed": 0}}
    if slot is not None:
        st["outputs"] = [slot]
    return {"idportrait_stand_in": st, **extra}


def small(**override):
    return {"idportrait_stand_in": {"inputs_override": override}}


def checkpoint(family, name, url):
    return {"type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": name},
            "properties": {**tiny(family), "models": [{"name": name, "url": url, "directory": "checkpoints"}]}}


def sd15_checkpoint():
    return checkpoint("sd15", "v1-5-pruned-emaonly.safetensors",
                      "https://huggingface.co/Comfy-Org/stable-diffusion-v1-5-archive")


def flux_loaders(g):
    g["unet"] = {"type": "UNETLoader", "inputs": {"unet_name": "flux1-dev.safetensors", "weight_dtype": "default"},
                 "properties": tiny("flux", 0)}
    g["clip"] = {"type": "DualCLIPLoader", "inputs": {"clip_name1": "clip_l.safetensors",
                                                      "clip_name2": "t5xxl_fp16.safetensors", "type": "flux"},
                 "properties": tiny("flux", 1)}
    g["vae"] = {"type": "VAELoader", "inputs": {"vae_name": "ae.safetensors"}, "properties": tiny("flux", 2)}
    return ("unet", 0), ("clip", 0), ("vae", 0)


def omni_loaders(g, family, omni_file=None):
    """CLIP vision (ViT-H) and Omni-ID loaders, added once per graph."""
    if "cv" not in g:
        g["cv"] = {"type": "CLIPVisionLoader", "inputs": {"clip_name": CLIP_H},
                   "properties": {"idportrait_stand_in": {"class_type": "IDP_TinyClipVision", "inputs": {"weights_seed": 0}},
                                  "models": [{"name": CLIP_H, "url": CLIP_H_URL, "directory": "clip_vision"}]}}
    if "omni" not in g:
        g["omni"] = {"type": "IDP_OmniIDLoader", "inputs": {"omni_id_file": omni_file or f"omni_id_{family}.safetensors"},
                     "properties": {"idportrait_stand_in_file": {"folder": "omni_id", "family": family}}}


def omni_id_block(g, family, model, faces=("faces", 0), key="", weight=1.0, mask=None, omni_file=None):
    omni_loaders(g, family, omni_file)
    g["enc" + key] = {"type": "IDP_OmniIDEncode", "inputs": {"omni_id_model": ("omni", 0), "clip_vision": ("cv", 0),
                                                              "faces": faces, "crop": "center"}}
    inputs = {"model": model, "omni_id_model": ("omni", 0), "identity": ("enc" + key, 0), "weight": weight,
              "start_at": 0.0, "end_at": 1.0, "apply_to": "cond"}
    if mask is not None:
        inputs["attn_mask"] = mask
    g["apply" + key] = {"type": "IDP_OmniIDApply", "inputs": inputs}
    return ("apply" + key, 0)


def load_faces(g, key="faces", image="face.png"):
    g[key] = {"type": "LoadImage", "inputs": {"image": image},
              "properties": {"idportrait_stand_in_image": image}}
    return (key, 0)


def detect_align(g, key, image):
    """Offline face detector + Detect & Align (224 px crops for CLIP) of ``image``; returns the crops output."""
    if "det" not in g:
        g["det"] = {"type": "IDP_FaceDetectorLoader", "inputs": {"score_threshold": 0.8, "max_size": 1280,
                                                                 "provider": "CPU"}}
    g[key] = {"type": "IDP_FaceDetectAlign", "inputs": {"face_analysis": ("det", 0), "image": image, "crop_size": "224",
                                                        "padding": 0.0, "order": "largest", "face_index": 0,
                                                        "min_face_size": 0, "skip_images_without_face": False}}
    return (key, 0)


def sample_and_save(g, model, pos, neg, vae, family, steps=20, cfg=7.0, size=1024, prefix="idportrait"):
    empty = "EmptySD3LatentImage" if family == "flux" else "EmptyLatentImage"
    g["latent"] = {"type": empty, "inputs": {"width": size, "height": size, "batch_size": 1},
                   "properties": small(**CI_SIZE)}
    g["sampler"] = {"type": "KSampler", "inputs": {"model": model, "positive": pos, "negative": neg,
                                                   "latent_image": ("latent", 0), "seed": 42, "steps": steps, "cfg": cfg,
                                                   "sampler_name": "euler", "scheduler": "simple" if family == "flux" else "normal",
                                                   "denoise": 1.0},
                    "properties": small(steps=2)}
    g["decode"] = {"type": "VAEDecode", "inputs": {"samples": ("sampler", 0), "vae": vae}}
    g["save"] = {"type": "SaveImage", "inputs": {"images": ("decode", 0), "filename_prefix": prefix}}


def note(text):
    return {"type": "Note", "text": text, "pos": [40, 700]}


OMNI_NOTE = ("Omni-ID has no official weights: train them with this pack's trainer (README, 'Training Omni-ID') and put "
             "the .safetensors in models/omni_id. CLIP vision: {clip} in models/clip_vision (the ViT-H/14 file "
             "IP-Adapter uses). Feed aligned face crops of ONE person (any number) to 'Omni-ID Encode Faces'.")


def wf_flux_omni_id():
    g = {"note": note("FLUX + Omni-ID.\n\nModels: flux1-dev.safetensors in models/unet (or diffusion_models), clip_l and "
                      "t5xxl_fp16 in models/clip, ae.safetensors in models/vae.\n" + OMNI_NOTE.format(clip=CLIP_H))}
    model, clip, vae = flux_loaders(g)
    faces = load_faces(g)
    applied = omni_id_block(g, "flux", model, faces)
    g["pos"] = {"type": "CLIPTextEncode", "inputs": {"clip": clip, "text": "portrait photo of a person, golden hour"}}
    g["guid"] = {"type": "FluxGuidance", "inputs": {"conditioning": ("pos", 0), "guidance": 3.5}}
    g["neg"] = {"type": "CLIPTextEncode", "inputs": {"clip": clip, "text": ""}}
    sample_and_save(g, applied, ("guid", 0), ("neg", 0), vae, "flux", cfg=1.0, prefix="flux_omni_id")
    return g


def wf_sdxl_omni_id():
    g = {"note": note("SDXL + Omni-ID.\n\nModels: sd_xl_base_1.0.safetensors in models/checkpoints.\n" + OMNI_NOTE.format(clip=CLIP_H))}
    g["ckpt"] = checkpoint("sdxl", "sd_xl_base_1.0.safetensors",
                           "https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0")
    faces = load_faces(g)
    applied = omni_id_block(g, "sdxl", ("ckpt", 0), faces)
    g["pos"] = {"type": "CLIPTextEncode", "inputs": {"clip": ("ckpt", 1), "text": "portrait photo of a person, studio light"}}
    g["neg"] = {"type": "CLIPTextEncode", "inputs": {"clip": ("ckpt", 1), "text": "blurry, lowres"}}
    sample_and_save(g, applied, ("pos", 0), ("neg", 0), ("ckpt", 2), "sdxl", cfg=5.0, prefix="sdxl_omni_id")
    return g


IPA_PLUS_FACE_SDXL = "ip-adapter-plus-face_sdxl_vit-h.safetensors"
IPA_PLUS_FACE_SDXL_URL = ("https://huggingface.co/h94/IP-Adapter/resolve/main/sdxl_models/"
                          "ip-adapter-plus-face_sdxl_vit-h.safetensors")
XLABS_IPA = "ip_adapter.safetensors"
XLABS_IPA_URL = "https://huggingface.co/XLabs-AI/flux-ip-adapter-v2/resolve/main/ip_adapter.safetensors"
CLIP_L = "clip-vit-large-patch14.safetensors"
CLIP_L_URL = "https://huggingface.co/openai/clip-vit-large-patch14/resolve/main/model.safetensors"


def ip_adapter_block(g, kind, family, model, faces, file, url, clip, clip_url, weight=1.0):
    """A public adapter file (IP-Adapter or XLabs) → Encode → Apply, with the stand-in file CI writes in its layout."""
    g["cv"] = {"type": "CLIPVisionLoader", "inputs": {"clip_name": clip},
               "properties": {"idportrait_stand_in": {"class_type": "IDP_TinyClipVision", "inputs": {"weights_seed": 0}},
                              "models": [{"name": clip, "url": clip_url, "directory": "clip_vision"}]}}
    g["ipa"] = {"type": "IDP_IPAdapterFullFaceLoader", "inputs": {"ipadapter_file": file},
                "properties": {"idportrait_stand_in_file": {"folder": "ipadapter", "kind": kind, "family": family},
                               "models": [{"name": file, "url": url, "directory": "ipadapter"}]}}
    g["enc"] = {"type": "IDP_OmniIDEncode", "inputs": {"omni_id_model": ("ipa", 0), "clip_vision": ("cv", 0),
                                                       "faces": faces, "crop": "center", "combine_embeds": "concat"}}
    g["apply"] = {"type": "IDP_OmniIDApply", "inputs": {"model": model, "omni_id_model": ("ipa", 0),
                                                        "identity": ("enc", 0), "weight": weight, "start_at": 0.0,
                                                        "end_at": 1.0, "apply_to": "cond, negative on uncond",
                                                        "weight_type": "linear", "embeds_scaling": "V only"}}
    return ("apply", 0)


def wf_sdxl_ip_adapter_plus_face():
    g = {"note": note(
        "SDXL + the public IP-Adapter plus-face (no training needed).\n\nModels: sd_xl_base_1.0.safetensors in "
        f"models/checkpoints; {IPA_PLUS_FACE_SDXL} (h94/IP-Adapter, sdxl_models/) in models/ipadapter; its image "
        f"encoder is CLIP ViT-H/14: {CLIP_H} (h94/IP-Adapter, models/image_encoder/model.safetensors) in "
        "models/clip_vision. Any IP-Adapter file works in this loader (told by its keys): plus, full-face, basic "
        "(ViT-H or ViT-bigG), FaceID (encode from ArcFace). Feed aligned face crops of ONE person. The negative rows "
        "attend to CLIP of an all-zero image, as the original (connect negative_image to change it).")}
    g["ckpt"] = checkpoint("sdxl", "sd_xl_base_1.0.safetensors",
                           "https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0")
    faces = detect_align(g, "align", load_faces(g))
    applied = ip_adapter_block(g, "plus", "sdxl", ("ckpt", 0), faces, IPA_PLUS_FACE_SDXL, IPA_PLUS_FACE_SDXL_URL,
                               CLIP_H, CLIP_H_URL, weight=0.8)
    g["pos"] = {"type": "CLIPTextEncode", "inputs": {"clip": ("ckpt", 1), "text": "portrait photo of a person, studio light"}}
    g["neg"] = {"type": "CLIPTextEncode", "inputs": {"clip": ("ckpt", 1), "text": "blurry, lowres"}}
    sample_and_save(g, applied, ("pos", 0), ("neg", 0), ("ckpt", 2), "sdxl", steps=30, cfg=5.0,
                    prefix="sdxl_ip_adapter_plus_face")
    return g


def wf_flux_xlabs_ip_adapter():
    g = {"note": note(
        "FLUX + XLabs' public FLUX IP-Adapter (v2; no training needed).\n\nModels: as in the FLUX example "
        f"(flux1-dev in models/unet, clip_l and t5xxl_fp16 in models/clip, ae in models/vae); {XLABS_IPA} "
        f"(XLabs-AI/flux-ip-adapter-v2) in models/ipadapter or models/xlabs/ipadapters; its image encoder is "
        f"OpenAI CLIP ViT-L/14: {CLIP_L} (openai/clip-vit-large-patch14, model.safetensors) in models/clip_vision. "
        "It acts after every double block, as released. XLabs tune it with true CFG in their own sampler; with "
        "KSampler keep cfg 1 and FluxGuidance, and try weight 0.6-1.")}
    model, clip, vae = flux_loaders(g)
    applied = ip_adapter_block(g, "xlabs", "flux", model, load_faces(g), XLABS_IPA, XLABS_IPA_URL, CLIP_L, CLIP_L_URL,
                               weight=0.8)
    g["pos"] = {"type": "CLIPTextEncode", "inputs": {"clip": clip, "text": "portrait photo of a person, golden hour"}}
    g["guid"] = {"type": "FluxGuidance", "inputs": {"conditioning": ("pos", 0), "guidance": 3.5}}
    g["neg"] = {"type": "CLIPTextEncode", "inputs": {"clip": clip, "text": ""}}
    sample_and_save(g, applied, ("guid", 0), ("neg", 0), vae, "flux", cfg=1.0, prefix="flux_xlabs_ip_adapter")
    return g


def wf_sd15_omni_id_controlnet():
    g = {"note": note("SD1.5 + Omni-ID + ControlNet.\n\nModels: v1-5-pruned-emaonly.safetensors in models/checkpoints; "
                      "control_v11p_sd15_openpose.safetensors in models/controlnet; the control image is a face "
                      "keypoint image of the face in 'pose.png' (face tools), so the identity from 'face.png' takes that pose.\n" + OMNI_NOTE.format(clip=CLIP_H))}
    g["ckpt"] = sd15_checkpoint()
    applied = omni_id_block(g, "sd15", ("ckpt", 0), detect_align(g, "align", load_faces(g)))
    detect_align(g, "pose_faces", load_faces(g, "pose_photo", "pose.png"))
    g["landmark_image"] = {"type": "IDP_FaceLandmarkImage", "inputs": {"faces": ("pose_faces", 1),
                                                                       "style": "5 keypoints (InstantID)", "point_size": 0,
                                                                       "faces_to_use": "selected"}}
    g["pos"] = {"type": "CLIPTextEncode", "inputs": {"clip": ("ckpt", 1), "text": "portrait photo of a person, smiling"}}
    g["neg"] = {"type": "CLIPTextEncode", "inputs": {"clip": ("ckpt", 1), "text": "blurry, lowres"}}
    g["cn"] = {"type": "ControlNetLoader", "inputs": {"control_net_name": "control_v11p_sd15_openpose.safetensors"},
               "properties": {"idportrait_stand_in": {"class_type": "IDP_TinyControlNet",
                                                      "inputs": {"family": "sd15", "weights_seed": 0}}}}
    control = ("landmark_image", 0)
    g["cnapply"] = {"type": "ControlNetApplyAdvanced", "inputs": {"positive": ("pos", 0), "negative": ("neg", 0),
                                                                   "control_net": ("cn", 0), "image": control,
                                                                   "strength": 0.8, "start_percent": 0.0, "end_percent": 1.0}}
    sample_and_save(g, applied, ("cnapply", 0), ("cnapply", 1), ("ckpt", 2), "sd15", size=512,
                    prefix="sd15_omni_id_controlnet")
    return g


def wf_two_identities_regions():
    g = {"note": note("Two identities in two regions (SD1.5). Each 'Apply Omni-ID' gets its own mask (left/right half); "
                      "chain them. Put one face set per person.\n" + OMNI_NOTE.format(clip=CLIP_H))}
    g["ckpt"] = sd15_checkpoint()
    fa = load_faces(g, "faces_a", "face.png")
    fb = load_faces(g, "faces_b", "face_b.png")
    g["mask_full"] = {"type": "SolidMask", "inputs": {"value": 0.0, "width": 512, "height": 512}}
    g["mask_half"] = {"type": "SolidMask", "inputs": {"value": 1.0, "width": 256, "height": 512}}
    g["mask_left"] = {"type": "MaskComposite", "inputs": {"destination": ("mask_full", 0), "source": ("mask_half", 0),
                                                          "x": 0, "y": 0, "operation": "add"}}
    g["mask_right"] = {"type": "InvertMask", "inputs": {"mask": ("mask_left", 0)}}
    a = omni_id_block(g, "sd15", ("ckpt", 0), fa, key="_a", mask=("mask_left", 0))
    b = omni_id_block(g, "sd15", a, fb, key="_b", mask=("mask_right", 0))
    g["pos"] = {"type": "CLIPTextEncode", "inputs": {"clip": ("ckpt", 1), "text": "two people side by side, photo"}}
    g["neg"] = {"type": "CLIPTextEncode", "inputs": {"clip": ("ckpt", 1), "text": "blurry, lowres"}}
    sample_and_save(g, b, ("pos", 0), ("neg", 0), ("ckpt", 2), "sd15", size=512, prefix="two_identities")
    return g


def wf_identity_mixing():
    g = {"note": note("Identity mixing (SD1.5): 'Mix Identities' interpolates two encoded identities (weight_b = share of "
                      "B) or stacks their tokens.\n" + OMNI_NOTE.format(clip=CLIP_H))}
    g["ckpt"] = sd15_checkpoint()
    fa = load_faces(g, "faces_a", "face.png")
    fb = load_faces(g, "faces_b", "face_b.png")
    omni_loaders(g, "sd15")
    for k, f in (("a", fa), ("b", fb)):
        g["enc_" + k] = {"type": "IDP_OmniIDEncode", "inputs": {"omni_id_model": ("omni", 0), "clip_vision": ("cv", 0),
                                                                 "faces": f, "crop": "center"}}
    g["mix"] = {"type": "IDP_IdentityMix", "inputs": {"identity_a": ("enc_a", 0), "identity_b": ("enc_b", 0),
                                                      "mode": "interpolate", "weight_b": 0.5}}
    g["apply"] = {"type": "IDP_OmniIDApply", "inputs": {"model": ("ckpt", 0), "omni_id_model": ("omni", 0),
                                                        "identity": ("mix", 0), "weight": 1.0, "start_at": 0.0,
                                                        "end_at": 1.0, "apply_to": "cond"}}
    g["save_id"] = {"type": "IDP_IdentitySave", "inputs": {"identity": ("mix", 0), "filename_prefix": "identities/mixed"}}
    g["pos"] = {"type": "CLIPTextEncode", "inputs": {"clip": ("ckpt", 1), "text": "portrait photo of a person"}}
    g["neg"] = {"type": "CLIPTextEncode", "inputs": {"clip": ("ckpt", 1), "text": "blurry, lowres"}}
    sample_and_save(g, ("apply", 0), ("pos", 0), ("neg", 0), ("ckpt", 2), "sd15", size=512, prefix="identity_mixing")
    return g


def wf_face_metrics():
    g = {"note": note("Scoring generated images with the papers' metrics: ArcFace ID similarity (needs an insightface "
                      "pack, antelopev2 or buffalo_l, in models/insightface/models/<name>), pose, CLIP-I/CLIP-T when a "
                      "CLIP model is connected. Results: JSON text and a bar chart.")}
    g["ckpt"] = sd15_checkpoint()
    g["pos"] = {"type": "CLIPTextEncode", "inputs": {"clip": ("ckpt", 1), "text": "portrait photo of a person"}}
    g["neg"] = {"type": "CLIPTextEncode", "inputs": {"clip": ("ckpt", 1), "text": "blurry, lowres"}}
    sample_and_save(g, ("ckpt", 0), ("pos", 0), ("neg", 0), ("ckpt", 2), "sd15", size=512, prefix="scored")
    g["insightface"] = {"type": "IDP_FaceInsightFaceLoader", "inputs": {"pack": "antelopev2", "provider": "CPU",
                                                                        "det_size": 640, "det_thresh": 0.5},
                        "properties": {"idportrait_stand_in": {"class_type": "IDP_FaceDetectorLoader",
                                                               "inputs": {"score_threshold": 0.8, "max_size": 1280,
                                                                          "provider": "CPU"}}}}
    refs = load_faces(g, "references", "face.png")
    g["metrics"] = {"type": "IDP_FaceMetrics", "inputs": {"face_analysis": ("insightface", 0), "generated": ("decode", 0),
                                                          "references": refs, "prompts": "portrait photo of a person",
                                                          "missing_face": "exclude"}}
    g["show"] = {"type": "PreviewImage", "inputs": {"images": ("metrics", 1)}}
    return g


def wf_sdxl_infinite_id():
    g = {"note": note("Infinite-ID identity/text decoupling (SDXL; paper setting: DDIM 30 steps, CFG 5). An identity "
                      "stream (identity attention on, text off) and the text stream run in one batch; the text stream "
                      "mixes in the identity stream's self-attention keys/values (AdaIN-mean) and adds the identity "
                      "attention to its cross-attention.\n" + OMNI_NOTE.format(clip=CLIP_H))}
    g["ckpt"] = checkpoint("sdxl", "sd_xl_base_1.0.safetensors",
                           "https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0")
    faces = load_faces(g)
    omni_loaders(g, "sdxl")
    g["enc"] = {"type": "IDP_OmniIDEncode", "inputs": {"omni_id_model": ("omni", 0), "clip_vision": ("cv", 0),
                                                       "faces": faces, "crop": "center"}}
    g["infinite"] = {"type": "IDP_InfiniteIDApply", "inputs": {"model": ("ckpt", 0), "omni_id_model": ("omni", 0),
                                                               "identity": ("enc", 0)}}
    g["pos"] = {"type": "CLIPTextEncode", "inputs": {"clip": ("ckpt", 1), "text": "a watercolor portrait of a person"}}
    g["neg"] = {"type": "CLIPTextEncode", "inputs": {"clip": ("ckpt", 1), "text": "blurry, lowres"}}
    sample_and_save(g, ("infinite", 0), ("pos", 0), ("neg", 0), ("ckpt", 2), "sdxl", steps=30, cfg=5.0,
                    prefix="sdxl_infinite_id")
    g["sampler"]["inputs"].update(sampler_name="ddim", scheduler="ddim_uniform")
    return g


def wf_sd15_rb_guidance():
    g = {"note": note("OmniPortrait RB-Guidance (SD1.5) with an identity pivot: Omni-ID gives the coarse identity, "
                      "RB-Guidance then follows the gradient of a DIFT feature-matching energy between the generated "
                      "face (inside the drawn region box) and the reference face, for t <= u*T. No trained weights "
                      "needed for the guidance itself.\n" + OMNI_NOTE.format(clip=CLIP_H))}
    g["ckpt"] = sd15_checkpoint()
    applied = omni_id_block(g, "sd15", ("ckpt", 0), detect_align(g, "align", load_faces(g)))
    g["pos"] = {"type": "CLIPTextEncode", "inputs": {"clip": ("ckpt", 1), "text": "portrait photo of a woman in a garden"}}
    g["neg"] = {"type": "CLIPTextEncode", "inputs": {"clip": ("ckpt", 1), "text": "blurry, lowres"}}
    g["latent"] = {"type": "EmptyLatentImage", "inputs": {"width": 512, "height": 512, "batch_size": 1},
                   "properties": small(**CI_SIZE)}
    g["rb"] = {"type": "IDP_RBGuidanceSampler", "inputs": {
        "model": applied, "seed": 42, "steps": 30, "cfg": 7.5, "sampler_name": "euler", "scheduler": "normal",
        "positive": ("pos", 0), "negative": ("neg", 0), "latent_image": ("latent", 0), "denoise": 1.0,
        "vae": ("ckpt", 2), "p": 8.5, "u": 0.6, "t0": 671, "feature_point": "auto", "reference": ("align", 0),
        "region_box": "0.3,0.15,0.7,0.6"},
        "properties": small(steps=3), "size": [360, 760]}
    g["decode"] = {"type": "VAEDecode", "inputs": {"samples": ("rb", 0), "vae": ("ckpt", 2)}}
    g["save"] = {"type": "SaveImage", "inputs": {"images": ("decode", 0), "filename_prefix": "sd15_rb_guidance"}}
    g["mgen"] = {"type": "MaskToImage", "inputs": {"mask": ("rb", 1)}}
    g["preview"] = {"type": "PreviewImage", "inputs": {"images": ("mgen", 0)}}
    return g


CLIP_L = "CLIP-ViT-L-14-laion2B-s32B-b82K.safetensors"
CLIP_L_URL = "https://huggingface.co/laion/CLIP-ViT-L-14-laion2B-s32B-b82K"


def wf_sd15_rb_guidance_pivot_id():
    g = {"note": note("OmniPortrait as in the paper (SD1.5): the Pivot ID encoder puts e_mix = Linear([e_ref; e_txt]) "
                      "into the prompt in place of the class word ('woman'), and RB-Guidance takes the generated face "
                      "region M_gen from the cross-attention of e_mix (no region box needed) and follows the gradient "
                      "of the DIFT feature-matching energy for t <= u*T (Eq. 7-8 as written: euclidean, sum).\n"
                      "No Pivot ID weights are public: train them with the pack's trainer (README, 'Training', stage "
                      "pivot) and put export/pivot_id.safetensors into models/pivot_id. CLIP vision: the model the "
                      f"weights were trained with ({CLIP_L}, OpenCLIP ViT-L/14, as in the paper, in "
                      "models/clip_vision; with a fine-tuned trunk, the run's clip_vision_finetuned.safetensors).")}
    g["ckpt"] = sd15_checkpoint()
    reference = detect_align(g, "align", load_faces(g))
    g["cvl"] = {"type": "CLIPVisionLoader", "inputs": {"clip_name": CLIP_L},
                "properties": {"idportrait_stand_in": {"class_type": "IDP_TinyClipVision", "inputs": {"weights_seed": 0}},
                               "models": [{"name": CLIP_L, "url": CLIP_L_URL, "directory": "clip_vision"}]}}
    g["pivot"] = {"type": "IDP_PivotIDLoader", "inputs": {"pivot_file": "pivot_id_sd15.safetensors"},
                  "properties": {"idportrait_stand_in_file": {"folder": "pivot_id"}}}
    g["pos"] = {"type": "IDP_PivotIDTextEncode", "inputs": {
        "clip": ("ckpt", 1), "text": "portrait photo of a woman in a garden", "pivot_id": ("pivot", 0),
        "clip_vision": ("cvl", 0), "reference": reference, "class_word": "woman", "occurrence": 0}}
    g["neg"] = {"type": "CLIPTextEncode", "inputs": {"clip": ("ckpt", 1), "text": "blurry, lowres"}}
    g["latent"] = {"type": "EmptyLatentImage", "inputs": {"width": 512, "height": 512, "batch_size": 1},
                   "properties": small(**CI_SIZE)}
    g["rb"] = {"type": "IDP_RBGuidanceSampler", "inputs": {
        "model": ("ckpt", 0), "seed": 42, "steps": 50, "cfg": 7.5, "sampler_name": "ddim", "scheduler": "ddim_uniform",
        "positive": ("pos", 0), "negative": ("neg", 0), "latent_image": ("latent", 0), "denoise": 1.0,
        "vae": ("ckpt", 2), "p": 8.5, "u": 0.6, "t0": 671, "feature_point": "auto", "reference": reference,
        "match": "euclidean", "reduction": "sum"},
        "properties": small(steps=3), "size": [360, 760]}
    g["decode"] = {"type": "VAEDecode", "inputs": {"samples": ("rb", 0), "vae": ("ckpt", 2)}}
    g["save"] = {"type": "SaveImage", "inputs": {"images": ("decode", 0), "filename_prefix": "sd15_rb_guidance_pivot_id"}}
    g["mgen"] = {"type": "MaskToImage", "inputs": {"mask": ("rb", 1)}}
    g["preview"] = {"type": "PreviewImage", "inputs": {"images": ("mgen", 0)}}
    return g


def wf_flux_rb_guidance():
    g = {"note": note("OmniPortrait RB-Guidance on FLUX: a GUIDER for SamplerCustomAdvanced. For the last u of the noise "
                      "schedule it follows the gradient of a DIFT feature-matching energy between the generated face "
                      "(inside the region box) and the detected reference face; the features are read after the last "
                      "double block ('auto'). FLUX-dev is guidance-distilled: keep cfg 1 and set the distilled guidance "
                      "with FluxGuidance. No trained weights needed for the guidance. Models as in the FLUX example.")}
    model, clip, vae = flux_loaders(g)
    reference = detect_align(g, "align", load_faces(g))
    g["pos"] = {"type": "CLIPTextEncode", "inputs": {"clip": clip, "text": "portrait photo of a woman in a garden"}}
    g["guid"] = {"type": "FluxGuidance", "inputs": {"conditioning": ("pos", 0), "guidance": 3.5}}
    g["neg"] = {"type": "CLIPTextEncode", "inputs": {"clip": clip, "text": ""}}
    g["rb"] = {"type": "IDP_RBGuidanceGuider", "inputs": {
        "model": model, "positive": ("guid", 0), "negative": ("neg", 0), "cfg": 1.0, "vae": vae, "p": 8.5, "u": 0.6,
        "t0": 671, "feature_point": "auto", "reference": reference, "region_box": "0.3,0.15,0.7,0.6"},
        "size": [360, 620]}
    g["noise"] = {"type": "RandomNoise", "inputs": {"noise_seed": 42}}
    g["ksel"] = {"type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}}
    g["sigmas"] = {"type": "BasicScheduler", "inputs": {"model": model, "scheduler": "simple", "steps": 20,
                                                        "denoise": 1.0}, "properties": small(steps=3)}
    g["latent"] = {"type": "EmptySD3LatentImage", "inputs": {"width": 1024, "height": 1024, "batch_size": 1},
                   "properties": small(**CI_SIZE)}
    g["sample"] = {"type": "SamplerCustomAdvanced", "inputs": {"noise": ("noise", 0), "guider": ("rb", 0),
                                                               "sampler": ("ksel", 0), "sigmas": ("sigmas", 0),
                                                               "latent_image": ("latent", 0)}}
    g["decode"] = {"type": "VAEDecode", "inputs": {"samples": ("sample", 0), "vae": vae}}
    g["save"] = {"type": "SaveImage", "inputs": {"images": ("decode", 0), "filename_prefix": "flux_rb_guidance"}}
    g["mgen"] = {"type": "IDP_RBGuidanceMaskPreview", "inputs": {"guider": ("rb", 0), "samples": ("sample", 0)}}
    g["mgen_image"] = {"type": "MaskToImage", "inputs": {"mask": ("mgen", 0)}}
    g["preview"] = {"type": "PreviewImage", "inputs": {"images": ("mgen_image", 0)}}
    return g


def wf_flashface_sd15():
    g = {"note": note("FlashFace (released SD1.5 weights) with a face position box. Models: flashface.ckpt from "
                      "HF shilongz/FlashFace-SD1.5 in models/flashface (convert it once to a deduplicated safetensors "
                      "with `python -m guidance.flashface_checkpoint`, see README); the SD1.5 checkpoint for its text "
                      "encoder and VAE. Draw the face box on the sampler node (drag in the box editor). Released "
                      "defaults: lambda_feat 1.2, lambda_ref 3.2, CFG 7.5, launch 750, 4 references.")}
    g["ckpt"] = sd15_checkpoint()
    g["ff"] = {"type": "IDP_FlashFaceLoader", "inputs": {"flashface_file": "flashface.ckpt", "weight_dtype": "default"},
               "properties": {"idportrait_stand_in_file": {"folder": "flashface"},
                              "models": [{"name": "flashface.ckpt", "directory": "flashface",
                                          "url": "https://huggingface.co/shilongz/FlashFace-SD1.5/resolve/main/flashface.ckpt"}]}}
    faces = load_faces(g)
    g["refs"] = {"type": "IDP_FlashFaceEncodeReferences", "inputs": {"faces": faces, "vae": ("ckpt", 2), "crop": "detect",
                                                                     "size": 224, "pad_to": 4}}
    g["pos"] = {"type": "CLIPTextEncode", "inputs": {"clip": ("ckpt", 1), "text": "a photo of a woman wearing a hat"}}
    g["neg"] = {"type": "CLIPTextEncode", "inputs": {"clip": ("ckpt", 1), "text": "nsfw, blurry, lowres"}}
    g["latent"] = {"type": "EmptyLatentImage", "inputs": {"width": 512, "height": 512, "batch_size": 1},
                   "properties": small(**CI_SIZE)}
    g["sampler"] = {"type": "IDP_FlashFaceSampler", "inputs": {
        "model": ("ff", 0), "positive": ("pos", 0), "negative": ("neg", 0), "references": ("refs", 0),
        "latent_image": ("latent", 0), "seed": 42, "steps": 25, "cfg": 7.5, "lambda_feat": 1.2, "lambda_ref": 3.2,
        "launch": 750.0, "face_x1": 0.3, "face_y1": 0.1, "face_x2": 0.6, "face_y2": 0.4, "num_references": 4},
        "properties": small(steps=2), "size": [360, 700]}
    g["decode"] = {"type": "VAEDecode", "inputs": {"samples": ("sampler", 0), "vae": ("ckpt", 2)}}
    g["save"] = {"type": "SaveImage", "inputs": {"images": ("decode", 0), "filename_prefix": "flashface"}}
    return g


def wf_flux_reference_attention():
    g = {"note": note("Training-free reference attention on FLUX (an extension, not FlashFace's trained model): the model "
                      "itself encodes the reference faces and their tokens join the keys/values of its joint attention; "
                      "lambda_feat blends, three-way guidance with lambda_ref. Models as in the FLUX example.")}
    model, clip, vae = flux_loaders(g)
    faces = load_faces(g)
    g["refs"] = {"type": "IDP_FlashFaceEncodeReferences", "inputs": {"faces": faces, "vae": vae, "crop": "detect",
                                                                     "size": 224, "pad_to": 4}}
    g["pos"] = {"type": "CLIPTextEncode", "inputs": {"clip": clip, "text": "portrait photo of a person, soft light"}}
    g["neg"] = {"type": "CLIPTextEncode", "inputs": {"clip": clip, "text": ""}}
    g["tf"] = {"type": "IDP_FlashFaceTrainingFreeApply", "inputs": {
        "model": model, "references": ("refs", 0), "positive": ("pos", 0), "negative": ("neg", 0), "lambda_feat": 0.85,
        "lambda_ref": 2.0, "cfg": 3.5, "launch": 1000.0, "lambda_before": 0.85, "cfg_rescale": 0.0, "blocks": "decoder"}}
    g["noise"] = {"type": "RandomNoise", "inputs": {"noise_seed": 42}}
    g["ksel"] = {"type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}}
    g["sigmas"] = {"type": "BasicScheduler", "inputs": {"model": ("tf", 0), "scheduler": "simple", "steps": 20,
                                                        "denoise": 1.0}, "properties": small(steps=2)}
    g["latent"] = {"type": "EmptySD3LatentImage", "inputs": {"width": 1024, "height": 1024, "batch_size": 1},
                   "properties": small(**CI_SIZE)}
    g["sample"] = {"type": "SamplerCustomAdvanced", "inputs": {"noise": ("noise", 0), "guider": ("tf", 1),
                                                               "sampler": ("ksel", 0), "sigmas": ("sigmas", 0),
                                                               "latent_image": ("latent", 0)}}
    g["decode"] = {"type": "VAEDecode", "inputs": {"samples": ("sample", 0), "vae": vae}}
    g["save"] = {"type": "SaveImage", "inputs": {"images": ("decode", 0), "filename_prefix": "flux_reference_attention"}}
    return g


WORKFLOWS = {
    "flux_omni_id": wf_flux_omni_id,
    "sdxl_omni_id": wf_sdxl_omni_id,
    "sd15_omni_id_controlnet": wf_sd15_omni_id_controlnet,
    "two_identities_two_regions": wf_two_identities_regions,
    "identity_mixing": wf_identity_mixing,
    "face_metrics": wf_face_metrics,
    "sdxl_infinite_id": wf_sdxl_infinite_id,
    "sd15_rb_guidance_pivot": wf_sd15_rb_guidance,
    "sd15_rb_guidance_pivot_id": wf_sd15_rb_guidance_pivot_id,
    "flux_rb_guidance": wf_flux_rb_guidance,
    "flashface_sd15_face_box": wf_flashface_sd15,
    "flux_training_free_reference_attention": wf_flux_reference_attention,
    "sdxl_ip_adapter_plus_face": wf_sdxl_ip_adapter_plus_face,
    "flux_xlabs_ip_adapter": wf_flux_xlabs_ip_adapter,
}


def main():
    import embedded_comfy  # noqa: F401  (registers every node, ours included)
    import nodes
    from workflow_tools import build_ui
    os.makedirs(OUT, exist_ok=True)
    for name, fn in WORKFLOWS.items():
        ui = build_ui(fn(), lambda t: nodes.NODE_CLASS_MAPPINGS.get(t), lambda t: nodes.NODE_CLASS_MAPPINGS[t].INPUT_TYPES())
        with open(os.path.join(OUT, name + ".json"), "w") as f:
            json.dump(ui, f, indent=1)
        print("wrote", name)


if __name__ == "__main__":
    main()

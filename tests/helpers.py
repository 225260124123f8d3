"""Helpers shared by the test modules (import from here, never from another test file).

Everything runs on the tiny stand-in models in the embedded ComfyUI (harness.py)."""
import os

import torch

import folder_paths
import nodes

import harness
import stand_in_files   # scripts/ (on sys.path through harness): the demo writes the same tiny files
from idportrait.guidance import ip_adapter as IP
from idportrait.guidance import patching as P
from idportrait.stand_ins import models as tm

EXAMPLES = sorted(os.path.join(harness.REPO, "example_workflows", f)
                  for f in os.listdir(os.path.join(harness.REPO, "example_workflows")) if f.endswith(".json"))


# --- sampling and injectors that see what the patching layer gives them ----------------------------------

def sample(model, family, steps=4, cfg=4.0, seed=11, size=16):
    lat = torch.zeros(1, tm.latent_channels(family), size, size)
    return nodes.common_ksampler(model, seed, steps, cfg, "euler", "normal", tm.tiny_conditioning(family, 1),
                                 tm.tiny_conditioning(family, 2), {"samples": lat})[0]["samples"]


class PassThrough(P.Injector):
    kinds = ("attn1", "attn2", "double", "single")

    def attn1(self, ctx, out, **kw):
        return out

    attn2 = attn1

    def double_block(self, ctx, args, call, **kw):
        return call(args)

    single_block = double_block


class Recorder(PassThrough):
    def __init__(self, key, **kw):
        super().__init__(**kw)
        self.key, self.seen = key, []

    def attn1(self, ctx, out, **kw):
        if ctx.key == self.key:
            self.seen.append((ctx.base.clone(), out.clone()))
        return out

    def double_block(self, ctx, args, call, **kw):
        res = call(args)
        if ctx.key == self.key:
            self.seen.append(res["img"].clone())   # later blocks may update their input in place
        return res



# --- identity adapters and Omni-ID weight files ------------------------------------------------------------

TOKEN_DIM = 32


def random_adapter(model, family, seed=0, scale=0.3):
    dm = model.model.diffusion_model
    if family == "flux":
        a = IP.FluxIdentityAdapter(TOKEN_DIM, dm.hidden_size, len(dm.double_blocks), len(dm.single_blocks))
    else:
        a = IP.SDIdentityAdapter(TOKEN_DIM, tm.TEXT_WIDTH, IP.SDIdentityAdapter.inner_dims_of(dm))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in a.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return a


def identity_tokens(seed=3, n=8):
    return torch.randn(1, n, TOKEN_DIM, generator=torch.Generator().manual_seed(seed))


MODELS = os.path.join(harness.BASE_DIR, "models", "omni_id")
os.makedirs(MODELS, exist_ok=True)
folder_paths.add_model_folder_path("omni_id", MODELS)
CFG = stand_in_files.omni_id_config()
rand_ = stand_in_files.randomize


def write_weights(family, name=None, seed=0):
    """An Omni-ID weight file in the real format for a tiny model of ``family`` (scripts/stand_in_files.py)."""
    name = name or f"tiny_{family}.safetensors"
    stand_in_files.write_omni_id_weights(family, os.path.join(MODELS, name), seed)
    return name


def workflow(family, omni_file, weight=1.0, controlnet=False, mask=False):
    empty = "EmptySD3LatentImage" if family == "flux" else "EmptyLatentImage"
    wf = {
        "1": {"class_type": "IDP_TinyModels", "inputs": {"family": family, "weights_seed": 0}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "photo of a woman"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "blurry"}},
        "4": {"class_type": empty, "inputs": {"width": 128, "height": 128, "batch_size": 1}},
        "10": {"class_type": "IDP_OmniIDLoader", "inputs": {"omni_id_file": omni_file}},
        "11": {"class_type": "IDP_TinyClipVision", "inputs": {"weights_seed": 0}},
        "12": {"class_type": "EmptyImage", "inputs": {"width": 96, "height": 112, "batch_size": 3, "color": 0x996655}},
        "13": {"class_type": "IDP_OmniIDEncode", "inputs": {"omni_id_model": ["10", 0], "clip_vision": ["11", 0],
                                                            "faces": ["12", 0], "crop": "center"}},
        "14": {"class_type": "IDP_OmniIDApply", "inputs": {"model": ["1", 0], "omni_id_model": ["10", 0],
                                                           "identity": ["13", 0], "weight": weight, "start_at": 0.0,
                                                           "end_at": 1.0, "apply_to": "cond"}},
        "5": {"class_type": "KSampler", "inputs": {"model": ["14", 0], "positive": ["2", 0], "negative": ["3", 0],
                                                   "latent_image": ["4", 0], "seed": 1, "steps": 2, "cfg": 4.0,
                                                   "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "6": {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": f"omni/{family}"}},
    }
    if mask:
        wf["15"] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 128, "height": 128}}
        wf["14"]["inputs"]["attn_mask"] = ["15", 0]
    if controlnet:
        wf["20"] = {"class_type": "IDP_TinyControlNet", "inputs": {"family": family, "weights_seed": 0}}
        wf["21"] = {"class_type": "EmptyImage", "inputs": {"width": 128, "height": 128, "batch_size": 1, "color": 0xFFFFFF}}
        wf["22"] = {"class_type": "ControlNetApplyAdvanced", "inputs": {"positive": ["2", 0], "negative": ["3", 0],
                                                                         "control_net": ["20", 0], "image": ["21", 0],
                                                                         "strength": 0.8, "start_percent": 0.0,
                                                                         "end_percent": 1.0}}
        wf["5"]["inputs"]["positive"], wf["5"]["inputs"]["negative"] = ["22", 0], ["22", 1]
    return wf


def latest_latent(prefix):
    import safetensors.torch
    d = harness.output_file("omni")
    f = sorted(x for x in os.listdir(d) if x.startswith(prefix))[-1]
    return safetensors.torch.load_file(os.path.join(d, f))["latent_tensor"]


def diffusers_tiny_sd15_unet(model):
    """diffusers' UNet2DConditionModel with the architecture and the weights of the tiny SD1.5 stand-in ``model``
    (for differential tests against diffusers' IP-Adapter processors); skips when diffusers is missing."""
    import pytest
    import comfy.utils
    diffusers = pytest.importorskip("diffusers")
    unet = diffusers.UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=tm.TEXT_WIDTH,
        attention_head_dim=8, norm_num_groups=32).eval()
    ldm = model.model.diffusion_model.state_dict()
    mapping = comfy.utils.unet_to_diffusers(model.model.model_config.unet_config)
    missing, unexpected = unet.load_state_dict({k: ldm[v] for k, v in mapping.items() if v in ldm}, strict=False)
    assert not missing and not unexpected   # the map also lists optional layers
    return unet


# --- a real ComfyUI server over HTTP and its websocket: scripts/comfy_server.py (shared with bench/soak.py)
from comfy_server import HANG_CAP_S, history_entry, http_get, http_post, run_over_http, wait_until  # noqa: E402,F401

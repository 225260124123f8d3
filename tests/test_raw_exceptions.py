"""Bad input, round two: every case that used to end in a raw Python exception (ZeroDivisionError, IndexError,
interpolate's RuntimeError, torch.load's errors, ...) is now a typed error of this pack whose message names the
input and the fix. Each case runs through the node a user has in the graph and, where a library function was
the one that failed, through that function too."""
import math
import os

import pytest
import safetensors.torch
import torch

import folder_paths

import harness
import stand_in_files
from flashface_tiny import tiny_state_dict
from helpers import MODELS, write_weights
from idportrait.errors import (FaceError, FlashFaceCheckpointError, FlashFaceError, InputError, OmniIDError,
                               RBGuidanceError)
from idportrait.face import detect as FD
from idportrait.face import masks as FM
from idportrait.guidance import flashface as FF
from idportrait.guidance import ip_adapter as IP
from idportrait.guidance import omni_id as OM
from idportrait.guidance import rb_guidance as RG
from idportrait.guidance import rows
from idportrait.guidance.omni_id import Identity
from idportrait.nodes import face_tools as FT
from idportrait.nodes import flashface as FN
from idportrait.nodes import omni_id as N
from idportrait.nodes import rb_guidance as NRB
from idportrait.omni_encoder import weights as W
from idportrait.stand_ins import models as tm

ZERO_IMAGE = torch.zeros(1, 0, 0, 3)
BAD_MASKS = {"1-D": (torch.ones(64), "1 dimension"), "4-D": (torch.ones(1, 1, 64, 64), "4 dimension"),
             "0x0": (torch.ones(1, 0, 0), "empty")}
BOX = "0.2, 0.2, 0.8, 0.8"


@pytest.fixture(scope="module")
def kit():
    with torch.inference_mode():
        model, vae = tm.tiny_model("sd15", 0), tm.tiny_vae("sd15")
    omni = OM.load_omni_id_model(os.path.join(MODELS, write_weights("sd15", "raw_exc.safetensors")))
    ident = Identity(torch.randn(1, 16, omni.encoder_module.config.token_dim), [1])
    with torch.inference_mode():
        refs, _ = FF.encode_references(torch.rand(1, 64, 64, 3), vae, "pre-cropped", 64, 1)
    ff_dir = stand_in_files.model_folder(harness.BASE_DIR, "flashface")
    folder_paths.add_model_folder_path("flashface", ff_dir)
    ff_path = os.path.join(ff_dir, "raw_exc_flashface.ckpt")
    torch.save(tiny_state_dict(context=tm.TEXT_WIDTH), ff_path)
    return {"model": model, "vae": vae, "omni": omni, "ident": ident, "cv": tm.tiny_clip_vision(0),
            "pos": tm.tiny_conditioning("sd15", 1), "neg": tm.tiny_conditioning("sd15", 2), "refs": refs,
            "ff_model": FF.load_flashface(ff_path), "fa": FT.FaceDetectorLoader.execute(0.5, 640, "CPU").result[0],
            "ff_dir": ff_dir}


def _rb_guider_node(k, **kw):
    return NRB.RBGuidanceGuider.execute(k["model"], k["pos"], k["neg"], 4.0, k["vae"], 8.5, 0.6, 671, "auto",
                                        **{"region_box": BOX, "reference": torch.rand(1, 64, 64, 3), **kw})


def _rb_sampler_node(k, **kw):
    return NRB.RBGuidanceSampler.execute(k["model"], 0, 2, 4.0, "euler", "normal", k["pos"], k["neg"],
                                         {"samples": torch.zeros(1, 4, 8, 8)}, 1.0, k["vae"], 8.5, 0.6, 671, "auto",
                                         **{"region_box": BOX, "reference": torch.rand(1, 64, 64, 3), **kw})


# ------------------------------------------------------------------------------------------ 0x0 images (11 inputs)

ZERO_IMAGE_NODES = {
    "OmniIDEncode.faces": lambda k: N.OmniIDEncode.execute(k["omni"], k["cv"], ZERO_IMAGE, "center"),
    "OmniIDEncodeArcFace.faces": lambda k: N.OmniIDEncodeArcFace.execute(k["omni"], None, k["cv"], ZERO_IMAGE),
    "FlashFaceEncodeReferences.faces (detect)":
        lambda k: FN.FlashFaceEncodeReferences.execute(ZERO_IMAGE, k["vae"], "detect", 224, 4),
    "FlashFaceEncodeReferences.faces (pre-cropped)":
        lambda k: FN.FlashFaceEncodeReferences.execute(ZERO_IMAGE, k["vae"], "pre-cropped", 224, 4),
    "RBGuidanceIdentity.reference": lambda k: NRB.RBGuidanceIdentity.execute(ZERO_IMAGE, region_box=BOX),
    "RBGuidanceGuider.reference": lambda k: _rb_guider_node(k, reference=ZERO_IMAGE),
    "RBGuidanceSampler.reference": lambda k: _rb_sampler_node(k, reference=ZERO_IMAGE),
    "FaceDetectAlign.image": lambda k: FT.FaceDetectAlign.execute(k["fa"], ZERO_IMAGE, "224", 0.0, "largest", 0, 0,
                                                                  False),
    "FaceMetrics.generated": lambda k: FT.FaceMetrics.execute(k["fa"], ZERO_IMAGE, torch.rand(1, 64, 64, 3), "exclude"),
    "FaceMetrics.references": lambda k: FT.FaceMetrics.execute(k["fa"], torch.rand(1, 64, 64, 3), ZERO_IMAGE,
                                                               "exclude"),
    "FaceMetrics.target": lambda k: FT.FaceMetrics.execute(k["fa"], torch.rand(1, 64, 64, 3),
                                                           torch.rand(1, 64, 64, 3), "exclude", target=ZERO_IMAGE),
}


@pytest.mark.parametrize("case", list(ZERO_IMAGE_NODES))
def test_a_0x0_image_is_refused_by_every_node_that_takes_images(kit, case):
    name = case.split(".")[1].split(" ")[0]
    with pytest.raises(InputError, match=f"input '{name}' is an image of size 0x0; connect images with at least one"):
        ZERO_IMAGE_NODES[case](kit)


def test_a_0x0_image_is_refused_by_the_library_functions_that_divided_by_its_size(kit):
    with pytest.raises(FaceError, match=r"cannot look for faces in an image of shape \(1, 0, 0, 3\)"):
        FD.detect_faces(ZERO_IMAGE)
    with pytest.raises(OmniIDError, match="Omni-ID Encode: the images are 0x0 pixels"):
        OM.encode_faces(kit["omni"], kit["cv"], ZERO_IMAGE, True)   # CLIP preprocess divided by the size
    with pytest.raises(FlashFaceError, match="FlashFace references: the images are 0x0 pixels"):
        FF.encode_references(ZERO_IMAGE, kit["vae"], "pre-cropped", 224, 4)
    g = RG.RBGuider(kit["model"], [RG.RBIdentity(ZERO_IMAGE, region_box=(0.2, 0.2, 0.8, 0.8))], kit["vae"])
    with pytest.raises(RBGuidanceError, match="identity 1: reference: the images are 0x0 pixels"):
        g.prepare_references()


# ------------------------------------------------------------------------------------------ masks of 1/4 dims, 0x0

MASK_NODES = {
    "OmniIDApply.attn_mask": lambda k, m: N.OmniIDApply.execute(k["model"], k["omni"], k["ident"], 1.0, 0.0, 1.0,
                                                                "cond", attn_mask=m),
    "FlashFaceApply.face_mask": lambda k, m: FN.FlashFaceApply.execute(k["ff_model"], k["refs"], k["pos"], k["neg"],
                                                                       1.2, 3.2, 7.5, 750.0, 0.85, 0.5, 0.0, 0.0,
                                                                       0.0, 0.0, face_mask=m),
    "RBGuidanceGuider.reference_mask": lambda k, m: _rb_guider_node(k, reference_mask=m),
    "RBGuidanceGuider.region_mask": lambda k, m: _rb_guider_node(k, region_mask=m, region_box=""),
    "RBGuidanceSampler.reference_mask": lambda k, m: _rb_sampler_node(k, reference_mask=m),
    "RBGuidanceSampler.region_mask": lambda k, m: _rb_sampler_node(k, region_mask=m, region_box=""),
    "RBGuidanceIdentity.reference_mask": lambda k, m: NRB.RBGuidanceIdentity.execute(torch.rand(1, 64, 64, 3),
                                                                                      reference_mask=m, region_box=BOX),
    "RBGuidanceIdentity.region_mask": lambda k, m: NRB.RBGuidanceIdentity.execute(torch.rand(1, 64, 64, 3),
                                                                                   region_mask=m),
}


@pytest.mark.parametrize("shape", list(BAD_MASKS))
@pytest.mark.parametrize("case", list(MASK_NODES))
def test_a_mask_of_the_wrong_rank_or_no_pixels_is_refused_naming_the_input(kit, case, shape):
    mask, what = BAD_MASKS[shape]
    with pytest.raises(InputError, match=f"input '{case.split('.')[1]}' .*{what}"):
        MASK_NODES[case](kit, mask)


@pytest.mark.parametrize("shape", list(BAD_MASKS))
def test_bad_masks_are_typed_errors_in_the_library_too(kit, shape):
    mask, _ = BAD_MASKS[shape]
    adapter = kit["omni"].adapter_for(kit["model"])
    with pytest.raises(OmniIDError, match="attn_mask"):
        IP.IdentityInjector(adapter, kit["ident"].tokens, "sd15", mask=mask)
    with pytest.raises(FlashFaceError, match="face_mask"):
        FF.apply_flashface(kit["ff_model"], kit["refs"], FF.Guidance(), mask=mask)
    for field in ("reference_mask", "region_mask"):
        ident = RG.RBIdentity(torch.rand(1, 64, 64, 3), region_box=(0.2, 0.2, 0.8, 0.8),
                              **{field: mask, **({"reference_mask": torch.ones(1, 64, 64)} if field != "reference_mask"
                                                 else {})})
        with pytest.raises(RBGuidanceError, match=f"identity 1: {field}"):
            RG.RBGuider(kit["model"], [ident], kit["vae"]).prepare_references()
    if mask.ndim != 3 or mask.numel():   # token_mask gets masks the injectors already checked; still typed
        with pytest.raises(InputError, match="region mask is"):
            rows.token_mask(mask.reshape(1, 1, 1, -1) if mask.ndim == 1 else mask, (8, 8), 2)


def test_an_empty_flashface_face_mask_is_refused(kit):
    empty = torch.zeros(0, 64, 64)
    with pytest.raises(InputError, match=r"FlashFace Apply \(IDP\): input 'face_mask' is empty"):
        MASK_NODES["FlashFaceApply.face_mask"](kit, empty)
    with pytest.raises(FlashFaceError, match="FlashFace face_mask: the mask is empty"):   # was an IndexError
        FF.apply_flashface(kit["ff_model"], kit["refs"], FF.Guidance(), mask=empty)


# ------------------------------------------------------------------------------------------ files

def test_an_identity_file_with_no_identities_is_refused(kit):
    name = "zero_identities.safetensors"
    W.save_identity(os.path.join(folder_paths.get_input_directory(), name), torch.zeros(0, 16, 32))
    with pytest.raises(OmniIDError, match=f"{name} holds no identity"):   # was a modulo by zero when applied
        N.IdentityLoad.execute(name)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_mlp_ratio_in_weight_metadata_is_refused(value):
    name = write_weights("sd15", f"mlp_{value}.safetensors")
    path = os.path.join(MODELS, name)
    sd, meta = safetensors.torch.load_file(path), W.read_metadata(path)
    safetensors.torch.save_file(sd, path, metadata={**meta, "mlp_ratio": value})
    with pytest.raises(OmniIDError, match=f"mlp_ratio must be a finite number > 0, got {value}"):
        N.OmniIDLoader.execute(name)


def _zip_checkpoint_bytes():
    import io
    buf = io.BytesIO()
    torch.save({"a": torch.zeros(4)}, buf)
    return buf.getvalue()


FLASHFACE_FILES = {
    "empty": (b"", "is empty"),
    "text": (b"not a checkpoint\n" * 20, "is not a readable torch checkpoint"),
    "truncated zip": (lambda: _zip_checkpoint_bytes()[:200], "is not a readable torch checkpoint"),
    "bad safetensors header": ((40).to_bytes(8, "little") + b"{broken json" + b" " * 40,
                               "is not a readable safetensors file"),
    "truncated safetensors": (None, "is not a readable safetensors file"),
}


@pytest.mark.parametrize("case", list(FLASHFACE_FILES))
def test_damaged_flashface_files_are_typed_errors_naming_the_file(kit, case):
    data, msg = FLASHFACE_FILES[case]
    if case == "truncated safetensors":
        good = os.path.join(kit["ff_dir"], "good_for_truncation.safetensors")
        safetensors.torch.save_file({k: v.contiguous() for k, v in tiny_state_dict(context=tm.TEXT_WIDTH).items()},
                                    good)
        with open(good, "rb") as f:
            data = f.read()[:-1000]
    elif callable(data):
        data = data()
    name = f"damaged_{case.replace(' ', '_')}.ckpt"
    with open(os.path.join(kit["ff_dir"], name), "wb") as f:
        f.write(data)
    with pytest.raises(FlashFaceCheckpointError, match=f"{name} {msg}.*download or convert it again"):
        FN.FlashFaceLoader.execute(name, "default")


# ------------------------------------------------------------------------------------------ face mask, save prefix

def test_face_mask_feather_nan_is_refused_by_the_node_and_the_library():
    with pytest.raises(InputError, match="input 'feather' is nan"):
        FT.FaceMask.execute(None, "box ellipse", 0.0, "pixels", math.nan, "selected")
    with pytest.raises(FaceError, match="feather is nan"):
        FM.face_masks([[]], 8, 8, feather_px=math.nan)


@pytest.mark.parametrize("prefix,why", [("identities/" + "y" * 400, "too long"), ("identities/a\x00", "control")])
def test_save_identity_with_an_over_long_or_nul_prefix_is_refused(prefix, why):
    with pytest.raises(InputError, match=f"filename_prefix .*{why}"):
        N.IdentitySave.execute(Identity(torch.randn(1, 4, 8), [1]), prefix)


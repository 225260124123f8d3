"""Omni-ID nodes end to end in a real ComfyUI: tiny weight files in the real format, real loaders."""
import os

import pytest
import torch

import folder_paths

import harness
import stand_in_files
from helpers import CFG, MODELS, latest_latent, workflow, write_weights
from idportrait.guidance import ip_adapter as IP
from idportrait.guidance import omni_id as OM
from idportrait.nodes import omni_id as N
from idportrait.stand_ins import models as tm
from idportrait.omni_encoder import weights as W
from idportrait.omni_encoder.encoder import OmniIDConfig, OmniIDEncoder

@pytest.mark.parametrize("family,controlnet", [("sd15", True), ("sdxl", False), ("flux", False)])
def test_omni_id_workflow_runs_end_to_end(family, controlnet):
    name = write_weights(family)
    harness.run_workflow(workflow(family, name, controlnet=controlnet, mask=family == "sdxl"))
    with_id = latest_latent(family)
    harness.run_workflow(workflow(family, name, weight=0.0, controlnet=controlnet))
    without = latest_latent(family)
    assert with_id.shape == without.shape and not torch.equal(with_id, without)


def test_encode_node_output_size_and_order_invariance():
    m = OM.load_omni_id_model(os.path.join(MODELS, write_weights("sd15")))
    cv = tm.tiny_clip_vision(0)
    g = torch.Generator().manual_seed(0)
    faces = torch.rand(3, 64, 64, 3, generator=g)
    ident = OM.encode_faces(m, cv, faces, crop=True)
    assert ident.tokens.shape == (1, CFG.num_queries, CFG.token_dim) and ident.num_source_images == [3]
    shuffled = OM.encode_faces(m, cv, faces[[2, 0, 1]], crop=True)
    torch.testing.assert_close(ident.tokens, shuffled.tokens, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="empty"):
        OM.encode_faces(m, cv, faces[:0], crop=True)


def test_wrong_family_missing_keys_and_empty_batch_fail_clearly():
    flux_file = write_weights("flux", "flux_for_sd.safetensors")
    with pytest.raises(harness.WorkflowError, match="trained for flux"):
        harness.run_workflow(workflow("sd15", flux_file))
    # an SD1.5 file applied to SDXL: same family label check catches it before any shape is read
    sd_file = write_weights("sd15", "sd15_for_sdxl.safetensors")
    with pytest.raises(harness.WorkflowError, match="trained for sd15"):
        harness.run_workflow(workflow("sdxl", sd_file))
    # a file with a projection missing
    enc_sd, meta = OmniIDEncoder(CFG).state_dict(), W.IdentityWeightsMeta(config=CFG, base_family="sd15", injected_blocks="all")
    dm = tm.tiny_model("sd15").model.diffusion_model
    proj = IP.SDIdentityAdapter(CFG.token_dim, tm.TEXT_WIDTH, IP.SDIdentityAdapter.inner_dims_of(dm)).state_dict()
    proj.pop(next(k for k in proj if k.startswith("attn2.")))
    W.save_identity_weights(os.path.join(MODELS, "broken.safetensors"), enc_sd, proj, meta)
    with pytest.raises(harness.WorkflowError, match="do not form a sd15 adapter|Missing key"):
        harness.run_workflow(workflow("sd15", "broken.safetensors"))
    wf = workflow("sd15", write_weights("sd15"))
    wf["12"] = {"class_type": "ImageFromBatch", "inputs": {"image": ["16", 0], "batch_index": 0, "length": 1}}
    wf["16"] = {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0}}
    harness.run_workflow(wf)   # one image is fine


def test_mix_save_load_round_trip():
    a = OM.Identity(torch.randn(1, 16, 32), [2])
    b = OM.Identity(torch.randn(1, 16, 32), [3])
    assert torch.equal(N.IdentityMix.execute(a, b, "interpolate", 0.0).result[0].tokens, a.tokens)
    assert torch.equal(N.IdentityMix.execute(a, b, "interpolate", 1.0).result[0].tokens, b.tokens)
    stacked = N.IdentityMix.execute(a, b, "stack", 0.5).result[0]
    assert stacked.tokens.shape == (1, 32, 32) and stacked.num_source_images == [2, 3]
    out = N.IdentitySave.execute(a, "identities/test_rt")
    rel = out.ui["text"][0]
    src = os.path.join(folder_paths.get_output_directory(), rel)
    dst = os.path.join(folder_paths.get_input_directory(), os.path.basename(rel))
    os.replace(src, dst)
    loaded = N.IdentityLoad.execute(os.path.basename(rel)).result[0]
    assert torch.equal(loaded.tokens, a.tokens) and loaded.num_source_images == [2]


def test_public_ip_adapter_file_loads_as_clip_baseline_and_applies():
    """The CLIP baseline loads an IP-Adapter 'full face' style file and injects like the converted weights."""
    model = tm.tiny_model("sd15", 0)
    d = os.path.join(harness.BASE_DIR, "models", "ipadapter")
    os.makedirs(d, exist_ok=True)
    folder_paths.add_model_folder_path("ipadapter", d)
    stand_in_files.write_ip_adapter_full_face(os.path.join(d, "ip-adapter-full-face_tiny.safetensors"), seed=5)
    m = N.IPAdapterFullFaceLoader.execute("ip-adapter-full-face_tiny.safetensors").result[0]
    ident = OM.encode_faces(m, tm.tiny_clip_vision(0), torch.rand(2, 64, 64, 3), crop=True)
    assert ident.tokens.shape == (1, 2 * 257, tm.TEXT_WIDTH)   # CLIP baseline: all 257 tokens per image
    patched = N.OmniIDApply.execute(model, m, ident, 1.0, 0.0, 1.0, "cond").result[0]
    assert patched is not model
    with pytest.raises(ValueError, match="FLUX"):
        N.OmniIDApply.execute(tm.tiny_model("flux"), m, ident, 1.0, 0.0, 1.0, "cond")


def test_arcface_baseline_encode_node():
    from idportrait.nodes.face_tools import FaceEmbedding
    cfg = OmniIDConfig(encoder_type="arcface", token_dim=32, clip_dim=tm.TEXT_WIDTH, num_queries=16, heads=2)
    from idportrait.omni_encoder.baselines import build_encoder
    enc = build_encoder(cfg)
    m = OM.OmniIDModel(enc, None, "sd15", W.IdentityWeightsMeta(config=cfg, base_family="sd15", injected_blocks="all"))
    emb = torch.nn.functional.normalize(torch.randn(3, 512), dim=-1)
    ident = N.OmniIDEncodeArcFace.execute(m, FaceEmbedding(emb, [0, 1, 2])).result[0]
    assert ident.tokens.shape == (1, 16, 32) and ident.num_source_images == [3]
    again = N.OmniIDEncodeArcFace.execute(m, FaceEmbedding(emb[[2, 0, 1]], [0, 1, 2])).result[0]
    torch.testing.assert_close(ident.tokens, again.tokens)      # order of the faces does not matter
    with pytest.raises(ValueError, match="no ArcFace embedding"):
        N.OmniIDEncodeArcFace.execute(m, FaceEmbedding(emb[:0], []))
    omni = OM.load_omni_id_model(os.path.join(MODELS, write_weights("sd15")))
    with pytest.raises(ValueError, match="Omni-ID Encode Faces"):
        N.OmniIDEncodeArcFace.execute(omni, FaceEmbedding(emb, [0, 1, 2]))

"""Weights under ComfyUI's memory management, and per-run state that lives exactly one run.

* The identity adapter and encoder of Omni-ID weights are ModelPatchers: ComfyUI loads the adapter with the
  patched model and unloads it when it frees memory; FLUX adapter weights are never copied per block.
* Nothing a run learns (reference features of a step, the reference batch size that fit, identity keys/values,
  the last M_gen) is seen by the next run on the same patched MODEL.
"""
import os

import pytest
import torch

import comfy.model_management as mm
import comfy.model_patcher
import comfy.samplers

import harness  # noqa: F401
from helpers import MODELS, sample, write_weights
from idportrait.guidance import flashface as FF
from idportrait.guidance import ip_adapter as IP
from idportrait.guidance import omni_id as OM
from idportrait.guidance import patching as P
from idportrait.guidance import rb_guidance as RG
from idportrait.guidance.run_state import Trace
from idportrait.nodes import omni_id as N
from idportrait.omni_encoder import weights as W
from idportrait.stand_ins import models as tm


def _loaded(patcher) -> bool:
    return any(lm.model is patcher for lm in mm.current_loaded_models)


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_adapter_and_encoder_are_models_comfy_loads_and_offloads(family):
    m = OM.load_omni_id_model(os.path.join(MODELS, write_weights(family, f"lifecycle_{family}.safetensors")))
    assert isinstance(m.adapter, comfy.model_patcher.ModelPatcher) and isinstance(m.encoder, comfy.model_patcher.ModelPatcher)
    ident = OM.encode_faces(m, tm.tiny_clip_vision(0), torch.rand(2, 64, 64, 3), crop=True)
    assert _loaded(m.encoder)                              # encode_faces ran it where ComfyUI loaded it
    model = tm.tiny_model(family, 0)
    patched = N.OmniIDApply.execute(model, m, ident, 1.0, 0.0, 1.0, "cond").result[0]
    assert any(p is m.adapter for p in patched.model_patches_models())   # what load_models_gpu loads with the model
    mm.unload_all_models()
    assert not _loaded(m.adapter)
    sample(patched, family, steps=2)
    assert _loaded(m.adapter)                              # sampling the patched model loaded the adapter too
    mm.free_memory(1e30, mm.get_torch_device())           # ComfyUI making room: everything goes
    assert not _loaded(m.adapter) and not _loaded(m.encoder)
    assert all(p.device == m.adapter.offload_device for p in m.adapter.model.parameters())


def test_flux_adapter_weights_are_never_copied_per_block(monkeypatch):
    """fp16 adapter weights on an fp32 model: each layer casts per call; no module copy, the weights untouched."""
    name = write_weights("flux", "lifecycle_flux_fp16.safetensors")
    meta, enc, proj = W.load_identity_weights(os.path.join(MODELS, name))
    half = "lifecycle_flux_half.safetensors"
    W.save_identity_weights(os.path.join(MODELS, half), enc, {k: v.half() for k, v in proj.items()}, meta)
    m = OM.load_omni_id_model(os.path.join(MODELS, half))
    params = {n: (p.dtype, p.data_ptr()) for n, p in m.adapter.model.named_parameters()}
    assert {d for d, _ in params.values()} == {torch.float16}
    copies = []
    orig = IP._on

    def spy(module, like):
        got = orig(module, like)
        if got is not module:
            copies.append(type(module).__name__)
        return got
    monkeypatch.setattr(IP, "_on", spy)
    model = tm.tiny_model("flux", 0)
    ident = OM.Identity(torch.randn(1, 16, 32, generator=torch.Generator().manual_seed(0)), [1])
    patched = N.OmniIDApply.execute(model, m, ident, 1.0, 0.0, 1.0, "cond").result[0]
    with Trace() as trace:
        out = sample(patched, "flux", steps=2, cfg=1.0)
    dm = model.model.diffusion_model
    assert len(trace.of("identity.kv")) == len(dm.double_blocks) + len(dm.single_blocks)   # one k/v per block
    assert copies == [] and torch.isfinite(out).all()
    assert {n: (p.dtype, p.data_ptr()) for n, p in m.adapter.model.named_parameters()} == params
    assert not torch.equal(out, sample(model, "flux", steps=2, cfg=1.0))   # the identity did act


def _refs(n=4, seed=6):
    g = torch.Generator().manual_seed(seed)
    return FF.FlashFaceReferences.single(torch.randn(n, 4, 8, 8, generator=g))


def _ff_run(model, steps, batch, seed=3):
    lat = torch.zeros(batch, 4, 16, 16)
    noise = torch.randn(lat.shape, generator=torch.Generator().manual_seed(seed))
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(tm.tiny_conditioning("sd15", 1, batch=1), tm.tiny_conditioning("sd15", 2, batch=1))
    guider.set_cfg(5.0)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", steps)
    with torch.inference_mode():
        return guider.sample(noise, lat, comfy.samplers.sampler_object("euler"), sigmas, seed=seed, disable_pbar=True)


def test_two_runs_on_one_patched_model_share_no_per_run_value():
    """Run A learns a smaller reference batch (memory) and caches the reference features of its steps; run B on the
    same patched MODEL, with another batch and step count, starts from none of it."""
    model = tm.tiny_model("sd15", 0)
    patched = FF.apply_training_free(model, _refs(), FF.Guidance(0.9, 2.0, launch=1000, lambda_before=0.85,
                                                                  rescale=0.0))
    sizes, limit = [], [True]

    def limited(mod, args, kwargs):   # the model is its own reference net: reference calls carry no patch layer
        if P.LAYER_KEY in (kwargs.get("transformer_options") or {}):
            return
        sizes.append(args[0].shape[0])
        if limit[0] and args[0].shape[0] > 1:
            raise torch.OutOfMemoryError("test: pretend more than one reference face does not fit")

    h = model.model.diffusion_model.register_forward_pre_hook(limited, with_kwargs=True)
    try:
        with Trace() as a:
            _ff_run(patched, steps=3, batch=2)
        limit[0] = False
        sizes.clear()
        with Trace() as b:
            _ff_run(patched, steps=2, batch=1)
    finally:
        h.remove()
    passes_a, passes_b = a.of("flashface.reference_pass"), b.of("flashface.reference_pass")
    assert [p["batch_size"] for p in passes_a][-1] == 1          # run A learned that one face at a time fits
    assert len(passes_b) == 2 and all(p["batch_size"] is None for p in passes_b)   # run B: its own 2 steps, no size
    assert sizes == [4, 4]                                         # run B's reference passes took all 4 faces at once
    assert len(a.runs) == len(b.runs) == 1 and a.runs[0] is not b.runs[0] and a.runs[0].cleared


def test_rb_guider_records_start_empty_in_every_run():
    """The last M_gen (the mask preview) belongs to the run that made it: a run without guided steps shows none."""
    with torch.inference_mode():
        model, vae = tm.tiny_model("sd15", 0), tm.tiny_vae("sd15")
    box = torch.zeros(1, 128, 128)
    box[:, 16:112, 16:112] = 1.0
    ident = RG.RBIdentity(torch.rand(1, 128, 128, 3, generator=torch.Generator().manual_seed(5)), reference_mask=box,
                          region_mask=box)
    g = RG.RBGuider(model, [ident], vae, RG.RBSettings(p=8.5, u=1.0))
    g.set_conds(tm.tiny_conditioning("sd15", 1), tm.tiny_conditioning("sd15", 2))
    g.set_cfg(4.0)
    lat = torch.zeros(1, 4, 16, 16)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", 3)
    with torch.inference_mode():
        g.sample(torch.randn(lat.shape), lat, comfy.samplers.sampler_object("euler"), sigmas, disable_pbar=True)
    assert g.last_gen_masks and g.gen_mask_preview((128, 128)).sum() > 0
    g.settings.u = 0.0                                             # no step is guided in the next run
    with torch.inference_mode():
        g.sample(torch.randn(lat.shape), lat, comfy.samplers.sampler_object("euler"), sigmas, disable_pbar=True)
    assert not any(s.guided for s in g.trace) and g.last_gen_masks is None
    assert g.gen_mask_preview((128, 128)).sum() == 0


def test_a_graph_that_is_never_backpropagated_is_freed_by_release():
    """GradPass's saved-tensor handles close a cycle through autograd's C++ graph when an op saves its own output
    (sigmoid does): gc cannot free it, and without a backward nothing else does. ``release`` breaks it."""
    import gc
    import weakref
    from idportrait.guidance.differentiable import GradPass
    x = torch.randn(64, requires_grad=True)
    with torch.inference_mode(False), torch.enable_grad(), GradPass() as gp:
        y = torch.sigmoid(x * 2.0)
    ref = weakref.ref(y)
    del y
    gp.release()
    gc.collect()
    assert ref() is None


def test_rb_guidance_pivot_id_workflow_keeps_nothing_between_runs():
    """The Pivot ID example's region is empty on random stand-in weights, so no guided step backpropagates: its
    graphs used to stay alive (464 tensors per run). Runs 2 and 3 must leave the same tensors alive."""
    import gc
    import json
    import random
    import warnings
    import stand_in_files
    from helpers import EXAMPLES
    path = next(p for p in EXAMPLES if os.path.basename(p) == "sd15_rb_guidance_pivot_id.json")
    with open(path) as f:
        ui = json.load(f)
    api = harness.stand_in_api(ui)
    stand_in_files.prepare_files(ui, harness.BASE_DIR)
    rng = random.Random(0)
    counts = []
    for _ in range(3):
        prompt = json.loads(json.dumps(api))
        for node in prompt.values():   # a new seed each run: nothing is served from ComfyUI's cache
            for k in ("seed", "noise_seed"):
                if isinstance(node["inputs"].get(k), int):
                    node["inputs"][k] = rng.randrange(2 ** 31)
        with Trace() as t:
            harness.run_workflow(prompt)
        assert t.count("rb.reference_draw")   # the RB-Guidance sampler ran
        gc.collect()
        with warnings.catch_warnings():   # isinstance on every live object touches deprecated torch aliases
            warnings.simplefilter("ignore", FutureWarning)
            counts.append(sum(isinstance(o, torch.Tensor) for o in gc.get_objects()))
    assert counts[2] == counts[1], counts

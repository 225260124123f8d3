"""The main job (scripts/demo.py, what `bash scripts/run_demo.sh` runs): every technique's example workflow runs on a
reference photo and writes its image; one captioned tile per technique on the contact sheet; timings measured
side by side with the plain graph; real-weight files found by their keys; bad input named with its fix."""
import contextlib
import copy
import io
import json
import os
import statistics

import numpy as np
import pytest
import torch
from PIL import Image


import demo
import demo_graphs as G
import demo_report as R
import harness
import stand_in_files




def _run(args):
    """demo.main in this process (ComfyUI is already loaded); returns (exit code, what it printed)."""
    console = io.StringIO()
    with contextlib.redirect_stdout(console):
        rc = demo.main(args)
    return rc, console.getvalue()


# ------------------------------------------------------------------------------------------ stand-in run

STEPS = 3
PROMPT = "portrait of a person, soft light"


@pytest.fixture(scope="module")
def stand_in_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("demo_out"))
    rc, console = _run(["--out", out, "--steps", str(STEPS), "--repeats", "1", "--prompt", PROMPT])
    with open(os.path.join(out, "report.json")) as f:
        report = json.load(f)
    return {"rc": rc, "out": out, "report": report, "console": console}


def test_every_technique_ran_its_example_workflow_and_wrote_its_image(stand_in_run):
    rep, out = stand_in_run["report"], stand_in_run["out"]
    assert stand_in_run["rc"] == 0, stand_in_run["console"]
    assert rep["stand_in_models"] is True and rep["mode"] == "stand-in"
    assert [t["key"] for t in rep["techniques"]] == [t.key for t in demo.TECHNIQUES]
    assert rep["skipped"] == [] and rep["failed"] == []
    for tech, rec in zip(demo.TECHNIQUES, rep["techniques"]):
        assert rec["status"] == "ran"
        assert all(v.startswith(("STAND-IN", "offline")) for v in rec["models"].values()), rec["models"]
        img = Image.open(os.path.join(out, rec["image"]))
        assert img.size == tuple(rec["size"]) == (128, 128)        # CI's stand-in latent size
        assert np.asarray(img).std() > 0
        # the graph that ran is the example converted exactly as CI converts it, with the demo's reference images
        # and step count and nothing else changed
        with open(os.path.join(harness.REPO, "example_workflows", tech.example)) as f:
            ui = json.load(f)
        if tech.derive:
            ui = tech.derive(ui)
        expected = harness.stand_in_api(ui)
        negative = sorted(expected[k]["inputs"]["text"] for k in G.prompt_nodes(expected, "negative"))
        G.set_images(expected, demo.IMAGE_NAMES)
        G.set_steps(expected, STEPS)
        G.set_prompt(expected, tech.prompt_prefix + PROMPT)
        with open(os.path.join(out, rec["graphs"]["pack"])) as f:
            ran = json.load(f)
        assert ran == expected, tech.key
        assert [ran[k]["inputs"]["text"] for k in G.prompt_nodes(ran, "positive")] == [tech.prompt_prefix + PROMPT]
        assert sorted(ran[k]["inputs"]["text"] for k in G.prompt_nodes(ran, "negative")) == negative
        with open(os.path.join(out, rec["graphs"]["plain"])) as f:
            plain = json.load(f)
        assert G.identity_nodes(plain) == [] and not any(n["class_type"] == "IDP_FaceMetrics" for n in plain.values())
        if tech.key != "face_metrics":
            assert rec["identity_nodes"], tech.key
        assert os.path.isfile(os.path.join(out, rec["plain_image"]))
    assert "IDP_IPAdapterFullFaceLoader" in {n["class_type"] for n in json.load(
        open(os.path.join(out, "graphs", "ip_adapter_full_face.json"))).values()}


def test_relative_timings_come_from_the_measured_runs(stand_in_run):
    for rec in stand_in_run["report"]["techniques"]:
        runs, tm = rec["runs"], rec["timing"]
        assert [r["graph"] for r in runs] == ["pack", "plain"]            # side by side, one repeat
        key = tm["per_step_key"]
        for r in runs:
            assert r["steps"] == STEPS and r["graph_seconds"] > 0 and r["sampler_seconds"] > 0
            assert r["sampler_seconds"] < r["graph_seconds"]
            assert r[key] > 0
            if key == "steady_seconds_per_step":
                assert 2 <= r["step_callbacks"] <= STEPS        # the sampler's own step reports
                assert r[key] * (STEPS - 1) <= r["sampler_seconds"]
            else:   # FlashFace's sampler reports no steps: node time / steps for both graphs
                assert rec["key"] == "flashface" and r[key] == pytest.approx(r["sampler_seconds"] / STEPS, abs=1e-5)
        pack = statistics.median(r[key] for r in runs if r["graph"] == "pack")
        plain = statistics.median(r[key] for r in runs if r["graph"] == "plain")
        assert tm["seconds_per_step"] == pack and tm["plain_seconds_per_step"] == plain
        assert tm["relative_per_step"] == round(pack / plain, 3)
        plain_sampler = next(r["sampler"] for r in runs if r["graph"] == "plain")
        assert plain_sampler in ("KSampler", "SamplerCustomAdvanced")


def test_contact_sheet_has_one_captioned_tile_per_technique(stand_in_run):
    rep, out = stand_in_run["report"], stand_in_run["out"]
    layout = rep["contact_sheet"]
    sheet = np.asarray(Image.open(os.path.join(out, layout["file"])).convert("RGB")).astype(int)
    assert sheet.shape[1::-1] == tuple(layout["size"])
    tiles = layout["tiles"]
    assert [t["key"] for t in tiles] == ["reference"] + [t.key for t in demo.TECHNIQUES]
    images = {"reference": os.path.join(out, rep["reference"]["images"]["A"]["crop"])}
    images.update({r["key"]: os.path.join(out, r["image"]) for r in rep["techniques"]})
    recs = {r["key"]: r for r in rep["techniques"]}
    for t in tiles:
        x0, y0, x1, y1 = t["box"]
        assert np.array_equal(sheet[y0:y1, x0:x1], np.asarray(R.fit(Image.open(images[t["key"]]))).astype(int)), t["key"]
        cx0, cy0, cx1, cy1 = t["caption_box"]
        assert (sheet[cy0:cy1, cx0:cx1] < 128).any(), f"caption of {t['key']} has no text"
        if t["key"] != "reference":
            rec = recs[t["key"]]
            assert t["caption"][0] == rec["title"]
            assert "STAND-IN" in t["caption"][1]
            assert t["caption"][2].startswith(f"{STEPS} steps, {rec['timing']['seconds']:.1f} s")
    # the picture says it shows stand-ins: the red warning line under the title
    assert ((sheet[R.HEADER_H - 20:R.HEADER_H, :, 0] > 150) & (sheet[R.HEADER_H - 20:R.HEADER_H, :, 1] < 60)).any()


def test_metrics_say_what_ran_and_why_the_rest_did_not(stand_in_run):
    for rec in stand_in_run["report"]["techniques"]:
        m = rec["metrics"]
        assert m["ran"]["face_detection_rate"] in (0.0, 1.0)
        assert "id_sim" in m["not_run"] and "insightface" in m["not_run"]["id_sim"]
        assert "target" in m["not_run"]["pose_error"]
        assert "random" in m["not_run"]["clip_i"] or "no face" in m["not_run"]["clip_i"]
    with open(os.path.join(stand_in_run["out"], "report.md")) as f:
        md = f.read()
    assert "STAND-IN MODELS" in md and all(t.title in md for t in demo.TECHNIQUES)


def test_console_has_one_line_per_technique_and_comfyui_logs_go_to_the_file(stand_in_run):
    lines = stand_in_run["console"].splitlines()
    n = len(demo.TECHNIQUES)
    for i, tech in enumerate(demo.TECHNIQUES):
        assert sum(ln.startswith(f"[{i + 1:2d}/{n}] {tech.title}:") for ln in lines) == 1
    assert not any(ln.startswith(("INFO", "WARNING", "Traceback", "Requested to load")) for ln in lines)
    with open(os.path.join(stand_in_run["out"], "comfyui.log")) as f:
        logged = f.read()
    assert "building tiny" in logged     # the pack's and ComfyUI's logging during the runs landed here


# ------------------------------------------------------------------------------------------ real-weights layout

def _save(path, tensors, metadata=None):
    from safetensors.torch import save_file
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata=metadata)


def _tiny(*shape):
    return torch.zeros(shape)


def clip_l_text_model(clip) -> dict:
    """The text model's keys as in HF / SD checkpoints (text_model.*) from a comfy.sd.CLIP of ComfyUI's SD1 class."""
    pre = "clip_l.transformer."
    return {k[len(pre):]: v for k, v in clip.get_sd().items() if k.startswith(pre + "text_model.")}


def tiny_sd15_checkpoint(path):
    """The tiny SD1.5 stand-in in the original SD1.5 checkpoint layout (model.diffusion_model.*,
    cond_stage_model.transformer.text_model.*, first_stage_model.*): real key names, tiny shapes."""
    from idportrait.stand_ins import models as tm
    sd = {f"model.diffusion_model.{k}": v for k, v in tm.tiny_model("sd15").model.diffusion_model.state_dict().items()}
    sd.update({f"cond_stage_model.transformer.{k}": v for k, v in clip_l_text_model(tm.tiny_clip()).items()})
    sd.update({f"first_stage_model.{k}": v for k, v in tm.tiny_vae("sd15").get_sd().items()})
    _save(path, sd)


def tiny_flux_diffusion_model(path):
    from idportrait.stand_ins import models as tm
    _save(path, tm.tiny_model("flux").model.diffusion_model.state_dict())


def tiny_clip_vision_h(path):
    """HF CLIPVisionModelWithProjection layout of ViT-H/14 (32 layers, patch 14), widths 8."""
    t = {"vision_model.embeddings.patch_embedding.weight": _tiny(8, 3, 14, 14), "visual_projection.weight": _tiny(8, 8)}
    for i in range(32):
        for p in ("q_proj", "k_proj", "v_proj", "out_proj"):
            t[f"vision_model.encoder.layers.{i}.self_attn.{p}.weight"] = _tiny(8, 8)
    _save(path, t)


def tiny_ip_adapter_full_face(path):
    """ip-adapter-full-face_sd15's layout: MLP projection proj.{0,2,3} and 16 cross-attention layers 1, 3, ..., 31."""
    t = {f"image_proj.proj.{i}.{p}": _tiny(8, 8) if p == "weight" and i != 3 else _tiny(8)
         for i in (0, 2, 3) for p in ("weight", "bias")}
    for n in range(16):
        t[f"ip_adapter.{2 * n + 1}.to_k_ip.weight"] = _tiny(8, 8)
        t[f"ip_adapter.{2 * n + 1}.to_v_ip.weight"] = _tiny(8, 8)
    _save(path, t)


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    """Files in real key layouts under names that do not tell what they are, plus decoys named like real files."""
    d = str(tmp_path_factory.mktemp("models"))
    tiny_sd15_checkpoint(os.path.join(d, "checkpoints", "my_portrait_model.safetensors"))
    tiny_flux_diffusion_model(os.path.join(d, "unet", "dit.safetensors"))
    tiny_clip_vision_h(os.path.join(d, "clip_vision", "vision.safetensors"))
    tiny_ip_adapter_full_face(os.path.join(d, "ipadapter", "adapter.safetensors"))
    os.makedirs(os.path.join(d, "omni_id"))
    stand_in_files.write_omni_id_weights("sd15", os.path.join(d, "omni_id", "trained_last.safetensors"))
    os.makedirs(os.path.join(d, "flashface"))
    torch.save(stand_in_files.flashface_tiny_state_dict(), os.path.join(d, "flashface", "weights.ckpt"))
    # decoys: right names, wrong contents
    torch.save({"foo.weight": torch.zeros(2)}, os.path.join(d, "checkpoints", "flashface.ckpt"))
    _save(os.path.join(d, "omni_id", "omni_id_sdxl.safetensors"), {"encoder.queries": _tiny(4, 4)})
    from idportrait.stand_ins import models as tm
    _save(os.path.join(d, "clip", "clip_l.safetensors"),      # a CLIP text model, but 2 layers, not CLIP-L's 12
          clip_l_text_model(tm.tiny_clip()))
    fixtures = pytest.importorskip("face_fixtures")
    pytest.importorskip("insightface")
    fixtures.make_pack(d, "antelopev2")
    return d


def test_models_dir_files_are_found_by_their_keys_and_each_skip_names_its_file(models_dir, tmp_path):
    out = str(tmp_path / "out")
    rc, text = _run(["--models-dir", models_dir, "--out", out, "--dry-run"])
    assert rc == 0, text
    with open(os.path.join(out, "report.json")) as f:
        rep = json.load(f)
    found = {r: [f["rel"] for f in fs] for r, fs in rep["models_dir"]["found"].items()}
    assert found == {"sd15_checkpoint": ["checkpoints/my_portrait_model.safetensors"],
                     "flux_unet": ["unet/dit.safetensors"], "clip_vision_h": ["clip_vision/vision.safetensors"],
                     "ip_adapter_full_face": ["ipadapter/adapter.safetensors"],
                     "omni_id_sd15": ["omni_id/trained_last.safetensors"], "flashface": ["flashface/weights.ckpt"],
                     "insightface": ["insightface/models/antelopev2"]}
    ignored = {i["file"]: i["why"] for i in rep["models_dir"]["ignored"]}
    assert set(ignored) == {"checkpoints/flashface.ckpt", "omni_id/omni_id_sdxl.safetensors", "clip/clip_l.safetensors"}
    assert "2 layers" in ignored["clip/clip_l.safetensors"]

    planned = {t["key"]: t for t in rep["techniques"]}
    assert set(planned) == {"flashface", "rb_guidance_sd15", "omni_id_sd15", "ip_adapter_full_face", "two_identities",
                            "identity_mixing", "face_metrics"}
    assert all(t["status"] == "planned" for t in planned.values())   # converted and accepted by ComfyUI's validator
    assert planned["flashface"]["models"] == {"sd15_checkpoint": "checkpoints/my_portrait_model.safetensors",
                                              "flashface": "flashface/weights.ckpt"}
    assert planned["face_metrics"]["models"]["insightface"] == "insightface/models/antelopev2"
    assert any("ControlNet off" in n for n in planned["omni_id_sd15"]["notes"])      # no ControlNet file: bypassed
    with open(os.path.join(out, planned["omni_id_sd15"]["graphs"]["pack"])) as f:
        g = json.load(f)
    types = {n["class_type"] for n in g.values()}
    assert "ControlNetApplyAdvanced" not in types and "IDP_OmniIDApply" in types
    ckpt = next(n for n in g.values() if n["class_type"] == "CheckpointLoaderSimple")
    assert ckpt["inputs"]["ckpt_name"] == "my_portrait_model.safetensors"

    skipped = {s["key"]: {m["role"]: m for m in s["missing"]} for s in rep["skipped"]}
    flux = {"flux_clip_l", "flux_t5xxl", "flux_vae"}            # the FLUX diffusion model itself was found
    assert skipped == {"flux_reference_attention": skipped["flux_reference_attention"],
                       "rb_guidance_flux": skipped["rb_guidance_flux"], "omni_id_sdxl": skipped["omni_id_sdxl"],
                       "omni_id_flux": skipped["omni_id_flux"], "infinite_id": skipped["infinite_id"]}
    assert set(skipped["flux_reference_attention"]) == set(skipped["rb_guidance_flux"]) == flux
    assert set(skipped["omni_id_flux"]) == flux | {"omni_id_flux"}
    assert set(skipped["omni_id_sdxl"]) == set(skipped["infinite_id"]) == {"sdxl_checkpoint", "omni_id_sdxl"}
    assert skipped["omni_id_sdxl"]["sdxl_checkpoint"]["file"] == "sd_xl_base_1.0.safetensors"
    assert skipped["omni_id_sdxl"]["sdxl_checkpoint"]["folder"] == "checkpoints"
    assert skipped["omni_id_flux"]["flux_t5xxl"]["folder"] == "text_encoders"
    assert "skipped: Omni-ID, SDXL — needs an SDXL base checkpoint: sd_xl_base_1.0.safetensors in models/checkpoints" in text
    with open(os.path.join(out, "report.md")) as f:
        assert "`omni_id_sdxl.safetensors` in `models/omni_id`" in f.read()


def test_models_dir_with_nothing_usable_names_the_fix(tmp_path):
    d = tmp_path / "models"
    (d / "checkpoints").mkdir(parents=True)
    torch.save({"foo.weight": torch.zeros(2)}, str(d / "checkpoints" / "v1-5-pruned-emaonly.ckpt"))
    rc, text = _run(["--models-dir", str(d), "--out", str(tmp_path / "o1"), "--dry-run"])
    assert rc == 2
    assert "nothing usable in --models-dir" in text and "checkpoints/v1-5-pruned-emaonly.ckpt: not a file" in text
    assert "checkpoints/v1-5-pruned-emaonly.safetensors" in text           # the expected layout is named
    # pack files alone are not enough: every technique needs a base model, and each skip names it
    os.makedirs(d / "omni_id")
    stand_in_files.write_omni_id_weights("sd15", str(d / "omni_id" / "w.safetensors"))
    rc, text = _run(["--models-dir", str(d), "--out", str(tmp_path / "o2"), "--dry-run"])
    assert rc == 2 and "nothing to run with the files in" in text
    assert "Omni-ID, SD1.5 + ControlNet pose — needs an SD1.5 checkpoint" in text
    assert "omni_id_sd15.safetensors" not in text.split("Omni-ID, SD1.5 + ControlNet pose — needs")[1].split("\n")[0]
    rc, text = _run(["--models-dir", str(tmp_path / "missing"), "--out", str(tmp_path / "o3")])
    assert rc == 2 and "is not a folder" in text


def test_bad_references_name_the_fix(tmp_path):
    txt = tmp_path / "notes.txt"
    txt.write_text("not a photo")
    rc, text = _run(["--reference", str(txt), "--out", str(tmp_path / "o1"), "--dry-run"])
    assert rc == 2 and "is not an image file" in text and "JPEG or PNG" in text
    grey = tmp_path / "grey.png"
    Image.fromarray(np.full((256, 256, 3), 128, np.uint8)).save(grey)
    rc, text = _run(["--reference", str(grey), "--out", str(tmp_path / "o2"), "--dry-run"])
    assert rc == 2 and "no face found in the reference" in text and "--reference" in text
    rc, text = _run(["--reference", str(tmp_path / "nope.jpg"), "--out", str(tmp_path / "o3")])
    assert rc == 2 and "does not exist" in text


def test_all_in_one_flux_checkpoint_feeds_the_flux_graphs_and_the_prompt_reaches_them(tmp_path):
    """A FLUX checkpoint with its text encoders and VAE inside (Comfy-Org's layout) replaces the three FLUX loaders."""
    from idportrait.stand_ins import models as tm
    d = tmp_path / "models"
    sd = {f"model.diffusion_model.{k}": v for k, v in tm.tiny_model("flux").model.diffusion_model.state_dict().items()}
    sd.update({f"text_encoders.clip_l.transformer.{k}": v for k, v in clip_l_text_model(tm.tiny_clip()).items()})
    sd["text_encoders.t5xxl.transformer.encoder.block.0.layer.1.DenseReluDense.wi_0.weight"] = _tiny(8, 8)
    sd.update({f"vae.{k}": v for k, v in tm.tiny_vae("flux").get_sd().items()})
    _save(str(d / "checkpoints" / "flux_all.safetensors"), sd)
    os.makedirs(d / "omni_id")
    stand_in_files.write_omni_id_weights("flux", str(d / "omni_id" / "f.safetensors"))
    tiny_clip_vision_h(str(d / "clip_vision" / "h.safetensors"))
    out = tmp_path / "out"
    rc, text = _run(["--models-dir", str(d), "--out", str(out), "--dry-run", "--prompt", "a knight in armour"])
    assert rc == 0, text
    with open(out / "report.json") as f:
        rep = json.load(f)
    planned = {t["key"]: t for t in rep["techniques"]}
    assert set(planned) == {"flux_reference_attention", "rb_guidance_flux", "omni_id_flux"}
    for key, t in planned.items():
        assert t["models"]["flux_checkpoint"] == "checkpoints/flux_all.safetensors"
        with open(out / t["graphs"]["pack"]) as f:
            g = json.load(f)
        types = [n["class_type"] for n in g.values()]
        assert types.count("CheckpointLoaderSimple") == 1
        assert not {"UNETLoader", "DualCLIPLoader", "VAELoader"} & set(types)
        ck = next(k for k, n in g.items() if n["class_type"] == "CheckpointLoaderSimple")
        slots = {v[1] for n in g.values() for v in n["inputs"].values() if G.is_link(v) and v[0] == ck}
        assert slots == {0, 1, 2}                                   # MODEL, CLIP and VAE all come from it
        texts = {nid: n["inputs"]["text"] for nid, n in g.items() if n["class_type"] == "CLIPTextEncode"}
        assert [texts[k] for k in G.prompt_nodes(g, "positive")] == ["a knight in armour"]
        assert [texts[k] for k in G.prompt_nodes(g, "negative")] == [""]


def test_with_an_insightface_pack_the_images_get_arcface_id_similarity(models_dir):
    """The metrics pass of a real-weights run: the pack found in --models-dir gives id_sim (stand-in ONNX pack whose
    detector fires on a white square; two crops of the same texture are one 'identity')."""
    import folder_paths
    import demo_models as M
    fixtures = pytest.importorskip("face_fixtures")
    import embedded_comfy
    inv = M.scan(models_dir)
    assert inv.get("insightface").extra["pack"] == "antelopev2"
    inv.found.pop("clip_vision_h")      # its layout stand-in (widths 8) is for detection only, not loadable
    face = fixtures.textured_face_image(seed=3)
    Image.fromarray(face).save(os.path.join(folder_paths.get_input_directory(), demo.IMAGE_NAMES["face.png"]))
    gen = os.path.join(harness.BASE_DIR, "generated_same.png")
    Image.fromarray(face).save(gen)
    blank = os.path.join(harness.BASE_DIR, "generated_blank.png")
    Image.fromarray(np.zeros((640, 640, 3), np.uint8)).save(blank)
    saved = copy.deepcopy(folder_paths.folder_names_and_paths)
    try:   # score_images registers the pack's folder with ComfyUI, as main() does (which restores it after the run)
        res = demo.score_images(embedded_comfy, folder_paths, [("same", gen), ("blank", blank)], inv, stand_in=False)
    finally:
        demo._restore_folders(folder_paths, saved)
    same, none = res["same"], res["blank"]
    assert "insightface pack antelopev2" in same["detector"]
    assert same["ran"]["face_detection_rate"] == 1.0 and same["ran"]["id_sim"] == pytest.approx(1.0, abs=1e-4)
    assert "id_sim" not in same["not_run"] and "target" in same["not_run"]["pose_error"]
    assert none["ran"] == {"face_detection_rate": 0.0}
    assert none["not_run"]["id_sim"] == "no face found in the generated image"
    assert "CLIP ViT-H/14" in none["not_run"]["clip_i"]

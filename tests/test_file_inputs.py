"""File inputs stay inside ComfyUI's folders, files with NaN/inf are refused naming the file, and a file that
changed on disk runs its node again (over HTTP, ComfyUI's own cache decides)."""
import asyncio
import os
import uuid

import pytest
import safetensors.torch
import torch

import execution
import folder_paths

import harness
import stand_in_files
from helpers import run_over_http
from flashface_tiny import tiny_state_dict
from helpers import MODELS, write_weights
from idportrait.errors import FlashFaceCheckpointError, InputError, OmniIDError
from idportrait.nodes import face_tools as FT
from idportrait.nodes import flashface as FN
from idportrait.nodes import omni_id as N
from idportrait.omni_encoder import weights as W
from idportrait.stand_ins import models as tm

OUTSIDE = os.path.dirname(harness.BASE_DIR)   # the folder that holds ComfyUI's base folder
SECRET = os.path.join(OUTSIDE, f"idp-secret-{uuid.uuid4().hex[:8]}.safetensors")
W.save_identity(SECRET, torch.randn(1, 4, 8), {"encoder_type": "omni_id"})


def _traversals(folder_depth: int) -> list:
    up = "../" * (folder_depth + 1)
    return [up + os.path.basename(SECRET), SECRET, "/etc/hostname", "/root", "C:\\Windows\\win.ini", "x/../../y",
            "identities/\x00.safetensors"]


# (node, input, other inputs, how deep the input's folder is under BASE_DIR)
FILE_INPUTS = [
    (N.IdentityLoad, "identity_file", {}, 1),
    (N.OmniIDLoader, "omni_id_file", {}, 2),
    (N.IPAdapterFullFaceLoader, "ipadapter_file", {}, 2),
    (FN.FlashFaceLoader, "flashface_file", {"weight_dtype": "default"}, 2),
    (FT.FaceInsightFaceLoader, "pack", {"provider": "CPU", "det_size": 640, "det_thresh": 0.5}, 3),
]


def _validation_errors(cls, values):
    prompt = {"1": {"class_type": cls.define_schema().node_id, "inputs": dict(values)}}
    return asyncio.run(execution.validate_inputs("v", prompt, "1", {}))[1]


def _no_server_path(text):
    for leak in (harness.BASE_DIR, OUTSIDE, "/etc", "/root", "No such", "header too small", "Is a directory",
                 "Windows", os.path.basename(SECRET)):
        assert leak not in text, f"message reveals {leak!r}: {text}"


@pytest.mark.parametrize("cls,name,others,depth", FILE_INPUTS, ids=[f"{c.__name__}.{n}" for c, n, _, _ in FILE_INPUTS])
def test_every_file_input_refuses_traversal_and_absolute_paths_without_naming_server_paths(cls, name, others, depth):
    display = cls.define_schema().display_name
    for bad in _traversals(depth):
        errors = _validation_errors(cls, {**others, name: bad})
        assert errors, f"{name}={bad!r} passed validation"
        text = " ".join(e["details"] for e in errors)
        assert f"input '{name}'" in text and display in text
        _no_server_path(text)
        with pytest.raises(InputError) as e:   # a connected value or a direct call: refused at execute too
            cls.execute(**{**others, name: bad})
        assert name in str(e.value)
        _no_server_path(str(e.value))


def test_identity_load_resolves_only_inside_comfyui_folders():
    """Below the node's list check: the resolver itself refuses escapes and links out, and follows ComfyUI's
    annotations for the output folder."""
    from idportrait.nodes.folders import user_file
    for bad in _traversals(1):
        with pytest.raises(InputError) as e:
            user_file(bad, "Load Identity (IDP): identity_file")
        _no_server_path(str(e.value))
    link = os.path.join(folder_paths.get_input_directory(), "linked_out.safetensors")
    if not os.path.lexists(link):
        os.symlink(SECRET, link)
    assert "linked_out.safetensors" in N.IdentityLoad.define_schema().inputs[0].options   # listed, as ComfyUI lists
    with pytest.raises(InputError, match="a link that leads outside ComfyUI's input folder") as e:
        N.IdentityLoad.execute("linked_out.safetensors")
    _no_server_path(str(e.value))
    # what Save Identity wrote is offered as '... [output]' and loads from the output folder
    saved = N.IdentitySave.execute(_identity(3), "identities/file_inputs").ui["text"][0]
    choice = f"{saved} [output]"
    assert choice in N.IdentityLoad.define_schema().inputs[0].options
    torch.testing.assert_close(N.IdentityLoad.execute(choice).result[0].tokens, _identity(3).tokens)


def _identity(seed):
    from idportrait.guidance.omni_id import Identity
    return Identity(torch.randn(1, 4, 8, generator=torch.Generator().manual_seed(seed)), [1], "omni_id")


@pytest.mark.parametrize("prefix,why", [
    ("../outside/identity", "inside the output folder"), ("/tmp/identity", "inside the output folder"),
    ("identities/a\x00b", "control character"), ("identities/" + "x" * 300, "too long"), ("", "is empty")])
def test_save_identity_prefix_stays_in_the_output_folder(prefix, why):
    with pytest.raises(InputError, match=f"Save Identity \\(IDP\\): filename_prefix.*{why}") as e:
        N.IdentitySave.execute(_identity(0), prefix)
    _no_server_path(str(e.value))


# ---------------------------------------------------------------------------------------------- non-finite files

def test_omni_id_weights_with_nan_are_refused_naming_the_file_and_tensor():
    name = write_weights("sd15", "nan_weights.safetensors")
    path = os.path.join(MODELS, name)
    sd = safetensors.torch.load_file(path)
    meta = W.read_metadata(path)
    key = next(k for k in sd if k.startswith("proj."))
    sd[key].view(-1)[0] = float("nan")
    safetensors.torch.save_file(sd, path, metadata=meta)
    with pytest.raises(OmniIDError, match=f"nan_weights.safetensors: tensor '{key}' holds 1 NaN or infinite value"):
        N.OmniIDLoader.execute(name)


def test_ip_adapter_file_with_inf_is_refused():
    d = stand_in_files.model_folder(harness.BASE_DIR, "ipadapter")
    folder_paths.add_model_folder_path("ipadapter", d)
    path = stand_in_files.write_ip_adapter_full_face(os.path.join(d, "inf_full_face.safetensors"), seed=5)
    sd = safetensors.torch.load_file(path)
    sd["image_proj.proj.0.weight"][0, 0] = float("inf")
    safetensors.torch.save_file(sd, path)
    with pytest.raises(OmniIDError, match="inf_full_face.safetensors: tensor 'image_proj.proj.0.weight' holds"):
        N.IPAdapterFullFaceLoader.execute("inf_full_face.safetensors")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_identity_file_with_non_finite_tokens_is_refused_naming_the_file(bad):
    tokens = torch.randn(1, 4, 8)
    tokens[0, 1, 2] = bad
    name = f"nonfinite_{bad}.safetensors"
    W.save_identity(os.path.join(folder_paths.get_input_directory(), name), tokens)
    with pytest.raises(OmniIDError, match=f"{name}: tensor 'identity' holds 1 NaN or infinite value") as e:
        N.IdentityLoad.execute(name)
    assert harness.BASE_DIR not in str(e.value)   # named as the user chose it, not by its server path


def test_flashface_checkpoint_with_nan_is_refused_naming_the_file():
    d = stand_in_files.model_folder(harness.BASE_DIR, "flashface")
    folder_paths.add_model_folder_path("flashface", d)
    sd = tiny_state_dict(context=tm.TEXT_WIDTH)
    key = next(k for k in sorted(sd) if k.startswith("ref_decoder") and sd[k].is_floating_point())
    sd[key].view(-1)[0] = float("nan")
    torch.save(sd, os.path.join(d, "nan_flashface.ckpt"))
    with pytest.raises(FlashFaceCheckpointError, match="nan_flashface.ckpt: (main|ref|ref_attention) tensor .* holds "
                                                       "NaN or infinite values"):
        FN.FlashFaceLoader.execute("nan_flashface.ckpt", "default")


# ---------------------------------------------------------------------------------------------- change check

def _queue_and_wait(server, prompt):
    resp, entry, _ = run_over_http(server["url"], prompt)
    assert resp["node_errors"] == {}, resp
    return entry


def _cached_nodes(entry):
    return [n for m, d in entry["status"]["messages"] if m == "execution_cached" for n in d["nodes"]]


@pytest.mark.server
def test_an_overwritten_identity_file_runs_again_over_http(server):
    """ComfyUI caches a node whose inputs did not change: Load Identity's fingerprint is the file's content."""
    inp = os.path.join(server["base"], "input")
    os.makedirs(inp, exist_ok=True)
    path = os.path.join(inp, "fp_identity.safetensors")
    out_dir = os.path.join(server["base"], "output", "fp")
    prompt = {"1": {"class_type": "IDP_IdentityLoad", "inputs": {"identity_file": "fp_identity.safetensors"}},
              "2": {"class_type": "IDP_IdentitySave", "inputs": {"identity": ["1", 0], "filename_prefix": "fp/id"}}}

    def saved():
        return sorted(os.listdir(out_dir)) if os.path.isdir(out_dir) else []

    first, second = torch.randn(1, 4, 8), torch.randn(1, 4, 8)   # same size: only the content differs
    W.save_identity(path, first)
    e1 = _queue_and_wait(server, prompt)
    assert e1["status"]["status_str"] == "success"
    W.save_identity(path, second)   # overwritten in place, same name, same size
    e2 = _queue_and_wait(server, prompt)
    assert e2["status"]["status_str"] == "success" and "1" not in _cached_nodes(e2)
    files = saved()
    assert len(files) == 2
    torch.testing.assert_close(W.load_identity(os.path.join(out_dir, files[-1]))[0], second)
    e3 = _queue_and_wait(server, prompt)   # unchanged file: served from ComfyUI's cache
    assert "1" in _cached_nodes(e3) and len(saved()) == 2


def test_every_file_reading_node_fingerprints_its_file():
    """What ComfyUI compares before reusing a cached result: it changes when the file does, not otherwise."""
    name = write_weights("sd15", "fp_weights.safetensors", seed=0)
    a = N.OmniIDLoader.fingerprint_inputs(omni_id_file=name)
    assert a == N.OmniIDLoader.fingerprint_inputs(omni_id_file=name)
    write_weights("sd15", name, seed=1)
    assert N.OmniIDLoader.fingerprint_inputs(omni_id_file=name) != a
    assert N.OmniIDLoader.fingerprint_inputs(omni_id_file="../x").startswith("unresolved")   # never opened

    d = stand_in_files.model_folder(harness.BASE_DIR, "flashface")
    folder_paths.add_model_folder_path("flashface", d)
    torch.save(tiny_state_dict(context=tm.TEXT_WIDTH, seed=0), os.path.join(d, "fp_flashface.ckpt"))
    b = FN.FlashFaceLoader.fingerprint_inputs(flashface_file="fp_flashface.ckpt", weight_dtype="default")
    torch.save(tiny_state_dict(context=tm.TEXT_WIDTH, seed=1), os.path.join(d, "fp_flashface.ckpt"))
    assert FN.FlashFaceLoader.fingerprint_inputs(flashface_file="fp_flashface.ckpt", weight_dtype="default") != b

    pack_dir = os.path.join(stand_in_files.model_folder(harness.BASE_DIR, "insightface"), "models", "fp_pack")
    os.makedirs(pack_dir, exist_ok=True)
    folder_paths.add_model_folder_path("insightface", os.path.dirname(os.path.dirname(pack_dir)))
    with open(os.path.join(pack_dir, "det.onnx"), "wb") as f:
        f.write(b"1")
    c = FT.FaceInsightFaceLoader.fingerprint_inputs(pack="fp_pack")
    with open(os.path.join(pack_dir, "det.onnx"), "wb") as f:
        f.write(b"22")
    assert FT.FaceInsightFaceLoader.fingerprint_inputs(pack="fp_pack") != c

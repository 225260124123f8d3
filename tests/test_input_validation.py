"""Every node checks its own option values, floats and connected tensors (nodes/validation.py), on every
ComfyUI version: 0.3.75 does not check V3 combo values at all, and no version refuses a NaN float."""
import asyncio
import math

import pytest
import torch
from comfy_api.latest import io

import execution

from idportrait import nodes as pack_nodes
from idportrait.errors import InputError
from idportrait.nodes import face_tools as FT
from idportrait.nodes import omni_id as N
from idportrait.nodes import validation as V

NODES = pack_nodes.all_nodes()


def _inputs_of(kind):
    out = []
    for cls in NODES:
        schema = cls.define_schema()
        out += [(cls, schema, i) for i in schema.inputs if isinstance(i, kind)]
    return out


def _fresh(cls, name):
    """The schema and input as the node defines them now (file lists change while the suite runs)."""
    schema = cls.define_schema()
    return schema, next(i for i in schema.inputs if i.id == name)


def _validate(cls, values: dict) -> list:
    """ComfyUI's own validation of one node (widget values only; links are not needed for these checks)."""
    prompt = {"1": {"class_type": cls.define_schema().node_id, "inputs": dict(values)}}
    ok, errors, _ = asyncio.run(execution.validate_inputs("validate", prompt, "1", {}))
    return [e for e in errors if e["type"] not in ("required_input_missing",)]


def _widget_defaults(schema) -> dict:
    out = {}
    for i in schema.inputs:
        if isinstance(i, io.Combo.Input) and i.options:
            out[i.id] = i.default if i.default is not None else i.options[0]
        elif isinstance(i, (io.Int.Input, io.Float.Input)):
            out[i.id] = i.default if i.default is not None else (i.min if i.min is not None else 0)
    return out


COMBOS = _inputs_of(io.Combo.Input)
FLOATS = _inputs_of(io.Float.Input)


def test_the_pack_has_combo_and_float_inputs_to_check():
    assert len(COMBOS) >= 25 and len(FLOATS) >= 40
    assert all(getattr(cls, V.GUARD_MARK, False) for cls in NODES)


@pytest.mark.parametrize("cls,schema,inp", COMBOS, ids=[f"{s.node_id}.{i.id}" for _, s, i in COMBOS])
def test_every_combo_refuses_a_value_not_in_its_options_and_names_the_valid_ones(cls, schema, inp):
    schema, inp = _fresh(cls, inp.id)
    values = {**_widget_defaults(schema), inp.id: "not-a-choice"}
    errors = _validate(cls, values)
    assert errors, f"{schema.node_id}.{inp.id} accepted 'not-a-choice'"
    text = " ".join(e["details"] for e in errors)
    assert f"input '{inp.id}'" in text and (schema.display_name in text)
    options = list(inp.options or [])
    if options:
        assert "valid values: " + ", ".join(repr(o) for o in options[:V._SHOWN]) in text
    else:
        assert "nothing to choose from" in text
    # the default (a valid value) passes the same check
    if options:
        assert not [e for e in _validate(cls, _widget_defaults(schema)) if f"input '{inp.id}'" in e["details"]]


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_every_float_refuses_non_finite_values(bad):
    for cls, schema, inp in FLOATS:
        errors = _validate(cls, {**_widget_defaults(schema), inp.id: bad})
        text = " ".join(e["details"] for e in errors)
        assert f"input '{inp.id}' is {bad}; it must be a finite number" in text, (schema.node_id, inp.id, text)


def test_a_float_outside_its_range_is_refused_even_where_the_node_checks_other_inputs_itself():
    # Apply Omni-ID has its own start/end check; ComfyUI then skipped min/max for all of its inputs
    errors = _validate(N.OmniIDApply, {"weight": 50.0, "start_at": 0.0, "end_at": 1.0, "apply_to": "cond"})
    assert any("input 'weight' is 50.0, above its maximum 5.0 (valid: -1.0 to 5.0)" in e["details"] for e in errors)
    errors = _validate(N.OmniIDApply, {"weight": 1.0, "start_at": 0.8, "end_at": 0.2, "apply_to": "cond"})
    assert any("start_at (0.8) must not exceed end_at (0.2)" in e["details"] for e in errors)   # its own check runs
    assert not _validate(N.OmniIDApply, {"weight": 1.0, "start_at": 0.2, "end_at": 0.8, "apply_to": "cond+uncond"})


def test_execute_refuses_bad_options_that_reach_it_without_validation():
    """A connected widget or a direct call is not validated by ComfyUI: execute checks the same way."""
    with pytest.raises(InputError, match=r"Face Mask \(IDP\): input 'grow_unit' is 'percent', which is not one of "
                                         r"its choices; valid values: 'pixels', '% of face size'"):
        FT.FaceMask.execute(None, "landmark hull", 0.0, "percent", 0.0, "selected")
    with pytest.raises(InputError, match="input 'feather' is nan; it must be a finite number"):
        FT.FaceMask.execute(None, "landmark hull", 0.0, "pixels", math.nan, "selected")
    with pytest.raises(InputError, match="input 'crop_size' is 'abc'"):
        FT.FaceDetectAlign.execute(None, torch.zeros(1, 8, 8, 3), "abc", 0.0, "largest", 0, 0, False)


def test_execute_refuses_empty_and_non_finite_tensors_by_their_type():
    zero = torch.zeros(1, 0, 0, 3)
    with pytest.raises(InputError, match=r"Detect & Align Faces \(IDP\): input 'image' is an image of size 0x0"):
        FT.FaceDetectAlign.execute(None, zero, "224", 0.0, "largest", 0, 0, False)
    nan = torch.full((1, 8, 8, 3), math.nan)
    with pytest.raises(InputError, match="input 'image' holds NaN or infinite pixel values"):
        FT.FaceDetectAlign.execute(None, nan, "224", 0.0, "largest", 0, 0, False)
    for mask, what in ((torch.ones(8), "1 dimension"), (torch.ones(1, 1, 8, 8), "4 dimension"),
                       (torch.ones(1, 0, 0), "empty"), (torch.full((8, 8), math.inf), "NaN or infinite")):
        with pytest.raises(InputError, match=f"Apply Omni-ID \\(IDP\\): input 'attn_mask' .*{what}"):
            N.OmniIDApply.execute(None, None, None, 1.0, 0.0, 1.0, "cond", attn_mask=mask)


def test_a_value_that_looks_like_a_path_is_not_echoed():
    msg = V.widget_problem(N.IdentityLoad.define_schema(), N.IdentityLoad.define_schema().inputs[0], "/etc/hostname")
    assert "/etc" not in msg and "the value given" in msg and "identity_file" in msg

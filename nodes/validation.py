"""Every node's inputs checked against its own schema, with no per-node code (installed by ``guard``).

ComfyUI 0.3.75 does not check the value of a V3 combo (``COMBO`` is not a list there; current ComfyUI does), no
version refuses a NaN float, and none looks inside a connected IMAGE/MASK/LATENT, so an API client's typo used to be
remapped silently (``apply_to`` "cnd" acted as cond+uncond) or surfaced as a raw exception deep inside a technique.

``guard(node_class)`` (applied by ``nodes.all_nodes`` to every node of the pack, including ones added later)
installs:

* ``validate_inputs``: at prompt validation, each combo value (in its options) and float (finite, within
  min/max). It declares exactly those inputs as parameters, the way ComfyUI expects a node that checks an
  input itself (ComfyUI then leaves those to it and still checks the ints), and chains to the node's own
  ``validate_inputs`` if it has one;
* a wrapper around ``execute``: the same widget checks (connected widgets and direct calls reach it without
  validation), plus connected tensors: an IMAGE must be finite with a non-zero size, a MASK (H, W) or
  (M, H, W) with M, H, W > 0 and finite, a LATENT's samples finite.

Messages name the node, the input and the valid values, and never echo a value that looks like a path.
"""
from __future__ import annotations

import functools
import inspect
import math
from typing import Optional

import torch
from comfy_api.latest import io

from ..errors import InputError
from ..face.types import all_finite

GUARD_MARK = "_idp_guarded"
_SHOWN = 12   # options listed in a message; longer lists (file lists) are cut


def _display(schema) -> str:
    return schema.display_name or schema.node_id


def _looks_like_path(v) -> bool:
    return isinstance(v, str) and ("/" in v or "\\" in v or ".." in v or "\x00" in v)


def _shown(v) -> str:
    if _looks_like_path(v):
        return "the value given"
    text = repr(v)
    return text if len(text) <= 80 else text[:77] + "...'"


def _options_text(options: list) -> str:
    if not options:
        return ("there is nothing to choose from: the list is empty (put the file the input's tooltip names in its "
                "folder, then refresh the node list)")
    shown = ", ".join(repr(o) for o in options[:_SHOWN])
    more = f", ... ({len(options)} in all)" if len(options) > _SHOWN else ""
    return f"valid values: {shown}{more}"


WIDGETS = (io.Combo.Input, io.Int.Input, io.Float.Input)   # the inputs whose values are checked before execution


def widget_problem(schema, inp, value) -> Optional[str]:
    """Why ``value`` is not valid for widget input ``inp`` (None when it is)."""
    where = f"{_display(schema)}: input '{inp.id}'"
    if isinstance(inp, io.Combo.Input):
        options = list(inp.options or [])
        values = value if getattr(inp, "multiselect", False) and isinstance(value, (list, tuple)) else [value]
        bad = [v for v in values if v not in options]
        if bad:
            return f"{where} is {_shown(bad[0])}, which is not one of its choices; {_options_text(options)}"
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        kind = "a number" if isinstance(inp, io.Float.Input) else "an integer"
        return f"{where} must be {kind}, got {_shown(value)}"
    if isinstance(inp, io.Float.Input) and not math.isfinite(value):
        return f"{where} is {value}; it must be a finite number" + _range_text(inp)
    if inp.min is not None and value < inp.min:
        return f"{where} is {value}, below its minimum {inp.min}" + _range_text(inp)
    if inp.max is not None and value > inp.max:
        return f"{where} is {value}, above its maximum {inp.max}" + _range_text(inp)
    return None


def _range_text(inp) -> str:
    if inp.min is not None and inp.max is not None:
        return f" (valid: {inp.min} to {inp.max})"
    return ""


def tensor_problem(schema, inp, value) -> Optional[str]:
    """Why a connected IMAGE / MASK / LATENT cannot be used (None when it can or is not checked here)."""
    where = f"{_display(schema)}: input '{inp.id}'"
    if isinstance(inp, io.Image.Input) and isinstance(value, torch.Tensor):
        if value.ndim == 4 and (value.shape[1] == 0 or value.shape[2] == 0):
            return (f"{where} is an image of size {value.shape[2]}x{value.shape[1]}; connect images with at least one "
                    "pixel (a crop or resize upstream produced an empty image)")
        if not all_finite(value):
            return f"{where} holds NaN or infinite pixel values; fix the node that produced it"
    elif isinstance(inp, io.Mask.Input) and isinstance(value, torch.Tensor):
        if value.ndim not in (2, 3):
            return (f"{where} is a tensor with {value.ndim} dimension(s) {tuple(value.shape)}; a MASK is (H, W) or "
                    "(batch, H, W): connect a MASK output (e.g. Load Image's mask, Face Mask, Solid Mask)")
        if value.numel() == 0:
            return (f"{where} is empty {tuple(value.shape)}; connect a mask with at least one pixel (a mask node "
                    "upstream found nothing)")
        if not all_finite(value):
            return f"{where} holds NaN or infinite values; a mask is 0 (outside) to 1 (inside)"
    elif isinstance(inp, io.Latent.Input) and isinstance(value, dict):
        samples = value.get("samples")
        if isinstance(samples, torch.Tensor) and not all_finite(samples):
            return f"{where} holds NaN or infinite values; fix the node that produced the latent"
    return None


def check_values(node_class, values: dict, tensors: bool = False) -> Optional[str]:
    """The first problem with ``values`` (input name -> value) against the node's schema, or None.

    The schema is built afresh (file lists are current). None and absent values are not checked (links
    not yet evaluated, optional inputs).
    """
    schema = node_class.define_schema()
    for inp in schema.inputs:
        value = values.get(inp.id, None)
        if value is None:
            continue
        if isinstance(inp, WIDGETS):
            msg = widget_problem(schema, inp, value)
        else:
            msg = tensor_problem(schema, inp, value) if tensors else None
        if msg:
            return msg
    return None


def _own(node_class, name: str):
    """The node's own classmethod ``name`` (the function), if it defines one."""
    for c in node_class.__mro__:
        if c is io.ComfyNode or not issubclass(c, io.ComfyNode):
            break
        if name in c.__dict__:
            attr = c.__dict__[name]
            return attr.__func__ if isinstance(attr, classmethod) else attr
    return None


def guard(node_class):
    """Install the schema checks on ``node_class`` (idempotent); returns the class."""
    if node_class.__dict__.get(GUARD_MARK):
        return node_class
    own_validate = _own(node_class, "validate_inputs")
    # ints ComfyUI checks against min/max itself on every version; combos (0.3.75) and NaN floats it does not
    names = [i.id for i in node_class.define_schema().inputs if isinstance(i, (io.Combo.Input, io.Float.Input))]
    if own_validate is not None:   # inputs the node's own check names are passed to it too
        spec = inspect.getfullargspec(own_validate)
        names += [a for a in spec.args[1:] if a not in names]

    def validate_inputs(cls, **values):
        msg = check_values(cls, values)
        if msg:
            return msg
        return own_validate(cls, **values) if own_validate is not None else True

    # ComfyUI passes a node's validate_inputs the inputs it names (and then leaves their checks to it): name those
    # inputs, each with a default (a connected widget arrives as None, an absent optional not at all)
    params = [inspect.Parameter("cls", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    params += [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None) for n in names]
    validate_inputs.__signature__ = inspect.Signature(params)
    node_class.validate_inputs = classmethod(validate_inputs)

    execute = _own(node_class, "execute")
    sig = inspect.signature(execute)

    def _check(cls, args, kwargs):
        try:
            bound = sig.bind(cls, *args, **kwargs).arguments
        except TypeError:
            return   # a wrong call fails in execute itself, with Python's own message
        values = {k: v for k, v in bound.items() if k != next(iter(sig.parameters))}
        for k, v in list(values.items()):
            if sig.parameters[k].kind is inspect.Parameter.VAR_KEYWORD:
                values.update(values.pop(k))
        msg = check_values(cls, values, tensors=True)
        if msg:
            raise InputError(msg)

    if inspect.iscoroutinefunction(execute):
        @functools.wraps(execute)
        async def guarded(cls, *args, **kwargs):
            _check(cls, args, kwargs)
            return await execute(cls, *args, **kwargs)
    else:
        @functools.wraps(execute)
        def guarded(cls, *args, **kwargs):
            _check(cls, args, kwargs)
            return execute(cls, *args, **kwargs)
    node_class.execute = classmethod(guarded)
    setattr(node_class, GUARD_MARK, True)
    return node_class


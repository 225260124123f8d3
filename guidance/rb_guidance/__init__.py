"""OmniPortrait Reference-Based Guidance (RB-Guidance) in ComfyUI.

The package's parts, each with one job: energy.py (Eq. 6–11 in plain torch), feature_points.py (where DIFT
features are read), regions.py (boxes, detected faces and prompt tokens as regions), capture.py (what our own
passes record, and the early stop at the feature point), guider.py (the guider), pivot.py (the Pivot ID
encoder's e_mix in the prompt, whose cross-attention gives M_gen). Autograd through ComfyUI's
forward: guidance/differentiable.py.
"""
from ...errors import FeaturePointError, RBGuidanceError  # noqa: F401
from ..differentiable import GradPass  # noqa: F401
from . import capture, energy, pivot  # noqa: F401
from .capture import CAPTURE_KEY, RBInjector, _FeatureReady  # noqa: F401
from .feature_points import (FEATURE_AUTO, FeaturePoint, mask_grid, resolve_feature_point,  # noqa: F401
                             unet_attention_levels, unet_upsample_blocks)
from .guider import (T0_DEFAULT, RBGuider, RBIdentity, RBSettings, StepTrace,  # noqa: F401
                     guided_sigma_window)
from .regions import MASK_SOURCES, box_mask, detect_reference_masks, find_token_index, parse_box  # noqa: F401
from .pivot import PIVOT_KEY, PivotModel, load_pivot_model, pivot_conditioning, pivot_tokens  # noqa: F401

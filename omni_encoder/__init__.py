"""Identity encoders (Omni-ID and its baselines) as plain torch modules; no ComfyUI imports.

The submodules below are imported eagerly so that the pack loads each of them exactly once (see
tests/harness.py).
"""
from .baselines import ArcFaceCLIPEncoder, ArcFaceEncoder, CLIPTokensEncoder, build_encoder
from .encoder import IdentityEncoder, OmniIDConfig, OmniIDEncoder
from .mixing import mix_identities, stack_identities
from .weights import (IdentityWeightsMeta, check_base_family, check_state_dict, load_identity, load_identity_encoder,
                      load_identity_weights, save_identity, save_identity_weights)

__all__ = [
    "OmniIDConfig", "IdentityEncoder", "OmniIDEncoder", "CLIPTokensEncoder", "ArcFaceEncoder", "ArcFaceCLIPEncoder",
    "build_encoder", "mix_identities", "stack_identities", "IdentityWeightsMeta", "save_identity_weights",
    "load_identity_weights", "load_identity_encoder", "check_base_family", "check_state_dict", "save_identity",
    "load_identity",
]

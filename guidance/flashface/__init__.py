"""FlashFace reference attention in ComfyUI: the released SD1.5 model and a training-free extension.

The package's parts, each with one job: references.py (reference faces and their preparation), prompts.py (the
released demo's prompt postfixes), mask.py (the face position mask), guidance.py (two-/three-way guidance, the MODEL and GUIDER paths), attention.py (the
injectors: reference pass and reference attention), model.py (the released model as ComfyUI models),
apply.py (applying it to a MODEL). The released checkpoint's format: guidance/flashface_checkpoint.py and
guidance/flashface_keys.py.

Sampler: the released DDIM with ``discretization='trailing'`` (timesteps 999, 999−1000/n, ...) is ComfyUI's
``ddim`` sampler with the ``simple`` scheduler (identical timesteps when n divides 1000, e.g. 25 or 50;
``sgm_uniform`` is off by one or two timesteps at some steps). Any ComfyUI sampler and scheduler works.
"""
from ...errors import FlashFaceCheckpointError, FlashFaceError, FlashFaceMemoryError  # noqa: F401
from .apply import FIX_NOT_FLASHFACE, apply_flashface, apply_training_free, injector_of, make_guider  # noqa: F401
from . import attention  # noqa: F401
from .attention import TF_BLOCKS, FlashFaceInjector, ReferenceAttention, TrainingFreeInjector  # noqa: F401
from .guidance import (REF_LABEL, RELEASED, TRAINING_FREE, FlashFaceGuider, Guidance, as_cfg_pair,  # noqa: F401
                       rescale_cfg, three_way, timestep_1000)
from .mask import FaceMaskConcat, face_position_mask, mask_to_latent  # noqa: F401
from .model import REF_UNET_KEY, build_models, is_flashface_model, load_flashface, sd15_unet_config  # noqa: F401
from .references import (DETECT_SCORE, DETECT_SIZE, FlashFaceReferences, ReferenceSet, crop_and_level,  # noqa: F401
                         detect_as_released, encode_references, pad_to_square, released_eye_angle)
from .prompts import NEGATIVE_POSTFIX, POSITIVE_POSTFIX, with_released_postfixes  # noqa: F401
from .prompts import encode as encode_prompt  # noqa: F401

"""Tiny FlashFace checkpoints in the released naming (test helper shared by the FlashFace tests).

Every one of the 2142 released keys (from shared/reference/flashface/checkpoint_keys_shapes.txt), with
every width divided by 10 (context 768 -> ``context``), random values, and the aliases holding copies
of their ori_* twins as in the real file. The builder lives in scripts/stand_in_files.py (the demo's stand-in run
writes the same files).
"""
import os

import stand_in_files as _sif   # scripts/ (on sys.path through harness): the demo writes the same tiny files

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The released checkpoint's 2142 keys and shapes (names and shapes only, no weights), kept in the repository so
# that the FlashFace tests run in any clone.
KEYS_FILE = _sif.FLASHFACE_KEYS_FILE
MODEL_CHANNELS = _sif.FLASHFACE_MODEL_CHANNELS
tiny_shape = _sif.flashface_tiny_shape
tiny_state_dict = _sif.flashface_tiny_state_dict

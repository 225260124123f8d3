"""Run configuration of the trainer: one YAML or JSON file per run, copied into the run folder.

Every field has a default, so a config file only names what it changes. Sections::

    stage        mtd | flow | adapter | pivot
    output_dir   run folder: config.yaml, log.jsonl, images/, checkpoints/, export/
    seed         drives every random choice (few-to-many split, augmentation, masks, noise, t)
    data         DataConfig      dataset, resolution, few-to-many sampling, augmentation, masks
    trunk        TrunkConfig     the CLIP image trunk (ComfyUI CLIP vision file, or the tiny stand-in)
    encoder      OmniIDConfig fields (omni_encoder.encoder): the identity encoder being trained
    mtd          MTDConfig       stage 1 masked transformer decoder
    base         BaseConfig      stage 2 frozen base model (ComfyUI files or the tiny stand-ins)
    pivot        PivotConfig     Pivot ID encoder trainer
    init         InitConfig      weights to start from (stage-1 export, a node weight file)
    optim        OptimConfig     AdamW, schedule, batch size, accumulation, steps
    engine       EngineConfig    mixed precision, gradient checkpointing, EMA, DDP options
    log          LogConfig       logging, image, checkpoint intervals
    export       ExportConfig    the weight file the nodes load

``apply_overrides(cfg, ["optim.lr=5e-5", "data.num_inputs=[3,3]"])`` changes fields from the command
line (values are parsed as YAML).
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import yaml

from ..encoder import OmniIDConfig
from ...errors import TrainingError

STAGES = ("mtd", "flow", "adapter", "pivot")


@dataclass
class DataConfig:
    root: str = ""                   # folder with one sub-folder per identity (see data.py)
    manifest: str = ""               # or a manifest (.jsonl / .json) listing identities and images
    resolution: int = 0              # target (X^r) resolution; 0 = stage default (448 MTD, 512 flow/adapter/pivot)
    input_resolution: int = 224      # X^s resolution handed to the CLIP trunk (CLIP-H: 224)
    images_per_identity: int = 8     # identities with more images use a random subset of this size per epoch
    num_inputs: list = field(default_factory=lambda: [1, 3])   # |X^s| drawn uniformly in [min, max]
    num_targets: int = 8             # |X^r|; 8 = all images of the identity (paper)
    disjoint: bool = False           # draw X^r from the images not in X^s (paper: all 8, inputs included)
    align: str = "none"              # none: images are aligned crops (curate output); detect: detect + align on load
    crop_padding: float = 0.6        # ArcFace-template padding used for aligned crops (curate writes this too)
    mask: str = "auto"               # auto: <stem>.mask.png if present else template ellipse; file; ellipse; none
    hflip: float = 0.5               # probability of a horizontal flip per image
    color_jitter: float = 0.05       # max relative brightness/contrast/saturation change per image
    scale_jitter: float = 0.03       # max relative zoom/shift per image
    augment_targets: bool = False    # augment X^r too (default: only the encoder inputs X^s)
    holdout: list = field(default_factory=list)   # identity names kept out of training (evaluation split)
    holdout_fraction: float = 0.0    # or a seeded fraction of identities
    min_images: int = 0              # identities with fewer images are skipped (0 = num_targets)
    workers: int = 0                 # DataLoader worker processes


@dataclass
class TrunkConfig:
    kind: str = "clip_vision"        # clip_vision: a ComfyUI CLIP vision file; tiny: the tiny stand-in; none (arcface)
    path: str = ""                   # CLIP-ViT-H-14 .safetensors (ComfyUI models/clip_vision)
    seed: int = 0                    # tiny stand-in seed
    image_size: int = 224            # tiny stand-in input size (patch 14: (size/14)^2 + 1 tokens)
    trainable: bool = True           # paper: Omni-ID fine-tunes all CLIP-H layers; False freezes it
    lr_scale: float = 1.0            # learning-rate multiplier for the trunk


@dataclass
class MTDConfig:
    patch: int = 14                  # appendix A.2: 14 x 14 patches
    dim: int = 1024                  # decoder width (not given by the paper: our choice)
    heads: int = 16
    mlp_ratio: float = 4.0
    cross_blocks: int = 6            # appendix A.2: 6 CA + 2 SA blocks
    self_blocks: int = 2
    mask_ratio: float = 0.95         # 95 % of the target's patches hidden
    loss_on: str = "all"             # all: every face-mask pixel (Eq. 4); masked: only hidden patches


@dataclass
class BaseConfig:
    family: str = "flux"             # flux | sd15 | sdxl
    kind: str = "files"              # files: ComfyUI model files below; tiny: the tiny stand-ins
    seed: int = 0                    # tiny stand-in seed
    checkpoint: str = ""             # SD1.5/SDXL: a full checkpoint (model + CLIP + VAE)
    unet: str = ""                   # FLUX: the diffusion model file (flux1-dev.safetensors)
    clip: list = field(default_factory=list)   # FLUX: [clip_l.safetensors, t5xxl.safetensors]
    vae: str = ""                    # FLUX: ae.safetensors (SD: taken from the checkpoint unless given)
    weight_dtype: str = "default"    # default | bf16 | fp16 | fp32 for the frozen diffusion model
    prompt: str = "photo of a person."   # Eq. 6's fixed text y
    guidance: float = 1.0            # FLUX-dev distilled guidance value during training
    timesteps: str = "uniform"       # uniform (Eq. 7: t ~ U(0,1)) | logit_normal (FLUX: sigma), EPS: uniform over 1000
    hidden_init: str = "zero_v"      # FLUX: zero_v (identity injection starts as a no-op) | normal
    text_drop: float = 0.0           # probability of an empty prompt per sample (adapter/pivot trainers)
    id_drop: float = 0.0             # probability of dropping the identity per sample
    cache_latents: bool = False      # keep target latents in memory (frozen VAE, un-augmented targets)


@dataclass
class PivotConfig:
    class_word: str = "person"       # the prompt token e_mix replaces ("woman", "man", ...)
    eta: float = 2e-3                # Eq. 5 weight of the face-localisation loss
    loc_grid: int = 16               # attention-map resolution of L_loc (paper: 16 x 16)
    image_dim: int = 0               # width of e_ref (0 = the trunk's projection width)


@dataclass
class InitConfig:
    encoder: str = ""                # stage-1 export (encoder_stage1.safetensors) or a node weight file
    adapter: str = ""                # a node weight file whose proj.* start the adapter
    trunk: str = ""                  # CLIP vision file to start the trunk from; "": the trunk init.encoder was
                                     # trained with (its run's clip_vision_finetuned), else trunk.path; "stock": trunk.path


@dataclass
class OptimConfig:
    lr: float = 1e-4                 # both stages: constant 1e-4 (appendix A.2)
    weight_decay: float = 0.01
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_steps: int = 0
    max_grad_norm: float = 1.0       # 0 disables clipping
    batch_size: int = 4              # identities per process per micro-batch (see PAPER_DEFAULTS for the papers')
    grad_accum: int = 1
    max_steps: int = 1000            # optimizer steps (not the papers': `default-config` writes theirs per stage)


@dataclass
class EngineConfig:
    mixed_precision: str = "no"      # no | bf16 | fp16 (accelerate autocast)
    gradient_checkpointing: bool = False
    ema_decay: float = 0.0           # 0 = no EMA; e.g. 0.999
    find_unused_parameters: bool = False
    allow_tf32: bool = True


@dataclass
class LogConfig:
    every: int = 10                  # steps between log.jsonl lines
    image_every: int = 500           # steps between reconstruction images (0 = never)
    save_every: int = 1000           # steps between checkpoints (0 = only at the end)
    keep_checkpoints: int = 3
    progress: bool = True            # tqdm bar on the main process
    probe: bool = True               # loss of a fixed batch (fixed seeds) at the first and last step
    probe_every: int = 0             # steps between fixed-batch probe losses (0: first and last step only)


@dataclass
class ExportConfig:
    name: str = ""                   # file name under output_dir/export (default: omni_id_<family>.safetensors)
    injected_blocks: str = "all"
    use_ema: bool = True             # export the EMA weights when EMA is on
    version: str = "1"


@dataclass
class TrainConfig:
    stage: str = "mtd"
    output_dir: str = "runs/omni_id"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    trunk: TrunkConfig = field(default_factory=TrunkConfig)
    encoder: dict = field(default_factory=dict)
    mtd: MTDConfig = field(default_factory=MTDConfig)
    base: BaseConfig = field(default_factory=BaseConfig)
    pivot: PivotConfig = field(default_factory=PivotConfig)
    init: InitConfig = field(default_factory=InitConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    log: LogConfig = field(default_factory=LogConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    def __post_init__(self):
        self.validate()

    # -- derived values
    @property
    def encoder_config(self) -> OmniIDConfig:
        return OmniIDConfig.from_dict({k: str(v) for k, v in self.encoder.items()})

    @property
    def target_resolution(self) -> int:
        if self.data.resolution:
            return int(self.data.resolution)
        return 448 if self.stage == "mtd" else 512

    def validate(self) -> None:
        if self.stage not in STAGES:
            raise TrainingError(f"stage {self.stage!r} is not one of {', '.join(STAGES)}")
        lo, hi = input_range(self.data.num_inputs)
        if not 1 <= lo <= hi:
            raise TrainingError(f"data.num_inputs must be [min, max] with 1 <= min <= max, got {self.data.num_inputs}")
        if hi > self.data.images_per_identity or self.data.num_targets > self.data.images_per_identity:
            raise TrainingError(f"data.num_inputs {self.data.num_inputs} / num_targets {self.data.num_targets} exceed "
                             f"images_per_identity {self.data.images_per_identity}")
        if self.data.disjoint and hi + self.data.num_targets > self.data.images_per_identity:
            raise TrainingError("data.disjoint needs max inputs + num_targets <= images_per_identity")
        if self.data.num_targets < 1:
            raise TrainingError("data.num_targets must be >= 1")
        if not 0.0 <= self.mtd.mask_ratio < 1.0:
            raise TrainingError(f"mtd.mask_ratio must be in [0, 1), got {self.mtd.mask_ratio}")
        if self.mtd.loss_on not in ("all", "masked"):
            raise TrainingError("mtd.loss_on must be 'all' or 'masked'")
        if self.engine.mixed_precision not in ("no", "bf16", "fp16"):
            raise TrainingError("engine.mixed_precision must be no, bf16 or fp16")
        if self.base.family not in ("flux", "sd15", "sdxl"):
            raise TrainingError(f"base.family must be flux, sd15 or sdxl, got {self.base.family!r}")
        if self.trunk.kind not in ("clip_vision", "tiny", "none"):
            raise TrainingError("trunk.kind must be clip_vision, tiny or none")
        if self.base.kind not in ("files", "tiny"):
            raise TrainingError("base.kind must be files or tiny")
        if self.data.mask not in ("auto", "file", "ellipse", "none"):
            raise TrainingError("data.mask must be auto, file, ellipse or none")
        if self.data.align not in ("none", "detect"):
            raise TrainingError("data.align must be none or detect")
        if self.optim.batch_size < 1 or self.optim.grad_accum < 1 or self.optim.max_steps < 1:
            raise TrainingError("optim.batch_size, grad_accum and max_steps must be >= 1")
        self.encoder_config  # raises on bad encoder fields
        if self.stage == "mtd" and self.target_resolution % self.mtd.patch:
            raise TrainingError(f"MTD resolution {self.target_resolution} is not a multiple of the patch size {self.mtd.patch}")

    # -- serialisation
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            if path.endswith(".json"):
                json.dump(self.to_dict(), f, indent=2)
            else:
                yaml.safe_dump(self.to_dict(), f, sort_keys=False)

    @classmethod
    def from_dict(cls, data: Optional[dict]) -> "TrainConfig":
        data = dict(data or {})
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise TrainingError(f"unknown config keys {unknown}; see omni_encoder/train/config.py")
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name not in data:
                continue
            value = data[f.name]
            sub = _SECTIONS.get(f.name)
            if sub is not None:
                value = _section(sub, value, f.name)
            elif f.name == "seed":
                value = int(value)
            kwargs[f.name] = value
        return cls(**kwargs)

    @classmethod
    def load(cls, path: str, overrides: Sequence[str] = ()) -> "TrainConfig":
        with open(path) as f:
            data = json.load(f) if path.endswith(".json") else yaml.safe_load(f)
        return apply_overrides(cls.from_dict(data), overrides)


# What the papers give per stage, written by ``cli.py default-config`` over the field defaults (``paper_config``).
# Everything else is ours. ``optim.batch_size`` counts identities per process and the papers count target images
# per step: Omni-ID's MTD used 256 = 8 GPUs x 4 identities x 8 targets (batch_size 4 on 8 processes), its flow stage
# 32 = 4 identities x 8 targets in all (batch_size 4 on one process, or 1 on four); the processes are the launcher's.
PAPER_DEFAULTS = {
    # Omni-ID appendix A.2: 250K iterations, AdamW, constant 1e-4, 448 px (target_resolution), 1-3 inputs, 8 targets
    "mtd": {"optim": {"max_steps": 250_000, "lr": 1e-4, "batch_size": 4}, "trunk": {"trainable": True}},
    # A.2: 5K iterations (main text §4.1: 10K), constant 1e-4, 512 px, FLUX-dev injected into all blocks
    "flow": {"optim": {"max_steps": 5_000, "lr": 1e-4, "batch_size": 4}, "trunk": {"trainable": True},
             "base": {"family": "flux"}},
    # A.1: the CLIP baseline trained 5K steps in the flow stage (ArcFace: 75K; set max_steps for it)
    "adapter": {"optim": {"max_steps": 5_000, "lr": 1e-4, "batch_size": 4}, "base": {"family": "flux"}},
    # OmniPortrait §4.1: AdamW 2e-5, SD 80K steps (SDXL: 60K), text and ID dropped with 10 % probability each
    "pivot": {"optim": {"max_steps": 80_000, "lr": 2e-5}, "base": {"family": "sd15", "text_drop": 0.1,
                                                                    "id_drop": 0.1}},
}
PIVOT_SDXL_STEPS = 60_000


def paper_config(stage: str, family: str = "") -> "TrainConfig":
    """The stage's config with the papers' values (PAPER_DEFAULTS) over the field defaults."""
    if stage not in STAGES:
        raise TrainingError(f"stage {stage!r} is not one of {', '.join(STAGES)}")
    data = {"stage": stage}
    for section, values in PAPER_DEFAULTS[stage].items():
        data[section] = dict(values)
    if family:
        data.setdefault("base", {})["family"] = family
        if stage == "pivot" and family == "sdxl":
            data["optim"]["max_steps"] = PIVOT_SDXL_STEPS
    return TrainConfig.from_dict(data)


def input_range(num_inputs) -> tuple[int, int]:
    """data.num_inputs as (min, max): an int n or [n] means exactly n, [a, b] means a..b."""
    if isinstance(num_inputs, int):
        return num_inputs, num_inputs
    vals = [int(v) for v in num_inputs]
    if len(vals) == 1:
        return vals[0], vals[0]
    if len(vals) != 2:
        raise TrainingError(f"data.num_inputs must be n or [min, max], got {num_inputs}")
    return vals[0], vals[1]


_SECTIONS = {"data": DataConfig, "trunk": TrunkConfig, "mtd": MTDConfig, "base": BaseConfig, "pivot": PivotConfig,
             "init": InitConfig, "optim": OptimConfig, "engine": EngineConfig, "log": LogConfig,
             "export": ExportConfig}


def _section(kind, value, name):
    if isinstance(value, kind):
        return value
    value = dict(value or {})
    fields = {f.name: f for f in dataclasses.fields(kind)}
    unknown = sorted(set(value) - set(fields))
    if unknown:
        raise TrainingError(f"unknown keys {unknown} in config section {name!r}")
    return kind(**{k: _coerce(fields[k], v, f"{name}.{k}") for k, v in value.items()})


def _coerce(f, v, where: str):
    """YAML 1.1 reads 1e-4 as a string: convert to the field's type (float/int/bool) when needed."""
    default = f.default
    try:
        if isinstance(default, bool):
            return v if isinstance(v, bool) else str(v).lower() in ("1", "true", "yes", "on")
        if isinstance(default, float) and isinstance(v, (str, int)):
            return float(v)
        if isinstance(default, int) and isinstance(v, str):
            return int(v)
    except ValueError:
        raise TrainingError(f"config {where}={v!r} is not a valid {type(default).__name__}") from None
    return v


def apply_overrides(cfg: TrainConfig, overrides: Sequence[str]) -> TrainConfig:
    """``section.key=value`` (value parsed as YAML) or ``key=value`` for top-level fields."""
    if not overrides:
        return cfg
    data = cfg.to_dict()
    for item in overrides:
        if "=" not in item:
            raise TrainingError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        value: Any = yaml.safe_load(raw)
        parts = key.strip().split(".")
        node = data
        for p in parts[:-1]:
            if not isinstance(node, dict) or p not in node:
                raise TrainingError(f"override {item!r}: no config section {p!r}")
            node = node[p]
        if parts[-1] not in node and not (len(parts) == 2 and parts[0] == "encoder"):
            raise TrainingError(f"override {item!r}: unknown key {parts[-1]!r}")
        node[parts[-1]] = value
    return TrainConfig.from_dict(data)

"""The training loop shared by every trainer (MTD, flow matching, adapter-only, Pivot ID), on HF accelerate.

One process or many: the same code runs under ``python .../cli.py train``, ``accelerate launch`` (DDP,
FSDP through an accelerate config) or ``torchrun``; accelerate sets the devices, wraps the trainable
module for gradient synchronisation and shards the batches. Nothing here launches processes.

Per run folder (``output_dir``)::

    config.yaml            the full configuration of the run
    log.jsonl              one line per ``log.every`` steps: step, loss, lr, epoch, samples/s
    images/step_*.png      reconstructions (MTD: masked target | prediction | target | face mask;
                           flow: target | noised | one-step x0 prediction)
    checkpoints/step_*/    accelerate state: model, optimizer, scheduler, RNG, EMA, data position
    export/                the files of export.py

Exact resume: the checkpoint holds the trainable weights, AdamW moments, the scheduler, every RNG, the
EMA and the data position (epoch, batches consumed); samples are a function of (seed, epoch, identity)
(data.py), so a resumed run computes the same next-step loss as one that never stopped.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
from typing import Callable, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..baselines import build_encoder
from ..trunk_identity import FINETUNED_FILE, trunk_metadata
from .config import TrainConfig
from .data import EpochSampler, IdentityDataset, collate_identities, load_records, save_image_grid, split_identities
from .export import (check_trunk_init, export_identity_weights, export_stage1, export_trunk, load_adapter_init,
                     load_encoder_init, load_trunk_init, trunk_init)
from .flow import DiffusionDecoder, FlowStage, IdentityEncoding, adapter_proj_state, build_adapter, load_base
from .mtd import MTDStage, MaskedTransformerDecoder
from .pivot import build_pivot_stage, export_pivot
from .stage import Stage
from .trunk import build_trunk, checkpoint_modules, trunk_state_dict
from ...errors import TrainingError

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------
# Small stateful helpers saved with the checkpoints


class TrainState:
    """Optimizer steps done and the data position (epoch, micro-batches of that epoch consumed)."""

    def __init__(self):
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0

    def state_dict(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch}

    def load_state_dict(self, sd: dict) -> None:
        self.step, self.epoch, self.batch_in_epoch = int(sd["step"]), int(sd["epoch"]), int(sd["batch_in_epoch"])


class EMA:
    """Exponential moving average of the trainable parameters (fp32 shadow copies)."""

    def __init__(self, module: nn.Module, decay: float):
        self.decay = float(decay)
        self.shadow = {n: p.detach().float().clone() for n, p in module.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        for n, p in module.named_parameters():
            if n in self.shadow:
                self.shadow[n].lerp_(p.detach().float(), 1.0 - self.decay)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": {k: v.cpu() for k, v in self.shadow.items()}}

    def load_state_dict(self, sd: dict) -> None:
        self.decay = float(sd["decay"])
        for k, v in sd["shadow"].items():
            self.shadow[k] = v.to(self.shadow[k].device) if k in self.shadow else v

    @contextlib.contextmanager
    def applied(self, module: nn.Module):
        """Temporarily load the averaged weights into ``module``."""
        params = dict(module.named_parameters())
        saved = {n: params[n].detach().clone() for n in self.shadow if n in params}
        with torch.no_grad():
            for n in saved:
                params[n].copy_(self.shadow[n].to(params[n].dtype))
        try:
            yield module
        finally:
            with torch.no_grad():
                for n, v in saved.items():
                    params[n].copy_(v)


# ---------------------------------------------------------------------------------------------------
# Building a stage



def build_stage(cfg: TrainConfig, device: torch.device, arcface_fn: Optional[Callable] = None) -> Stage:
    enc_cfg = cfg.encoder_config
    encoder = build_encoder(enc_cfg)
    if cfg.init.encoder:
        load_encoder_init(cfg.init.encoder, encoder)
    trunk_cfg = cfg.trunk
    if cfg.stage == "adapter" and trunk_cfg.trainable:
        log.info("adapter stage: the trunk is frozen (frozen representation)")
        trunk_cfg = type(trunk_cfg)(**{**trunk_cfg.__dict__, "trainable": False})
    trunk = build_trunk(trunk_cfg, output="embeds" if cfg.stage == "pivot" else "penultimate") \
        if (encoder.uses_clip or cfg.stage == "pivot") else None
    source = _trunk_name(trunk_cfg)
    if trunk is not None:
        # stage hand-over: a stage-1 encoder comes with the trunk it was fine-tuned with (export.trunk_init)
        path, fingerprint = trunk_init(cfg.init)
        if path:
            load_trunk_init(path, trunk)
            check_trunk_init(path, fingerprint, trunk, explicit=bool(cfg.init.trunk))
            source = os.path.basename(path)
            log.info("trunk initialised from %s", path)
    if cfg.stage == "pivot":
        stage = build_pivot_stage(cfg, device, trunk, encoder)
        stage.trunk_source = source
        return stage
    if trunk is not None and encoder.uses_clip and hasattr(trunk, "width") and trunk.width != enc_cfg.clip_dim:
        raise TrainingError(f"the CLIP trunk gives tokens of width {trunk.width} but encoder.clip_dim is "
                         f"{enc_cfg.clip_dim}; set encoder.clip_dim (CLIP-H: 1280)")
    if trunk is not None and encoder.uses_clip and hasattr(trunk, "tokens_per_image") and \
            trunk.tokens_per_image != enc_cfg.tokens_per_image:
        raise TrainingError(f"the CLIP trunk gives {trunk.tokens_per_image} tokens per image but encoder.tokens_per_image "
                         f"is {enc_cfg.tokens_per_image}; set it (CLIP-H at 224 px: 257)")
    if cfg.stage == "adapter" and enc_cfg.encoder_type == "omni_id":
        encoder.requires_grad_(False)   # a pretrained Omni-ID is a frozen representation here
    if cfg.engine.gradient_checkpointing:
        n = checkpoint_modules(_encoder_blocks(encoder))
        if trunk is not None and any(p.requires_grad for p in trunk.parameters()):
            n += checkpoint_modules(trunk.blocks())
        log.info("gradient checkpointing on %d encoder/trunk blocks", n)
    identity = IdentityEncoding(encoder, trunk, arcface_fn)
    if cfg.stage == "mtd":
        m = cfg.mtd
        decoder = MaskedTransformerDecoder(encoder.output_dim, cfg.target_resolution, m.patch, m.dim, m.heads,
                                           m.mlp_ratio, m.cross_blocks, m.self_blocks)
        if cfg.engine.gradient_checkpointing:
            checkpoint_modules(decoder.blocks())
        return Stage(MTDStage(identity, decoder, m.mask_ratio, m.loss_on), encoder, trunk, trunk_source=source)
    patcher, clip, vae = load_base(cfg.base, device)
    adapter = build_adapter(cfg.base.family, patcher.model.diffusion_model, encoder.output_dim, cfg.base.hidden_init)
    if cfg.init.adapter:
        load_adapter_init(cfg.init.adapter, adapter, cfg.base.family)
    decoder = DiffusionDecoder(patcher, clip, vae, cfg.base.family, adapter, cfg.base, device, cfg.target_resolution,
                               checkpointing=cfg.engine.gradient_checkpointing)
    notes = (f"inference tensors replaced in the base model: {decoder.inference_tensors_fixed}",)
    module = FlowStage(identity, adapter, decoder, cfg.base.id_drop, cfg.base.text_drop)
    return Stage(module, encoder, trunk, adapter, cfg.base.family, notes, source)


def _trunk_name(trunk_cfg) -> str:
    if trunk_cfg.kind == "tiny":
        return f"tiny stand-in (seed {trunk_cfg.seed})"
    return os.path.basename(trunk_cfg.path) if trunk_cfg.kind == "clip_vision" else ""


def _encoder_blocks(encoder: nn.Module) -> list:
    t = getattr(encoder, "transformer", None)
    return [] if t is None else list(t.cross_blocks) + list(t.self_blocks)


def param_groups(module: nn.Module, trunk: Optional[nn.Module], cfg: TrainConfig) -> list:
    """AdamW groups: no weight decay on biases, norms, queries/embeddings (1-D or marked), trunk lr scaled."""
    trunk_ids = {id(p) for p in trunk.parameters()} if trunk is not None else set()
    groups: dict = {}
    for n, p in module.named_parameters():
        if not p.requires_grad:
            continue
        decay = p.ndim >= 2 and not any(s in n for s in ("queries", "pos", "mask_token", "token_offset"))
        scale = cfg.trunk.lr_scale if id(p) in trunk_ids else 1.0
        key = (decay, scale)
        groups.setdefault(key, []).append(p)
    if not groups:
        raise TrainingError("nothing to train: every parameter is frozen")
    return [{"params": ps, "weight_decay": cfg.optim.weight_decay if d else 0.0, "lr": cfg.optim.lr * s}
            for (d, s), ps in groups.items()]


# ---------------------------------------------------------------------------------------------------
# The loop


def make_accelerator(cfg: TrainConfig):
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.state import AcceleratorState, GradientState, PartialState
    # A single-process caller (tests, notebooks) may train several times with different settings:
    # accelerate's process-wide state would keep the first run's mixed precision.
    if int(os.environ.get("WORLD_SIZE", "1")) == 1 and AcceleratorState._shared_state:
        AcceleratorState._reset_state(reset_partial_state=not PartialState().use_distributed)
        GradientState._reset_state()
    return Accelerator(mixed_precision=cfg.engine.mixed_precision, gradient_accumulation_steps=cfg.optim.grad_accum,
                       kwargs_handlers=[DistributedDataParallelKwargs(
                           find_unused_parameters=cfg.engine.find_unused_parameters)])


def checkpoint_dirs(output_dir: str) -> list:
    d = os.path.join(output_dir, "checkpoints")
    if not os.path.isdir(d):
        return []
    return sorted(os.path.join(d, n) for n in os.listdir(d) if n.startswith("step_"))


def resolve_resume(output_dir: str, resume: Optional[str]) -> Optional[str]:
    if not resume:
        return None
    if resume == "latest":
        found = checkpoint_dirs(output_dir)
        return found[-1] if found else None
    if not os.path.isdir(resume):
        raise FileNotFoundError(f"no checkpoint folder {resume}")
    return resume


def build_loader(cfg: TrainConfig, records) -> tuple[IdentityDataset, EpochSampler, DataLoader]:
    ds = IdentityDataset(records, cfg.data, cfg.seed, cfg.target_resolution, cfg.data.input_resolution)
    sampler = EpochSampler(len(ds), cfg.seed)
    dl = DataLoader(ds, batch_size=cfg.optim.batch_size, sampler=sampler, collate_fn=collate_identities,
                    drop_last=True, num_workers=cfg.data.workers, persistent_workers=cfg.data.workers > 0)
    return ds, sampler, dl


def _to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def train(cfg: TrainConfig, *, arcface_fn: Optional[Callable] = None, resume: Optional[str] = None,
          stop_at_step: Optional[int] = None, dump_grads: Optional[str] = None,
          records=None) -> dict:
    """Run (or continue) a training run; returns a summary (losses per step, exported files, ...).

    ``stop_at_step``: stop (with a checkpoint) after this many optimizer steps, without changing the
    schedule's horizon (``optim.max_steps``). ``dump_grads``: save the synchronised gradients of the
    first optimizer step (main process) to this file, for checking distributed runs.
    """
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    acc = make_accelerator(cfg)
    main = acc.is_main_process
    out = cfg.output_dir
    if main:
        os.makedirs(out, exist_ok=True)
        cfg.save(os.path.join(out, "config.yaml"))
    if cfg.engine.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    set_seed(cfg.seed)
    stage = build_stage(cfg, acc.device, arcface_fn)
    module = stage.module.to(acc.device)
    for note in stage.notes:
        log.info(note)

    if records is None:
        records = load_records(cfg.data)
    train_records, held = split_identities(records, cfg.data.holdout, cfg.data.holdout_fraction, cfg.seed)
    if held and main:
        with open(os.path.join(out, "holdout.json"), "w") as f:
            json.dump(sorted(r.name for r in held), f, indent=1)
    ds, sampler, dl = build_loader(cfg, train_records)
    if len(ds) < cfg.optim.batch_size * acc.num_processes:
        raise TrainingError(f"{len(ds)} identities cannot fill one batch of {cfg.optim.batch_size} x "
                         f"{acc.num_processes} processes")

    opt = torch.optim.AdamW(param_groups(module, stage.trunk, cfg), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                            eps=cfg.optim.eps)
    warm = cfg.optim.warmup_steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) if warm > 0 else 1.0)
    # The scheduler is not handed to accelerate (which would step it once per process per step): it
    # counts optimizer steps whatever the world size, and is saved as a registered object.
    module, opt, dl = acc.prepare(module, opt, dl)
    raw = acc.unwrap_model(module)
    state = TrainState()
    acc.register_for_checkpointing(state, sched)
    ema = None
    if cfg.engine.ema_decay > 0:
        ema = EMA(raw, cfg.engine.ema_decay)
        acc.register_for_checkpointing(ema)
    ckpt = resolve_resume(out, resume)
    if ckpt:
        acc.load_state(ckpt)
        log.info("resumed from %s at step %d (epoch %d, batch %d)", ckpt, state.step, state.epoch,
                 state.batch_in_epoch)

    probe_batch = _to_device(collate_identities([ds[(0, i)] for i in range(min(len(ds), cfg.optim.batch_size))]),
                             acc.device)
    probes: dict = {}

    def probe():
        if not main or not cfg.log.probe:
            return
        was = raw.training
        raw.eval()
        with torch.no_grad(), acc.autocast():
            probes[state.step] = float(raw(probe_batch)["loss"])
        raw.train(was)
        if log_f is not None:
            log_f.write(json.dumps({"step": state.step, "probe_loss": probes[state.step]}) + "\n")

    max_steps = cfg.optim.max_steps
    stop = min(max_steps, stop_at_step) if stop_at_step else max_steps
    losses: dict = {}
    pbar = tqdm(total=stop, initial=state.step, disable=not (main and cfg.log.progress), desc=f"train {cfg.stage}",
                dynamic_ncols=True)
    log_f = open(os.path.join(out, "log.jsonl"), "a") if main else None
    t_last, n_last = time.perf_counter(), 0
    micro_losses: list = []
    saved: list = []
    checked_grads = False

    def save(step):
        path = os.path.join(out, "checkpoints", f"step_{step:07d}")
        acc.save_state(path)
        saved.append(path)
        if main and cfg.log.keep_checkpoints > 0:
            for old in checkpoint_dirs(out)[:-cfg.log.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()

    try:
        probe()
        while state.step < stop:
            sampler.set_epoch(state.epoch)
            dl.set_epoch(state.epoch)
            loader = dl
            if state.batch_in_epoch:
                loader = acc.skip_first_batches(dl, state.batch_in_epoch)
                loader.set_epoch(state.epoch)
            exhausted = True
            for batch in loader:
                batch = _to_device(batch, acc.device)
                first_micro = not micro_losses
                with acc.accumulate(module):
                    res = module(batch)
                    acc.backward(res["loss"])
                    micro_losses.append(res["loss"].detach())
                    if acc.sync_gradients:
                        if state.step == 0 and not checked_grads:
                            _check_all_grads(raw, cfg)
                            checked_grads = True
                        if dump_grads and state.step == 0:
                            _dump_grads(acc, raw, dump_grads)
                        if cfg.optim.max_grad_norm > 0:
                            acc.clip_grad_norm_(module.parameters(), cfg.optim.max_grad_norm)
                    opt.step()
                    if acc.sync_gradients:
                        sched.step()
                    opt.zero_grad(set_to_none=True)
                if first_micro:
                    image_batch = batch
                state.batch_in_epoch += 1
                n_last += batch["targets"].shape[0] * acc.num_processes
                if not acc.sync_gradients:
                    continue
                state.step += 1
                if ema is not None:
                    ema.update(raw)
                loss = acc.reduce(torch.stack(micro_losses).mean(), reduction="mean").item()
                micro_losses = []
                losses[state.step] = loss
                if not math.isfinite(loss):
                    raise FloatingPointError(f"loss is {loss} at step {state.step}: lower optim.lr or use bf16/no")
                pbar.update(1)
                pbar.set_postfix(loss=f"{loss:.4f}")
                if main and (state.step % max(1, cfg.log.every) == 0 or state.step == stop):
                    now = time.perf_counter()
                    rec = {"step": state.step, "loss": loss, "lr": sched.get_last_lr()[0], "epoch": state.epoch,
                           "samples_per_s": n_last / max(now - t_last, 1e-9), "time": time.time()}
                    log_f.write(json.dumps(rec) + "\n")
                    log_f.flush()
                    t_last, n_last = now, 0
                if cfg.log.image_every and (state.step % cfg.log.image_every == 0 or state.step == 1) and main:
                    _save_images(raw, image_batch, os.path.join(out, "images", f"step_{state.step:07d}.png"))
                if cfg.log.probe_every and state.step % cfg.log.probe_every == 0 and state.step < stop:
                    probe()
                if cfg.log.save_every and state.step % cfg.log.save_every == 0 and state.step < stop:
                    save(state.step)
                if state.step >= stop:
                    exhausted = False
                    break
            if exhausted:
                state.epoch += 1
                state.batch_in_epoch = 0
        probe()
        if not saved or not saved[-1].endswith(f"step_{state.step:07d}"):
            save(state.step)
        exported = {}
        if main:
            exported = export_run(cfg, stage, raw, ema, state.step)
        acc.wait_for_everyone()
    finally:
        pbar.close()
        if log_f is not None:
            log_f.close()
    summary = {"losses": losses, "probe": probes, "step": state.step, "exported": exported, "checkpoints": saved,
               "notes": list(stage.notes), "num_processes": acc.num_processes, "device": str(acc.device)}
    acc.end_training()
    return summary


def _check_all_grads(raw: nn.Module, cfg: TrainConfig) -> None:
    """Every trainable parameter must get a gradient: under DDP a parameter without one makes the
    gradient all-reduce silently incomplete (without find_unused_parameters)."""
    missing = [n for n, p in raw.named_parameters() if p.requires_grad and p.grad is None]
    if missing and not cfg.engine.find_unused_parameters:
        raise RuntimeError(f"{len(missing)} trainable parameters got no gradient (e.g. {missing[:3]}): freeze them, "
                           "or set engine.find_unused_parameters: true")


def _dump_grads(acc, raw: nn.Module, path: str) -> None:
    grads = {n: p.grad.detach().float().cpu().clone() for n, p in raw.named_parameters()
             if p.requires_grad and p.grad is not None}
    if acc.is_main_process:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        torch.save(grads, path)


def _save_images(raw: nn.Module, batch: dict, path: str) -> None:
    fn = getattr(raw, "reconstruct", None)
    if fn is None:
        return
    was = raw.training
    raw.eval()
    try:
        save_image_grid(path, fn(batch))
    except Exception as e:   # images are a diagnostic: never stop a run for them
        log.warning("could not write reconstruction images: %s", e)
    finally:
        raw.train(was)


def export_run(cfg: TrainConfig, stage: Stage, raw: nn.Module, ema: Optional[EMA], step: int) -> dict:
    """Write the run's export files (EMA weights when enabled and export.use_ema)."""
    out = os.path.join(cfg.output_dir, "export")
    files = {}
    ctx = ema.applied(raw) if (ema is not None and cfg.export.use_ema) else contextlib.nullcontext()
    trained = stage.trunk is not None and any(p.requires_grad for p in stage.trunk.parameters())
    extra = {"trainer_stage": cfg.stage, "trainer_steps": step, "trunk_trained": int(trained)}
    with ctx:
        # which trunk the exported weights belong to (omni_encoder.trunk_identity): the nodes check it
        extra.update(trunk_metadata(trunk_state_dict(stage.trunk) if stage.trunk is not None else None, trained,
                                    stage.trunk_source))
        if cfg.stage == "mtd":
            files["encoder"] = export_stage1(os.path.join(out, "encoder_stage1.safetensors"), stage.encoder, extra)
        elif cfg.stage == "pivot":
            files["pivot"] = export_pivot(os.path.join(out, cfg.export.name or "pivot_id.safetensors"), stage, extra)
        else:
            name = cfg.export.name or f"omni_id_{stage.family}.safetensors"
            if stage.encoder.config.encoder_type != "omni_id" and not cfg.export.name:
                name = f"{stage.encoder.config.encoder_type}_{stage.family}.safetensors"
            files["weights"] = export_identity_weights(os.path.join(out, name), stage.encoder,
                                                       adapter_proj_state(stage.adapter, stage.family), stage.family,
                                                       cfg.export.injected_blocks, extra)
        if trained:
            files["clip_vision"] = export_trunk(os.path.join(out, FINETUNED_FILE),
                                                trunk_state_dict(stage.trunk))
    return files

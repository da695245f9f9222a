"""Stage two: train a Hybrid Distill student from cached teacher targets. No teacher runs here.

    distill(cfg: DistillConfig) -> Path   (the run directory)

Inputs are the dataset manifest, the MIM store (relations / attention / block features and the
masks) and the discriminative store (final-layer features) written by `hdpipe extract`. Everything
the loss needs comes out of them; the teachers' depth, head count and widths are read from the
stores' attributes and array shapes, so this module never builds or loads a teacher model.

Run directory `<runs_dir>/<name>/`:
    config.yaml          resolved DistillConfig
    env.json             git SHA, package versions, command line, world size, device
    log.jsonl            one JSON line per optimizer step: step, epoch, lr, the loss's meters (`loss`,
                         the weighted sum, then `loss_<term>` per term of `pipeline.train.losses`:
                         loss_features, loss_relations, ...), images_per_s (global, this step),
                         elapsed_s (wall seconds since this process started the run), and one line per
                         epoch end (the epoch's averaged meters)
    plots/loss.csv       step, epoch, lr and the loss's meters per step, for `dvc plots` (header = the
                         first step row's keys without timings)
    metrics.json         epoch, step and the last epoch's averaged meters, the same keys (DVC metrics)
    ranks/rank<r>.json   each rank's final step and weights digest (equal on every rank under DDP)
    checkpoints/last.pt  atomic checkpoint, every `checkpoint_every` optimizer steps and at each
                         epoch end (model + heads, optimizer, scheduler, loader position, RNG states)
    student/             model.safetensors (timm keys) + config.json: the exported encoder

Resume (`resume: true`): the run restarts from `checkpoints/last.pt`. A checkpoint holds the loader
position as (epoch, batches done in that epoch); checkpoints are only taken at optimizer-step
boundaries, so a mid-epoch resume rebuilds that epoch's loader with `skip_batches = batches done`
(the loader replays the same batch order), restores every RNG, and continues; on CPU the loss curve
is identical to an uninterrupted run. Log rows written after the checkpoint are dropped and redone.
One writer per run: `<runs_dir>/<name>.hdpipe-lock` (`pipeline.locks`) refuses a second one.
The resumed config must equal the checkpoint's (device, compile, logging and checkpoint cadence
excepted); `workers`, `mix_shards` and the world size may change only at an epoch boundary (they
decide the loader's batch order), and then the lr is re-scaled to the new global batch.

DDP: under torchrun (`RANK`/`WORLD_SIZE` in the environment) the process group is initialized
with NCCL on GPU and gloo on CPU; each rank reads its own shards with the same number of steps;
rank 0 alone writes files, every rank reads the checkpoint on resume (so the run directory must be
on a filesystem all nodes share; ranks that disagree stop with an error). The logged losses are
averaged over ranks.

    torchrun --nproc_per_node=8 -m pipeline.cli distill --config params.yaml

`build_run` wires a `pipeline.train.loop.Run` (student, loss, optimizer, schedule, loader config, resumed
state); `distill` calls `pipeline.train.loop.train_steps(run, batches, max_steps)` up to each checkpoint,
epoch after epoch, and exports. Loss terms and their weights: `pipeline.train.losses` and `loss_weights`.
"""
from __future__ import annotations

import dataclasses
import json
import platform
import sys
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Literal

import torch
from timm.data import resolve_data_config
from torch.nn.parallel import DistributedDataParallel as DDP

from pipeline.config import to_dict, write_resolved
from pipeline.data.manifest import read_manifest
from pipeline.errors import ConfigError
from pipeline.provenance import environment
from pipeline.targets.layout import MimTarget
from pipeline.targets.masking import Masking
from pipeline.targets.weights import weights_digest
from pipeline.train.checkpoint import export_student, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from pipeline.train.distributed import barrier, gather_objects, locked_group, same_on_every_rank
from pipeline.train.epochs import epoch_iterators
from pipeline.train import loader, losses  # by module: the step count and the loss are looked up when used
from pipeline.train.loader import LoaderConfig
from pipeline.train.loop import Run, TrainState, train_steps
from pipeline.train.losses import TeacherMode, term_weights
from pipeline.train.online import build_online
from pipeline.train.optim import WarmupCosine, build_optimizer, scaled_lr
from pipeline.train.plan import view_reuse
from pipeline.train.runlog import RunLog, prepare_run_dir
from pipeline.train.sources import TeacherShapes, resolve_sources
from pipeline.train.student import MaskedStudent
from pipeline.urls import atomic_write_bytes


@dataclass(frozen=True)
class DistillConfig:
    manifest: str = "manifests/sample.json"  # dataset manifest JSON the stores were extracted from
    # where targets come from: the stores (hdpipe), or both teachers run at every step (the baseline it replaces)
    source: Literal["cache", "online"] = "cache"
    mim_store: str | None = "targets/mae.zarr"  # MIM teacher store URL (relations, masks); None = disc_only
    disc_store: str | None = "targets/clip.zarr"  # discriminative teacher store URL (features); None = mim_only
    # online: FILE:SECTION describing the MIM teacher, view plan and masks, as for hdpipe extract
    online_mim: str = "params.yaml:extract_mim"
    online_disc: str = "params.yaml:extract_disc"  # online: FILE:SECTION describing the discriminative teacher
    # cached: which stored view an epoch shows: random over views_used, or cycle (epoch mod views_used); online views
    # are always fresh
    view_schedule: Literal["random", "cycle"] = "random"
    views_used: int = 0  # cached: use only the first N stored views (0 = all), so one extraction serves a views sweep
    # fraction F of the view's stored patch tokens the student sees each step, a new seeded subset every epoch ([CLS]
    # always; targets cut to the same tokens; 1 = off)
    token_resample: float = 1.0
    # cached: the student's input from the MIM store's pixels (auto: when it holds them for this student; store:
    # required; render: always decode and render the tars' images); the same input bit for bit either way
    student_pixels: Literal["auto", "store", "render"] = "auto"
    model: str = "vit_base_patch16_224"  # timm ViT name of the student (random init)
    model_kwargs: dict = field(default_factory=dict)  # timm.create_model kwargs (img_size, patch_size, depth, ...)
    # teacher blocks (1-based) to distill, a subset of the store's; () = all stored
    relation_layers: tuple[int, ...] = ()
    mim_target: MimTarget = "relations"  # which T_m target (paper: relations)
    teachers: TeacherMode = "hybrid"  # which loss terms: both, features only, MIM only
    masking: Masking = "progressive"  # student token mask (paper: progressive)
    alpha: float = 1.0  # weight of the MIM (relation) term, paper's α
    # weights of extra loss terms {name: weight} registered in pipeline.train.losses.LOSS_TERMS, e.g. {l2: 0.1}
    # (features weighs 1 and relations α by teachers and alpha)
    loss_weights: dict = field(default_factory=dict)
    smoothl1_beta: float = 1.0  # SmoothL1 β in target units (the paper does not state it; PyTorch's default)
    epochs: int = 2  # training epochs (paper: 300 main results, 100 ablations; small default for the sample)
    batch_size: int = 16  # images per device per micro-batch
    accum_steps: int = 1  # micro-batches per optimizer step (global batch = batch_size × accum_steps × world size)
    base_lr: float = 6e-4  # lr at global batch 1024; actual lr = base_lr × global_batch / 1024
    min_lr: float = 0.0  # lr at the end of the cosine decay
    weight_decay: float = 0.05  # AdamW decoupled weight decay (not on norms, biases, pos_embed, cls_token)
    warmup_epochs: float = 1.0  # linear warmup length in epochs (converted to optimizer steps)
    clip_grad: float | None = None  # max global grad norm; None = no clipping
    compile: bool = False  # torch.compile the student (GPU runs; first steps are slow while compiling)
    workers: int = 2  # DataLoader worker processes per rank (0 = load in the main process)
    mix_shards: int = 4  # tar shards whose rows each loader worker shuffles together (memory: that many shards at once)
    seed: int = 0  # seed for student init, view choice per epoch, shuffling, random masks
    runs_dir: str = "runs"  # parent folder of run directories
    name: str = "hybrid"  # run name: outputs go to <runs_dir>/<name>/
    checkpoint_every: int = 200  # optimizer steps between checkpoints (0 = only at epoch ends)
    resume: bool = False  # continue from <run>/checkpoints/last.pt (none there: start fresh)
    device: str = "auto"  # auto (CUDA when present, else CPU), cpu, cuda, cuda:N
    log_every: int = 1  # optimizer steps between log.jsonl/plots rows (losses averaged over ranks)
    print_every: int = 50  # optimizer steps between progress lines on stderr (loss, images/s, ETA); 0 = epoch ends only

    def validate(self) -> None:
        if self.source == "cache" and self.teachers in ("hybrid", "mim_only") and not self.mim_store:
            raise ConfigError(f"teachers '{self.teachers}' needs mim_store (the MIM teacher's store URL)")
        if self.source == "cache" and self.teachers in ("hybrid", "disc_only") and not self.disc_store:
            raise ConfigError(f"teachers '{self.teachers}' needs disc_store (the discriminative teacher's store URL)")
        if self.views_used < 0:
            raise ConfigError(f"views_used must be >= 0 (0 = every stored view), got {self.views_used}")
        if not 0 < self.token_resample <= 1:
            raise ConfigError(f"token_resample must be a fraction in (0, 1] (1 = every stored token), "
                              f"got {self.token_resample}")
        for key in ("epochs", "batch_size", "accum_steps", "log_every", "mix_shards"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.checkpoint_every < 0 or self.workers < 0 or self.print_every < 0:
            raise ConfigError("checkpoint_every, print_every and workers must be >= 0")
        if any(not isinstance(w, (int, float)) or w < 0 for w in self.loss_weights.values()):
            raise ConfigError(f"loss_weights must map loss term names to numbers >= 0, got {self.loss_weights}")
        if self.alpha < 0 or self.smoothl1_beta <= 0 or self.base_lr <= 0 or self.warmup_epochs < 0:
            raise ConfigError("alpha >= 0, smoothl1_beta > 0, base_lr > 0 and warmup_epochs >= 0 are required")

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.name


# Fields that may differ between a checkpoint's config and the resuming run's (they change neither
# the math nor the batch order). `workers`, `mix_shards` and the world size decide the loader's batch
# order, so they may change only when the checkpoint is at an epoch boundary.
RESUME_FREE = {"resume", "device", "log_every", "print_every", "checkpoint_every", "compile", "runs_dir",
               "student_pixels"}  # the same input either way
EPOCH_BOUNDARY_FREE = {"workers", "mix_shards"}  # decide the loader's batch order: free at epoch ends only


# ----------------------------------------------------------------------------- stores and student
def _loader_roles(cfg: DistillConfig) -> tuple[str | None, tuple[int, ...] | None]:
    """(disc store the loader reads, relation layers it serves) for the teachers mode: disc_only
    still replays the MIM store's views and masks but loads no MIM target."""
    disc = cfg.disc_store if cfg.teachers != "mim_only" else None
    layers = () if cfg.teachers == "disc_only" else (tuple(cfg.relation_layers) or None)
    return disc, layers


def target_sources(cfg: DistillConfig):
    """What the stores serve, checked against the manifest, each other and this run's settings
    (`pipeline.train.sources.resolve_sources`, the one owner of those checks), before a student is built."""

    read_manifest(cfg.manifest)  # a missing or malformed manifest is reported first, by name
    disc, layers = _loader_roles(cfg)
    return resolve_sources(cfg.manifest, cfg.mim_store, disc, cfg.masking, layers, cfg.mim_target)


def build_student(cfg: DistillConfig, src: TeacherShapes) -> MaskedStudent:
    """The student for these teachers' shapes (stores or online); a student that cannot serve them is a ConfigError."""
    student = MaskedStudent(
        cfg.model,
        cfg.model_kwargs,
        feature_dim=src.feature_dim if cfg.teachers != "mim_only" else None,
        relation_layers=src.relation_layers,
        teacher_depth=src.mim_depth,
        teacher_heads=src.mim_heads,
        mim_target=cfg.mim_target,
        mim_dim=src.mim_dim,
    )
    if tuple(student.grid) != tuple(src.grid):
        raise ConfigError(
            f"student '{cfg.model}' with model_kwargs {cfg.model_kwargs} has a {student.grid} patch grid but the "
            f"stores were extracted on a {src.grid} grid; set model_kwargs img_size/patch_size to match the teachers"
        )
    return student


def loader_config(cfg: DistillConfig, student: MaskedStudent, device: torch.device, online: dict | None = None):
    """The loader's config for this run: the student's input size and normalization, and which
    targets the teachers mode reads (disc_only still replays the MIM store's views and masks)."""


    data_cfg = resolve_data_config({}, model=student.vit)  # mean/std/interpolation of the model family
    h, w = student.vit.patch_embed.img_size  # the built size (model_kwargs img_size), not the family's default
    if h != w:
        raise ConfigError(f"student img_size {(h, w)} is not square; the stored views are square crops")
    disc, layers = _loader_roles(cfg)
    stores = {} if online else {"mim_store": cfg.mim_store, "disc_store": disc}
    return LoaderConfig(
        manifest=cfg.manifest, batch_size=cfg.batch_size, num_workers=cfg.workers, mix_shards=cfg.mix_shards,
        seed=cfg.seed, img_size=int(h), mean=tuple(float(v) for v in data_cfg["mean"]),
        std=tuple(float(v) for v in data_cfg["std"]), interpolation=str(data_cfg.get("interpolation", "bicubic")),
        masking=cfg.masking, relation_layers=layers, mim_target=cfg.mim_target, pin_memory=device.type == "cuda",
        # On a GPU the loader ships uint8 pixels (4x fewer bytes to pin and copy); they are
        # normalized on the GPU, bit for bit what the loader's own float path gives.
        image_transport="uint8" if device.type == "cuda" else "float",
        # and the stored codes of the targets, decoded on the GPU (`pipeline.train.target_rows`)
        target_transport="encoded" if device.type == "cuda" else "decoded",
        view_schedule=cfg.view_schedule, views_used=cfg.views_used, token_resample=cfg.token_resample,
        student_pixels=cfg.student_pixels, **stores, **(online or {}),
    )


# ----------------------------------------------------------------------------- the run
def build_run(cfg: DistillConfig, dist, device: torch.device) -> Run:
    """Student, loss, optimizer, schedule and loader config for `cfg`, resumed from the run's
    checkpoint when `cfg.resume` (its config must match; see RESUME_FREE)."""

    run_dir = cfg.run_dir
    term_weights(cfg.teachers, cfg.alpha, cfg.loss_weights)  # an unknown loss term is refused before any work
    if dist.main:
        prepare_run_dir(run_dir)
    online = online_loader = None
    if cfg.source == "online":

        shapes, online, online_loader = build_online(
            cfg.online_mim, cfg.online_disc, teachers=cfg.teachers, relation_layers=tuple(cfg.relation_layers),
            mim_target=cfg.mim_target, masking=cfg.masking, seed=cfg.seed, device=device,
            token_resample=cfg.token_resample)
    else:
        src = target_sources(cfg)
        shapes = src.shapes()
    torch.manual_seed(cfg.seed)
    student = build_student(cfg, shapes).to(device)
    lcfg = loader_config(cfg, student, device, online_loader)
    batches = loader.steps_per_epoch(lcfg, dist.world_size)
    steps_per = batches // cfg.accum_steps  # optimizer steps per epoch; trailing micro-batches are dropped
    if steps_per < 1:
        raise ConfigError(
            f"an epoch has {batches} batches of {cfg.batch_size} per rank on {dist.world_size} rank(s), fewer than "
            f"accum_steps={cfg.accum_steps}: lower batch_size/accum_steps or use more data"
        )
    global_batch = cfg.batch_size * cfg.accum_steps * dist.world_size
    lr = scaled_lr(cfg.base_lr, global_batch)
    optimizer = build_optimizer(student, lr, cfg.weight_decay)
    scheduler = WarmupCosine(optimizer, lr, total_steps=steps_per * cfg.epochs,
                             warmup_steps=round(cfg.warmup_epochs * steps_per), min_lr=cfg.min_lr)
    log = RunLog(run_dir, dist.main, name=f"distill {cfg.name}", log_every=cfg.log_every,
                 print_every=cfg.print_every, total_steps=steps_per * cfg.epochs, epochs=cfg.epochs)
    state = TrainState()
    ckpt_path = run_dir / "checkpoints" / "last.pt"
    ckpt = load_checkpoint(str(ckpt_path)) if cfg.resume else None
    if ckpt is None and not cfg.resume and ckpt_path.exists():
        raise ConfigError(f"{ckpt_path} exists: pass --resume to continue that run, or choose another --name")
    if ckpt is not None:
        check_resume(cfg, ckpt, ckpt_path, dist.world_size)
        student.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        state = TrainState(**ckpt["state"])
        set_rng_state(ckpt["rng"][dist.rank] if dist.rank < len(ckpt["rng"]) else ckpt["rng"][0])
        log.truncate(state.step)
    else:
        log.start()
    if dist.main and cfg.source == "cache":  # once the run is known to go ahead
        line, warn = view_reuse(cfg.epochs, cfg.views_used or src.num_views, cfg.token_resample)
        print(f"distill {cfg.name}: {'warning: ' if warn else ''}{line}", file=sys.stderr, flush=True)
    model: torch.nn.Module = student
    if dist.world_size > 1:

        # Without both teachers some parameters get no gradient (feature head / last blocks).
        model = DDP(student, device_ids=[device] if device.type == "cuda" else None,
                    find_unused_parameters=cfg.teachers != "hybrid")
    if cfg.compile:
        model = torch.compile(model)
    loss_fn = partial(losses.hybrid_loss, blocks=student.capture_blocks, head_rule=student.head_rule, alpha=cfg.alpha,
                      beta=cfg.smoothl1_beta, target=cfg.mim_target, teachers=cfg.teachers,
                      loss_weights=cfg.loss_weights)
    return Run(student, model, loss_fn, optimizer, scheduler, lcfg, steps_per, global_batch, lr, state, log, dist,
               device, accum_steps=cfg.accum_steps, clip_grad=cfg.clip_grad, resumed=ckpt is not None, online=online)


def save(run: Run, cfg: DistillConfig) -> None:
    """Atomic checkpoint of the whole run (every rank's RNG states; rank 0 writes)."""

    rngs = gather_objects(rng_state(), run.dist)
    run.state.saved_step = run.state.step
    if run.dist.main:
        save_checkpoint(str(run.checkpoint_path), {
            "model": run.student.state_dict(), "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(), "scaler": None,  # bf16 autocast: no loss scaling
            "state": dataclasses.asdict(run.state), "rng": rngs, "config": to_dict(cfg),
            "world_size": run.dist.world_size,
        })
    barrier(run.dist)


def distill(cfg: DistillConfig) -> Path:
    """Train the student for `cfg.epochs` from the stores, export it, return the run directory. Rank 0
    holds the run folder's writer lock throughout (`pipeline.locks`): a second run on it stops at once."""

    with locked_group(cfg.device, cfg.run_dir, "run folder") as (d, device):  # resume truncates the logs
        run = build_run(cfg, d, device)
        state = run.state
        same_on_every_rank(d, state.step, cfg.run_dir)
        if d.main:
            write_resolved(cfg, cfg.run_dir / "config.yaml")
            env = environment() | {"world_size": d.world_size, "device": str(device), "global_batch": run.global_batch,
                                   "lr": run.lr, "steps_per_epoch": run.steps_per_epoch,
                                   "resumed_from_step": state.step if run.resumed else None}
            atomic_write_bytes(str(cfg.run_dir / "env.json"), (json.dumps(env, indent=2) + "\n").encode())
        meters: dict = {}
        # Each epoch's loader starts while the previous epoch ends (no worker start-up stall).
        for epoch, loader_it in epoch_iterators(run.loader_cfg, state.epoch, cfg.epochs, d.rank, d.world_size,
                                                skip_batches=state.batches_done):
            assert epoch == state.epoch
            batches = run.batches(loader_it)
            while state.epoch_steps < run.steps_per_epoch:
                left = run.steps_per_epoch - state.epoch_steps
                if cfg.checkpoint_every:  # stop at the next checkpoint step, save, go on
                    left = min(left, cfg.checkpoint_every - state.step % cfg.checkpoint_every)
                before = state.epoch_steps
                meters = train_steps(run, batches, max_steps=left)
                if state.epoch_steps == before:
                    raise RuntimeError(f"the loader of epoch {state.epoch} ended after {state.batches_done} batches, "
                                       f"before the {run.steps_per_epoch} steps it promised")
                if state.epoch_steps < run.steps_per_epoch:
                    save(run, cfg)
            run.log.epoch_end({"epoch": state.epoch, "step": state.step} | meters)
            state.next_epoch()
            save(run, cfg)
        if d.main:
            if meters:  # (a resumed run that was already finished trains nothing and keeps its metrics)
                summary = {"epoch": cfg.epochs, "step": state.step} | {k: v for k, v in meters.items() if k != "steps"}
                atomic_write_bytes(str(cfg.run_dir / "metrics.json"), (json.dumps(summary, indent=2) + "\n").encode())
            lcfg = run.loader_cfg
            export_student(run.student.encoder_state_dict(), cfg.model, run.student.model_kwargs,
                           cfg.run_dir / "student",
                           preprocessing={"mean": list(lcfg.mean), "std": list(lcfg.std),
                                          "interpolation": lcfg.interpolation})
        # Every rank says what it ended with (DDP keeps the weights equal; multi-node runs check it).

        atomic_write_bytes(str(cfg.run_dir / "ranks" / f"rank{d.rank}.json"), (json.dumps({
            "rank": d.rank, "world_size": d.world_size, "step": state.step, "host": platform.node(),
            "weights_digest": weights_digest(run.student)}, indent=1) + "\n").encode())
        barrier(d)
        return cfg.run_dir


def check_resume(cfg: DistillConfig, ckpt: dict, path: Path, world_size: int) -> None:
    """A resumed run must train the same thing; mid-epoch it must also replay the same batches."""
    saved, now = to_dict(DistillConfig()) | ckpt["config"], to_dict(cfg)  # fields newer than the checkpoint: defaults
    diff = [k for k in now if k not in RESUME_FREE | EPOCH_BOUNDARY_FREE and saved.get(k) != now[k]]
    if diff:
        detail = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs now {now[k]!r}" for k in diff)
        raise ConfigError(f"--resume with settings that differ from {path}: {detail}; use the run's config.yaml "
                          "or another --name")
    if ckpt["state"]["batches_done"]:
        moved = [f"{k} {saved.get(k)} -> {now[k]}" for k in sorted(EPOCH_BOUNDARY_FREE) if saved.get(k) != now[k]]
        if ckpt.get("world_size", 1) != world_size:
            moved.append(f"world size {ckpt.get('world_size', 1)} -> {world_size}")
        if moved:
            raise ConfigError(
                f"{path} is mid-epoch (epoch {ckpt['state']['epoch']}, {ckpt['state']['batches_done']} batches "
                f"done) and "
                f"the loader's batch order depends on {', '.join(moved)}; resume with the same settings"
            )

"""Stage two: train a Hybrid Distill student from cached teacher targets. No teacher runs here.

    distill(cfg: DistillConfig) -> Path   (the run directory)

Inputs are the dataset manifest, the MIM store (relations / attention / block features and the
masks) and the discriminative store (final-layer features) written by `hdpipe extract`. Everything
the loss needs comes out of them; the teachers' depth, head count and widths are read from the
stores' attributes and array shapes, so this module never builds or loads a teacher model.

Run directory `<runs_dir>/<name>/`:
    config.yaml          resolved DistillConfig
    env.json             git SHA, package versions, command line, world size, device
    log.jsonl            one JSON line per optimizer step: step, epoch, lr, loss, loss_features,
                         loss_relations, images_per_s (global, this step), elapsed_s (wall seconds
                         since this process started the run), and one line per epoch end
    plots/loss.csv       step, epoch, lr and the three losses per step, for `dvc plots`
    metrics.json         last epoch's averaged meters (DVC metrics)
    checkpoints/last.pt  atomic checkpoint, every `checkpoint_every` optimizer steps and at each
                         epoch end (model + heads, optimizer, scheduler, loader position, RNG states)
    student/             model.safetensors (timm keys) + config.json: the exported encoder

Resume (`resume: true`): the run restarts from `checkpoints/last.pt`. A checkpoint holds the loader
position as (epoch, batches done in that epoch); checkpoints are only taken at optimizer-step
boundaries, so a mid-epoch resume rebuilds that epoch's loader with `skip_batches = batches done`
(the loader replays the same batch order), restores every RNG, and continues; on CPU the loss curve
is identical to an uninterrupted run. Log rows written after the checkpoint are dropped and redone.
The resumed config must equal the checkpoint's (device, compile, logging and checkpoint cadence
excepted); `workers` and the world size may change only at an epoch boundary (they decide the
loader's batch order), and then the lr is re-scaled to the new global batch.

DDP: under torchrun (`RANK`/`WORLD_SIZE` in the environment) the process group is initialized
with NCCL on GPU and gloo on CPU; each rank reads its own shards with the same number of steps;
rank 0 alone writes files, every rank reads the checkpoint on resume (so the run directory must be
on a filesystem all nodes share; ranks that disagree stop with an error). The logged losses are
averaged over ranks.

    torchrun --nproc_per_node=8 -m pipeline.cli distill --config params.yaml
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from pipeline.train.checkpoint import CHECKPOINT_NAME, export_student, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from pipeline.config import to_dict, write_resolved
from pipeline.device import autocast, pick_device
from pipeline.urls import atomic_write_bytes
from pipeline.errors import ConfigError, HdpipeError, NonFiniteError
from pipeline.train.losses import hybrid_loss
from pipeline.train.optim import build_optimizer, clip_gradients, scaled_lr, WarmupCosine
from pipeline.train.student import MaskedStudent


@dataclass(frozen=True)
class DistillConfig:
    manifest: str = "manifests/sample.json"  # dataset manifest JSON the stores were extracted from
    mim_store: str | None = "targets/mae.zarr"  # MIM teacher store URL (relations, masks); None = disc_only
    disc_store: str | None = "targets/clip.zarr"  # discriminative teacher store URL (features); None = mim_only
    model: str = "vit_base_patch16_224"  # timm ViT name of the student (random init)
    model_kwargs: dict = field(default_factory=dict)  # timm.create_model kwargs (img_size, patch_size, depth, ...)
    relation_layers: tuple[int, ...] = ()  # teacher blocks (1-based) to distill, a subset of the store's; () = all stored
    mim_target: Literal["relations", "attention", "block_features"] = "relations"  # which T_m target (paper: relations)
    teachers: Literal["hybrid", "disc_only", "mim_only"] = "hybrid"  # which loss terms: both, features only, MIM only
    masking: Literal["progressive", "direct", "random", "none"] = "progressive"  # student token mask (paper: progressive)
    alpha: float = 1.0  # weight of the MIM (relation) term, paper's α
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
        if self.teachers in ("hybrid", "mim_only") and not self.mim_store:
            raise ConfigError(f"teachers '{self.teachers}' needs mim_store (the MIM teacher's store URL)")
        if self.teachers in ("hybrid", "disc_only") and not self.disc_store:
            raise ConfigError(f"teachers '{self.teachers}' needs disc_store (the discriminative teacher's store URL)")
        for key in ("epochs", "batch_size", "accum_steps", "log_every", "mix_shards"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.checkpoint_every < 0 or self.workers < 0 or self.print_every < 0:
            raise ConfigError("checkpoint_every, print_every and workers must be >= 0")
        if self.alpha < 0 or self.smoothl1_beta <= 0 or self.base_lr <= 0 or self.warmup_epochs < 0:
            raise ConfigError("alpha >= 0, smoothl1_beta > 0, base_lr > 0 and warmup_epochs >= 0 are required")

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.name


# Fields that may differ between a checkpoint's config and the resuming run's (they change neither
# the math nor the batch order). `workers`, `mix_shards` and the world size decide the loader's batch
# order, so they may change only when the checkpoint is at an epoch boundary.
RESUME_FREE = {"resume", "device", "log_every", "print_every", "checkpoint_every", "compile", "runs_dir"}
EPOCH_BOUNDARY_FREE = {"workers", "mix_shards"}  # decide the loader's batch order: free at epoch ends only


# ----------------------------------------------------------------------------- distributed
@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_pref: str) -> tuple[Dist, torch.device]:
    """torchrun env vars present -> init the process group (NCCL on GPU, gloo on CPU)."""
    import torch.distributed as dist

    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", 0))
        device = pick_device(device_pref, local_rank=local)
        here = False
        if not dist.is_initialized():
            if device.type == "cuda":
                torch.cuda.set_device(device)
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
            here = True
        return Dist(rank, world, local, here), device
    return Dist(), pick_device(device_pref)


def all_mean(values: torch.Tensor, d: Dist) -> torch.Tensor:
    """Mean of a small float tensor over ranks (identity without DDP)."""
    if d.world_size == 1:
        return values
    import torch.distributed as dist

    values = values.clone()
    dist.all_reduce(values)
    return values / d.world_size


# ----------------------------------------------------------------------------- stores and checks
def _loader_roles(cfg: DistillConfig) -> tuple[str | None, tuple[int, ...] | None]:
    """(disc store the loader reads, relation layers it serves) for the teachers mode: disc_only
    still replays the MIM store's views and masks but loads no MIM target."""
    disc = cfg.disc_store if cfg.teachers != "mim_only" else None
    layers = () if cfg.teachers == "disc_only" else (tuple(cfg.relation_layers) or None)
    return disc, layers


def target_sources(cfg: DistillConfig):
    """What the stores serve, checked against the manifest, each other and this run's settings
    (`pipeline.train.loader.resolve_sources`, the one owner of those checks), before a student is built."""
    from pipeline.train.loader import resolve_sources
    from pipeline.data.manifest import read_manifest

    read_manifest(cfg.manifest)  # a missing or malformed manifest is reported first, by name
    disc, layers = _loader_roles(cfg)
    return resolve_sources(cfg.manifest, cfg.mim_store, disc, cfg.masking, layers, cfg.mim_target)


def build_student(cfg: DistillConfig, src) -> MaskedStudent:
    """The student for these stores; a student that cannot serve them is a ConfigError."""
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


# ----------------------------------------------------------------------------- run directory
def prepare_run_dir(run_dir: Path) -> None:
    """Create the run directory or fail with a clear error when it cannot be written."""
    try:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        (run_dir / "plots").mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise HdpipeError(
            f"run directory {run_dir} is not writable ({e.strerror or e}); choose another --runs-dir or --name"
        ) from None


def environment() -> dict:
    """What produced this run: git SHA, versions, command, host."""
    import timm

    def git(*args):
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                                  cwd=Path(__file__).resolve().parent).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            return None

    from pipeline import __version__

    return {
        "git_sha": git("rev-parse", "HEAD"),
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "hdpipe": __version__,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
        "command": sys.argv,
        "host": platform.node(),
    }


class RunLog:
    """log.jsonl + plots/loss.csv, appended per step by rank 0; truncated to a step on resume."""

    # No timings here: the plot table is a pure function of the run, so a resumed run's equals an
    # uninterrupted one's byte for byte (speed stays in log.jsonl).
    CSV_FIELDS = ("step", "epoch", "lr", "loss", "loss_features", "loss_relations")

    def __init__(self, run_dir: Path, enabled: bool, name: str = "distill"):
        self.jsonl = run_dir / "log.jsonl"
        self.csv = run_dir / "plots" / "loss.csv"
        self.enabled = enabled
        self.name = name
        self.t_start = time.perf_counter()  # `elapsed_s` of each row counts from here (this process)
        self.first_step = 0  # the step this process started from (a resume starts later)

    def say(self, row: dict, total_steps: int, epochs: int) -> None:
        """One progress line on stderr (rank 0): where the run is, its losses, speed and ETA."""
        if not self.enabled:
            return
        from pipeline.progress import eta

        done = row["step"] - self.first_step
        rate = done / max(time.perf_counter() - self.t_start, 1e-9)
        left = (total_steps - row["step"]) / rate if rate > 0 else None
        what = "epoch end" if row.get("event") == "epoch_end" else f"lr {row['lr']:.3g}, {row['images_per_s']:.1f} img/s"
        print(f"{self.name}: epoch {row['epoch'] + 1}/{epochs} step {row['step']}/{total_steps} loss {row['loss']:.4f} "
              f"(features {row['loss_features']:.4f}, relations {row['loss_relations']:.4f}), {what}, "
              f"ETA {eta(left)}", file=sys.stderr, flush=True)

    def truncate(self, step: int) -> None:
        """Keep rows of steps <= `step` (those after the checkpoint are redone on resume)."""
        if not self.enabled:
            return
        rows = [json.loads(l) for l in self.jsonl.read_text().splitlines() if l.strip()] if self.jsonl.exists() else []
        rows = [r for r in rows if r.get("step", 0) <= step and not (r.get("event") == "epoch_end" and r["step"] > step)]
        self.jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
        self.csv.write_text(",".join(self.CSV_FIELDS) + "\n" + "".join(
            ",".join(str(r[k]) for k in self.CSV_FIELDS) + "\n" for r in rows if "event" not in r))

    def start(self) -> None:
        if self.enabled:
            self.jsonl.write_text("")
            self.csv.write_text(",".join(self.CSV_FIELDS) + "\n")

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        with self.jsonl.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if "event" not in row:
            with self.csv.open("a") as f:
                f.write(",".join(str(row[k]) for k in self.CSV_FIELDS) + "\n")


# ----------------------------------------------------------------------------- training
@dataclass
class TrainState:
    """Counters a checkpoint restores: global step, loader position, and the epoch's meters so far
    (a mid-epoch resume then reports the same epoch averages as an uninterrupted run)."""

    step: int = 0  # optimizer steps done in the whole run
    epoch: int = 0  # current epoch (0-based)
    batches_done: int = 0  # micro-batches of `epoch` already consumed
    epoch_sums: list = field(default_factory=lambda: [0.0, 0.0, 0.0])  # sums of (loss, features, relations) over this epoch's steps
    epoch_steps: int = 0  # optimizer steps of `epoch` already summed


def _to_device(batch: dict, device: torch.device) -> dict:
    nb = device.type == "cuda"
    return {k: (v.to(device, non_blocking=nb) if torch.is_tensor(v) else v) for k, v in batch.items()}


def train_one_epoch(
    model: torch.nn.Module,
    student: MaskedStudent,
    loader,
    optimizer: torch.optim.Optimizer,
    scheduler: WarmupCosine,
    device: torch.device,
    state: TrainState,
    cfg: DistillConfig,
    dist_info: Dist,
    steps_in_epoch: int,
    log: RunLog,
    save: callable,
    loss_fn=None,
) -> dict:
    """One epoch (or its remainder after a resume) of optimizer steps; returns averaged meters.

    `model` is what runs the forward (the student, possibly DDP-wrapped or compiled); `student` the
    bare module. An optimizer step takes `accum_steps` micro-batches; gradients are synchronized only
    on the last one. Non-finite losses (averaged over ranks, so every rank stops together) raise
    `NonFiniteError` naming the step before the optimizer applies anything. `loss_fn` defaults to
    `pipeline.train.losses.hybrid_loss`.
    """
    loss_fn = loss_fn or hybrid_loss
    model.train()
    sums = torch.tensor(state.epoch_sums, dtype=torch.float64)  # restored mid-epoch on resume
    micro = 0
    acc = torch.zeros(3, device=device)
    t0 = time.perf_counter()
    images = 0
    for batch in loader:
        if state.batches_done // cfg.accum_steps >= steps_in_epoch:
            break
        batch = _to_device(batch, device)
        last_micro = micro == cfg.accum_steps - 1
        sync = last_micro or not hasattr(model, "no_sync")
        with (nullcontext() if sync else model.no_sync()):
            with autocast(device):
                out = model(batch["image"], batch["keep_index"])
            losses = loss_fn(
                out, batch, blocks=student.capture_blocks, head_rule=student.head_rule, alpha=cfg.alpha,
                beta=cfg.smoothl1_beta, target=cfg.mim_target, teachers=cfg.teachers,
            )
            (losses["loss"] / cfg.accum_steps).backward()
        acc += torch.stack([losses["loss"].detach(), losses["loss_features"], losses["loss_relations"]]).float()
        images += batch["image"].shape[0]
        micro += 1
        state.batches_done += 1
        if not last_micro:
            continue
        meters = all_mean(acc / cfg.accum_steps, dist_info).cpu()
        if not torch.isfinite(meters).all():
            optimizer.zero_grad(set_to_none=True)
            raise NonFiniteError(
                f"non-finite loss at step {state.step + 1} (epoch {state.epoch}): loss={meters[0].item()}, "
                f"features={meters[1].item()}, relations={meters[2].item()}; the run stopped, "
                f"checkpoints/last.pt holds the last good state (step {_last_saved(cfg)})"
            )
        clip_gradients(student, cfg.clip_grad)
        lr = scheduler.get_lr()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        state.step += 1
        sums += meters.double()
        state.epoch_sums, state.epoch_steps = sums.tolist(), state.epoch_steps + 1
        acc.zero_()
        micro = 0
        dt = time.perf_counter() - t0
        row = {
            "step": state.step, "epoch": state.epoch, "lr": lr,
            "loss": meters[0].item(), "loss_features": meters[1].item(), "loss_relations": meters[2].item(),
            "images_per_s": round(images * dist_info.world_size / max(dt, 1e-9), 2),
            "elapsed_s": round(time.perf_counter() - log.t_start, 4),
        }
        if state.step % cfg.log_every == 0:
            log.write(row)
        if cfg.print_every and state.step % cfg.print_every == 0:
            log.say(row, steps_in_epoch * cfg.epochs, cfg.epochs)
        t0 = time.perf_counter()
        images = 0
        if cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0:
            save()
    n = max(state.epoch_steps, 1)
    return {"loss": sums[0].item() / n, "loss_features": sums[1].item() / n,
            "loss_relations": sums[2].item() / n, "steps": state.epoch_steps}


def _last_saved(cfg: DistillConfig) -> int | str:
    ck = load_checkpoint(str(cfg.run_dir / "checkpoints" / CHECKPOINT_NAME))
    return ck["state"]["step"] if ck else "none: no checkpoint was written yet"


def _loader_config(cfg: DistillConfig, student: MaskedStudent, device: torch.device):
    """The loader's config for this run: the student's input size and normalization, and which
    targets the teachers mode reads (disc_only still replays the MIM store's views and masks)."""
    from timm.data import resolve_data_config

    from pipeline.train.loader import LoaderConfig

    data_cfg = resolve_data_config({}, model=student.vit)  # mean/std/interpolation of the model family
    h, w = student.vit.patch_embed.img_size  # the built size (model_kwargs img_size), not the family's default
    if h != w:
        raise ConfigError(f"student img_size {(h, w)} is not square; the stored views are square crops")
    disc, layers = _loader_roles(cfg)
    return LoaderConfig(
        manifest=cfg.manifest,
        mim_store=cfg.mim_store,
        disc_store=disc,
        batch_size=cfg.batch_size,
        num_workers=cfg.workers,
        mix_shards=cfg.mix_shards,
        seed=cfg.seed,
        img_size=int(h),
        mean=tuple(float(v) for v in data_cfg["mean"]),
        std=tuple(float(v) for v in data_cfg["std"]),
        interpolation=str(data_cfg.get("interpolation", "bicubic")),
        masking=cfg.masking,
        relation_layers=layers,
        mim_target=cfg.mim_target,
        pin_memory=device.type == "cuda",
    )


def distill(cfg: DistillConfig) -> Path:
    """Train the student for `cfg.epochs` from the stores, export it, return the run directory."""
    from pipeline.train.loader import build_loader, steps_per_epoch

    d, device = init_distributed(cfg.device)
    try:
        return _distill(cfg, d, device, build_loader, steps_per_epoch)
    finally:
        if d.initialized_here:
            import torch.distributed as dist

            dist.destroy_process_group()


def _distill(cfg, d: Dist, device, build_loader, steps_per_epoch) -> Path:
    run_dir = cfg.run_dir
    ckpt_path = run_dir / "checkpoints" / CHECKPOINT_NAME
    if d.main:
        prepare_run_dir(run_dir)
    src = target_sources(cfg)
    torch.manual_seed(cfg.seed)
    student = build_student(cfg, src).to(device)
    lcfg = _loader_config(cfg, student, device)
    batches = steps_per_epoch(lcfg, d.world_size)
    steps_per = batches // cfg.accum_steps  # optimizer steps per epoch; trailing micro-batches are dropped
    if steps_per < 1:
        raise ConfigError(
            f"an epoch has {batches} batches of {cfg.batch_size} per rank on {d.world_size} rank(s), fewer than "
            f"accum_steps={cfg.accum_steps}: lower batch_size/accum_steps or use more data"
        )
    global_batch = cfg.batch_size * cfg.accum_steps * d.world_size
    lr = scaled_lr(cfg.base_lr, global_batch)
    optimizer = build_optimizer(student, lr, cfg.weight_decay)
    scheduler = WarmupCosine(optimizer, lr, total_steps=steps_per * cfg.epochs,
                             warmup_steps=round(cfg.warmup_epochs * steps_per), min_lr=cfg.min_lr)
    state = TrainState()
    log = RunLog(run_dir, d.main, name=f"distill {cfg.name}")

    ckpt = load_checkpoint(str(ckpt_path)) if cfg.resume else None
    if ckpt is None and not cfg.resume and ckpt_path.exists():
        raise ConfigError(f"{ckpt_path} exists: pass --resume to continue that run, or choose another --name")
    if ckpt is not None:
        _check_resume(cfg, ckpt, ckpt_path, d.world_size)
        student.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        state = TrainState(**ckpt["state"])
        set_rng_state(ckpt["rng"][d.rank] if d.rank < len(ckpt["rng"]) else ckpt["rng"][0])
        log.truncate(state.step)
        log.first_step = state.step
    else:
        log.start()
    _same_on_every_rank(d, state.step, run_dir)
    if d.main:
        write_resolved(cfg, run_dir / "config.yaml")
        env = environment() | {"world_size": d.world_size, "device": str(device), "global_batch": global_batch,
                               "lr": lr, "steps_per_epoch": steps_per, "resumed_from_step": state.step if ckpt else None}
        atomic_write_bytes(str(run_dir / "env.json"), (json.dumps(env, indent=2) + "\n").encode())

    model: torch.nn.Module = student
    if d.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        # Without both teachers some parameters get no gradient (feature head / last blocks).
        model = DDP(student, device_ids=[device] if device.type == "cuda" else None,
                    find_unused_parameters=cfg.teachers != "hybrid")
    if cfg.compile:
        model = torch.compile(model)

    def save() -> None:
        rngs = _gather_rng(d)
        if d.main:
            save_checkpoint(str(ckpt_path), {
                "model": student.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": None,  # bf16 autocast: no loss scaling
                "state": dataclasses.asdict(state), "rng": rngs, "config": to_dict(cfg),
                "world_size": d.world_size,
            })
        _barrier(d)

    meters: dict = {}
    while state.epoch < cfg.epochs:
        loader = build_loader(lcfg, state.epoch, d.rank, d.world_size, skip_batches=state.batches_done)
        meters = train_one_epoch(model, student, loader, optimizer, scheduler, device, state, cfg, d,
                                 steps_per, log, save)
        end = {"event": "epoch_end", "epoch": state.epoch, "step": state.step} | meters
        log.write(end)
        log.say(end, steps_per * cfg.epochs, cfg.epochs)
        state.epoch += 1
        state.batches_done, state.epoch_sums, state.epoch_steps = 0, [0.0, 0.0, 0.0], 0
        save()
    if d.main:
        if meters:  # (a resumed run that was already finished trains nothing and keeps its metrics)
            summary = {"epoch": cfg.epochs, "step": state.step} | {k: v for k, v in meters.items() if k != "steps"}
            atomic_write_bytes(str(run_dir / "metrics.json"), (json.dumps(summary, indent=2) + "\n").encode())
        export_student(student.encoder_state_dict(), cfg.model, cfg.model_kwargs, run_dir / "student",
                       preprocessing={"mean": list(lcfg.mean), "std": list(lcfg.std), "interpolation": lcfg.interpolation})
    _barrier(d)
    return run_dir


def _gather_rng(d: Dist) -> list:
    """Every rank's RNG states (rank order), so each rank resumes its own streams."""
    mine = rng_state()
    if d.world_size == 1:
        return [mine]
    import torch.distributed as dist

    out = [None] * d.world_size
    dist.all_gather_object(out, mine)
    return out


def _same_on_every_rank(d: Dist, step: int, run_dir: Path) -> None:
    """Every rank must start from the same checkpoint (else their loaders and steps diverge and hang)."""
    if d.world_size == 1:
        return
    import torch.distributed as dist

    steps: list = [None] * d.world_size
    dist.all_gather_object(steps, step)
    if len(set(steps)) != 1:
        raise ConfigError(
            f"ranks start from different steps {steps}: every rank reads {run_dir}/checkpoints/last.pt, so the run "
            f"directory must be on a filesystem all nodes share (or an fsspec URL) for --resume"
        )


def _barrier(d: Dist) -> None:
    if d.world_size > 1:
        import torch.distributed as dist

        dist.barrier()


def _check_resume(cfg: DistillConfig, ckpt: dict, path: Path, world_size: int) -> None:
    """A resumed run must train the same thing; mid-epoch it must also replay the same batches."""
    saved, now = ckpt["config"], to_dict(cfg)
    diff = [k for k in now if k not in RESUME_FREE | EPOCH_BOUNDARY_FREE and saved.get(k) != now[k]]
    if diff:
        detail = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs now {now[k]!r}" for k in diff)
        raise ConfigError(f"--resume with settings that differ from {path}: {detail}; use the run's config.yaml or another --name")
    if ckpt["state"]["batches_done"]:
        moved = [f"{k} {saved.get(k)} -> {now[k]}" for k in sorted(EPOCH_BOUNDARY_FREE) if saved.get(k) != now[k]]
        if ckpt.get("world_size", 1) != world_size:
            moved.append(f"world size {ckpt.get('world_size', 1)} -> {world_size}")
        if moved:
            raise ConfigError(
                f"{path} is mid-epoch (epoch {ckpt['state']['epoch']}, {ckpt['state']['batches_done']} batches done) and "
                f"the loader's batch order depends on {', '.join(moved)}; resume with the same settings"
            )

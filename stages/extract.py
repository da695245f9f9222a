"""Stage one: run each frozen teacher once per view and store its targets in a Zarr v3 store.

    hdpipe shard --sample
    hdpipe extract --teacher mae  --manifest manifests/sample.json --targets targets
    hdpipe extract --teacher clip --manifest manifests/sample.json --targets targets
    hdpipe extract --teacher timm:vit_tiny_patch16_224 --role mim --random-init \
        --model-kwargs '{"img_size": 64, "patch_size": 8, "depth": 6}' --name tiny-mim ...

One task per tar shard k writes Zarr shard k of every array in one go, then the done marker
(`TargetStore.write_shard`): zarr has no locking, so one writer owns one whole shard, and a reader
(or a resumed run) trusts only shards whose marker exists. Re-running the same command skips done
shards; the result is identical to an uninterrupted run because every value is a pure function of
(teacher weights, view plan, sample index, view id).

MIM teachers (`role: mim`, e.g. mae) write: `views` [N, V, 5], `keep_progressive` and `keep_direct`
[N, V, n_keep], `relations` [N, V, n_layers, H, T, T] (raw Q·Kᵀ, no 1/√d), optionally `attention`
(softmax(R·d^-0.5) over the stored token set) and `block_features` [N, V, n_layers, T, D], and
`valid` [N]. Discriminative teachers (clip, deit, dino) read `views` and `keep_progressive` from the
MIM store's shard k, render the same views and write `features` [N, V, T, D] over the same tokens.

Scale-out: without `--workers`/`--scheduler` every shard runs in this process (no cluster, nothing
to pay on one machine). `--workers N` starts a dask `LocalCluster(n_workers=N, threads_per_worker=1,
processes=True)`; `--scheduler ADDRESS` submits to a running cluster. On a multi-GPU host, worker i of
a LocalCluster (dask names them 0..N-1) takes GPU `i % device_count` (`pipeline.device.pick_device`
with the worker's index as local rank); on an external cluster start one worker per GPU with its own
`CUDA_VISIBLE_DEVICES` (what `dask-cuda`'s `LocalCUDACluster` does), so each sees one device.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Literal

import numpy as np

from pipeline.errors import ConfigError, NonFiniteError, ShardError, StoreError

# Extra MIM targets a user may ask for besides relations (paper Tab. 5-6).
EXTRA_TARGETS = ("attention", "block_features")
# Bumped when the arrays or attributes this stage writes change meaning.
EXTRACT_FORMAT = 1


@dataclass(frozen=True)
class ExtractConfig:
    manifest: str = "manifests/sample.json"  # dataset manifest (path or fsspec URL) written by `hdpipe shard`
    teacher: str = "mae"  # mae | clip | deit | dino | timm:NAME | open_clip:NAME[:TAG]
    role: Literal["auto", "mim", "disc"] = "auto"  # auto: from the teacher table (mae -> mim, others -> disc)
    checkpoint: str | None = None  # local weights (.pth/.bin/.safetensors) instead of the hub's pretrained tag
    random_init: bool = False  # random weights from a fixed seed (pipeline.targets.teachers.RANDOM_INIT_SEED; demos and tests only)
    model_kwargs: dict = field(default_factory=dict)  # passed to the model constructor, e.g. {img_size: 64, patch_size: 8}
    targets: str = "targets"  # folder (or fsspec URL) holding the stores: <targets>/<name>.zarr
    name: str | None = None  # store name; default: the teacher name (':' and '/' become '-')
    out: str | None = None  # full store URL; overrides targets/name
    mim_store: str | None = None  # disc teachers: the MIM store to read views/masks from; default <targets>/mae.zarr
    # View plan (MIM teachers; None = VIEW_DEFAULTS). Discriminative teachers take the MIM store's
    # plan: left None they inherit it, and a value that differs from it is an error.
    views: int | None = None  # views (crops) per image, V; MIM default 1
    seed: int | None = None  # view-plan seed: crop box and flip of view (index, v) come from rng([seed, index, v]); MIM default 0
    scale: tuple[float, float] | None = None  # RandomResizedCrop area range, fraction of the image; MIM default (0.2, 1.0), MAE's
    ratio: tuple[float, float] | None = None  # RandomResizedCrop aspect-ratio range (width/height); MIM default (3/4, 4/3)
    hflip: bool | None = None  # horizontal flip with p=0.5 per view; MIM default true
    relation_layers: tuple[int, ...] = (-2, -1)  # 1-based blocks; values <= 0 count back from the last block L (0 = L, -1 = L-1), so the default is (L-2, L-1) = (10, 11) for L = 12
    extra_targets: tuple[str, ...] = ()  # MIM only: any of attention (softmax(R·d^-0.5) over the token set), block_features (block outputs at relation layers)
    mask_ratio: float = 0.3  # K: fraction of kept patch tokens dropped at each of the layers (0, L/3, 2L/3)
    tokens: Literal["auto", "kept", "all"] = "auto"  # token set of relations/features: [CLS]+kept or every token; auto = kept for MIM, the MIM store's set for disc
    precision: str = "fp16"  # stored float precision (pipeline.targets.quant.PRECISIONS): fp16, int8 (per-row scales), q1pct (compact, <= 1% error per view)
    batch_size: int = 64  # views per teacher forward
    device: str = "auto"  # auto (CUDA when present, the worker's own GPU under dask), cpu, cuda, cuda:1, ...
    workers: int = 0  # >0: start a dask LocalCluster with this many single-threaded worker processes
    scheduler: str | None = None  # address of a running dask scheduler (tcp://host:8786); overrides workers
    retries: int = 2  # dask retries per shard task (a lost worker; deterministic errors fail again)
    on_error: Literal["fail", "skip"] = "fail"  # unreadable image inside a shard: stop, or store valid=false and list it in the done marker
    overwrite: bool = False  # delete and rebuild an existing store built with other settings
    progress: bool = True  # progress bar and summary on stderr

    def validate(self) -> None:
        """Range checks that need no files or models (called by `pipeline.config.resolve`)."""
        if self.views is not None and self.views < 1:
            raise ConfigError(f"views must be >= 1, got {self.views}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ConfigError(f"mask_ratio must be in [0, 1), got {self.mask_ratio}")
        if self.scale is not None and not 0.0 < self.scale[0] <= self.scale[1] <= 1.0:
            raise ConfigError(f"scale must satisfy 0 < min <= max <= 1, got {self.scale}")
        if self.ratio is not None and not 0.0 < self.ratio[0] <= self.ratio[1]:
            raise ConfigError(f"ratio must satisfy 0 < min <= max, got {self.ratio}")
        if not self.relation_layers:
            raise ConfigError("relation_layers must name at least one block (e.g. -2,-1 for L-2, L-1)")
        if len(set(self.relation_layers)) != len(self.relation_layers):
            raise ConfigError(f"relation_layers has duplicates: {self.relation_layers}")
        for extra in self.extra_targets:
            if extra not in EXTRA_TARGETS:
                raise ConfigError(f"unknown extra target '{extra}'; choices: {', '.join(EXTRA_TARGETS)}")
        if self.workers < 0:
            raise ConfigError(f"workers must be >= 0, got {self.workers}")
        if self.retries < 0:
            raise ConfigError(f"retries must be >= 0, got {self.retries}")
        from pipeline.targets.quant import PRECISIONS

        if self.precision not in PRECISIONS:
            raise ConfigError(f"unknown precision '{self.precision}'; choices: {', '.join(PRECISIONS)}")
        if self.random_init and self.checkpoint:
            raise ConfigError("pass either --checkpoint or --random-init, not both")


# ----------------------------------------------------------------------------------------------
# Names, URLs and roles


def check_teacher_name(teacher: str):
    """The teacher's spec; unknown names raise ConfigError listing the choices (nothing is loaded)."""
    from pipeline.targets.teachers import parse_spec

    return parse_spec(teacher)


def teacher_role(cfg: ExtractConfig) -> str:
    """`mim` or `disc`: the config's role, or the teacher table's when `auto` (timm `*.mae` tags are mim)."""
    if cfg.role != "auto":
        return cfg.role
    return check_teacher_name(cfg.teacher).role


def _join(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name


def store_name(cfg: ExtractConfig) -> str:
    return cfg.name or cfg.teacher.replace(":", "-").replace("/", "-")


def store_url(cfg: ExtractConfig) -> str:
    """Where this run writes: --out, else <targets>/<name>.zarr."""
    return cfg.out or _join(cfg.targets, f"{store_name(cfg)}.zarr")


def mim_store_url(cfg: ExtractConfig) -> str:
    return cfg.mim_store or _join(cfg.targets, "mae.zarr")


def resolve_layers(layers: tuple[int, ...], depth: int) -> tuple[int, ...]:
    """Relation layers as 1-based block numbers; values <= 0 count back from the last block L."""
    out = tuple(int(b) if b > 0 else depth + int(b) for b in layers)
    bad = [b for b, r in zip(layers, out) if not 1 <= r <= depth]
    if bad:
        raise ConfigError(f"relation_layers {list(bad)} fall outside blocks 1..{depth} of this teacher")
    return tuple(sorted(out))


def view_setting(cfg: ExtractConfig, key: str):
    """A MIM run's view-plan setting: the config's value, or VIEW_DEFAULTS[key] when left unset."""
    from pipeline.data.views import VIEW_DEFAULTS

    value = getattr(cfg, key)
    return VIEW_DEFAULTS[key] if value is None else value


# ----------------------------------------------------------------------------------------------
# Teachers, one per process


# Loading a ViT-B costs seconds and ~350 MB, and a dask worker runs many shard tasks: each process
# keeps its teachers here. The key holds everything that changes the weights or where they live,
# so a worker that later runs a different teacher (or device) never reuses the wrong model.
_TEACHER_CACHE: dict[tuple, Any] = {}


def _worker_rank() -> int | None:
    """Index of this dask worker (LocalCluster names workers 0..N-1), None outside dask."""
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):
        return None
    name = worker.name
    if isinstance(name, int):
        return name
    if isinstance(name, str) and name.isdigit():
        return int(name)
    return 0


def task_device(cfg: ExtractConfig):
    """The torch device this process extracts on: under dask, worker i takes GPU i % count."""
    from pipeline.device import pick_device

    return pick_device(cfg.device, local_rank=_worker_rank())


def get_teacher(cfg: ExtractConfig, device=None):
    """The teacher for `cfg`, loaded once per process (see _TEACHER_CACHE).

    Random-init weights come from a fixed seed inside `load_teacher`, so every process (dask
    workers, a resumed run, `hdpipe verify`) builds the same model; the store checks the digest.
    """
    from pipeline.targets.teachers import load_teacher

    device = device if device is not None else task_device(cfg)
    key = (cfg.teacher, cfg.checkpoint, cfg.random_init, json.dumps(cfg.model_kwargs, sort_keys=True), str(device))
    teacher = _TEACHER_CACHE.get(key)
    if teacher is None:
        teacher = load_teacher(cfg.teacher, checkpoint=cfg.checkpoint, random_init=cfg.random_init,
                               model_kwargs=dict(cfg.model_kwargs), device=device)
        _TEACHER_CACHE[key] = teacher
    return teacher


# ----------------------------------------------------------------------------------------------
# Reading a tar shard


@dataclass
class Row:
    """One sample of a tar shard, still encoded: images are decoded batch by batch on the prefetch
    thread, so a shard of 1024 ImageNet JPEGs costs ~110 MB of bytes, not ~600 MB of pixels."""

    index: int  # global sample index
    name: str  # original relative path (for messages)
    data: bytes  # the encoded image as stored in the tar
    error: str | None = None  # why the image could not be decoded (set when on_error=skip)


def read_rows(manifest, k: int) -> list[Row]:
    """Every sample of tar shard k, in index order, still encoded (checked against the manifest)."""
    from pipeline.data.reading import read_shard_records

    info = manifest.shards[k]
    # The whole tar is read (and its sha256 checked) before any of it reaches a teacher.
    rows = [Row(int(s["index"]), str(s.get("name", "")), s["image"]) for s in read_shard_records(manifest, k)]
    got = [r.index for r in rows]
    if got != list(info.indices):
        raise ShardError(
            f"shard {k} ({info.url}) holds indices {got[:3]}...{got[-3:]} ({len(got)} samples) but the manifest "
            f"says [{info.first_index}, {info.first_index + info.count}); rebuild it with `hdpipe shard`"
        )
    return rows


# ----------------------------------------------------------------------------------------------
# Batched teacher targets


def _check_finite(cfg: ExtractConfig, k: int, name: str, t) -> None:
    import torch

    if not bool(torch.isfinite(t).all()):
        raise NonFiniteError(
            f"teacher {cfg.teacher} produced non-finite {name} on shard {k}; nothing of this shard was "
            "stored (shards already done are kept); check the weights (--checkpoint) and model_kwargs"
        )


def gather_tokens(x, tok):
    """Tokens `tok` of x. x: [B, N, ...] or relation-like [B, H, N, N]; tok: long [B, T].

    Token dims are gathered in order, so index 0 of the result is tok[:, 0] (the CLS token).
    """
    import torch

    if x.dim() == 3:  # [B, N, D] -> [B, T, D]
        return torch.gather(x, 1, tok[:, :, None].expand(-1, -1, x.shape[-1]))
    b, h, n, _ = x.shape  # [B, H, N, N] -> [B, H, T, N] -> [B, H, T, T]
    t = tok.shape[1]
    rows = torch.gather(x, 2, tok[:, None, :, None].expand(b, h, t, n))
    return torch.gather(rows, 3, tok[:, None, None, :].expand(b, h, t, t))


def token_index(keep, num_patches: int, tokens: str, batch: int, device):
    """long [B, T]: CLS (0) then kept patches shifted by one (tokens=kept), or every token (all)."""
    import torch

    if tokens == "all":
        return torch.arange(num_patches + 1, device=device).expand(batch, -1)
    cls = torch.zeros(batch, 1, dtype=torch.long, device=device)
    return torch.cat([cls, keep.to(device=device, dtype=torch.long) + 1], dim=1)


def mim_batch(teacher, x, layers: tuple[int, ...], extras: tuple[str, ...], ratio: float, tokens: str,
              keep=None) -> dict:
    """MIM targets for a normalized batch x [B, 3, S, S] -> dict of tensors.

    keep_progressive, keep_direct: long [B, n_keep]; relations (+attention): [B, n_layers, H, T, T];
    block_features: [B, n_layers, T, D]. `keep` (long [B, n_keep]) gathers the token set from given
    masks instead of the computed progressive ones (`hdpipe verify` compares values on the stored set).
    """
    import torch

    from pipeline.targets.masking import direct_keep, mask_layers, progressive_keep

    depth = teacher.depth
    mlayers = tuple(mask_layers(depth))
    want_blocks = layers if "block_features" in extras else ()
    out = teacher.forward_targets(x, relation_layers=layers, hidden_layers=tuple(sorted(set(mlayers) | {depth})),
                                  block_layers=want_blocks, features=False)
    prog = progressive_keep({i: out["hidden"][i] for i in mlayers}, mlayers, ratio)  # [B, n_keep]
    direct = direct_keep(out["hidden"][depth], prog.shape[1])  # [B, n_keep]
    num_patches = out["hidden"][0].shape[1] - 1
    tok = token_index(prog if keep is None else keep, num_patches, tokens, x.shape[0], x.device)
    rel = torch.stack([gather_tokens(out["relations"][l].float(), tok) for l in layers], dim=1)  # [B, nL, H, T, T]
    res = {"keep_progressive": prog, "keep_direct": direct, "relations": rel}
    if "attention" in extras:
        # Softmax over the stored token set: what a student that sees only these tokens can match.
        res["attention"] = torch.softmax(rel * teacher.head_dim ** -0.5, dim=-1)
    if "block_features" in extras:
        res["block_features"] = torch.stack([gather_tokens(out["block"][l].float(), tok) for l in layers], dim=1)
    return res


def disc_batch(teacher, x, keep, tokens: str) -> dict:
    """features [B, T, D] after the final norm over [CLS]+keep (tokens=kept) or every token."""
    out = teacher.forward_targets(x, features=True)
    feats = out["features"].float()  # [B, N, D]
    tok = token_index(keep, feats.shape[1] - 1, tokens, x.shape[0], x.device)
    return {"features": gather_tokens(feats, tok)}


# ----------------------------------------------------------------------------------------------
# Store layout


def plan_for(cfg: ExtractConfig, teacher):
    from pipeline.data.views import ViewPlan

    return ViewPlan(seed=view_setting(cfg, "seed"), views=view_setting(cfg, "views"), size=teacher.img_size,
                    scale=tuple(view_setting(cfg, "scale")), ratio=tuple(view_setting(cfg, "ratio")),
                    hflip=view_setting(cfg, "hflip"), interpolation=teacher.interpolation)


def effective_tokens(cfg: ExtractConfig, role: str, mim_attrs: dict | None) -> str:
    if role == "mim":
        return "kept" if cfg.tokens == "auto" else cfg.tokens
    mim_tokens = mim_attrs["tokens"]
    if cfg.tokens not in ("auto", mim_tokens):
        raise ConfigError(
            f"--tokens {cfg.tokens} differs from the MIM store's token set '{mim_tokens}' "
            f"({mim_store_url(cfg)}); discriminative features use the MIM store's tokens (drop --tokens)"
        )
    return mim_tokens


def n_keep_for(num_patches: int, ratio: float) -> int:
    from pipeline.targets.masking import kept_count

    return int(kept_count(num_patches, ratio))


def store_layout(cfg: ExtractConfig, role: str, teacher, mim_attrs: dict | None) -> tuple[dict, dict]:
    """(hdpipe attributes, {array name: ArraySpec}) of this run's store.

    The attributes are what a resumed run must match exactly (TargetStore.create compares them), so
    they hold every setting that changes a stored value and nothing that does not (batch size,
    workers, device). The store adds the manifest digest, counts and its package version.
    """
    from pipeline.targets.store import ArraySpec

    P = cfg.precision
    gh, gw = teacher.grid
    patches = gh * gw
    tokens = effective_tokens(cfg, role, mim_attrs)
    attrs: dict[str, Any] = {
        "extract_format": EXTRACT_FORMAT,
        "teacher": cfg.teacher,
        "role": role,
        "checkpoint": cfg.checkpoint,
        "random_init": cfg.random_init,
        "model_kwargs": dict(sorted(cfg.model_kwargs.items())),
        "weights_source": teacher.weights_source,
        "weights_digest": teacher.weights_digest,
        "preprocessing": teacher.preprocessing,
        "depth": teacher.depth, "num_heads": teacher.num_heads, "head_dim": teacher.head_dim,
        "embed_dim": teacher.embed_dim, "grid": [gh, gw],
        "tokens": tokens,
        "precision": cfg.precision,
        "valid": "valid [N] bool: false for samples skipped as unreadable (listed in their shard's done marker)",
    }
    if role == "mim":
        plan = plan_for(cfg, teacher)
        from pipeline.targets.masking import mask_layers

        layers = resolve_layers(cfg.relation_layers, teacher.depth)
        n_keep = n_keep_for(patches, cfg.mask_ratio)
        T = 1 + (n_keep if tokens == "kept" else patches)
        attrs.update({
            "view_plan": plan.to_attrs(), "view_plan_digest": plan.digest(),
            "relation_layers": list(layers),
            "relation_scale": "none: raw Q·Kᵀ per head; logits = R * head_dim**-0.5",
            "mask": {"rule": "progressive", "ratio": cfg.mask_ratio, "layers": list(mask_layers(teacher.depth)),
                     "direct_layer": teacher.depth, "n_keep": n_keep},
            "extra_targets": sorted(cfg.extra_targets),
        })
        nl, H, D = len(layers), teacher.num_heads, teacher.embed_dim
        arrays = {"views": ArraySpec((5,), "float32"),
                  "keep_progressive": ArraySpec((n_keep,), "int16"),
                  "keep_direct": ArraySpec((n_keep,), "int16"),
                  "relations": ArraySpec((nl, H, T, T), "float32", P)}
        if "attention" in cfg.extra_targets:
            arrays["attention"] = ArraySpec((nl, H, T, T), "float32", P)
        if "block_features" in cfg.extra_targets:
            arrays["block_features"] = ArraySpec((nl, T, D), "float32", P)
    else:
        mim_grid = list(mim_attrs["grid"])
        if mim_grid != [gh, gw]:
            raise ConfigError(
                f"teacher {cfg.teacher} has a {gh}x{gw} patch grid but the MIM store {mim_store_url(cfg)} has "
                f"{mim_grid[0]}x{mim_grid[1]}: patch token i must mean the same region for both; pick a teacher "
                "with the same grid (model_kwargs img_size/patch_size)"
            )
        n_keep = int(mim_attrs["mask"]["n_keep"])
        T = 1 + (n_keep if tokens == "kept" else patches)
        attrs.update({
            "view_plan": mim_attrs["view_plan"], "view_plan_digest": mim_attrs["view_plan_digest"],
            "mim_store": mim_store_url(cfg), "mim_weights_digest": mim_attrs["weights_digest"],
            "mask": mim_attrs["mask"],
            "features": "final-layer tokens after the model's final norm, raw (whiten at load time)",
        })
        arrays = {"features": ArraySpec((T, teacher.embed_dim), "float32", P)}
    arrays["valid"] = ArraySpec((), "bool", per_view=False)
    return attrs, arrays


# ----------------------------------------------------------------------------------------------
# One task: one whole tar shard -> one whole Zarr shard


# One prefetch thread per process, reused by every shard: a fresh thread per shard would get a
# fresh glibc malloc arena each time, and retained arenas make peak RSS grow with the shard count.
_PREFETCH: ThreadPoolExecutor | None = None


def _prefetched(batches: list, prepare: Callable) -> Iterator:
    """(batch, prepare(batch)) pairs, preparing batch i+1 on a thread while the caller runs batch i.

    Decoding and rendering (PIL, which releases the GIL) then overlap the teacher's forward, which is
    what keeps extraction close to a pure teacher forward.
    """
    global _PREFETCH
    if not batches:
        return
    if _PREFETCH is None:
        _PREFETCH = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hdpipe-prefetch")
    future = _PREFETCH.submit(prepare, batches[0])
    try:
        for i, batch in enumerate(batches):
            ready = future.result()
            if i + 1 < len(batches):
                future = _PREFETCH.submit(prepare, batches[i + 1])
            yield batch, ready
    finally:
        future.cancel()  # a failed batch leaves nothing queued behind it


def extract_shard(cfg: ExtractConfig, k: int, progress: Callable[[int], None] | None = None) -> dict:
    """Compute every target of tar shard k and write Zarr shard k (done marker last); returns its summary.

    Runs in the driver process or on a dask worker; everything it needs is rebuilt from `cfg` (the
    teacher comes from this process's cache). `progress(n)` is called after each batch of n views.
    Images are decoded and rendered on a prefetch thread, batch by batch; an unreadable image stops
    the shard (on_error=fail, nothing of it is written) or is stored as valid=false (skip).
    """
    import torch

    from pipeline.device import autocast
    from pipeline.data.images import decode_image
    from pipeline.data.manifest import read_manifest
    from pipeline.targets.store import TargetStore
    from pipeline.data.views import View, ViewPlan, render

    t0 = time.perf_counter()
    manifest = read_manifest(cfg.manifest)
    store = TargetStore.open(store_url(cfg), mode="r+")
    attrs = store.attrs
    role = attrs["role"]
    device = task_device(cfg)
    teacher = get_teacher(cfg, device)
    if teacher.weights_digest != attrs["weights_digest"]:
        raise StoreError(
            f"teacher {cfg.teacher} on this worker has weights digest {teacher.weights_digest[:12]} but the store "
            f"{store_url(cfg)} was created with {attrs['weights_digest'][:12]}; every worker must load the same weights"
        )
    info = manifest.shards[k]
    rows = read_rows(manifest, k)
    S, V = len(rows), store.views
    size, interp = teacher.img_size, teacher.interpolation
    valid = np.ones(S, dtype=bool)
    # Whole-shard outputs, filled batch by batch; rows of unreadable samples stay zero (valid=false).
    out = {name: np.zeros(((S, V) if spec.per_view else (S,)) + spec.shape_tail, dtype=spec.dtype)
           for name, spec in store.arrays.items()}
    if role == "mim":
        plan = ViewPlan.from_attrs(attrs["view_plan"])
        layers, extras = tuple(attrs["relation_layers"]), tuple(attrs["extra_targets"])
        mim_views = keep_src = None
    else:
        plan = None
        got = TargetStore.open(mim_store_url(cfg)).read_shard(k, names=["views", "keep_progressive", "valid"])
        valid &= got["valid"].astype(bool)  # no views or masks exist for samples the MIM run skipped
        mim_views, keep_src = got["views"], got["keep_progressive"]  # [S, V, 5], int16 [S, V, n_keep]
    items = [(r, v) for r in range(S) if valid[r] for v in range(V)]
    batches = [items[i:i + cfg.batch_size] for i in range(0, len(items), cfg.batch_size)]

    def prepare(batch):
        """([B] float32 [3, size, size] views in [0, 1], ok bool [B]) for (row, view) pairs.

        Runs on the prefetch thread: only decoding and rendering (PIL) happen here; stacking and
        normalizing stay on the main thread so the two threads do not both start torch's OpenMP
        thread team (on a CPU host that oversubscribes the cores the forward pass needs)."""
        images = {}
        for r in dict.fromkeys(r for r, _ in batch):
            try:
                images[r] = decode_image(rows[r].data, f"image {rows[r].index:09d} ({rows[r].name}) in shard {k} "
                                                       f"({info.url})")
            except ShardError as e:
                if cfg.on_error == "fail":
                    raise ShardError(f"{e}; re-run with --on-error skip to store it as valid=false") from None
                rows[r].error = str(e)
        xs, ok = [], []
        for r, v in batch:
            if r not in images:
                xs.append(torch.zeros(3, size, size))
                ok.append(False)
                continue
            if plan is not None:  # MIM: the view is a pure function of (seed, index, view id)
                view = plan.view(rows[r].index, v, *images[r].size)
                out["views"][r, v] = view.as_row()
            else:  # disc: exactly the view the MIM teacher saw
                view = View.from_row(mim_views[r, v])
            xs.append(render(images[r], view, size, interp))
            ok.append(True)
        return xs, np.array(ok)

    with torch.inference_mode():
        for batch, (xs, ok) in _prefetched(batches, prepare):
            x = teacher.normalize(torch.stack(xs))  # [B, 3, size, size] on the teacher's device
            with autocast(device):
                if role == "mim":
                    res = mim_batch(teacher, x, layers, extras, float(attrs["mask"]["ratio"]), attrs["tokens"])
                else:
                    keep = torch.as_tensor(np.stack([keep_src[r, v] for r, v in batch]).astype(np.int64))
                    res = disc_batch(teacher, x, keep.to(device), attrs["tokens"])
            rr = np.array([r for r, _ in batch])[ok]
            vv = np.array([v for _, v in batch])[ok]
            for name, t in res.items():
                t = t[torch.as_tensor(ok, device=t.device)]
                if t.is_floating_point():
                    t = t.float()
                    _check_finite(cfg, k, name, t)
                out[name][rr, vv] = t.cpu().numpy()
            if progress is not None:
                progress(len(batch))
    for r, row in enumerate(rows):
        if row.error is not None:
            valid[r] = False
    out["valid"] = valid
    skipped = [{"index": row.index, "name": row.name, "reason": row.error or "invalid in the MIM store"}
               for row, ok in zip(rows, valid) if not ok]
    summary = {"shard": k, "rows": S, "views": int(valid.sum()) * V, "skipped": skipped,
               "seconds": round(time.perf_counter() - t0, 3), "device": str(device), "pid": os.getpid(),
               "worker": _worker_rank(), "autocast": "bf16" if device.type == "cuda" else "none"}
    store.write_shard(k, out, summary)
    return summary


# ----------------------------------------------------------------------------------------------
# Driver


def check_writable(url: str) -> None:
    """Refuse early, with the path, when the store cannot be written (local paths; remote URLs are
    checked by creating the store itself)."""
    from pipeline.urls import fs_and_path

    fs, path = fs_and_path(url)
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    if "file" not in protocols and "local" not in protocols:
        return
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK | os.X_OK):
        what = "is not a folder" if not os.path.isdir(probe) else "is not writable"
        raise StoreError(
            f"cannot write the store {url}: {probe} {what}; choose another location with --targets DIR or --out URL"
        )


def open_mim_store(cfg: ExtractConfig, manifest):
    """The complete MIM store a discriminative run reads, checked against this run's manifest; the
    run inherits its view plan (a restated setting that differs is an error). Hints never rebuild
    that store: this command did not make it."""
    from pipeline.targets.hints import extract_command, sibling_url
    from pipeline.targets.store import TargetStore
    from pipeline.data.views import ViewPlan

    url = mim_store_url(cfg)
    try:
        mim = TargetStore.open(url)
    except StoreError as e:
        # No runnable command here: which MIM teacher the user wants is not known.
        raise StoreError(f"teacher {cfg.teacher} needs the MIM store {url}, which cannot be opened ({e}); make it "
                         f"first with hdpipe extract --role mim --teacher <your MIM teacher, e.g. mae> --manifest "
                         f"{cfg.manifest} --out {url}, or point --mim-store at an existing one") from None
    attrs = mim.attrs
    if attrs.get("role") != "mim":
        raise StoreError(f"{url} holds {attrs.get('role')} targets of teacher {attrs.get('teacher')}, not a MIM "
                         "store; point --mim-store at the MIM teacher's store")
    if attrs.get("manifest_digest") != manifest.digest():
        fresh = sibling_url(url, manifest.name)
        raise StoreError(
            f"the MIM store {url} was built from another manifest (digest {str(attrs.get('manifest_digest'))[:12]} "
            f"vs {manifest.digest()[:12]} of {cfg.manifest}); pass the manifest it was built from, or make a MIM "
            f"store for this one with `{extract_command(attrs, manifest=cfg.manifest, out=fresh)}` and pass "
            f"--mim-store {fresh}")
    plan = ViewPlan.from_attrs(attrs["view_plan"])
    diff = []
    for key in ("views", "seed", "scale", "ratio", "hflip"):
        asked, have = getattr(cfg, key), getattr(plan, key)
        if asked is not None and not np.allclose(np.atleast_1d(asked).astype(float), np.atleast_1d(have).astype(float)):
            diff.append(f"--{key} {asked} (the store has {have})")
    if diff:
        raise ConfigError(
            f"{', '.join(diff)}: a discriminative teacher renders exactly the views of its MIM store {url}, "
            "so it takes that store's view plan; drop these options (or point --mim-store at a MIM store "
            "made with them)")
    mim.require_complete(extract_command(attrs, manifest=cfg.manifest, out=url))
    return mim


def _store_bytes(url: str) -> int:
    from pipeline.urls import fs_and_path

    fs, path = fs_and_path(url)
    try:
        return int(fs.du(path, total=True))
    except (OSError, NotImplementedError):
        return 0


def _cpu():
    import torch

    return torch.device("cpu")


def for_workers(cfg: ExtractConfig) -> ExtractConfig:
    """`cfg` with local relative paths made absolute: a worker of an external cluster (--scheduler)
    may run in another folder. Paths must still be visible to the workers (shared filesystem or an
    fsspec URL such as s3://...)."""

    def absolute(p: str | None) -> str | None:
        if p is None or "://" in p:
            return p
        return os.path.abspath(p)

    return dataclasses.replace(cfg, manifest=absolute(cfg.manifest), targets=absolute(cfg.targets),
                               out=absolute(cfg.out), mim_store=absolute(mim_store_url(cfg)),
                               checkpoint=absolute(cfg.checkpoint))


def _log(msg: str) -> None:
    """A start or end line on stderr, printed with or without progress bars (DVC logs show it)."""
    print(msg, file=sys.stderr, flush=True)


def run_in_process(cfg: ExtractConfig, shards: list[int], on_done: Callable[[dict], None], progress) -> None:
    for k in shards:
        on_done(extract_shard(cfg, k, progress=progress))


def run_dask(cfg: ExtractConfig, shards: list[int], on_done: Callable[[dict], None]) -> None:
    """One task per shard on dask.distributed: a LocalCluster of `workers` processes, or `scheduler`."""
    from distributed import Client, LocalCluster, as_completed

    cluster = None
    if cfg.scheduler:
        client = Client(cfg.scheduler)
    else:
        # One thread per worker: a worker is one teacher on one device; torch uses the cores itself.
        cluster = LocalCluster(n_workers=cfg.workers, threads_per_worker=1, processes=True,
                               dashboard_address=None)
        client = Client(cluster)
    futures = []
    task_cfg = for_workers(cfg)
    try:
        futures = client.map(extract_shard, [task_cfg] * len(shards), shards, retries=cfg.retries, pure=False,
                             key=[f"extract-{store_name(cfg)}-{k:06d}-{os.getpid()}-{time.time_ns()}" for k in shards])
        for fut in as_completed(futures):
            on_done(fut.result())
    finally:
        client.cancel(futures)
        client.close()
        if cluster is not None:
            cluster.close()


def extract(cfg: ExtractConfig) -> str:
    """Run teacher `cfg.teacher` over every missing shard of `cfg.manifest`; returns the store URL.

    Everything a run can refuse is checked before any shard starts: teacher name, role, the MIM
    store (disc teachers), the output path, and an existing store's settings (resume when equal,
    refused unless `overwrite` when not).
    """
    from pipeline.config import to_dict
    from pipeline.urls import atomic_write_bytes
    from pipeline.data.manifest import read_manifest, verify_shards
    from pipeline.progress import Progress
    from pipeline.targets.store import TargetStore

    t0 = time.perf_counter()
    check_teacher_name(cfg.teacher)
    role = teacher_role(cfg)
    if role == "disc" and cfg.extra_targets:
        raise ConfigError(f"extra_targets {list(cfg.extra_targets)} are MIM targets; teacher {cfg.teacher} is "
                          "discriminative (use --role mim for a MIM teacher)")
    manifest = read_manifest(cfg.manifest)
    verify_shards(manifest, check_hashes=False)  # a missing tar is named now, not after hours of work
    url = store_url(cfg)
    mim_attrs = None
    if role == "disc":
        mim_attrs = open_mim_store(cfg, manifest).attrs
        if os.path.normpath(url) == os.path.normpath(mim_store_url(cfg)):
            raise ConfigError(f"the output {url} is the MIM store itself; pass --name or --out")
    check_writable(url)
    distributed = bool(cfg.scheduler) or cfg.workers > 0
    # The driver needs the teacher only for its attributes when workers extract: keep it off the GPUs.
    teacher = get_teacher(cfg, device=_cpu() if distributed else None)
    attrs, arrays = store_layout(cfg, role, teacher, mim_attrs)
    V = view_setting(cfg, "views") if role == "mim" else int(mim_attrs["views"])
    try:
        store = TargetStore.create(url, attrs, arrays, manifest, V, overwrite=cfg.overwrite)
    except PermissionError as e:
        raise StoreError(f"cannot write the store {url}: {e}; choose another location with --targets or --out") from None
    atomic_write_bytes(_join(url, "extract-config.json"),
                       json.dumps(to_dict(cfg), indent=1, sort_keys=True).encode())
    missing = list(store.missing_shards())
    done_before = len(manifest.shards) - len(missing)
    if not missing:
        _log(f"extract: {url} is complete ({len(manifest.shards)} shards); nothing to do")
        return url
    _log(f"extract: {cfg.teacher} ({role}) -> {url}: {len(missing)} of {len(manifest.shards)} shards to do"
         + (f" ({done_before} done before)" if done_before else ""))
    images = sum(manifest.shards[k].count for k in missing)
    bar = Progress(images * V, f"extract {store_name(cfg)}", unit="img" if V == 1 else "view", bar=cfg.progress)
    totals = {"shards": 0, "views": 0, "skipped": 0}

    def on_done(summary: dict) -> None:
        totals["shards"] += 1
        totals["views"] += summary["views"]
        totals["skipped"] += len(summary["skipped"])
        shards = f"shards {done_before + totals['shards']}/{len(manifest.shards)}"
        # in-process runs advance per batch; dask tasks report whole shards
        bar.update(summary["rows"] * V if distributed else 0, note=shards)

    try:
        if distributed:
            run_dask(cfg, missing, on_done)
        else:
            run_in_process(cfg, missing, on_done, progress=bar.update)
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    _log(f"extract: done {totals['shards']} shards, {images} images, {totals['views']} views "
         f"({totals['skipped']} skipped as unreadable), store {_store_bytes(url) / 2**20:.1f} MiB, "
         f"{seconds:.1f} s ({totals['views'] / max(seconds, 1e-9):.1f} views/s) -> {url}")
    return url

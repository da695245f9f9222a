"""Stage one: run a frozen teacher once per view and store its targets in a Zarr v3 store.

    hdpipe shard --sample
    hdpipe extract --teacher mae  --manifest manifests/sample.json --targets targets
    hdpipe extract --teacher clip --manifest manifests/sample.json --targets targets
    hdpipe extract --teacher timm:vit_tiny_patch16_224 --role mim --random-init \
        --model-kwargs '{"img_size": 64, "patch_size": 8, "depth": 6}' --name tiny-mim ...

`extract(cfg)` checks everything a run can refuse before any shard starts (teacher name, role,
the MIM store for discriminative teachers, the output path, an existing store's settings: resume
when equal, refused unless `overwrite` when not), creates the store (`pipeline.targets.layout`
says what it holds), then runs one task per missing tar shard (`pipeline.targets.task`) in this
process or on dask (`pipeline.run.executor`). Re-running the same command skips done shards.
Discriminative teachers take the MIM store's view plan and token set, and read its views and masks.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np

from pipeline import urls
from pipeline.data.views import Interpolation
from pipeline.errors import ConfigError, StoreError
from pipeline.targets.quant import CODECS
from pipeline.targets.recipe import TeacherRecipe


@dataclass(frozen=True)
class ExtractConfig(TeacherRecipe):
    """The teacher's recipe (`pipeline.targets.recipe.TeacherRecipe`: teacher, weights,
    preprocessing, view plan, layers, masks, token set) plus where the store goes and how to run."""

    manifest: str = "manifests/sample.json"  # dataset manifest (path or fsspec URL) written by `hdpipe shard`
    targets: str = "targets"  # folder (or fsspec URL) holding the stores: <targets>/<name>.zarr
    name: str | None = None  # store name; default: the teacher name (':' and '/' become '-')
    out: str | None = None  # full store URL; overrides targets/name
    mim_store: str | None = None  # disc teachers: the MIM store to read views/masks from; default <targets>/mae.zarr
    # stored float precision, a name in pipeline.targets.quant.CODECS: fp16, int8 (per-row scales), q1pct (<= 1%/view)
    precision: str = "fp16"
    batch_size: int = 64  # views per teacher forward
    device: str = "auto"  # auto (CUDA when present, the worker's own GPU under dask), cpu, cuda, cuda:1, ...
    workers: int = 0  # >0: start a dask LocalCluster with this many single-threaded worker processes
    scheduler: str | None = None  # address of a running dask scheduler (tcp://host:8786); overrides workers
    retries: int = 2  # dask retries per shard task (a lost worker; deterministic errors fail again)
    # unreadable image inside a shard: stop, or store valid=false and list it in the done marker
    on_error: Literal["fail", "skip"] = "fail"
    overwrite: bool = False  # delete and rebuild an existing store built with other settings
    # shards to extract again although done (damaged: readers and `hdpipe inspect --content` name them)
    rebuild_shards: tuple[int, ...] = ()
    progress: bool = True  # progress bar and summary on stderr
    # MIM stores: also store each view's student input (the stored tokens' patches, uint8, lossless), so stage two
    # decodes no JPEG; unset: on, except when resuming a store made without them (older stores)
    student_pixels: bool | None = None
    # side of the stored student views in pixels, a multiple of the teacher's grid; unset: the teacher's img_size
    student_img_size: int | None = None
    student_interpolation: Interpolation = "bicubic"  # resize filter of the stored student views (the loader's default)
    CHOICES: ClassVar[dict] = {"precision": CODECS}  # fields whose values are a registry's names (--help lists them)

    def validate(self) -> None:
        """Range checks that need no files or models (called by `pipeline.config.resolve`)."""
        super().validate()
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.workers < 0:
            raise ConfigError(f"workers must be >= 0, got {self.workers}")
        if self.retries < 0:
            raise ConfigError(f"retries must be >= 0, got {self.retries}")
        if any(k < 0 for k in self.rebuild_shards):
            raise ConfigError(f"rebuild_shards must be shard numbers >= 0, got {list(self.rebuild_shards)}")
        if self.precision not in CODECS:
            raise ConfigError(f"unknown precision {self.precision!r}; choose one of {list(CODECS)}")
        if self.student_img_size is not None and self.student_img_size < 1:
            raise ConfigError(f"student_img_size must be >= 1 pixel, got {self.student_img_size}")


def store_name(cfg: ExtractConfig) -> str:
    return cfg.name or cfg.teacher.replace(":", "-").replace("/", "-")


def store_url(cfg: ExtractConfig) -> str:
    """Where this run writes: --out, else <targets>/<name>.zarr."""
    return cfg.out or urls.join(cfg.targets, f"{store_name(cfg)}.zarr")


def mim_store_url(cfg: ExtractConfig) -> str:
    return cfg.mim_store or urls.join(cfg.targets, "mae.zarr")


def open_mim_store(cfg: ExtractConfig, manifest):
    """The complete MIM store a discriminative run reads, checked against this run's manifest; the
    run inherits its view plan and token set (a restated setting that differs is an error). Hints
    never rebuild that store: this command did not make it."""
    from pipeline.data.views import ViewPlan
    from pipeline.targets.hints import extract_command
    from pipeline.targets.store import TargetStore

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
        fresh = urls.sibling(url, manifest.name)
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
    if cfg.tokens not in ("auto", attrs["tokens"]):
        diff.append(f"--tokens {cfg.tokens} (the store has {attrs['tokens']})")
    if diff:
        raise ConfigError(
            f"{', '.join(diff)}: a discriminative teacher renders exactly the views of its MIM store {url} "
            "and stores the same tokens, so it takes that store's settings; drop these options (or point "
            "--mim-store at a MIM store made with them)")
    mim.require_complete(extract_command(attrs, manifest=cfg.manifest, out=url))
    return mim


def student_pixels(cfg: ExtractConfig, teacher, role: str):
    """The student pixels a new store of this run holds (`pipeline.targets.pixels`), or None."""
    from pipeline.targets.pixels import StudentPixels

    if role != "mim":
        if cfg.student_pixels or cfg.student_img_size is not None:
            raise ConfigError(f"--student-pixels / --student-img-size: teacher {cfg.teacher} is discriminative and its "
                              "store holds no student pixels (the student's views and masks come from the MIM store); "
                              "set them on the MIM teacher's extraction")
        return None
    if cfg.student_pixels is False:
        if cfg.student_img_size is not None:
            raise ConfigError("--student-img-size sizes the stored student pixels; drop it with --no-student-pixels")
        return None
    return StudentPixels.for_grid(cfg.student_img_size or teacher.img_size, cfg.student_interpolation, teacher.grid)


def resumes_without_pixels(url: str, attrs: dict, arrays: dict, manifest, views: int) -> bool:
    """Whether the store at `url` was made without student pixels and otherwise with exactly these
    settings: `student_pixels` unset then resumes it as it is (pixels are the default only since
    issue 19; re-running an older store's command must not rebuild it)."""
    from pipeline.targets.schema import diff, full_attrs
    from pipeline.targets.store import TargetStore

    try:
        old = TargetStore.open(url).attrs
    except StoreError:
        return False
    if old.get("student_pixels"):
        return False
    new = full_attrs(attrs, arrays, manifest, views)
    return not diff({k: v for k, v in old.items() if k != "created"}, {k: v for k, v in new.items() if k != "created"},
                    "")


def _log(msg: str) -> None:
    """A start or end line on stderr, printed with or without progress bars (DVC logs show it)."""
    print(msg, file=sys.stderr, flush=True)


def _pixel_bytes(store) -> str:
    """", student pixels N KB per view" over the store's done shards ("" when it holds none)."""
    if "student_pixels" not in store.arrays:
        return ""
    done = sorted(store.done_shards())
    views = sum(store.shard_rows(k)[1] for k in done) * store.views
    nbytes = sum(store.shard_bytes("student_pixels", k) for k in done)
    return f" (student pixels {nbytes / max(views, 1) / 1000:.1f} KB per view)"


def _invalidate_damaged(store, rebuild: tuple[int, ...]) -> None:
    """Un-finish the shards asked for and those whose files are missing or of the wrong length, so
    this run extracts them again (their done markers go first: no reader trusts them meanwhile)."""
    from pipeline.targets import integrity

    for k in rebuild:
        store.shard_rows(k)  # out of range: a StoreError naming the store's shards
    damaged = integrity.damaged_shards(store)
    for k, why in sorted(damaged.items()):
        _log(f"extract: shard {k} of {store.url} is damaged ({why}); extracting it again")
    for k in sorted(set(rebuild) | set(damaged)):
        store.invalidate(k)


def extract(cfg: ExtractConfig) -> str:
    """Run teacher `cfg.teacher` over every missing shard of `cfg.manifest`; returns the store URL."""
    import torch

    from pipeline.config import to_dict
    from pipeline.data.manifest import read_manifest, verify_shards
    from pipeline.locks import writer_lock
    from pipeline.progress import Progress
    from pipeline.run.executor import run_dask, run_in_process
    from pipeline.run.worker import cached_teacher, task_device
    from pipeline.targets.layout import disc_layout, mim_layout, resolve_layers
    from pipeline.targets.store import TargetStore
    from pipeline.targets.task import ShardTask

    t0 = time.perf_counter()
    role = cfg.resolved_role()  # unknown teacher names fail here
    if role == "disc" and cfg.extra_targets:
        raise ConfigError(f"extra_targets {list(cfg.extra_targets)} are MIM targets; teacher {cfg.teacher} is "
                          "discriminative (use --role mim for a MIM teacher)")
    manifest = read_manifest(cfg.manifest)
    verify_shards(manifest, check_hashes=False)  # a missing tar is named now, not after hours of work
    url = store_url(cfg)
    mim_attrs = None
    if role == "disc":
        mim_attrs = open_mim_store(cfg, manifest).attrs
        if urls.absolute(url) == urls.absolute(mim_store_url(cfg)):
            raise ConfigError(f"the output {url} is the MIM store itself; pass --name or --out")
    reason = urls.unwritable_reason(url)
    if reason:
        raise StoreError(f"cannot write the store {url}: {reason}; "
                         "choose another location with --targets DIR or --out URL")
    source = cfg.source()
    distributed = bool(cfg.scheduler) or cfg.workers > 0
    # The driver needs the teacher only for its attributes when workers extract: keep it off the GPUs.
    teacher = cached_teacher(source, torch.device("cpu") if distributed else task_device(cfg.device))
    pixels = student_pixels(cfg, teacher, role)
    if role == "mim":
        plan = cfg.view_plan(teacher)
        V = plan.views

        def layout(px):
            return mim_layout(teacher, source, plan=plan, relation_layers=resolve_layers(cfg.relation_layers,
                              teacher.depth), extra_targets=cfg.extra_targets, mask_ratio=cfg.mask_ratio,
                              tokens="kept" if cfg.tokens == "auto" else cfg.tokens, precision=cfg.precision,
                              student_pixels=px)

        attrs, arrays = layout(pixels)
        unset = pixels is not None and cfg.student_pixels is None
        if unset and resumes_without_pixels(url, *layout(None), manifest, V):
            _log(f"extract: {url} was made without student pixels; resuming it as it is (--student-pixels "
                 "--overwrite would rebuild it with them)")
            attrs, arrays = layout(None)
    else:
        attrs, arrays = disc_layout(teacher, source, mim_attrs=mim_attrs, mim_store=mim_store_url(cfg),
                                    precision=cfg.precision)
        V = int(mim_attrs["views"])
    # One writer per store (`pipeline.locks`): a second extraction of it, or an --overwrite that would
    # delete it under a running one, stops at once naming the holder. Dask workers write shards under
    # this driver's lock (one task per shard).
    with writer_lock(url, "target store"):
        try:
            store = TargetStore.create(url, attrs, arrays, manifest, V, overwrite=cfg.overwrite)
        except PermissionError as e:
            raise StoreError(f"cannot write the store {url}: {e}; "
                             "choose another location with --targets or --out") from None
        urls.atomic_write_bytes(urls.join(url, "extract-config.json"),
                                json.dumps(to_dict(cfg), indent=1, sort_keys=True).encode())
        _invalidate_damaged(store, cfg.rebuild_shards)
        missing = list(store.missing_shards())
        done_before = len(manifest.shards) - len(missing)
        # A q1pct store's channel basis is fitted by shard 0's writer: shard 0 then runs first, alone.
        first_alone = bool(missing) and store.bases.needed()
        if first_alone and missing[0] != 0:
            raise StoreError(f"target store {url} has shard 0 done but no fitted channel basis (damaged); "
                             "rebuild it with `hdpipe extract ... --overwrite`")
        if not missing:
            _log(f"extract: {url} is complete ({len(manifest.shards)} shards); nothing to do")
            return url
        _log(f"extract: {cfg.teacher} ({role}) -> {url}: {len(missing)} of {len(manifest.shards)} shards to do"
             + (f" ({done_before} done before)" if done_before else ""))
        task = ShardTask(manifest=cfg.manifest, store=url, source=source,
                         mim_store=mim_store_url(cfg) if role == "disc" else None, batch_size=cfg.batch_size,
                         device=cfg.device, on_error=cfg.on_error)
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
                run_dask(task, missing, on_done, workers=cfg.workers, scheduler=cfg.scheduler, retries=cfg.retries,
                         name=f"extract-{store_name(cfg)}", first_alone=first_alone)
            else:
                run_in_process(task, missing, on_done, progress=bar.update)
        finally:
            bar.close()
        seconds = time.perf_counter() - t0
        _log(f"extract: done {totals['shards']} shards, {images} images, {totals['views']} views "
             f"({totals['skipped']} skipped as unreadable), store {urls.size_on_disk(url) / 2**20:.1f} MiB"
             f"{_pixel_bytes(store)}, {seconds:.1f} s ({totals['views'] / max(seconds, 1e-9):.1f} views/s) -> {url}")
        return url

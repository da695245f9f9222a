"""The stage-two loader on real tars and real stores written by `stages.extract` (tiny timm teachers).

Every batch value is checked against an independent path: the tar read by `pipeline.data.reading`, the
stored view rendered by `pipeline.data.views.render` and normalized by torchvision, the targets read
with `TargetStore.read_rows` and gathered with `np.take`.
"""
from __future__ import annotations

import io
import os
import shutil
from dataclasses import replace
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from pipeline.data.reading import iter_shard
from pipeline.errors import ConfigError, StoreError
from pipeline.train.loader import LoaderConfig, build_loader, choose_view, plan_epoch, steps_per_epoch
from toydata import write_dataset
from pipeline.data.manifest import read_manifest
from pipeline.targets.masking import random_keep
from pipeline.targets.store import TargetStore
from pipeline.data.views import View, render
from stages.extract import ExtractConfig, extract

SHARD = 6  # samples per tar shard
IMG = 32  # teacher and student input side: 4x4 patches of 8 px
MIM = "timm:vit_tiny_patch16_224"
MIM_KW = {"img_size": IMG, "patch_size": 8, "depth": 3}  # 16 patches, 3 heads, 192-d; relation layers (1, 2)
DISC = "timm:deit_tiny_patch16_224"
DISC_KW = {"img_size": IMG, "patch_size": 8, "depth": 1}
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)  # a student normalization unlike the teachers'


def _image(rng: np.random.Generator) -> bytes:
    w, h = (int(v) for v in rng.integers(36, 72, size=2))
    img = rng.integers(0, 255, size=(h // 4, w // 4, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).resize((w, h), Image.BILINEAR).save(buf, format="PNG")
    return buf.getvalue()


def make_dataset(folder: Path, n: int, corrupt: tuple[int, ...] = (), seed: int = 0) -> str:
    """Real webdataset tars of SHARD PNGs each and their manifest; returns the manifest path."""
    rng = np.random.default_rng(seed)
    payloads = [_image(rng) if i not in corrupt else b"\x89PNG\r\n\x1a\n broken" + bytes(30) for i in range(n)]
    return write_dataset(folder, payloads, SHARD, ext="png")


def make_stores(manifest: str, out: Path, tokens: str, views: int, extras=(), seed: int = 0,
                precision: str = "fp16") -> tuple[str, str]:
    """Real MIM + disc stores from `stages.extract` (random-init tiny teachers, unreadable images skipped)."""
    common = dict(manifest=manifest, random_init=True, views=views, seed=seed, batch_size=32, device="cpu",
                  progress=False, on_error="skip", tokens=tokens, precision=precision)
    mim = extract(ExtractConfig(teacher=MIM, role="mim", model_kwargs=MIM_KW, out=str(out / "mim.zarr"),
                                extra_targets=tuple(extras), **common))
    disc = extract(ExtractConfig(teacher=DISC, role="disc", model_kwargs=DISC_KW, out=str(out / "disc.zarr"),
                                 mim_store=mim, **{**common, "tokens": "auto"}))
    return mim, disc


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    uneven = make_dataset(root / "uneven", n=22, corrupt=(8,))  # shards of 6, 6, 6, 4 rows; valid 6, 5, 6, 4
    even = make_dataset(root / "even", n=24, seed=1)  # 4 shards of 6, all valid
    kept_mim, kept_disc = make_stores(uneven, root / "kept", "kept", views=2, extras=("attention",))
    all_mim, all_disc = make_stores(uneven, root / "all", "all", views=2, extras=("attention", "block_features"))
    even_mim, even_disc = make_stores(even, root / "even-stores", "kept", views=1, precision="q1pct")
    return dict(root=root, uneven=uneven, even=even, kept=(kept_mim, kept_disc), all=(all_mim, all_disc),
                even_stores=(even_mim, even_disc))


def cfg_for(manifest: str, stores: tuple[str, str], **kw) -> LoaderConfig:
    base = dict(manifest=manifest, mim_store=stores[0], disc_store=stores[1], batch_size=3, num_workers=0,
                seed=5, img_size=IMG, mean=MEAN, std=STD, interpolation="bilinear")
    base.update(kw)
    return LoaderConfig(**base)


def run_epoch(cfg: LoaderConfig, epoch: int, rank: int = 0, world_size: int = 1, skip: int = 0) -> list[dict]:
    loader = build_loader(cfg, epoch, rank, world_size, skip_batches=skip)
    batches = list(loader)
    assert len(batches) == len(loader)
    return batches


def valid_indices(store_url: str) -> set[int]:
    store = TargetStore.open(store_url)
    valid = np.concatenate([store.read_shard(k, ["valid"])["valid"] for k in range(store.num_shards)])
    return set(np.flatnonzero(valid).tolist())


# ---------------------------------------------------------------------------------------------
# Coverage, step counts, determinism, resume


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("workers", [0, 2])
def test_every_sample_exactly_once_per_epoch(world, world_size, workers):
    cfg = cfg_for(world["even"], world["even_stores"], batch_size=4, num_workers=workers)
    steps = steps_per_epoch(cfg, world_size)
    assert steps == 24 // (4 * world_size)  # equal shards: nothing is dropped
    seen = []
    for rank in range(world_size):
        batches = run_epoch(cfg, epoch=3, rank=rank, world_size=world_size)
        assert len(batches) == steps
        for b in batches:
            assert b["image"].shape == (4, 3, IMG, IMG) and b["index"].shape == (4,)
        seen += [int(i) for b in batches for i in b["index"]]
    assert sorted(seen) == list(range(24))


def test_every_valid_sample_once_with_uneven_shards_and_skipped_rows(world):
    cfg = cfg_for(world["uneven"], world["kept"], batch_size=3, num_workers=2)
    valid = valid_indices(world["kept"][0])
    assert valid == set(range(22)) - {8}  # the unreadable image was stored as valid=false
    assert steps_per_epoch(cfg, 1) == 21 // 3
    seen = [int(i) for b in run_epoch(cfg, epoch=0) for i in b["index"]]
    assert sorted(seen) == sorted(valid)


@pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")  # 3 workers on a 2-core test machine
@pytest.mark.parametrize("world_size,workers", [(2, 0), (2, 2), (3, 1), (2, 3)])  # (2, 3): a worker without shards
def test_equal_steps_across_ranks_with_uneven_shards(world, world_size, workers):
    cfg = cfg_for(world["uneven"], world["kept"], batch_size=2, num_workers=workers)
    counts = sorted([6, 5, 6, 4])
    m = 4 // world_size
    steps = steps_per_epoch(cfg, world_size)
    assert steps == sum(counts[:m]) // 2
    valid = valid_indices(world["kept"][0])
    for epoch in range(3):
        per_rank = []
        for rank in range(world_size):
            batches = run_epoch(cfg, epoch, rank, world_size)
            assert len(batches) == steps
            per_rank.append([int(i) for b in batches for i in b["index"]])
        flat = [i for r in per_rank for i in r]
        assert len(flat) == len(set(flat)) == steps * 2 * world_size  # disjoint, nothing twice
        assert set(flat) <= valid


@pytest.fixture(scope="module")
def sorted_classes(tmp_path_factory):
    """48 images of 4 classes in class order, 8 tars of one class each (what sorted class folders
    give), with MIM + disc stores; class of index i is i // 12."""
    root = tmp_path_factory.mktemp("sorted")
    manifest = make_dataset(root / "data", n=48, seed=3)
    stores = make_stores(manifest, root / "stores", "kept", views=1)
    return manifest, stores


def _iid_distinct(labels: np.ndarray, batch: int) -> float:
    rng = np.random.default_rng(0)
    return float(np.mean([len(set(rng.choice(labels, batch, replace=False))) for _ in range(4000)]))


@pytest.mark.parametrize("workers", [0, 2])
def test_class_sorted_shards_give_mixed_batches(sorted_classes, workers):
    """Distinct classes per batch reach >= 80% of an iid draw's with the default mix_shards; one shard
    at a time (mix_shards=1) makes nearly one-class batches, so the measure can fail."""
    manifest, stores = sorted_classes
    labels = np.arange(48) // 12

    def mean_distinct(**kw) -> float:
        cfg = cfg_for(manifest, stores, batch_size=4, num_workers=workers, **kw)
        counts = [len(set(labels[b["index"].numpy()])) for epoch in range(3) for b in run_epoch(cfg, epoch)]
        return float(np.mean(counts))

    iid = _iid_distinct(labels, 4)
    assert LoaderConfig(manifest="m", mim_store="s").mix_shards == 4
    assert mean_distinct() >= 0.8 * iid
    assert mean_distinct(mix_shards=1) < 0.6 * iid


def test_same_epoch_same_batches_other_epoch_other_order_and_views(world):
    cfg = cfg_for(world["uneven"], world["all"], batch_size=3, num_workers=2, masking="random")
    a, b = run_epoch(cfg, epoch=1), run_epoch(cfg, epoch=1)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            assert torch.equal(x[key], y[key]), key
    c = run_epoch(cfg, epoch=2)
    order_a = [int(i) for x in a for i in x["index"]]
    order_c = [int(i) for x in c for i in x["index"]]
    assert order_a != order_c and sorted(order_a) == sorted(order_c)
    views_a = {int(i): int(v) for x in a for i, v in zip(x["index"], x["view"])}
    views_c = {int(i): int(v) for x in c for i, v in zip(x["index"], x["view"])}
    assert views_a != views_c  # a new view draw per epoch (V = 2)
    for epoch, views in ((1, views_a), (2, views_c)):
        for index, view in views.items():
            assert view == int(np.random.default_rng([cfg.seed, epoch, index]).integers(2))
    assert set(views_a.values()) == {0, 1}


def test_view_schedules_and_views_used(world):
    """cycle: epoch e shows stored view e mod views_used for every sample; random draws among the
    first views_used only; asking for more views than stored is an error."""
    base = cfg_for(world["uneven"], world["kept"], batch_size=3)
    for epoch in range(4):
        views = {int(v) for b in run_epoch(replace(base, view_schedule="cycle"), epoch) for v in b["view"]}
        assert views == {epoch % 2}
    assert {int(v) for e in range(3) for b in run_epoch(replace(base, views_used=1), e) for v in b["view"]} == {0}
    mixed = {int(v) for e in range(3) for b in run_epoch(base, e) for v in b["view"]}
    assert mixed == {0, 1}
    with pytest.raises(ConfigError, match="views_used 3 exceeds the 2 views"):
        build_loader(replace(base, views_used=3), 0)


def test_epochs_back_to_back_share_workers_that_run_ahead_and_change_nothing(world, tmp_path, monkeypatch):
    """One set of workers serves every epoch (the same processes), a worker starts the next epoch
    while the step still consumes this one's last batch, and the batches are exactly those of a
    loader built for each epoch alone."""
    import time

    from pipeline.train import epochs as E
    from pipeline.train import loader as L

    log = tmp_path / "plans.log"
    real_plan = L._PlanStream.plan

    def plan(self, epoch):  # runs in the workers too (forked with the patch): pid and time of each plan
        if L.get_worker_info() is not None:
            with open(log, "a") as f:
                f.write(f"{epoch} {os.getpid()} {time.monotonic()}\n")
        return real_plan(self, epoch)

    monkeypatch.setattr(L._PlanStream, "plan", plan)
    cfg = cfg_for(world["uneven"], world["kept"], num_workers=2)
    got, last_consumed = {}, {}
    for epoch, it in E.epoch_iterators(cfg, 1, 4, skip_batches=1):
        got[epoch] = []
        for b in it:
            if len(got[epoch]) == len(L.build_loader(cfg, epoch, skip_batches=1 if epoch == 1 else 0)) - 1:
                time.sleep(0.5)  # the step on the epoch's last batch: the workers go on meanwhile
                last_consumed[epoch] = time.monotonic()
            got[epoch].append(b)
    rows = [line.split() for line in log.read_text().splitlines()]
    pids = {e: {int(p) for ee, p, _ in rows if int(ee) == e} for e in (1, 2, 3)}
    assert len(pids[1]) == 2 and pids[1] == pids[2] == pids[3]  # the same two workers for every epoch
    started = {e: min(float(t) for ee, _, t in rows if int(ee) == e) for e in (2, 3)}
    assert started[2] < last_consumed[1] and started[3] < last_consumed[2]
    for epoch, batches in got.items():
        want = list(L.build_loader(cfg, epoch, skip_batches=1 if epoch == 1 else 0))
        assert len(batches) == len(want)
        for a, b in zip(batches, want):
            assert all(torch.equal(a[k], b[k]) for k in b)


@pytest.mark.parametrize("workers", [0, 2])
def test_skip_batches_yields_exactly_the_tail(world, workers):
    cfg = cfg_for(world["uneven"], world["all"], batch_size=2, num_workers=workers)
    full = run_epoch(cfg, epoch=4)
    n = len(full)
    assert n == steps_per_epoch(cfg, 1) == 21 // 2
    for k in (1, 4, n - 1, n):
        tail = run_epoch(cfg, epoch=4, skip=k)
        assert len(tail) == n - k
        for x, y in zip(full[k:], tail, strict=True):
            for key in x:
                assert torch.equal(x[key], y[key]), (k, key)
    with pytest.raises(ConfigError, match="skip_batches"):
        build_loader(cfg, 4, skip_batches=n + 1)


def test_batches_match_the_plan_and_workers_read_disjoint_shards(world):
    cfg = cfg_for(world["uneven"], world["kept"], batch_size=2, num_workers=2)
    plan = plan_epoch(cfg, epoch=0, rank=0, world_size=1)
    shards = [set(w.shards) for w in plan.workers]
    assert shards[0].isdisjoint(shards[1]) and shards[0] | shards[1] == {0, 1, 2, 3}
    for j, b in enumerate(run_epoch(cfg, epoch=0)):
        assert b["index"].tolist() == plan.indices(j).tolist()


def test_batch_order_does_not_depend_on_worker_timing(world, monkeypatch):
    """Slow down worker 0 so it finishes its pieces well after worker 1: the batches stay the same."""
    import time

    import pipeline.data.views
    from torch.utils.data import get_worker_info

    cfg = cfg_for(world["uneven"], world["kept"], batch_size=2, num_workers=2)
    reference = run_epoch(cfg, epoch=6)
    real_render = pipeline.data.views.render

    def slow_render(*args, **kwargs):
        info = get_worker_info()
        if info is not None and info.id == 0:
            time.sleep(0.05)
        return real_render(*args, **kwargs)

    monkeypatch.setattr(pipeline.data.views, "render", slow_render)  # forked workers inherit the patch
    slowed = run_epoch(cfg, epoch=6)
    for x, y in zip(reference, slowed, strict=True):
        for key in x:
            assert torch.equal(x[key], y[key]), key


# ---------------------------------------------------------------------------------------------
# Values: images and targets against independent reads


def _images(manifest: str) -> dict[int, Image.Image]:
    m = read_manifest(manifest)
    out = {}
    for k in range(m.num_shards):
        for rec in iter_shard(m, k, decode=False):
            try:
                out[rec["index"]] = Image.open(io.BytesIO(rec["image"])).convert("RGB")
            except OSError:
                pass  # the deliberately broken image; it must never be asked for
    return out


def test_exif_rotated_photos_are_seen_upright_by_teachers_and_student(tmp_path):
    """Phone photos store pixels sideways plus an EXIF Orientation tag. Extraction (crop boxes) and
    the loader (rendered batch) must both use the upright image, as an independent
    ImageOps.exif_transpose decode gives it."""
    from PIL import ImageOps

    rng = np.random.default_rng(11)
    payloads, upright = [], {}
    for i in range(12):
        small = rng.integers(0, 255, size=(6, 9, 3), dtype=np.uint8)
        im = Image.fromarray(small).resize((72, 48), Image.BILINEAR)  # stored landscape
        exif = Image.Exif()
        exif[0x0112] = (6, 8, 3, 1)[i % 4]  # rotate 90 CW / 90 CCW / 180 / none
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=95, exif=exif.tobytes())
        payloads.append(buf.getvalue())
        upright[i] = ImageOps.exif_transpose(Image.open(io.BytesIO(buf.getvalue()))).convert("RGB")
    assert upright[0].size == (48, 72)  # portrait once turned upright
    manifest = write_dataset(tmp_path / "data", payloads, SHARD)
    stores = make_stores(manifest, tmp_path / "stores", "kept", views=2)
    cfg = cfg_for(manifest, stores, batch_size=4)
    rows = TargetStore.open(stores[0]).read_rows(range(12), names=["views"])["views"]
    for i in range(12):
        for v in range(2):  # the stored boxes are the view plan's boxes for the upright size
            from pipeline.data.views import ViewPlan
            plan = ViewPlan.from_attrs(TargetStore.open(stores[0]).attrs["view_plan"])
            assert np.array_equal(rows[i, v], plan.view(i, v, *upright[i].size).as_row())
    for batch in run_epoch(cfg, epoch=0):
        for j, index in enumerate(batch["index"].tolist()):
            want = expected(cfg, index, int(batch["view"][j]), upright)["image"]
            np.testing.assert_allclose(batch["image"][j].numpy(), want, atol=1e-6)


def expected(cfg: LoaderConfig, index: int, view: int, images: dict) -> dict[str, np.ndarray]:
    """One sample computed without the loader: read_rows + np.take, render + TF.normalize."""
    mim = TargetStore.open(cfg.mim_store)
    rows = mim.read_rows([index])
    P = int(np.prod(mim.attrs["grid"]))
    n_keep = rows["keep_progressive"].shape[-1]
    keep = {
        "progressive": lambda: rows["keep_progressive"][0, view],
        "direct": lambda: rows["keep_direct"][0, view],
        "random": lambda: random_keep([index], [view], P, n_keep, cfg.seed)[0].numpy(),
        "none": lambda: np.arange(P),
    }[cfg.masking]().astype(np.int64)
    out = {"keep_index": keep}
    kept_store = mim.attrs["tokens"] == "kept"
    tok = np.arange(1 + n_keep) if kept_store else np.concatenate([[0], keep + 1])
    stored_layers = list(mim.attrs["relation_layers"])
    layers = stored_layers if cfg.relation_layers is None else list(cfg.relation_layers)
    pos = [stored_layers.index(layer) for layer in layers]
    if layers:
        t = np.take(rows[cfg.mim_target][0, view], pos, axis=0)
        if cfg.mim_target == "block_features":
            t = np.take(t, tok, axis=1)
        else:
            t = np.take(np.take(t, tok, axis=2), tok, axis=3)
        if cfg.mim_target == "attention" and not kept_store:
            t = t / t.sum(-1, keepdims=True)
        out[cfg.mim_target] = t
    if cfg.disc_store is not None:
        feats = TargetStore.open(cfg.disc_store).read_rows([index])["features"][0, view]
        out["features"] = np.take(feats, tok, axis=0)
    box = View.from_row(rows["views"][0, view])
    img = render(images[index], box, cfg.img_size, cfg.interpolation)
    out["image"] = TF.normalize(img, cfg.mean, cfg.std).numpy()
    return out


def check_batches(cfg: LoaderConfig, batches: list[dict], images: dict, epoch: int, views: int = 2) -> int:
    n = 0
    for b in batches:
        for i in range(b["index"].shape[0]):
            index, view = int(b["index"][i]), int(b["view"][i])
            assert view == choose_view(cfg.seed, epoch, index, views)
            want = expected(cfg, index, view, images)
            for key, value in want.items():
                got = b[key][i].numpy()
                assert got.dtype == (np.int64 if key == "keep_index" else np.float32), key
                np.testing.assert_allclose(got, value, rtol=1e-6, atol=1e-6, err_msg=key)
            n += 1
    return n


@pytest.mark.parametrize(
    "masking,mim_target,layers",
    [("progressive", "relations", None), ("direct", "relations", (2,)), ("random", "attention", None),
     ("none", "block_features", (1,)), ("random", "relations", (2, 1))],
)
def test_all_token_store_gathers_the_kept_tokens(world, masking, mim_target, layers):
    images = _images(world["uneven"])
    cfg = cfg_for(world["uneven"], world["all"], masking=masking, mim_target=mim_target, relation_layers=layers)
    batches = run_epoch(cfg, epoch=1)[:3]
    b = batches[0]
    n_keep = 16 if masking == "none" else TargetStore.open(cfg.mim_store).attrs["mask"]["n_keep"]
    T = 1 + n_keep
    n_layers = 2 if layers is None else len(layers)
    assert b["keep_index"].shape == (3, n_keep) and b["keep_index"].dtype == torch.int64
    assert (b["keep_index"].diff(dim=1) > 0).all()  # sorted, distinct
    tail = (n_layers, T, 192) if mim_target == "block_features" else (n_layers, 3, T, T)
    assert b[mim_target].shape == (3, *tail)
    assert b["features"].shape == (3, T, 192)
    assert {"relations", "attention", "block_features"} & set(b) == {mim_target}
    if masking == "none":
        assert torch.equal(b["keep_index"], torch.arange(16).expand(3, 16))
    if masking == "random":
        stored = TargetStore.open(cfg.mim_store).read_rows(b["index"].tolist())["keep_progressive"]
        prog = stored[np.arange(3), b["view"].numpy()]
        assert not np.array_equal(prog, b["keep_index"].numpy())
    assert check_batches(cfg, batches, images, epoch=1) == 9


def test_kept_token_store_serves_progressive_masking(world):
    images = _images(world["uneven"])
    cfg = cfg_for(world["uneven"], world["kept"], num_workers=2)
    batches = run_epoch(cfg, epoch=0)
    assert check_batches(cfg, batches[:2] + batches[-1:], images, epoch=0) == 9
    att = run_epoch(cfg_for(world["uneven"], world["kept"], mim_target="attention"), epoch=0)
    assert check_batches(cfg_for(world["uneven"], world["kept"], mim_target="attention"), att[:1], images, 0) == 3


def test_compact_precision_store_is_decoded(world):
    """A q1pct store (quantized residuals + row/column means) reaches the batch decoded to float32."""
    assert TargetStore.open(world["even_stores"][0]).precision == "q1pct"
    cfg = cfg_for(world["even"], world["even_stores"], num_workers=2)
    batches = run_epoch(cfg, epoch=0)
    assert batches[0]["relations"].dtype == torch.float32 and batches[0]["features"].dtype == torch.float32
    assert check_batches(cfg, batches[:2], _images(world["even"]), epoch=0, views=1) == 6


def test_loader_decodes_images_at_the_pixel_limit_of_its_manifest(world, tmp_path, monkeypatch):
    """Every image the loader decodes is held to the manifest's `max_image_pixels` (the limit `hdpipe
    shard --max-image-pixels` recorded), not to Pillow's own: a 200 Mpx header gets past the bomb
    check with a 400 Mpx manifest (only its cut pixel data fails) and is refused citing the default."""
    import pipeline.data.images as images
    from pipeline.data.manifest import write_manifest
    from pipeline.data.reading import read_shard_records
    from pipeline.errors import ShardError
    from pipeline.train.loader import _decode_image
    from toydata import bomb_png

    # The wiring: a copy of a manifest with a raised limit (same tars, same digest, so the same stores).
    even = read_manifest(world["even"])
    shards = tuple(replace(s, url=even.shard_url(k)) for k, s in enumerate(even.shards))  # absolute: the same tars
    raised = write_manifest(replace(even, shards=shards, max_image_pixels=400_000_000), tmp_path / "raised.json")
    seen = []

    def spy(data, what="image", *, max_pixels=images.DEFAULT_MAX_PIXELS):
        seen.append(max_pixels)
        return decode(data, what, max_pixels=max_pixels)

    decode = images.decode_image
    monkeypatch.setattr(images, "decode_image", spy)
    batches = run_epoch(cfg_for(str(raised.path), world["even_stores"]), epoch=0)
    plain = run_epoch(cfg_for(world["even"], world["even_stores"]), epoch=0)
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(batches, plain, strict=True))
    assert seen[:24] == [400_000_000] * 24 and seen[24:] == [images.DEFAULT_MAX_PIXELS] * 24
    monkeypatch.undo()
    # The check itself, on the records as the loader reads them.
    path = write_dataset(tmp_path / "data", [bomb_png(20_000, 10_000)], SHARD, ext="png")
    default = read_manifest(path)
    big = write_manifest(replace(default, max_image_pixels=400_000_000), tmp_path / "data" / "big.json")
    for m in (big, default):
        [rec] = read_shard_records(m, 0)
        with pytest.raises(ShardError) as e:
            _decode_image(rec["image"], rec["index"], m.shard_url(0), m.max_image_pixels)
        msg = str(e.value)
        if m is big:
            assert "does not decode (OSError: image file is truncated" in msg and "178956970" not in msg, msg
        else:
            assert "exceeds max_image_pixels=178956970" in msg and "--max-image-pixels" in msg, msg


def test_uint8_image_transport_normalized_on_the_device_equals_the_float_path(world):
    """What a GPU run gets (uint8 pixels, normalized after the copy by ahead_on_device) is bit for
    bit what the loader's float path gives (here the "device" is the CPU; the ops are the same)."""
    from pipeline.train.device_copy import ahead_on_device

    cfg = cfg_for(world["uneven"], world["kept"], num_workers=2)
    floats = run_epoch(cfg, epoch=1)
    u8 = replace(cfg, image_transport="uint8")
    raw = list(build_loader(u8, 1))
    assert raw[0]["image"].dtype == torch.uint8 and raw[0]["image"].nbytes * 4 == floats[0]["image"].nbytes
    got = list(ahead_on_device(iter(raw), torch.device("cpu"), normalize=(cfg.mean, cfg.std)))
    assert len(got) == len(floats)
    for a, b in zip(got, floats, strict=True):
        assert a["image"].dtype == torch.float32 and torch.equal(a["image"], b["image"])
        assert all(torch.equal(a[k], b[k]) for k in b if k != "image")


@pytest.mark.parametrize("store,kw", [
    ("kept", {}),  # fp16, kept tokens
    ("kept", {"student_pixels": "store", "interpolation": "bicubic"}),  # stored patches placed on the device
    ("all", {"mim_target": "attention", "masking": "direct", "token_resample": 0.6}),  # gathered, renormalized, cut
    ("all", {"mim_target": "block_features", "relation_layers": (2,)}),  # one layer of several
    ("even_stores", {}),  # q1pct: token-subspace relations, channel-basis features
])
def test_encoded_targets_decoded_on_the_device_equal_the_worker_decoded_ones(world, store, kw):
    """What a GPU run gets (the stored codes, decoded by ahead_on_device after the copy) is bit for
    bit what the loader's workers decode (here the "device" is the CPU; the code is the same), and
    the batches in between carry codes, not float32 targets."""
    from pipeline.train.device_copy import ahead_on_device

    manifest = world["even"] if store == "even_stores" else world["uneven"]
    cfg = cfg_for(manifest, world[store], num_workers=2, image_transport="uint8", **kw)
    decoded = run_epoch(cfg, epoch=1)
    raw = list(build_loader(replace(cfg, target_transport="encoded"), 1))
    target = kw.get("mim_target", "relations")
    assert target not in raw[0] and "features" not in raw[0] and "_targets" in raw[0]
    assert any(k.startswith(f"_enc.{target}.") for k in raw[0]) and ("_tok" in raw[0]) == (store == "all")
    pixels = "student_pixels" in kw
    assert ("_patches" in raw[0]) == pixels and ("image" in raw[0]) != pixels
    if pixels:  # a third of the image's bytes travel
        assert raw[0]["_patches"].dtype == torch.uint8 and raw[0]["_patches"].nbytes < decoded[0]["image"].nbytes / 2
    got = list(ahead_on_device(iter(raw), torch.device("cpu")))
    assert len(got) == len(decoded)
    for a, b in zip(got, decoded, strict=True):
        assert sorted(a) == sorted(b)
        assert all(torch.equal(a[k], b[k]) for k in b), [k for k in b if not torch.equal(a[k], b[k])]


def test_kept_and_all_token_stores_give_the_same_targets(world):
    """Same teachers, views and masks: gathering from a tokens:all store (attention renormalized over
    the kept tokens) reproduces the tokens:kept store, up to fp16 storage rounding."""
    for target in ("relations", "attention"):
        a = run_epoch(cfg_for(world["uneven"], world["kept"], mim_target=target), epoch=2)
        b = run_epoch(cfg_for(world["uneven"], world["all"], mim_target=target), epoch=2)
        for x, y in zip(a, b, strict=True):
            assert torch.equal(x["index"], y["index"]) and torch.equal(x["keep_index"], y["keep_index"])
            assert torch.equal(x["image"], y["image"])
            torch.testing.assert_close(x[target], y[target], rtol=2e-3, atol=2e-3)
            torch.testing.assert_close(x["features"], y["features"], rtol=2e-3, atol=2e-3)


def test_features_only_run_replays_the_disc_stores_mim_views(world):
    cfg = cfg_for(world["uneven"], (None, world["kept"][1]))
    batches = run_epoch(cfg, epoch=0)
    ref = run_epoch(cfg_for(world["uneven"], world["kept"]), epoch=0)
    assert "relations" not in batches[0]
    for x, y in zip(batches, ref, strict=True):
        for key in ("image", "keep_index", "features", "index", "view"):
            assert torch.equal(x[key], y[key])
    no_rel = run_epoch(cfg_for(world["uneven"], world["kept"], relation_layers=()), epoch=0)
    assert "relations" not in no_rel[0] and torch.equal(no_rel[0]["features"], ref[0]["features"])


# ---------------------------------------------------------------------------------------------
# Errors


def test_incomplete_store_names_missing_shards_and_the_command(world, tmp_path):
    copy = tmp_path / "mim.zarr"
    shutil.copytree(world["kept"][0], copy)
    (copy / "done" / "000002.json").unlink()
    with pytest.raises(StoreError, match=r"incomplete.*\(2\).*hdpipe extract") as err:
        build_loader(cfg_for(world["uneven"], (str(copy), None)), 0)
    # The command rebuilds this very store: same teacher, weights, model, views and tokens.
    for part in (f"--teacher {MIM}", "--role mim", "--random-init", f"--out {copy}", "--views 2", "--tokens kept",
                 '--model-kwargs \'{"depth": 3, "img_size": 32, "patch_size": 8}\'', "--extra-targets attention"):
        assert part in str(err.value), part


@pytest.mark.parametrize("workers", [0, 2])
def test_tar_changed_after_extraction_is_refused_before_any_batch(world, tmp_path, workers):
    """Same manifest (digest unchanged) but one image of tar 0 replaced: its sha256 no longer matches,
    and no batch holding any row of that tar is yielded, whichever worker reads it."""
    from pipeline.errors import IntegrityError
    from pipeline.data.manifest import sha256_of

    src = Path(world["uneven"]).parent
    shutil.copytree(src, tmp_path / "data")
    tar_path = tmp_path / "data" / "toy-000000.tar"
    want = sha256_of(str(tar_path))
    with tarfile.open(src / "toy-000000.tar") as old, tarfile.open(tar_path, "w") as new:
        for member in old.getmembers():
            body = old.extractfile(member).read()
            if member.name == "000000003.png":
                body = b"\x89PNG\r\n\x1a\n damaged" + bytes(20)
                member.size = len(body)
            new.addfile(member, io.BytesIO(body))
    got = sha256_of(str(tar_path))
    cfg = cfg_for(str(tmp_path / "data" / "toy.json"), world["kept"], batch_size=1, num_workers=workers,
                  mix_shards=1)
    seen = []
    with pytest.raises(IntegrityError) as err:
        for batch in build_loader(cfg, 0):
            seen += batch["index"].tolist()
    msg = str(err.value)
    assert f"tar {tar_path}" in msg and got in msg and want in msg and "--overwrite" in msg
    assert not [i for i in seen if i < SHARD], "a row of the changed tar reached a batch"


def test_store_from_another_manifest_is_refused(world):
    with pytest.raises(StoreError, match="manifest_digest"):
        build_loader(cfg_for(world["even"], world["kept"]), 0)


def test_disagreeing_stores_name_the_field(world, tmp_path):
    with pytest.raises(StoreError, match="tokens.*hdpipe extract"):
        build_loader(cfg_for(world["uneven"], (world["kept"][0], world["all"][1])), 0)
    other_mim, _ = make_stores(world["uneven"], tmp_path, "kept", views=2, extras=("attention",), seed=1)
    with pytest.raises(StoreError, match="view_plan_digest"):
        build_loader(cfg_for(world["uneven"], (other_mim, world["kept"][1])), 0)


def test_unstored_relation_layers_and_targets_name_the_extract_flag(world):
    with pytest.raises(StoreError, match=r"relation layers \[3\].*--relation-layers 1,2,3"):
        build_loader(cfg_for(world["uneven"], world["kept"], relation_layers=(2, 3)), 0)
    with pytest.raises(StoreError, match="block_features.*--extra-targets attention,block_features"):
        build_loader(cfg_for(world["uneven"], world["kept"], mim_target="block_features"), 0)
    with pytest.raises(StoreError, match="attention.*--extra-targets attention"):
        build_loader(cfg_for(world["even"], world["even_stores"], mim_target="attention"), 0)


@pytest.mark.parametrize("masking", ["direct", "random", "none"])
def test_kept_token_store_refuses_other_maskings(world, masking):
    with pytest.raises(StoreError, match="--tokens all"):
        build_loader(cfg_for(world["uneven"], world["kept"], masking=masking), 0)


def test_config_errors(world):
    with pytest.raises(ConfigError, match="at least one whole shard"):
        steps_per_epoch(cfg_for(world["uneven"], world["kept"]), 5)
    with pytest.raises(ConfigError, match="drop_last"):
        steps_per_epoch(cfg_for(world["uneven"], world["kept"], drop_last=False), 2)
    with pytest.raises(ConfigError, match="target store"):
        cfg_for(world["uneven"], (None, None)).validate()
    with pytest.raises(ConfigError, match="batch_size 30 exceeds the 21 valid samples"):
        steps_per_epoch(cfg_for(world["uneven"], world["kept"], batch_size=30), 1)


def test_drop_last_false_keeps_the_last_partial_batch(world):
    cfg = cfg_for(world["uneven"], world["kept"], batch_size=4, drop_last=False)
    batches = run_epoch(cfg, epoch=0)
    assert [b["index"].shape[0] for b in batches] == [4] * 5 + [1]
    assert sorted(int(i) for b in batches for i in b["index"]) == sorted(valid_indices(world["kept"][0]))

"""`hdpipe verify STORE --samples N`: re-run a store's teacher on N random stored views and compare.

    hdpipe verify targets/mae.zarr --samples 32

The teacher is rebuilt from the store's own attributes (teacher spec, checkpoint path, model
arguments; random-init weights from their recorded seed) and must hash to the recorded weights
digest before anything is compared: a different model would make every error meaningless. Views
are replayed from the stored crop boxes, and values are compared on the stored token set (the
stored masks pick the tokens), so a mask flip on a near-tie does not masquerade as a value error;
masks are compared separately (fraction of differing indices).

Errors per array: `max_abs` = max |stored - recomputed|, `rel` = the largest per-view relative error
||stored - recomputed||_2 / ||recomputed||_2. The tolerance is the store precision's own
(`verify_tolerance` of its codec in `pipeline.targets.quant.CODECS`): its storage error plus float
noise; when the store was computed under bf16 autocast (CUDA) and this run is not (or the other way
round), `AUTOCAST_SLACK` is added, since bf16 keeps 8 mantissa bits.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.errors import ConfigError, StoreError

AUTOCAST_SLACK = 5e-2  # extra relative error allowed when bf16 and fp32 runs are compared
MASK_TOLERANCE = 0.01  # fraction of kept indices allowed to differ (near-ties under other batching)


@dataclass(frozen=True)
class VerifyConfig:
    store: str  # target store URL (<targets>/<teacher>.zarr)
    samples: int = 16  # views to re-run, drawn uniformly from valid rows of done shards
    seed: int = 0  # seed of the draw of views
    manifest: str | None = None  # dataset manifest; default: the one recorded beside the store (extract-config.json)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    batch_size: int = 32  # views per teacher forward
    tolerance: float | None = None  # per-view relative error bound; default: the precision's own (+ AUTOCAST_SLACK)

    def validate(self) -> None:
        if self.samples < 1:
            raise ConfigError(f"samples must be >= 1, got {self.samples}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")


def _extract_config(store_url: str) -> dict:
    from pipeline.urls import exists, read_bytes

    path = store_url.rstrip("/") + "/extract-config.json"
    return json.loads(read_bytes(path)) if exists(path) else {}


def _errors(stored: np.ndarray, fresh: np.ndarray) -> dict[str, float]:
    """max |stored - fresh| and the largest per-view relative L2 error; arrays [n, ...]."""
    d = (stored.astype(np.float64) - fresh.astype(np.float64)).reshape(len(fresh), -1)
    ref = np.linalg.norm(fresh.astype(np.float64).reshape(len(fresh), -1), axis=1)
    rel = np.linalg.norm(d, axis=1) / np.maximum(ref, 1e-30)
    return {"max_abs": float(np.abs(d).max()), "rel": float(rel.max())}


def verify(cfg: VerifyConfig) -> dict[str, Any]:
    """Compare N stored views with a fresh teacher run; returns a report whose `ok` says all passed."""
    import torch

    from pipeline.data.reading import read_shard_records
    from pipeline.data.images import decode_image
    from pipeline.data.manifest import read_manifest
    from pipeline.targets.store import TargetStore
    from pipeline.data.views import View, ViewPlan, render, render_uint8
    from pipeline.run.worker import cached_teacher, task_device
    from pipeline.targets.compute import disc_batch, mim_batch
    from pipeline.targets.pixels import StudentPixels, stored_patches
    from pipeline.targets.quant import codec
    from pipeline.targets.teachers import TeacherSource

    store = TargetStore.open(cfg.store)
    attrs = store.attrs
    tolerance = codec(attrs["precision"]).verify_tolerance  # an unknown precision is refused before any work
    role = attrs["role"]
    recorded = _extract_config(cfg.store)
    manifest_path = cfg.manifest or recorded.get("manifest")
    if manifest_path is None:
        raise ConfigError(f"{cfg.store} records no manifest; pass --manifest PATH")
    manifest = read_manifest(manifest_path)
    if manifest.digest() != attrs["manifest_digest"]:
        raise StoreError(f"manifest {manifest_path} is not the one {cfg.store} was built from (digest "
                         f"{manifest.digest()[:12]} vs {attrs['manifest_digest'][:12]}); pass the right --manifest")

    device = task_device(cfg.device)
    teacher = cached_teacher(TeacherSource.from_attrs(attrs), device)
    if teacher.weights_digest != attrs["weights_digest"]:
        raise StoreError(f"the rebuilt teacher {attrs['teacher']} has weights digest {teacher.weights_digest[:12]} but "
                         f"{cfg.store} was made with {attrs['weights_digest'][:12]} ({attrs['weights_source']}): "
                         "the weights changed (another checkpoint file or library version), so nothing can be compared")

    # Draw (index, view) pairs among valid rows of done shards.
    V = int(attrs["view_plan"]["views"])
    done = sorted(store.done_shards())
    if not done:
        raise StoreError(f"{cfg.store} has no finished shard to verify")
    # Candidate j is view j % V of the (j // V)-th valid row, in index order: an index array, not a
    # Python pair per view (ImageNet's 1.28 M rows).
    shards = [manifest.shards[k] for k in done]
    rows = np.concatenate([np.arange(s.first_index, s.first_index + s.count) for s in shards])
    rows = rows[store.read_rows(rows, names=["valid"])["valid"].astype(bool)]
    rng = np.random.default_rng(cfg.seed)
    n = min(cfg.samples, rows.size * V)
    picks = sorted((int(rows[j // V]), int(j % V)) for j in rng.choice(rows.size * V, size=n, replace=False))
    indices = sorted({i for i, _ in picks})
    row_of = {i: r for r, i in enumerate(indices)}

    px = StudentPixels.from_attrs(attrs)  # stored student views: rendered again and compared exactly
    names = (["views", "keep_progressive", "keep_direct", "relations"] + list(attrs["extra_targets"])
             + (["student_pixels"] if px else []) if role == "mim" else ["features"])
    stored = store.read_rows(indices, names=names)  # {name: [len(indices), V, ...]}
    if role == "mim":
        views_src, keep_src = stored["views"], stored["keep_progressive"]
    else:
        mim = TargetStore.open(attrs["mim_store"])
        got = mim.read_rows(indices, names=["views", "keep_progressive"])
        views_src, keep_src = got["views"], got["keep_progressive"]

    images = {}
    for k in sorted({manifest.shard_of(i) for i in indices}):
        for sample in read_shard_records(manifest, k, decode=False):
            index = sample["index"]
            if index in row_of:
                images[index] = decode_image(sample["image"], f"image {index:09d} of {manifest_path}",
                                             max_pixels=manifest.max_image_pixels)

    plan = ViewPlan.from_attrs(attrs["view_plan"])
    fresh: dict[str, list] = {}
    with torch.inference_mode():
        for s in range(0, len(picks), cfg.batch_size):
            batch = picks[s:s + cfg.batch_size]
            views = [View.from_row(views_src[row_of[i], v]) for i, v in batch]
            x = torch.stack([render(images[i], view, teacher.img_size, teacher.interpolation)
                             for (i, _), view in zip(batch, views)])
            x = teacher.normalize(x).to(device)
            keep = torch.as_tensor(np.stack([keep_src[row_of[i], v] for i, v in batch]).astype(np.int64)).to(device)
            if role == "mim":
                out = mim_batch(teacher, x, tuple(attrs["relation_layers"]), tuple(attrs["extra_targets"]),
                                float(attrs["mask"]["ratio"]), attrs["tokens"], keep=keep)
                # The crop boxes themselves are a pure function of the plan: recompute them too.
                out["views"] = torch.as_tensor(np.stack([
                    plan.view(i, v, *images[i].size).as_row() for i, v in batch]))
                if px is not None:  # at the stored token set's patches, like the relations
                    u = torch.stack([render_uint8(images[i], view, px.img_size, px.interpolation)
                                     for (i, _), view in zip(batch, views)])
                    out["student_pixels"] = stored_patches(u, keep, attrs["tokens"], teacher.grid)
            else:
                out = disc_batch(teacher, x, keep, attrs["tokens"])
            for name, t in out.items():
                fresh.setdefault(name, []).append(t.float().cpu().numpy() if t.is_floating_point() else t.cpu().numpy())

    extraction_autocast = {store.done_marker(manifest.shard_of(i)).get("autocast", "none") for i in indices}
    here = "bf16" if device.type == "cuda" else "none"
    tol = cfg.tolerance if cfg.tolerance is not None else tolerance
    if cfg.tolerance is None and extraction_autocast != {here}:
        tol += AUTOCAST_SLACK
    report: dict[str, Any] = {"store": cfg.store, "teacher": attrs["teacher"], "precision": attrs["precision"],
                              "samples": len(picks), "device": str(device), "tolerance": tol, "arrays": {}}
    for name in names:
        got = np.stack([stored[name][row_of[i], v] for i, v in picks])
        new = np.concatenate(fresh[name])
        if name.startswith("keep_"):
            frac = float((np.sort(got, axis=-1) != np.sort(new.astype(got.dtype), axis=-1)).mean())
            entry = {"mismatch": frac, "tolerance": MASK_TOLERANCE, "ok": frac <= MASK_TOLERANCE}
        elif name == "views":
            err = _errors(got, new)
            entry = {**err, "tolerance": 1e-6, "ok": err["max_abs"] <= 1e-6}
        elif name == "student_pixels":  # lossless: equal or wrong
            err = _errors(got, new)
            entry = {**err, "tolerance": 0.0, "ok": err["max_abs"] == 0}
        else:
            err = _errors(got, new)
            entry = {**err, "tolerance": tol, "ok": err["rel"] <= tol}
        report["arrays"][name] = entry
    report["ok"] = all(e["ok"] for e in report["arrays"].values())
    return report


def format_report(report: dict) -> str:
    """Readable table of a `verify` report."""
    lines = [f"verify {report['store']}: teacher {report['teacher']}, precision {report['precision']}, "
             f"{report['samples']} views on {report['device']}",
             f"{'array':<18}{'max abs err':>14}{'max rel err':>14}{'tolerance':>12}  result"]
    for name, e in report["arrays"].items():
        if "mismatch" in e:
            lines.append(f"{name:<18}{'':>14}{e['mismatch']:>14.3%}{e['tolerance']:>12.3%}  "
                         f"{'ok' if e['ok'] else 'FAIL'} (fraction of differing indices)")
        else:
            lines.append(f"{name:<18}{e['max_abs']:>14.3e}{e['rel']:>14.3e}{e['tolerance']:>12.1e}  "
                         f"{'ok' if e['ok'] else 'FAIL'}")
    lines.append("verify: " + ("ok" if report["ok"]
                               else "FAILED: stored values differ from the teacher beyond tolerance"))
    return "\n".join(lines)

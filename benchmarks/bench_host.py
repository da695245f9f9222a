"""Host CPU per image of stage two and per view of extraction at the ViT-B defaults (issue 19; not a test).

On a GPU node the host work around the model decides the speed: a ViT-B student step takes ~0.1 ms
of GPU per image, so every host millisecond per image is a GPU waiting. This measures what the
stage-two loader costs the host for each way its data can travel:

- path `tars`: today's path: the tar read (sha256 checked once), JPEG decode, crop and resize to
  224 px (`pipeline.data.views.render_uint8`);
  path `pixels`: the store's student pixels (`hdpipe extract --student-pixels`, the default for new
  stores) placed into a zero image (`pipeline.data.patches.place_patches`): no tar, no JPEG;
- transport `decoded`: loader workers decode the targets to float32 (the CPU default);
  transport `encoded`: the stored codes (and stored patches) travel and the training device decodes
  and places them (the CUDA default, `pipeline.train.target_rows.finish_batch`); that is not host
  work on a GPU node, and is reported apart ("device decode", measured here on the CPU, where it is).

Extraction: the same stores' extraction, each phase's host CPU per view counted around the
functions `compute_shard` and its write call (the teacher forward excluded): JPEG decode, view render, the
student pixels' patches, encoding on the teacher's device (q1pct; fp16 is converted at write time)
and the shard's compression and write. Goal: encoding, compression and write <= 1 ms per view.
Rounds extract again into new stores (round 0's serve the loader).

Data: `--images` ImageNet-sized JPEGs (`bench_loader.make_photos`), tars of 64; a ViT-B/16 MIM
store (relations of blocks 11 and 12 over [CLS] + 67 kept tokens, student pixels) and a DeiT-B/16
disc store (features [68, 768]), random init, 2 views per image, in fp16 and in q1pct.

Whole loader: a `RunLoader` (2 workers and mix_shards 4 as distill, batch 64), in a fresh
process per setting: CPU of the process and its reaped workers for epochs 1-40 minus epoch 1 alone
(start-up cancels; epoch 0 warms the page cache and verifies the tars), per image; `--rounds`
processes each, min / median / max. The device decode is timed on the batches of a separate 4-epoch
run (batches kept hold their workers' piece buffers, which the timed runs reuse).
Phases: the loader's functions called one after another in one process (torch threads 1).
Goal (issue 19): <= 0.5 ms host CPU per image, fp16 and q1pct, ViT-B defaults, 224 px, 2 views.

    python benchmarks/bench_host.py [--images 128] [--rounds 3] [--work DIR] [--out benchmarks/results/host.json]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_loader import PhaseClock, make_photos, work_folder, write_report  # noqa: E402

GOAL_MS = 0.5  # stage two, host CPU ms per image
EXTRACT_GOAL_MS = 1.0  # extraction: encoding, compression and the store write, host CPU ms per view
STORE_WORK = ("pixels", "encode", "compress+write")  # what the extraction goal counts (decode and render apart)
CORES_PER_GPU = (14, 4)  # an 8-GPU node with ~112 cores; a 1-GPU box with 4 spare cores
TEACHERS = {"base": ("timm:vit_base_patch16_224", "timm:deit_base_patch16_224"),  # the ViT-B defaults
            "small": ("timm:vit_small_patch16_224", "timm:deit_small_patch16_224")}  # a quicker check of the code
PRECISIONS = ("fp16", "q1pct")
EPOCHS = 40  # epochs of the longer whole-loader run (start-up cancels against a run of one; 8 let its
# noise reach +-0.2 ms per image)
SETTINGS = [(path, transport) for path in ("tars", "pixels") for transport in ("decoded", "encoded")]
PHASES = ("targets read", "rows", "collate", "device decode")  # device: place patches, decode targets


EXTRACT_PHASES = ("decode", "render", "pixels", "encode", "compress+write")
SPENT: dict[str, float] = {}  # CPU seconds per extraction phase of the extraction running now


def _instrument() -> None:
    """Count each extraction phase's CPU seconds in SPENT: the functions `compute_shard` and its write call,
    wrapped. Per-thread CPU (decode and render run on the prefetch thread beside the forward); the
    torch work runs on one thread inside its wrapper, so its thread time is all of it; the shard's
    compression and write run on the writer thread while the next shard computes
    (`executor.run_in_process`), so they are that thread's CPU too (the whole-shard writer compresses
    in the calling thread; process CPU would count the next shard's forward as well)."""
    import torch

    import pipeline.data.images as images
    import pipeline.targets.pixels as pixels
    from pipeline.targets.device_encode import DeviceEncoder
    from pipeline.targets.store import TargetStore

    def timed(phase, fn, clock=time.thread_time, one_thread=False):
        def wrapper(*a, **k):
            threads = torch.get_num_threads()
            if one_thread:
                torch.set_num_threads(1)
            t = clock()
            try:
                return fn(*a, **k)
            finally:
                SPENT[phase] = SPENT.get(phase, 0.0) + clock() - t
                if one_thread:
                    torch.set_num_threads(threads)
        return wrapper

    images.decode_image = timed("decode", images.decode_image)
    pixels.render_views = timed("render", pixels.render_views)
    pixels.stored_patches = timed("pixels", pixels.stored_patches, one_thread=True)
    DeviceEncoder.put = timed("encode", DeviceEncoder.put, one_thread=True)
    # What write_shard still encodes itself (arrays the device did not encode: a q1pct store's shard 0,
    # whose writer fits the channel basis first) is encoding, not compression: counted as "encode"
    # and taken out of "compress+write". Only calls inside write_shard on this thread count (the
    # numpy path of DeviceEncoder.put calls quant.encode too, counted by its own wrapper).
    import threading

    from pipeline.targets import quant
    from pipeline.targets.bases import ChannelBases

    inside = threading.local()

    def at_write(fn):
        def wrapper(*a, **k):
            if not getattr(inside, "write", False):
                return fn(*a, **k)
            t = time.thread_time()
            try:
                return fn(*a, **k)
            finally:
                spent = time.thread_time() - t
                SPENT["encode"] = SPENT.get("encode", 0.0) + spent
                SPENT["compress+write"] = SPENT.get("compress+write", 0.0) - spent
        return wrapper

    quant.encode, quant.error_stats = at_write(quant.encode), at_write(quant.error_stats)
    ChannelBases.fit = at_write(ChannelBases.fit)
    write = timed("compress+write", TargetStore.write_shard)

    def write_shard(*a, **k):
        inside.write = True
        try:
            return write(*a, **k)
        finally:
            inside.write = False

    TargetStore.write_shard = write_shard


def make_data(work: Path, images: int) -> str:
    """ImageNet-sized photos in tars of 64 (once per work dir); the manifest path."""
    from stages.shard import ShardConfig, shard

    manifest = work / "manifests" / "imagenet-like.json"
    if not manifest.exists():
        make_photos(work / "photos", images)
        shard(ShardConfig(input=str(work / "photos"), name="imagenet-like", out_dir=str(work / "shards"),
                          manifest=str(manifest), shard_size=64, progress=False))
    return str(manifest)


def extract_pair(manifest: str, work: Path, precision: str, views: int, tag: str, geometry: str,
                 device: str = "cpu") -> dict:
    """A MIM + disc store pair in `precision`, with the host CPU ms per view of each extraction
    phase (`_instrument`; the teacher forward is not counted)."""
    from pipeline.data.manifest import read_manifest
    from stages.extract import ExtractConfig, extract

    n = read_manifest(manifest).total * views
    common = dict(manifest=manifest, random_init=True, targets=str(work / "targets"), batch_size=32,
                  progress=False, precision=precision, device=device, overwrite=True)
    _instrument()
    out: dict = {"ms_per_view": {}}
    for role, teacher in zip(("mim", "disc"), TEACHERS[geometry]):
        SPENT.clear()
        extra = {"views": views} if role == "mim" else {"mim_store": out["mim"]}
        out[role] = extract(ExtractConfig(teacher=teacher, role=role, name=f"{role}-{precision}{tag}", **extra,
                                          **common))
        out["ms_per_view"][role] = {ph: 1e3 * SPENT.get(ph, 0.0) / n for ph in EXTRACT_PHASES}
    return out


def loader_config(data: dict, precision: str, path: str, transport: str, workers: int = 2):
    from pipeline.train.loader import LoaderConfig

    stores = data[precision]
    return LoaderConfig(manifest=data["manifest"], mim_store=stores["mim"], disc_store=stores["disc"], batch_size=64,
                        num_workers=workers, img_size=224, pin_memory=False, image_transport="uint8",
                        target_transport=transport, student_pixels="store" if path == "pixels" else "render")


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process and of its reaped children (loader workers)."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        r = resource.getrusage(who)
        total += r.ru_utime + r.ru_stime
    return total


def whole_loader(data: dict, precision: str, path: str, transport: str, device: str = "cpu") -> dict:
    """Host CPU ms per image of the loader in steady state: one run of EPOCHS epochs minus one run
    of one epoch (each a `RunLoader`, its workers reaped at the end: both pay one start-up, which
    cancels), over the images of EPOCHS - 1 epochs. With transport `encoded`, the device decode of the
    same batches is timed apart."""
    from pipeline.train.loader import RunLoader
    from pipeline.train.target_rows import TARGETS, finish_batch

    cfg = loader_config(data, precision, path, transport)

    def consume(first: int, end: int, keep: list | None = None) -> tuple[float, int]:
        c0, n = _cpu_seconds(), 0
        run = RunLoader(cfg, first, end)
        for _, batches in run.epochs():
            for batch in batches:
                n += len(batch["index"])
                if keep is not None and TARGETS in batch:
                    keep.append(batch)
        del run, batches
        gc.collect()  # the workers are joined: their CPU is in RUSAGE_CHILDREN
        return _cpu_seconds() - c0, n

    consume(0, 1)  # warm-up: page cache, tar verification, imports
    one, n1 = consume(1, 2)
    three, n3 = consume(1, 1 + EPOCHS)
    kept: list = []
    consume(1, 5, kept)  # apart: batches kept hold their workers' buffers, which the timed runs reuse
    import torch

    decode_s = 0.0
    on = torch.device(device)
    for batch in kept:  # what the device does after the copy (wall time, synchronized, on a GPU)
        batch = {k: v.to(on) if torch.is_tensor(v) else v for k, v in batch.items()}
        if on.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        finish_batch(batch, batch[TARGETS])
        if on.type == "cuda":
            torch.cuda.synchronize()
        decode_s += time.perf_counter() - t
    return {"images": n3 - n1, "host_ms_per_image": 1e3 * (three - one) / (n3 - n1),
            "device_decode_ms_per_image": 1e3 * decode_s / max(1, sum(len(b["index"]) for b in kept))}


def phase_costs(data: dict, precision: str) -> dict:
    """CPU ms per image of each phase of the pixels + encoded path, called one after another."""
    import numpy as np
    import torch

    from pipeline.data.manifest import read_manifest
    from pipeline.train import loader as L
    from pipeline.train.plan import sources_of
    from pipeline.train.shard_rows import ShardRows, encoded_arrays
    from pipeline.train.target_rows import DeviceWork, finish_batch

    cfg = loader_config(data, precision, "pixels", "encoded", workers=0)
    src = sources_of(cfg)
    arrays = encoded_arrays(cfg.mim_store, cfg.disc_store, src)
    manifest = read_manifest(cfg.manifest)
    clock = PhaseClock(PHASES)
    spent, n = clock.spent, 0

    for k in range(manifest.num_shards):
        info = manifest.shards[k]
        t = time.process_time()
        rows = ShardRows(cfg, src, arrays, k, info.first_index, info.count, epoch=1, pixels=True)
        t = clock.lap("targets read", t)
        samples = []
        for local in range(info.count):
            index, view = info.first_index + local, int(rows.view_of_row[local])
            t = time.process_time()
            rec = rows.sample(local, index=index, view=view)  # its stored patches included
            rec["index"], rec["view"] = np.int64(index), np.int64(view)
            clock.lap("rows", t)
            samples.append(rec)
            n += 1
        t = time.process_time()
        batch = L._stack(samples, arrays)[0]
        t = clock.lap("collate", t)
        with torch.no_grad():
            finish_batch(batch, DeviceWork(arrays, src.grid))
        clock.lap("device decode", t)
    return {"images": n, "ms_per_image": {p: 1e3 * s / n for p, s in spent.items()}}


def child(args) -> None:
    import torch

    if args.child == "extract":  # the forward on both cores; the phases timed on one (see _instrument)
        torch.set_num_threads(2)
        tag = "" if args.round == 0 else f"-round{args.round}"
        print(json.dumps(extract_pair(make_data(args.work, args.images), args.work, args.precision, args.views, tag,
                                      args.geometry, args.device)))
        return
    torch.set_num_threads(1)
    data = json.loads((args.work / "data.json").read_text())
    if args.child == "phases":
        out = phase_costs(data, args.precision)
    else:
        path, transport = args.child.split("/")
        out = whole_loader(data, args.precision, path, transport, args.device)
    print(json.dumps(out))


def spread(values: list[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def run_child(args, kind: str, precision: str, round_: int = 0) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--precision", precision, "--work", str(args.work),
           "--images", str(args.images), "--views", str(args.views), "--round", str(round_),
           "--geometry", args.geometry, "--device", args.device]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{kind} {precision} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=128, help="ImageNet-sized JPEGs")
    p.add_argument("--views", type=int, default=2, help="stored views per image")
    p.add_argument("--geometry", choices=sorted(TEACHERS), default="base", help="teachers' size (base: ViT-B/16)")
    p.add_argument("--device", default="cpu", help="teachers' device at extraction, and where the encoded targets "
                   "are decoded (cuda on a GPU machine: benchmarks/gpu_check.sh)")
    p.add_argument("--rounds", type=int, default=3, help="fresh processes per setting; min/median/max reported")
    p.add_argument("--work", type=Path, default=None, help="work folder (kept; default: a temporary one)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/host.json"))
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--precision", default="fp16", help=argparse.SUPPRESS)
    p.add_argument("--round", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    tmp = work_folder(args, "bench-host-")
    t0 = time.perf_counter()
    data: dict = {"manifest": make_data(args.work, args.images)}
    extraction = {pr: [] for pr in PRECISIONS}
    for r in range(args.rounds):  # round 0's stores are the loader's
        for precision in PRECISIONS:
            got = run_child(args, "extract", precision, r)
            extraction[precision].append(got["ms_per_view"])
            if r == 0:
                data[precision] = {"mim": got["mim"], "disc": got["disc"]}
    (args.work / "data.json").write_text(json.dumps(data))
    print(f"stores ready in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    runs: dict = {pr: {f"{a}/{b}": [] for a, b in SETTINGS} | {"phases": []} for pr in PRECISIONS}
    for _ in range(args.rounds):  # interleaved rounds: drift on a shared machine hits every setting alike
        for precision in PRECISIONS:
            for kind in runs[precision]:
                runs[precision][kind].append(run_child(args, kind, precision))
    report = {"benchmark": "host CPU per image of stage two and per view of extraction at the ViT-B defaults "
                           "(issue 19)",
              "setting": {"images": args.images, "views": args.views, "teachers": TEACHERS[args.geometry],
                          "student_px": 224, "batch": 64, "workers": 2, "mix_shards": 4, "torch_threads": 1,
                          "rounds": args.rounds},
              "goal_ms": GOAL_MS, "precisions": {}}
    print(f"stage-two host CPU ms per image, {args.geometry} stores, {args.views} views, {args.images} "
          f"ImageNet-sized JPEGs, {args.rounds} rounds (min / median / max)")
    for precision in PRECISIONS:
        res = {}
        for kind, rs in runs[precision].items():
            if kind == "phases":
                res[kind] = {ph: spread([r["ms_per_image"][ph] for r in rs]) for ph in PHASES}
            else:
                res[kind] = {"host_ms": spread([r["host_ms_per_image"] for r in rs]),
                             "device_decode_ms": spread([r["device_decode_ms_per_image"] for r in rs])}
        best = res["pixels/encoded"]["host_ms"]["median"]
        res["meets_goal"] = best <= GOAL_MS
        report["precisions"][precision] = res
        print(f"{precision}:")
        for kind in runs[precision]:
            if kind == "phases":
                continue
            h = res[kind]["host_ms"]
            extra = (f"   + device decode {res[kind]['device_decode_ms']['median']:.3f} (on {args.device})"
                     if kind.endswith("encoded") else "")
            print(f"  {kind:16s} {h['min']:7.3f} {h['median']:7.3f} {h['max']:7.3f}{extra}")
        print("  phases of pixels/encoded (one process): " + ", ".join(
            f"{ph} {res['phases'][ph]['median']:.3f}" for ph in PHASES))
        print(f"  goal <= {GOAL_MS} ms (pixels/encoded): {'met' if res['meets_goal'] else 'NOT met'} ({best:.3f})")
    print(f"extraction host CPU ms per view (forward excluded), {args.rounds} rounds, median:")
    store_work = {}
    for precision in PRECISIONS:
        report["precisions"][precision]["extraction"] = ext = {}
        for role in ("mim", "disc"):
            ext[role] = {ph: spread([r[role][ph] for r in extraction[precision]]) for ph in EXTRACT_PHASES}
            work = spread([sum(r[role][ph] for ph in STORE_WORK) for r in extraction[precision]])
            # On a CUDA host the encoding (fp16 and q1pct have torch encoders) and the student patches
            # run on the teacher's GPU: the host's share of the store work is compression and write.
            on_gpu = work if args.device.startswith("cuda") else spread(
                [r[role]["compress+write"] for r in extraction[precision]])
            ext[role]["store work"] = work
            ext[role]["store work, encoded on the GPU"] = on_gpu
            ext[role]["meets_goal"] = on_gpu["median"] <= EXTRACT_GOAL_MS
            store_work[(precision, role)] = on_gpu["median"]
            print(f"  {precision:6s} {role:5s} " + ", ".join(f"{ph} {ext[role][ph]['median']:.3f}"
                                                             for ph in EXTRACT_PHASES)
                  + f"; store work {work['median']:.3f} here, {on_gpu['median']:.3f} encoded on the GPU (goal <= "
                  + f"{EXTRACT_GOAL_MS}: {'met' if ext[role]['meets_goal'] else 'NOT met'})")
    # What a host feeds each GPU: cores per GPU / host CPU seconds per image (or view).
    feed = {}
    for precision in PRECISIONS:
        loader_ms = report["precisions"][precision]["pixels/encoded"]["host_ms"]["median"]
        extract_ms = max(store_work[(precision, r)] for r in ("mim", "disc"))
        feed[precision] = {f"{cores} cores per GPU": {"stage two images/s": 1e3 * cores / loader_ms,
                                                      "extraction store work views/s": 1e3 * cores / extract_ms}
                           for cores in CORES_PER_GPU}
    report["host_feeds_per_gpu"] = feed
    print("images (views) per second the host can feed each GPU, host work only (extraction: encoded on the GPU):")
    for precision, rows in feed.items():
        for cores, r in rows.items():
            print(f"  {precision:6s} {cores:18s} stage two {r['stage two images/s']:9.0f} images/s, extraction store "
                  f"work {r['extraction store work views/s']:9.0f} views/s")
    report["runs"] = runs
    report["extraction_runs"] = extraction
    report["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                         "load_average_1min": os.getloadavg()[0]}
    write_report(args.out, report)
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()

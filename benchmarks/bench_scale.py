"""An ImageNet-count dry run: 1,281,167 tiny images through every stage on this machine (not a test).

    python benchmarks/bench_scale.py [--count 1281167] [--labeled 50000] [--work DIR]
        [--out benchmarks/results/scale.json] [--compare-fraction 0.01] [--shard-size 1024] [--keep]

What grows with the sample or shard count (manifests, epoch plans, done-marker scans, store metadata,
per-shard task overhead, DVC hashing of outputs, memory held per sample) is exercised at ImageNet's
count with images small enough for a 2-core machine. For each count (`--count`, and the same run at
`--compare-fraction` of it first, so growth is a ratio) and in its own folder, which is a git + DVC
repo holding a copy of this project (the code that runs is that copy, on PYTHONPATH):
1. writes `count` distinct 16x16 PNGs (seeded: a class template out of 1000 plus noise, the index
   stamped into the first pixels; the class is the `.cls` member) straight into webdataset tars of
   `--shard-size` (TarShardWriter: no loose files), and a labeled split of `--labeled` images
   (4/5 probe-train, 1/5 probe-test) the same way; indexes each with `hdpipe shard --urls`;
2. runs the real commands, each a `python -m pipeline.cli` subprocess reading its section of the
   folder's params.yaml (tiny random-init ViTs at 16 px, patch 4, one view; the MIM store q1pct, the
   discriminative store fp16): extract MIM, extract disc (SIGKILLed once part-way, then resumed),
   inspect and verify --samples 32 of both stores, distill one epoch (SIGKILLed once after a
   mid-epoch checkpoint, then resumed with --resume), evaluate on the labeled split;
3. measures the parts that grow in a probe process: manifest bytes and load time, the done-marker
   scan and damage check a resumed extraction starts with, the epoch plan (valid rows, steps, build
   and resume rebuild time, bytes), the checkpoint load, and the stores' metadata bytes and files;
4. runs `dvc repro` (the project's extract/distill/evaluate stages over this params.yaml: the
   stores resume with nothing to do, distill and evaluate run again; `--dvc stores` reproduces the
   extractions only and commits the rest) and times `dvc status` twice on the unchanged pipeline.

Per stage: wall, CPU (the process and the children it waited for, `os.wait4` in a small launcher),
CPU per image (also after start-up, where a stage says when its work starts), peak RSS of its
largest process (`ru_maxrss`) and of its process tree (sampled every 0.1 s). Growth = the large
run over the small one; the goals of issue 20 are checked at the end. Writes `--out` (JSON) and
prints a line per stage. The work folder is removed at the end unless `--keep`. A full run needs
~7 GB of disk (tars 3.4 GB, stores 2.5 GB) and took 50 minutes with `--dvc stores` on this 2-core
machine (benchmarks/results/scale.json: MIM extraction 24 min, disc 14, distill 4.4, evaluate 0.6,
writing the tars 2.7); `--dvc all` adds a second distillation and evaluation under `dvc repro`.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMAGENET_TRAIN = 1_281_167
CLASSES = 1000
SIDE = 16  # image side, px
# Teachers and student: 16 px views, 4 px patches (4x4 = 16 patches; 16 -> 11 -> 8 -> 6 kept), 3 blocks.
MIM_KW = {"img_size": SIDE, "patch_size": 4, "depth": 3, "embed_dim": 32, "num_heads": 2}
DISC_KW = {"img_size": SIDE, "patch_size": 4, "depth": 2, "embed_dim": 48, "num_heads": 3}
STUDENT_KW = dict(MIM_KW)
POLL_S = 0.1


# ----------------------------------------------------------------------------- synthetic tars
def _templates(seed: int):
    """uint8 [CLASSES, 4, 4, 3]: one coarse color pattern per class."""
    import numpy as np

    return np.random.default_rng([seed, 1]).integers(0, 256, (CLASSES, 4, 4, 3), dtype=np.uint8)


def shard_images(seed: int, split: int, k: int, first: int, count: int) -> tuple[list[bytes], list[int]]:
    """PNG bytes and labels of shard k of a split: the class template upscaled to SIDE px, noise,
    and the global index (3 bytes) and split id stamped into pixels (0, 0) and (0, 1): all distinct."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng([seed, split, k])
    labels = rng.integers(0, CLASSES, count)
    up = SIDE // 4
    px = _templates(seed)[labels].repeat(up, axis=1).repeat(up, axis=2).astype(np.int16)
    px = np.clip(px + rng.integers(-6, 7, px.shape), 0, 255).astype(np.uint8)
    index = np.arange(first, first + count, dtype=np.int64)
    px[:, 0, 0] = np.stack([(index >> s) & 255 for s in (16, 8, 0)], axis=-1)
    px[:, 0, 1] = split
    out = []
    for i in range(count):
        buf = io.BytesIO()
        Image.fromarray(px[i]).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out, labels.tolist()


def write_split(folder: Path, name: str, count: int, shard_size: int, seed: int, split: int) -> str:
    """Tars `<folder>/<name>-{k:06d}.tar` of `count` labeled images; returns their brace pattern."""
    from pipeline.data.tars import TarShardWriter, key_of, shard_filename

    folder.mkdir(parents=True, exist_ok=True)
    shards = -(-count // shard_size)
    for k in range(shards):
        first = k * shard_size
        n = min(shard_size, count - first)
        images, labels = shard_images(seed, split, k, first, n)
        with TarShardWriter(str(folder / shard_filename(name, k)), overwrite=True) as w:
            for i in range(n):
                w.add(key_of(first + i), {"png": images[i], "cls": str(int(labels[i])).encode("ascii")})
    return str(folder / f"{name}-{{{0:06d}..{shards - 1:06d}}}.tar")


# ----------------------------------------------------------------------------- measured subprocesses
@dataclass
class Measured:
    """One subprocess: its wall and CPU time, memory, and when marks happened (seconds from start)."""

    name: str
    argv: list
    wall_s: float = 0.0
    cpu_s: float = 0.0  # user + system of the process and every child it waited for (os.wait4; killed: sampled)
    maxrss_mb: float = 0.0  # peak RSS of its largest process (ru_maxrss; a killed run: sampled)
    tree_rss_peak_mb: float = 0.0  # peak of the summed RSS of the process tree, sampled every POLL_S
    returncode: int | None = None
    killed: bool = False
    marks: dict = field(default_factory=dict)  # {mark: {"s": seconds from start, "cpu_s": tree CPU then}}
    stdout: str = field(default="", repr=False)
    stderr_tail: str = field(default="", repr=False)

    def summary(self, images: int | None = None) -> dict:
        out = {k: v for k, v in asdict(self).items() if k not in ("argv", "stdout", "stderr_tail")}
        out["command"] = " ".join(str(a) for a in self.argv)
        if images:
            out["images"] = images
            out["cpu_ms_per_image"] = 1000 * self.cpu_s / images
            start = self.marks.get("started")
            if start is not None:
                out["cpu_ms_per_image_after_startup"] = 1000 * (self.cpu_s - start["cpu_s"]) / images
        return out


def _tree_usage(root_pid: int) -> tuple[float, float, float]:
    """(summed RSS MiB, largest process's RSS MiB, CPU seconds) of a live process tree (children's
    CPU counts once they were waited for)."""
    import psutil

    try:
        root = psutil.Process(root_pid)
        procs = [root] + root.children(recursive=True)
    except psutil.Error:
        return 0.0, 0.0, 0.0
    rss = top = cpu = 0.0
    for p in procs:
        try:
            one = p.memory_info().rss
            t = p.cpu_times()
        except psutil.Error:
            continue
        rss, top = rss + one, max(top, one)
        cpu += t.user + t.system + t.children_user + t.children_system
    return rss / 2**20, top / 2**20, cpu


def run_measured(name: str, argv: list, cwd: Path, env: dict, marks: dict | None = None,
                 kill_when=None, check: bool = True) -> Measured:
    """Run `argv`, polling `marks` {mark: predicate(m)} and `kill_when(m)` every POLL_S; a true
    `kill_when` SIGKILLs the whole process group (a crash of the job: the loader workers go too).

    The command runs under a small launcher (`launch`) that reports its rusage: a child's ru_maxrss
    starts at its parent's peak RSS at fork, so measured from this process (or pytest) directly a
    stage would never look smaller than its caller."""
    m = Measured(name, [str(a) for a in argv])
    marks = dict(marks or {})
    report = Path(tempfile.mkstemp(prefix="hdpipe-rusage-", suffix=".json")[1])
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--launch", str(report), "--", *m.argv],
                            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    out_chunks: list[bytes] = []
    err_lines: list[str] = []

    def pump(stream, sink, lines):
        for raw in iter(stream.readline, b""):
            (sink.append(raw) if lines is None else lines.append(raw.decode(errors="replace")))

    readers = [threading.Thread(target=pump, args=(proc.stdout, out_chunks, None), daemon=True),
               threading.Thread(target=pump, args=(proc.stderr, None, err_lines), daemon=True)]
    for t in readers:
        t.start()
    m.lines = err_lines  # predicates read the stderr lines seen so far
    status = None
    tree_cpu = largest = 0.0
    while status is None:
        pid, st = os.waitpid(proc.pid, os.WNOHANG)
        if pid:
            status = st
            break
        rss, top, cpu = _tree_usage(proc.pid)
        m.tree_rss_peak_mb = max(m.tree_rss_peak_mb, rss)
        largest = max(largest, top)
        tree_cpu = max(tree_cpu, cpu)
        for mark, pred in list(marks.items()):
            if pred(m):
                m.marks[mark] = {"s": round(time.perf_counter() - t0, 3), "cpu_s": round(cpu, 3)}
                del marks[mark]
        if kill_when is not None and not m.killed and kill_when(m):
            os.killpg(proc.pid, signal.SIGKILL)
            m.killed = True
        time.sleep(POLL_S)
    m.wall_s = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if m.killed:  # loader workers of a killed run: reap what is left of the group
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for t in readers:
        t.join(timeout=10)
    m.returncode = proc.returncode
    launched = json.loads(report.read_text() or "{}")
    report.unlink()
    # A killed job's launcher reported nothing and its loader workers were never waited for: the
    # last sample of its tree is all there is.
    m.cpu_s = max(launched.get("cpu_s", 0.0), tree_cpu if m.killed else 0.0)
    m.maxrss_mb = launched.get("maxrss_kb", 0) / 1024 or largest
    m.stdout = b"".join(out_chunks).decode(errors="replace")
    m.stderr_tail = "".join(err_lines[-40:])
    del m.lines
    if check and not m.killed and m.returncode != 0:
        raise RuntimeError(f"{name} failed ({m.returncode}): {' '.join(m.argv)}\n{m.stderr_tail}")
    return m


def launch(report: str, argv: list[str]) -> int:
    """Run `argv` and write its CPU time and peak RSS (os.wait4) to `report`; its exit status."""
    proc = subprocess.Popen(argv)
    _, status, ru = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    Path(report).write_text(json.dumps({"cpu_s": ru.ru_utime + ru.ru_stime, "maxrss_kb": ru.ru_maxrss}))
    return proc.returncode


def _seen(pattern: str):
    rx = re.compile(pattern)
    return lambda m: any(rx.search(line) for line in m.lines)


def _done_count(store: Path) -> int:
    try:
        return sum(1 for n in os.listdir(store / "done") if n.endswith(".json"))
    except FileNotFoundError:
        return 0


def _last_step(log: Path) -> int:
    """The step of the last complete row of a run's log.jsonl (0 when none)."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, os.path.getsize(log) - 4096))
            tail = f.read().decode(errors="replace")
    except OSError:
        return 0
    for line in reversed(tail.splitlines()[:-1] if not tail.endswith("\n") else tail.splitlines()):
        try:
            return int(json.loads(line).get("step", 0))
        except ValueError:
            continue
    return 0


# ----------------------------------------------------------------------------- one count
def _copy_project(dest: Path) -> None:
    """The project's files (as a clone has them, without tests and benchmarks) in a fresh git repo."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout.split()
    for rel in listed:
        src = ROOT / rel
        if src.is_file() and not rel.startswith(("tests/", "benchmarks/")):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def _params(n: int, batch: int, workers: int) -> dict:
    """This folder's params.yaml: the sections of the stages it keeps (shard and analyze are dropped
    from its dvc.yaml: this pipeline starts from the indexed manifests)."""
    steps = n // batch
    common = {"manifest": "manifests/scale-train.json", "random_init": True, "views": 1, "batch_size": 256,
              "overwrite": True, "progress": False}
    return {
        "extract_mim": {**common, "teacher": "timm:vit_tiny_patch16_224", "role": "mim", "name": "scale-mim",
                        "model_kwargs": MIM_KW, "relation_layers": [-2, -1], "mask_ratio": 0.3, "tokens": "kept",
                        "precision": "q1pct"},
        "extract_disc": {**{k: v for k, v in common.items() if k != "views"}, "teacher": "timm:vit_tiny_patch16_224",
                         "role": "disc", "name": "scale-disc", "mim_store": "targets/scale-mim.zarr",
                         "model_kwargs": DISC_KW, "precision": "fp16"},
        "distill": {"manifest": "manifests/scale-train.json", "mim_store": "targets/scale-mim.zarr",
                    "disc_store": "targets/scale-disc.zarr", "model": "vit_tiny_patch16_224",
                    "model_kwargs": STUDENT_KW, "epochs": 1, "batch_size": batch, "workers": workers,
                    "name": "scale", "checkpoint_every": max(1, steps // 5), "print_every": max(1, steps // 10),
                    "warmup_epochs": 0.1},
        "evaluate": {"model": "student:runs/scale/student", "train_manifest": "manifests/scale-probe-train.json",
                     "test_manifest": "manifests/scale-probe-test.json", "out": "reports/evaluate/scale.json",
                     "k": 20, "batch_size": 512, "linear_max_iter": 100, "progress": False},
    }


def _dvc_yaml(folder: Path) -> None:
    import yaml

    spec = yaml.safe_load((folder / "dvc.yaml").read_text())
    spec["stages"] = {k: v for k, v in spec["stages"].items() if k in ("extract_mim", "extract_disc", "distill",
                                                                      "evaluate")}
    (folder / "dvc.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))


def _git(folder: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost", *args], cwd=folder,
                   check=True, capture_output=True)


def prepare(folder: Path, n: int, labeled: int, args) -> dict:
    """The project copy, params.yaml and the tars of this count; returns the tars' brace patterns."""
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    _copy_project(folder)
    _dvc_yaml(folder)
    params = _params(n, args.batch_size, args.workers)
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (folder / ".gitignore").write_text("/data/\n__pycache__/\n")
    t0 = time.perf_counter()
    patterns = {"train": write_split(folder / "data/scale-train", "scale-train", n, args.shard_size, 0, 0),
                "probe-train": write_split(folder / "data/scale-probe-train", "scale-probe-train",
                                           labeled - labeled // 5, args.shard_size, 0, 1),
                "probe-test": write_split(folder / "data/scale-probe-test", "scale-probe-test",
                                          labeled // 5, args.shard_size, 0, 2)}
    return {"patterns": patterns, "write_tars_s": time.perf_counter() - t0,
            "tar_bytes": sum(f.stat().st_size for f in (folder / "data").rglob("*.tar"))}


def _env(folder: Path, threads: int) -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(folder)  # the copy runs, and is what DVC hashes as the stages' code
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    env["DVC_NO_ANALYTICS"] = "1"
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def run_count(folder: Path, n: int, labeled: int, args, progress=lambda stages: None) -> dict:
    """Every stage at `n` training images; returns this count's measurements. `progress(stages)` is
    called after each stage, so a run cut short keeps what it measured."""
    t_start = time.perf_counter()
    data = prepare(folder, n, labeled, args)
    env = _env(folder, args.threads)
    cli = [sys.executable, "-m", "pipeline.cli"]
    stages: dict[str, dict] = {}
    n_train, n_test = labeled - labeled // 5, labeled // 5

    def go(name, argv, images=None, **kw) -> Measured:
        m = run_measured(name, argv, folder, env, **kw)
        stages[name] = m.summary(images)
        progress(stages)
        print(f"  {name:<22} wall {m.wall_s:8.1f} s  cpu {m.cpu_s:8.1f} s  rss {m.maxrss_mb:7.0f} MiB"
              f"{'  (killed)' if m.killed else ''}", flush=True)
        return m

    for split, count in (("train", n), ("probe-train", n_train), ("probe-test", n_test)):
        go(f"shard_{split.replace('-', '_')}", cli + ["shard", "--urls", data["patterns"][split], "--name",
           f"scale-{split}", "--manifest", f"manifests/scale-{split}.json", "--no-progress"], images=count)
    manifest = json.loads((folder / "manifests/scale-train.json").read_text())
    shards = len(manifest["shards"])
    # "started": done markers scanned, damaged shards checked, the teacher loaded; then the shards' work
    started = {"started": _seen(r"shards to do|is complete")}
    go("extract_mim", cli + ["extract", "--config", "params.yaml:extract_mim"], images=n, marks=started)
    disc = folder / "targets/scale-disc.zarr"
    kill_at = max(1, min(shards - 1, int(args.kill_at * shards)))
    killed = go("extract_disc_killed", cli + ["extract", "--config", "params.yaml:extract_disc"], images=None,
                marks=started, kill_when=lambda m: _done_count(disc) >= kill_at)
    before = _done_count(disc)
    resumed = go("extract_disc_resumed", cli + ["extract", "--config", "params.yaml:extract_disc"],
                 images=sum(s["count"] for s in manifest["shards"][before:]) if before < shards else None,
                 marks={**started, "first_work": lambda m: _done_count(disc) > before})
    stages["extract_disc_killed"]["shards_done_at_kill"] = before
    stages["extract_disc"] = _combined([killed, resumed], n)
    for role in ("mim", "disc"):
        m = go(f"inspect_{role}", cli + ["inspect", f"targets/scale-{role}.zarr", "--json"])
        info = json.loads(m.stdout)
        stages[f"inspect_{role}"]["report"] = {
            "samples": info["samples"], "shards": info["shards"]["total"], "done": info["shards"]["done"],
            "damaged": len(info["damaged"]["shards"]), "bytes_per_view": info["bytes_per_view"]}
    for role in ("mim", "disc"):
        m = go(f"verify_{role}", cli + ["verify", f"targets/scale-{role}.zarr", "--samples", "32", "--json"])
        report = json.loads(m.stdout)
        stages[f"verify_{role}"]["report"] = {"ok": report["ok"], "samples": report["samples"]}
    steps = n // args.batch_size
    log = folder / "runs/scale/log.jsonl"
    ckpt = folder / "runs/scale/checkpoints/last.pt"
    every = max(1, steps // 5)
    # "started": the stores checked, their valid rows read, the checkpoint loaded (the line distill
    # prints once the run is known to go ahead); the plan is rebuilt next (the probe times it), then
    # each loader worker reads its first window of shards before the first step ("first_work")
    ready = _seen(r"each stored view is shown")
    kill_step = max(every + 1, int(args.kill_at * steps))
    killed = go("distill_killed", cli + ["distill", "--config", "params.yaml:distill"],
                marks={"started": ready, "first_work": lambda m: _last_step(log) >= 1},
                kill_when=lambda m: ckpt.exists() and _last_step(log) >= kill_step)
    saved = _checkpoint_step(folder, env)
    old_log = log.stat().st_ino  # the resumed run rewrites the log (rows after the checkpoint go) first
    resumed = go("distill_resumed", cli + ["distill", "--config", "params.yaml:distill", "--resume"],
                 images=(steps - saved) * args.batch_size,
                 marks={"started": ready,
                        "first_work": lambda m: log.stat().st_ino != old_log and _last_step(log) > saved})
    stages["distill_killed"]["checkpoint_step_at_kill"] = saved
    stages["distill"] = _combined([killed, resumed], steps * args.batch_size)
    metrics = json.loads((folder / "runs/scale/metrics.json").read_text())
    go("evaluate", cli + ["evaluate", "--config", "params.yaml:evaluate"], images=labeled)
    evaluation = json.loads((folder / "reports/evaluate/scale.json").read_text())
    probe = run_measured("probe", [sys.executable, str(Path(__file__).resolve()), "--probe"], folder, env)
    out = {
        "count": n, "labeled": labeled, "shard_size": args.shard_size, "shards": shards, **data,
        "stages": stages, "probe": json.loads(probe.stdout),
        "probe_process": {"wall_s": probe.wall_s, "maxrss_mb": probe.maxrss_mb},
        "distill": {"steps": metrics["step"], "steps_per_epoch": steps, "batch_size": args.batch_size,
                    "loss": metrics.get("loss")},
        "evaluate": {k: evaluation[k] for k in ("n_train", "n_test", "num_classes", "knn", "linear")},
    }
    if args.dvc != "off":
        out["dvc"] = run_dvc(folder, env, go, args.dvc)
    out["wall_s"] = time.perf_counter() - t_start
    return out


def _save_partial(result: dict, n: int, stages: dict, out: str) -> None:
    """The measurements so far, next to `--out` (`<out>.partial`): hours of a run survive its end."""
    partial = {**result, "runs": {**result["runs"], str(n): {"count": n, "stages": stages, "partial": True}}}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out + ".partial").write_text(json.dumps(partial, indent=1) + "\n")


def _combined(runs: list[Measured], images: int) -> dict:
    """A stage killed once and resumed: both processes' wall and CPU together, the larger RSS."""
    cpu = sum(m.cpu_s for m in runs)
    started = [m.marks.get("started", {}).get("cpu_s", 0.0) for m in runs]
    resume = runs[-1].marks
    return {"wall_s": sum(m.wall_s for m in runs), "cpu_s": cpu, "images": images,
            "cpu_ms_per_image": 1000 * cpu / images,
            "cpu_ms_per_image_after_startup": 1000 * (cpu - sum(started)) / images,
            "maxrss_mb": max(m.maxrss_mb for m in runs), "tree_rss_peak_mb": max(m.tree_rss_peak_mb for m in runs),
            "resume_startup_s": resume.get("started", {}).get("s"),
            "resume_first_work_s": resume.get("first_work", {}).get("s")}


def _checkpoint_step(folder: Path, env: dict) -> int:
    code = ("import sys; from pipeline.train.checkpoint import load_checkpoint; "
            "print(load_checkpoint(sys.argv[1])['state']['step'])")
    out = subprocess.run([sys.executable, "-c", code, "runs/scale/checkpoints/last.pt"], cwd=folder, env=env,
                         capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


def run_dvc(folder: Path, env: dict, go, mode: str) -> dict:
    """`dvc repro` of this folder's pipeline, then `dvc status` twice. The stores resume with nothing
    to do (DVC hashes them); mode "all" runs distill and evaluate again (DVC deletes their outputs
    first), "stores" reproduces the extractions only and commits the outputs the run above made."""
    dvc = [sys.executable, "-m", "dvc"]
    tracked = [p for p in subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT,
                                         capture_output=True, text=True, check=True).stdout.split()
               if not p.startswith(("tests/", "benchmarks/")) and (folder / p).is_file()]
    _git(folder, "init", "-q")
    if not (folder / ".dvc").is_dir():  # the project's own .dvc/ came with the copy
        subprocess.run(dvc + ["init", "-q"], cwd=folder, env=env, check=True, capture_output=True)
    _git(folder, "add", "--", *tracked, "params.yaml", "dvc.yaml", ".gitignore", ".dvc", "manifests")
    _git(folder, "commit", "-qm", "scale run")
    repro = go("dvc_repro", dvc + ["repro"] + (["extract_disc"] if mode == "stores" else []))
    if mode == "stores":
        go("dvc_commit", dvc + ["commit", "--force"])
    status = [go(f"dvc_status_{i}", dvc + ["status"]) for i in (1, 2)]
    return {"mode": mode, "repro_wall_s": repro.wall_s, "status_wall_s": [m.wall_s for m in status],
            "status_output": status[-1].stdout.strip()[-400:],
            "up_to_date": all("up to date" in m.stdout for m in status)}


# ----------------------------------------------------------------------------- the probe process
def probe() -> dict:
    """Run inside a count's folder: what a resume and a loader rebuild, each timed and sized."""
    import resource
    import tracemalloc

    import yaml

    from pipeline.data.manifest import read_manifest
    from pipeline.targets import integrity
    from pipeline.targets.store import TargetStore
    from pipeline.train.loader import LoaderConfig
    from pipeline.train.plan import plan_epoch, sources_of, steps_per_epoch

    params = yaml.safe_load(Path("params.yaml").read_text())
    d = params["distill"]
    out: dict = {}

    def timed(fn, repeat=1):
        best, value = None, None
        for _ in range(repeat):
            t0 = time.perf_counter()
            value = fn()
            dt = time.perf_counter() - t0
            best = dt if best is None else min(best, dt)
        return value, best

    manifests = {}
    for name in ("scale-train", "scale-probe-train"):
        path = f"manifests/{name}.json"
        m, first = timed(lambda: read_manifest(path))
        _, warm = timed(lambda: read_manifest(path), repeat=3)
        _, dig = timed(m.digest, repeat=3)
        manifests[name] = {"bytes": os.path.getsize(path), "shards": m.num_shards, "total": m.total,
                           "load_s_first": first, "load_s": warm, "digest_s": dig}
    out["manifests"] = manifests
    stores = {}
    for role in ("mim", "disc"):
        url = f"targets/scale-{role}.zarr"
        store, t_open = timed(lambda: TargetStore.open(url))
        missing, t_scan = timed(store.missing_shards)
        damaged, t_damaged = timed(lambda: integrity.damaged_shards(store))
        files = [p for p in Path(url).rglob("*") if p.is_file()]
        meta = [p for p in files if p.name.endswith(".json")]
        stores[role] = {"open_s": t_open, "done_scan_s": t_scan, "damage_check_s": t_damaged,
                        "missing": len(missing), "damaged": len(damaged), "files": len(files),
                        "metadata_files": len(meta), "metadata_bytes": sum(p.stat().st_size for p in meta),
                        "done_marker_bytes": sum(p.stat().st_size for p in meta if p.parent.name == "done"),
                        "data_bytes": sum(p.stat().st_size for p in files) - sum(p.stat().st_size for p in meta)}
    out["stores"] = stores
    cfg = LoaderConfig(manifest=d["manifest"], mim_store=d["mim_store"], disc_store=d["disc_store"],
                       batch_size=d["batch_size"], num_workers=d["workers"], img_size=SIDE, pin_memory=False)
    _, t_sources = timed(lambda: sources_of(cfg))
    steps, t_steps = timed(lambda: steps_per_epoch(cfg, 1))  # the first call reads every store's valid rows
    tracemalloc.start()
    plan, t_plan = timed(lambda: plan_epoch(cfg, 0, 0, 1))
    _, plan_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    _, t_resume = timed(lambda: plan_epoch(cfg, 0, 0, 1, skip_batches=steps // 2))
    rows = sum(w.rows.nbytes for w in plan.workers)
    total = manifests["scale-train"]["total"]
    out["plan"] = {"steps": steps, "resolve_sources_s": t_sources, "steps_per_epoch_s": t_steps,
                   "build_s": t_plan, "resume_rebuild_s": t_resume, "tracemalloc_peak_bytes": plan_peak,
                   "row_bytes": rows, "batches": len(plan.batches),
                   "tracemalloc_peak_bytes_per_sample": plan_peak / total}
    ckpt = Path(f"runs/{d['name']}/checkpoints/last.pt")
    if ckpt.exists():
        import torch

        _, t_ckpt = timed(lambda: torch.load(ckpt, map_location="cpu", weights_only=False))
        out["checkpoint"] = {"bytes": ckpt.stat().st_size, "load_s": t_ckpt}
    out["maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


# ----------------------------------------------------------------------------- growth and goals
RATIO_STAGES = ("shard_train", "extract_mim", "extract_disc", "distill", "evaluate", "shard_probe_train")


def growth(small: dict, large: dict) -> dict:
    """Large over small, per stage: CPU per image, peak RSS, and the RSS difference per added sample."""
    out = {}
    added = large["count"] - small["count"]
    for name in sorted(set(small["stages"]) & set(large["stages"])):
        a, b = small["stages"][name], large["stages"][name]
        row = {"wall_s": [a["wall_s"], b["wall_s"]], "maxrss_mb": [a["maxrss_mb"], b["maxrss_mb"]],
               "maxrss_ratio": b["maxrss_mb"] / a["maxrss_mb"] if a["maxrss_mb"] else None,
               "rss_bytes_per_added_sample": (b["maxrss_mb"] - a["maxrss_mb"]) * 2**20 / added if added else None}
        for key in ("cpu_ms_per_image", "cpu_ms_per_image_after_startup"):
            if key in a and key in b and a[key] > 0:
                row[key] = [a[key], b[key]]
                row[key.replace("cpu_ms_per_image", "cpu_per_image_ratio")] = b[key] / a[key]
        out[name] = row
    return out


def goals(large: dict, grow: dict | None) -> list[dict]:
    """Issue 20's goals, each with what was measured and whether it is met."""
    g = []
    st = large["stages"]
    rebuild = large["probe"]["plan"]["resume_rebuild_s"]
    for key, what, extra in (("extract_disc", "done markers scanned, damage checked, teacher loaded", 0.0),
                             ("distill", "stores checked, valid rows read, checkpoint loaded, plan rebuilt", rebuild)):
        s = st[key].get("resume_startup_s")
        s = None if s is None else s + extra
        g.append({"goal": f"{key} resume start-up ({what}) <= 10 s", "measured": s, "met": s is not None and s <= 10})
        s = st[key].get("resume_first_work_s")
        g.append({"goal": f"{key} resume: first {'shard done' if key == 'extract_disc' else 'step'} <= 10 s",
                  "measured": s, "met": s is not None and s <= 10})
    worst_inspect = max(st["inspect_mim"]["wall_s"], st["inspect_disc"]["wall_s"])
    g.append({"goal": "inspect <= 5 s", "measured": worst_inspect, "met": worst_inspect <= 5})
    if "dvc" in large:
        s = max(large["dvc"]["status_wall_s"])
        g.append({"goal": "dvc status (unchanged) <= 30 s", "measured": s, "met": s <= 30})
    s = max(m["load_s_first"] for m in large["probe"]["manifests"].values())
    g.append({"goal": "open a manifest <= 2 s", "measured": s, "met": s <= 2})
    if grow:
        for name in RATIO_STAGES:
            row = grow.get(name, {})
            r = row.get("cpu_per_image_ratio_after_startup", row.get("cpu_per_image_ratio"))
            if r is not None:
                g.append({"goal": f"{name}: CPU per image <= 1.1x the small run's", "measured": r, "met": r <= 1.1})
            r = grow.get(name, {}).get("maxrss_ratio")
            if r is not None:
                g.append({"goal": f"{name}: peak RSS <= 1.1x the small run's (plus stated bytes per sample)",
                          "measured": r, "met": r <= 1.1,
                          "bytes_per_added_sample": grow[name]["rss_bytes_per_added_sample"]})
    return g


def _machine() -> dict:
    import psutil

    return {"cpu_count": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "platform": platform.platform(), "python": platform.python_version(),
            "load_average_at_start": list(os.getloadavg())}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=IMAGENET_TRAIN, help="training images")
    ap.add_argument("--labeled", type=int, default=50_000, help="labeled images (4/5 probe-train, 1/5 probe-test)")
    ap.add_argument("--work", default=None, help="work folder (default: a new temporary folder)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scale.json"))
    ap.add_argument("--compare-fraction", type=float, default=0.01,
                    help="also run at this fraction of --count and --labeled first (0 = off)")
    ap.add_argument("--shard-size", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=256, help="distill images per step")
    ap.add_argument("--workers", type=int, default=2, help="distill loader workers")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per stage process")
    ap.add_argument("--kill-at", type=float, default=0.4, help="SIGKILL extract/distill after this fraction of work")
    ap.add_argument("--dvc", choices=("all", "stores", "off"), default="all",
                    help="dvc repro of every stage, or of the extractions only (then dvc commit); then dvc status")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)  # internal: run inside a count's folder
    ap.add_argument("--launch", help=argparse.SUPPRESS)  # internal: REPORT -- ARGV (see run_measured)
    args, rest = ap.parse_known_args(argv)
    if args.launch:
        sys.exit(launch(args.launch, rest[1:] if rest[:1] == ["--"] else rest))
    if rest:
        ap.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.probe:
        print(json.dumps(probe()))
        return {}
    t0 = time.perf_counter()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="hdpipe-scale-"))
    counts = [(args.count, args.labeled)]
    if args.compare_fraction > 0:
        counts.insert(0, (max(args.batch_size, round(args.count * args.compare_fraction)),
                          max(128, round(args.labeled * args.compare_fraction))))
    result: dict = {"benchmark": "scale", "machine": _machine(), "settings": {
        k: v for k, v in vars(args).items() if k not in ("probe", "work", "out")} | {
        "image_side": SIDE, "mim_kwargs": MIM_KW, "disc_kwargs": DISC_KW, "student_kwargs": STUDENT_KW},
        "runs": {}}
    try:
        for n, labeled in counts:
            print(f"scale run: {n} images, {labeled} labeled -> {work / f'n{n}'}", flush=True)
            result["runs"][str(n)] = run_count(work / f"n{n}", n, labeled, args,
                                               progress=lambda stages, n=n: _save_partial(result, n, stages, args.out))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    runs = [result["runs"][str(n)] for n, _ in counts]
    result["growth"] = growth(runs[0], runs[-1]) if len(runs) == 2 else None
    result["goals"] = goals(runs[-1], result["growth"])
    result["machine"]["load_average_at_end"] = list(os.getloadavg())
    result["wall_s"] = time.perf_counter() - t0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    Path(args.out + ".partial").unlink(missing_ok=True)
    for goal in result["goals"]:
        print(f"{'met ' if goal['met'] else 'MISS'}  {goal['goal']}: {goal['measured']}")
    print(f"wall {result['wall_s']:.0f} s -> {args.out}")
    return result


if __name__ == "__main__":
    main()

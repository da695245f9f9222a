"""Does a student trained from the cache match one trained online? A real-teacher study (not a test).

    python benchmarks/quality/study.py                     # Fashion-MNIST from Debian, a few hours on 2 CPUs
    python benchmarks/quality/study.py --quick --idx-dir D  # minutes: tiny sizes, every code path
    python benchmarks/quality/study.py --idx-dir /path/to/idx --work /tmp/study

Steps (each cached in --work, so an interrupted study resumes):
1. data: idx files -> ImageNet-style class folders (28x28 grayscale as RGB PNG) -> `hdpipe shard`:
   an unlabeled distillation split, a labeled probe/fine-tune split, the test split;
2. teachers, pretrained here (`teachers.py`): an MAE-style MIM teacher and a supervised one, both
   12-block 192-d ViTs on the 7x7 grid of 28 px / patch 4; each evaluated like a student;
3. one extraction per teacher with V views per image (`hdpipe extract`, fp16);
4. students (same geometry; `hdpipe distill`, fixed epochs): an lr sweep (>= 3 values spanning
   10x) for hybrid, disc_only and mim_only (cached, all V views, random schedule), settings compared
   at each one's best; then at hybrid's best lr: online hybrid (`--source online`), cached hybrid
   with views_used in {1, 2, 4, V}, a few alphas, SmoothL1 beta 2.0, and the key comparisons with a second seed;
5. every student and teacher: k-NN, linear probe, fine-tune top-1 (`hdpipe evaluate`), mean
   attention distance and its spread over heads, NMI (`hdpipe analyze`); wall and CPU time of
   every step; bytes on disk. Cached and online hybrid (every seed) and the teachers are
   fine-tuned again for longer.
Writes `<out>/study.json`, `<out>/views.png` and prints the README table. Numbers are what this run
measured; the machine is named in the JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from fashion import export_folder, load_split  # noqa: E402

STUDENT = "vit_tiny_patch16_224"
LAYERS = {"full": 12, "quick": 3}


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime + c.ru_utime + c.ru_stime


class Study:
    def __init__(self, args):
        self.args = args
        self.work = Path(args.work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.cache = self.work / "results.json"
        self.results = json.loads(self.cache.read_text()) if self.cache.exists() else {}
        depth = LAYERS["quick" if args.quick else "full"]
        self.geometry = {"img_size": 28, "patch_size": 4, "depth": depth}

    def step(self, key: str, fn):
        """Run `fn` once (its result and wall/CPU seconds cached under `key`)."""
        if key in self.results:
            return self.results[key]
        # A benchmark beside the study would inflate both timings on a small box: touch <work>/PAUSE to hold the
        # study between steps (never inside a timed one), remove it to go on.
        while (self.work / "PAUSE").exists():
            time.sleep(5)
        print(f"study: {key} ...", file=sys.stderr, flush=True)
        t0, c0 = time.perf_counter(), _cpu()
        out = fn()
        out = {**out, "wall_s": round(time.perf_counter() - t0, 2), "cpu_s": round(_cpu() - c0, 2)}
        self.results[key] = out
        self.cache.write_text(json.dumps(self.results, indent=1))
        print(f"study: {key} done in {out['wall_s']:.0f} s", file=sys.stderr, flush=True)
        return out

    def prepare(self) -> tuple[dict, dict, Path, dict]:
        """(data, teachers, params file, stores): the steps every study script starts from, cached."""
        data = self.data()
        teachers = self.teachers()
        params = self.params(data, teachers)
        return data, teachers, params, self.extract(params)

    # ---- 1. data --------------------------------------------------------------------------------
    def data(self) -> dict:
        a = self.args

        def make():
            from stages.shard import ShardConfig, shard

            idx = Path(a.idx_dir)
            train_x, train_y = load_split(idx, "train")
            test_x, test_y = load_split(idx, "test")
            out = {}
            for name, (x, y, n) in {"distill": (train_x, train_y, a.distill_images),
                                    "probe": (train_x, train_y, a.probe_images),
                                    "test": (test_x, test_y, a.test_images)}.items():
                shutil.rmtree(self.work / "folders" / name, ignore_errors=True)  # a resized split keeps no stale images
                folder = export_folder(x, y, range(min(n, len(x))), self.work / "folders" / name)
                out[name] = str(shard(ShardConfig(input=str(folder), name=f"fmnist-{name}",
                                                  out_dir=str(self.work / "shards"),
                                                  manifest=str(self.work / "manifests" / f"fmnist-{name}.json"),
                                                  shard_size=a.shard_size, progress=False, overwrite=True)))
            return {**out, "sizes": sizes}

        sizes = [a.distill_images, a.probe_images, a.test_images, a.shard_size]
        # resized study: new splits, same teachers
        if "data" in self.results and self.results["data"].get("sizes") != sizes:
            del self.results["data"]
        return self.step("data", make)

    # ---- 2. teachers ----------------------------------------------------------------------------
    def teacher_kwargs(self) -> dict:
        return {**self.geometry, "num_classes": 0}

    def teacher_spec(self, checkpoint: str) -> dict:
        """How evaluate/analyze load a teacher: the timm model, its weights, its own normalization."""
        from teachers import MEAN, STD

        return {"model": f"timm:{STUDENT}", "checkpoint": checkpoint, "model_kwargs": self.teacher_kwargs(),
                "mean": MEAN, "std": STD}

    def teachers(self) -> dict:
        import torch

        from teachers import pretrain_mae, pretrain_supervised

        a = self.args
        x, y = load_split(Path(a.idx_dir), "train")
        x, y = x[:a.pretrain_images], y[:a.pretrain_images]
        folder = self.work / "teachers"
        folder.mkdir(exist_ok=True)

        def train(kind):
            def run():
                if kind == "mim":
                    state, log = pretrain_mae(x, self.geometry["depth"], a.mae_epochs, batch=a.batch_size)
                else:
                    state, log = pretrain_supervised(x, y, self.geometry["depth"], a.sup_epochs, batch=a.batch_size)
                torch.save(state, folder / f"{kind}.pth")
                return {"checkpoint": str(folder / f"{kind}.pth"), "log": log}
            return run

        out = {kind: self.step(f"teacher-{kind}", train(kind)) for kind in ("mim", "disc")}
        for kind in ("mim", "disc"):
            spec = self.teacher_spec(out[kind]["checkpoint"])
            out[kind]["eval"] = self.step(f"eval-teacher-{kind}",
                                          lambda spec=spec, kind=kind: self.evaluate(spec, f"teacher-{kind}"))
        return out

    # ---- 3. extraction --------------------------------------------------------------------------
    def params(self, data: dict, teachers: dict) -> Path:
        """A params file with the two extract sections: extraction and online distillation read it."""
        from teachers import MEAN, STD

        common = dict(manifest=data["distill"], teacher=f"timm:{STUDENT}", model_kwargs=self.teacher_kwargs(),
                      mean=list(MEAN), std=list(STD), targets=str(self.work / "targets"), batch_size=128,
                      progress=False)
        sections = {"extract_mim": {**common, "role": "mim", "name": "mim", "checkpoint": teachers["mim"]["checkpoint"],
                                    "views": self.args.views, "seed": 0},
                    "extract_disc": {**common, "role": "disc", "name": "disc",
                                     "checkpoint": teachers["disc"]["checkpoint"],
                                     "mim_store": str(self.work / "targets" / "mim.zarr")}}
        path = self.work / "params.yaml"
        path.write_text(yaml.safe_dump(sections, sort_keys=False))
        return path

    def extract(self, params: Path) -> dict:
        from pipeline.config import load_section, resolve
        from stages.extract import ExtractConfig, extract
        from stages.inspect_store import bytes_per_view

        def run():
            out = {}
            for section in ("extract_mim", "extract_disc"):
                t0, c0 = time.perf_counter(), _cpu()
                url = extract(resolve(ExtractConfig, load_section(params, section)))
                from pipeline.targets.store import TargetStore

                store = TargetStore.open(url)
                out[section] = {"url": url, "wall_s": round(time.perf_counter() - t0, 2),
                                "cpu_s": round(_cpu() - c0, 2), "bytes_per_view": bytes_per_view(store)["total"],
                                "views": store.views, "images": store.total}
            return out

        return self.step("extract", run)

    # ---- 4. students ----------------------------------------------------------------------------
    def distill(self, label: str, data: dict, stores: dict, params: Path, **kw) -> dict:
        from stages.distill import DistillConfig, distill

        a = self.args

        def run():
            epochs = kw.get("epochs", a.student_epochs)
            cfg = DistillConfig(manifest=data["distill"], mim_store=stores["extract_mim"]["url"],
                                disc_store=stores["extract_disc"]["url"], model=STUDENT, model_kwargs=self.geometry,
                                epochs=epochs, batch_size=a.batch_size, workers=0, warmup_epochs=1.0,
                                runs_dir=str(self.work / "runs"), name=label, checkpoint_every=0, print_every=0,
                                online_mim=f"{params}:extract_mim", online_disc=f"{params}:extract_disc",
                                device=a.device, **{k: v for k, v in kw.items() if k != "epochs"})  # settings record it
            t0, c0 = time.perf_counter(), _cpu()
            run_dir = distill(cfg)
            train = {"train_wall_s": round(time.perf_counter() - t0, 2), "train_cpu_s": round(_cpu() - c0, 2),
                     "settings": {k: v for k, v in kw.items()},
                     "metrics": json.loads((run_dir / "metrics.json").read_text())}
            return {**train, **self.evaluate({"model": f"student:{run_dir / 'student'}"}, label)}

        return self.step(f"student-{label}", run)

    # ---- 5. evaluation --------------------------------------------------------------------------
    def long_finetune(self, label: str, spec: dict) -> dict:
        """Fine-tune top-1 after `long_finetune_epochs` (the sweep's short fine-tune is half warmup):
        for the models the study's conclusions rest on."""
        from stages.evaluate import EvaluateConfig, evaluate

        a = self.args
        data = self.results["data"]
        teacher = {k: v for k, v in spec.items() if k != "model"}

        def run():
            m = evaluate(EvaluateConfig(model=spec["model"], train_manifest=data["probe"], test_manifest=data["test"],
                                        k=min(20, a.probe_images), out=str(self.work / "eval-long" / f"{label}.json"),
                                        finetune_epochs=a.long_finetune_epochs, finetune_batch_size=a.batch_size,
                                        finetune_lr=a.finetune_lr, finetune_crop_scale=(0.5, 1.0), device=a.device,
                                        progress=False, **teacher))
            return {"finetune_top1": m["finetune"]["top1"], "epochs": a.long_finetune_epochs}

        return self.step(f"finetune{a.long_finetune_epochs}-{label}", run)

    def evaluate(self, spec: dict, label: str) -> dict:
        from stages.analyze import AnalyzeConfig, analyze
        from stages.evaluate import EvaluateConfig, evaluate

        a = self.args
        data = self.results["data"]
        teacher = {k: v for k, v in spec.items() if k != "model"}
        t0, c0 = time.perf_counter(), _cpu()
        m = evaluate(EvaluateConfig(model=spec["model"], train_manifest=data["probe"], test_manifest=data["test"],
                                    k=min(20, a.probe_images), out=str(self.work / "eval" / f"{label}.json"),
                                    finetune_epochs=a.finetune_epochs, finetune_batch_size=a.batch_size,
                                    finetune_lr=a.finetune_lr, finetune_crop_scale=(0.5, 1.0), device=a.device,
                                    progress=False, **teacher))
        r = analyze(AnalyzeConfig(models=(spec["model"],), labels=(label,), manifest=data["test"],
                                  num_images=min(64, a.test_images), out_dir=str(self.work / "analyze" / label),
                                  device=a.device, progress=False, **teacher))["models"][label]
        dist = np.array(r["attention_distance"])  # [L, H] pixels
        return {"knn_top1": m["knn"]["top1"], "linear_top1": m["linear"]["top1"],
                "finetune_top1": m["finetune"]["top1"], "attention_distance_mean": float(dist.mean()),
                "attention_distance_head_spread": float(dist.std(axis=1).mean()),
                "nmi_mean": float(np.mean(r["nmi"])), "eval_wall_s": round(time.perf_counter() - t0, 2),
                "eval_cpu_s": round(_cpu() - c0, 2)}


def score(r: dict) -> float:
    """How the lr sweep picks its best run: k-NN + linear-probe top-1 (fine-tune breaks ties)."""
    return r["knn_top1"] + r["linear_top1"] + 1e-3 * r["finetune_top1"]


def run(args) -> dict:
    study = Study(args)
    data, teachers, params, stores = study.prepare()
    V = args.views
    students, best = {}, {}
    for mode in ("hybrid", "disc_only", "mim_only"):  # lr first, for each teacher setting
        for lr in args.lrs:
            label = f"{mode}-lr{lr:g}"
            students[label] = study.distill(label, data, stores, params, teachers=mode, base_lr=lr)
        best[mode] = max(args.lrs, key=lambda lr: score(students[f"{mode}-lr{lr:g}"]))
    lr = best["hybrid"]
    students["online-hybrid"] = study.distill("online-hybrid", data, stores, params, source="online", base_lr=lr)
    for n in args.views_sweep:
        if n != V:
            students[f"hybrid-views{n}"] = study.distill(f"hybrid-views{n}", data, stores, params, base_lr=lr,
                                                         views_used=n)
    students[f"hybrid-views{V}"] = students[f"hybrid-lr{lr:g}"]
    for alpha in args.alphas:
        students[f"hybrid-alpha{alpha:g}"] = study.distill(f"hybrid-alpha{alpha:g}", data, stores, params, base_lr=lr,
                                                           alpha=alpha)
    for beta in args.betas:  # SmoothL1 beta: the paper states none; dBOT, whose recipe it follows, uses 2.0
        students[f"hybrid-beta{beta:g}"] = study.distill(f"hybrid-beta{beta:g}", data, stores, params, base_lr=lr,
                                                         smoothl1_beta=beta)
    for seed in args.seeds[1:]:  # the key comparisons again: the spread is the noise floor
        for label, kw in {"hybrid": {"base_lr": lr}, "online-hybrid": {"source": "online", "base_lr": lr},
                          "disc_only": {"teachers": "disc_only", "base_lr": best["disc_only"]},
                          "mim_only": {"teachers": "mim_only", "base_lr": best["mim_only"]}}.items():
            students[f"{label}-seed{seed}"] = study.distill(f"{label}-seed{seed}", data, stores, params,
                                                            seed=seed, **kw)
    # The comparison the product rests on, cached vs online hybrid with every seed, gets a longer
    # fine-tune (and the teachers, for scale).
    key = {f"teacher-{kind}": study.teacher_spec(teachers[kind]["checkpoint"]) for kind in ("mim", "disc")}
    for label in [f"hybrid-lr{lr:g}", "online-hybrid"] + [f"{name}-seed{seed}" for seed in args.seeds[1:]
                                                          for name in ("hybrid", "online-hybrid")]:
        key[label] = {"model": f"student:{study.work / 'runs' / label / 'student'}"}
    long = {label: study.long_finetune(label, spec) for label, spec in key.items()}
    report = summarize(study, teachers, stores, students, best, long)
    write_outputs(report, Path(args.out))
    return report


def summarize(study: Study, teachers: dict, stores: dict, students: dict, best: dict, long: dict) -> dict:
    a = study.args
    lr = best["hybrid"]
    cached = students[f"hybrid-lr{lr:g}"]
    online = students["online-hybrid"]
    extract_s = sum(s["wall_s"] for k, s in stores.items() if k.startswith("extract_"))
    extract_cpu = sum(s["cpu_s"] for k, s in stores.items() if k.startswith("extract_"))
    runs = {k[len("student-"):]: v for k, v in study.results.items() if k.startswith("student-")}  # each run once
    cached_train = [r["train_wall_s"] for k, r in runs.items() if not k.startswith("online")]
    online_train = [r["train_wall_s"] for k, r in runs.items() if k.startswith("online")]
    per_view = sum(s["bytes_per_view"] for k, s in stores.items() if k.startswith("extract_"))
    import torch

    return {
        "setup": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(a).items()},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "device": "cuda" if torch.cuda.is_available() and a.device != "cpu" else "cpu"},
        "teachers": teachers, "extraction": stores, "students": students, "best_lr": best,
        "finetune_long": {label: r["finetune_top1"] for label, r in long.items()},
        "comparison": {
            "cached_over_online_finetune": cached["finetune_top1"] / online["finetune_top1"],
            "cached_over_online_finetune_long": (long[f"hybrid-lr{lr:g}"]["finetune_top1"]
                                                 / long["online-hybrid"]["finetune_top1"]),
            "cached_over_online_knn": cached["knn_top1"] / online["knn_top1"],
            "single_run": {"cached_train_wall_s": cached["train_wall_s"], "extract_wall_s": extract_s,
                           "online_train_wall_s": online["train_wall_s"],
                           "online_over_cached_with_extraction": (online["train_wall_s"]
                                                                  / (cached["train_wall_s"] + extract_s))},
            "study_path": {
                "cached_runs": len(cached_train), "cached_wall_s": extract_s + sum(cached_train),
                "cached_cpu_s": extract_cpu + sum(r["train_cpu_s"] for k, r in runs.items()
                                                  if not k.startswith("online")),
                # every cached run done online instead: its measured online run time times the run count
                "online_projected_wall_s": float(np.mean(online_train)) * len(cached_train),
            },
            "bytes_per_view": per_view,
        },
    }


def write_outputs(report: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    (out / "study.json").write_text(json.dumps(report, indent=1) + "\n")
    s = report["students"]
    a = report["setup"]
    views = sorted(int(k.split("views")[1]) for k in s if k.startswith("hybrid-views") and "seed" not in k)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for metric, style in (("finetune_top1", "-o"), ("knn_top1", "-s"), ("linear_top1", "-^")):
        ax.plot(views, [s[f"hybrid-views{v}"][metric] for v in views], style, label=f"cached {metric[:-5]}")
        ax.axhline(s["online-hybrid"][metric], ls="--", lw=1, color=ax.lines[-1].get_color(),
                   label=f"online {metric[:-5]}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(views, [str(v) for v in views])
    ax.set_xlabel("stored views per image used (views_used)")
    ax.set_ylabel("test top-1")
    ax2 = ax.twinx()
    per_view = report["comparison"]["bytes_per_view"]
    ax2.plot(views, [per_view * v * a["distill_images"] / 1e6 for v in views], ":", color="gray")
    ax2.set_ylabel("store size on disk (MB, gray dotted)")
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(f"{a['student_epochs']} epochs, {a['distill_images']} images", fontsize=9)
    fig.savefig(out / "views.png", dpi=120, bbox_inches="tight")
    print(table(report))


def table(report: dict) -> str:
    long = report["finetune_long"]
    epochs = report["setup"]["long_finetune_epochs"]
    rows = [f"| model | lr | k-NN | linear | fine-tune | fine-tune ({epochs} ep) | attn dist (px) | head spread | NMI "
            "| train s |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]

    def row(name: str, lr: str, r: dict, key: str, seconds: float) -> str:
        f = f"{long[key]:.3f}" if key in long else "-"
        return (f"| {name} | {lr} | {r['knn_top1']:.3f} | {r['linear_top1']:.3f} | {r['finetune_top1']:.3f} | {f} | "
                f"{r['attention_distance_mean']:.2f} | {r['attention_distance_head_spread']:.2f} | "
                f"{r['nmi_mean']:.3f} | {seconds:.0f} |")

    for name, t in report["teachers"].items():
        rows.append(row(f"teacher {name}", "-", t["eval"], f"teacher-{name}", t["wall_s"]))
    for name, r in report["students"].items():
        rows.append(row(name, f"{r['settings']['base_lr']:g}", r, name, r["train_wall_s"]))
    return "\n".join(rows)


def arg_parser(doc: str) -> argparse.ArgumentParser:
    """The options every study script takes (they share the --work folder's cached steps)."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes (a test runs it on a synthetic idx stand-in)")
    p.add_argument("--idx-dir", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--work", default="/tmp/hdpipe-quality")
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--device", default="auto")
    return p


def main(argv=None) -> dict:
    args = arg_parser(__doc__).parse_args(argv)
    # Sized for a 2-CPU box: the MAE teacher takes ~55 min, everything after it about two hours. A larger box can
    # raise distill_images, probe_images and student_epochs; nothing else depends on them.
    full = dict(pretrain_images=20000, mae_epochs=12, sup_epochs=4, distill_images=2000, probe_images=2000,
                test_images=1000, shard_size=250, views=8, views_sweep=(1, 2, 4, 8), student_epochs=8, batch_size=128,
                lrs=(2e-3, 6e-3, 2e-2), alphas=(0.1, 0.3), betas=(2.0,), seeds=(0, 1), finetune_epochs=2,
                finetune_lr=2e-3, long_finetune_epochs=5)
    quick = dict(pretrain_images=96, mae_epochs=1, sup_epochs=1, distill_images=48, probe_images=40, test_images=20,
                 shard_size=16, views=2, views_sweep=(1, 2), student_epochs=1, batch_size=8, lrs=(2e-3, 2e-2),
                 alphas=(0.3,), betas=(2.0,), seeds=(0, 1), finetune_epochs=1, finetune_lr=2e-3,
                 long_finetune_epochs=1)
    for k, v in (quick if args.quick else full).items():
        setattr(args, k, v)
    return run(args)


if __name__ == "__main__":
    main()

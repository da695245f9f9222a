"""How many stored views does a long run need? Views x epochs on the quality study's data and teachers.

    python benchmarks/quality/views_study.py                      # hours on 2 CPUs; resumes, holds on <work>/PAUSE
    python benchmarks/quality/views_study.py --quick --idx-dir D  # minutes: every code path (tested)

Same data, teachers, stores and evaluation as `study.py` (its steps are reused and cached in the
same --work folder), then:
1. hybrid's lr sweep extended upward at the study's 8 epochs (its best so far was the largest tried);
2. at 4x the epochs (32) and that lr: cached hybrid with views_used in {1, 2, 4, 8}, token
   resampling (F = 0.75) at V = 2 and V = 8, and online hybrid (a fresh view every epoch), each with
   every seed; k-NN, linear probe, the short fine-tune and a 5-epoch fine-tune for each;
3. the curve: accuracy against showings per stored view (epochs / V), online as the reference, store
   bytes on a second axis; the rule (the smallest V, with or without resampling, whose seed-mean
   k-NN and 5-epoch fine-tune reach >= 99% of online's); the cost of the cached and online paths.
Writes `<out>/views.json`, `<out>/views-epochs.png` and prints the table.

Two processes on two cores: the second runs a share of the long runs in its own work folder (a copy
of the first's, so the cached steps are shared) with `--only LABEL,...` and no summary; the first
then takes its results with `--merge FOLDER` (each merged step records `merged_from`).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from study import Study, arg_parser, score  # noqa: E402

RULE_FRACTION = 0.99  # cached reaches this fraction of online's seed mean (k-NN and 5-epoch fine-tune)


def settings(args) -> dict[str, dict]:
    """{label: distill settings} of the long runs, one per (setting, seed); online last per seed."""
    out = {}
    for seed in args.seeds:
        suffix = "" if seed == args.seeds[0] else f"-seed{seed}"
        for v in args.views_sweep:
            out[f"long-views{v}{suffix}"] = {"views_used": v, "seed": seed}
        for v in args.resample_views:
            out[f"long-views{v}-resample{args.resample:g}{suffix}"] = {"views_used": v, "seed": seed,
                                                                      "token_resample": args.resample}
        out[f"long-online{suffix}"] = {"source": "online", "seed": seed}
    return out


def merge(study: Study, other: Path) -> None:
    """Take the finished steps of another process's work folder (`--only`) into this one's results."""
    theirs = json.loads((other / "results.json").read_text())
    new = {k: v for k, v in theirs.items() if k not in study.results}
    for key, value in new.items():
        value["merged_from"] = str(other)  # which process ran it (they shared the machine)
        study.results[key] = value
    study.cache.write_text(json.dumps(study.results, indent=1))
    print(f"study: merged {len(new)} steps from {other}: {sorted(new)}", file=sys.stderr, flush=True)


def run(args) -> dict:
    study = Study(args)
    for other in args.merge or ():
        merge(study, Path(other))
    data, _, params, stores = study.prepare()
    sweep = {lr: study.distill(f"hybrid-lr{lr:g}", data, stores, params, base_lr=lr) for lr in args.lrs}
    lr = max(args.lrs, key=lambda x: score(sweep[x]))
    runs = {}
    todo = settings(args)
    if args.only:
        # a share of the long runs for a second process (its own --work, whose results.json is merged afterwards)
        todo = {label: todo[label] for label in args.only.split(",")}
    for label, kw in todo.items():
        runs[label] = study.distill(label, data, stores, params, base_lr=lr, epochs=args.long_epochs, **kw)
        spec = {"model": f"student:{study.work / 'runs' / label / 'student'}"}
        runs[label] = {**runs[label], "finetune_long_top1": study.long_finetune(label, spec)["finetune_top1"]}
    if args.only:
        return runs
    report = summarize(args, study, stores, sweep, lr, runs)
    write_outputs(report, Path(args.out))
    return report


def group_of(label: str) -> str:
    """The setting a run belongs to (its label without the seed)."""
    return label.split("-seed")[0]


def summarize(args, study: Study, stores: dict, sweep: dict, lr: float, runs: dict) -> dict:
    groups: dict[str, list[dict]] = {}
    for label, r in runs.items():
        groups.setdefault(group_of(label), []).append(r)
    per_view = sum(s["bytes_per_view"] for k, s in stores.items() if k.startswith("extract_"))
    curve = {}
    for name, rs in groups.items():
        views = rs[0]["settings"].get("views_used")
        entry = {"seeds": len(rs), "views": views, "token_resample": rs[0]["settings"].get("token_resample", 1.0),
                 "showings_per_view": None if views is None else args.long_epochs / views,
                 "store_bytes": None if views is None else per_view * views * args.distill_images}
        for metric in ("knn_top1", "linear_top1", "finetune_top1", "finetune_long_top1"):
            vals = [r[metric] for r in rs]
            entry[metric] = {"mean": float(np.mean(vals)), "spread": float(np.max(vals) - np.min(vals)), "seeds": vals}
        curve[name] = entry
    online = curve["long-online"]
    for entry in curve.values():
        entry["of_online"] = {m: entry[m]["mean"] / online[m]["mean"] for m in ("knn_top1", "finetune_long_top1")}
    meets = sorted((e["views"], e["token_resample"] < 1, name) for name, e in curve.items()
                   if e["views"] is not None and min(e["of_online"].values()) >= RULE_FRACTION)
    rule = None
    if meets:
        views, resampled, name = meets[0]
        rule = {"setting": name, "views": views, "token_resample": curve[name]["token_resample"],
                "showings_per_view": curve[name]["showings_per_view"], "of_online": curve[name]["of_online"]}
    extract_wall = sum(s["wall_s"] for k, s in stores.items() if k.startswith("extract_"))
    extract_cpu = sum(s["cpu_s"] for k, s in stores.items() if k.startswith("extract_"))
    cached = {k: r for k, r in runs.items() if "online" not in k}
    online_runs = [r for k, r in runs.items() if "online" in k]
    online_wall = float(np.mean([r["train_wall_s"] for r in online_runs]))
    online_cpu = float(np.mean([r["train_cpu_s"] for r in online_runs]))
    one = runs["long-views2"] if "long-views2" in runs else next(iter(cached.values()))
    cost = {
        "single_run": {"cached_train_wall_s": one["train_wall_s"], "extract_wall_s": extract_wall,
                       "online_train_wall_s": runs["long-online"]["train_wall_s"],
                       "online_over_cached_with_extraction": runs["long-online"]["train_wall_s"]
                       / (one["train_wall_s"] + extract_wall)},
        "study_path": {"cached_runs": len(cached),
                       "cached_wall_s": extract_wall + sum(r["train_wall_s"] for r in cached.values()),
                       "cached_cpu_s": extract_cpu + sum(r["train_cpu_s"] for r in cached.values()),
                       # each cached run done online instead: the measured online run's cost times the count
                       "online_wall_s": online_wall * len(cached), "online_cpu_s": online_cpu * len(cached)},
    }
    path = cost["study_path"]
    path["online_over_cached_wall"] = path["online_wall_s"] / path["cached_wall_s"]
    path["online_over_cached_cpu"] = path["online_cpu_s"] / path["cached_cpu_s"]
    return {"setup": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()},
            "lr_sweep": {f"{k:g}": {m: v[m] for m in ("knn_top1", "linear_top1", "finetune_top1")}
                         for k, v in sweep.items()},
            "best_lr": lr, "runs": runs, "curve": curve, "rule": rule, "rule_fraction": RULE_FRACTION, "cost": cost,
            "bytes_per_view": per_view}


def write_outputs(report: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    (out / "views.json").write_text(json.dumps(report, indent=1) + "\n")
    curve = report["curve"]
    fig, ax = plt.subplots(figsize=(6.8, 4.4))
    for metric, marker in (("knn_top1", "s"), ("finetune_long_top1", "o")):
        for resampled, ls in ((False, "-"), (True, ":")):
            pts = sorted((e["showings_per_view"], e[metric]["mean"], e[metric]["spread"]) for e in curve.values()
                         if e["views"] is not None and (e["token_resample"] < 1) == resampled)
            if pts:
                x, y, spread = (np.array(v) for v in zip(*pts))
                tag = "resampled" if resampled else "cached"
                ax.errorbar(x, y, yerr=spread / 2, fmt=ls + marker, capsize=3, label=f"{tag} {metric[:-5]}")
        ax.axhline(curve["long-online"][metric]["mean"], ls="--", lw=1, color=ax.lines[-1].get_color(),
                   label=f"online {metric[:-5]}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel(f"showings per stored view (epochs / views_used; {report['setup']['long_epochs']} epochs)")
    ax.set_ylabel("test top-1 (seed mean; bars: seed range)")
    ax2 = ax.twinx()
    pts = sorted({(e["showings_per_view"], e["store_bytes"]) for e in curve.values() if e["views"] is not None})
    ax2.plot([p[0] for p in pts], [p[1] / 1e6 for p in pts], "x:", color="gray")
    ax2.set_ylabel("store size on disk (MB, gray)")
    ax.legend(fontsize=7, loc="lower left")
    fig.savefig(out / "views-epochs.png", dpi=120, bbox_inches="tight")
    print(table(report))


def table(report: dict) -> str:
    rows = ["| setting | views | F | showings/view | seeds | k-NN | linear | fine-tune 5 ep | k-NN / online "
            "| fine-tune / online | store MB |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, e in report["curve"].items():
        cell = lambda m: f"{e[m]['mean']:.3f} ± {e[m]['spread'] / 2:.3f}"  # noqa: E731
        views = "fresh" if e["views"] is None else str(e["views"])
        spv = "1" if e["views"] is None else f"{e['showings_per_view']:g}"
        mb = "-" if e["store_bytes"] is None else f"{e['store_bytes'] / 1e6:.1f}"
        rows.append(f"| {name} | {views} | {e['token_resample']:g} | {spv} | {e['seeds']} | {cell('knn_top1')} | "
                    f"{cell('linear_top1')} | {cell('finetune_long_top1')} | {e['of_online']['knn_top1']:.3f} | "
                    f"{e['of_online']['finetune_long_top1']:.3f} | {mb} |")
    return "\n".join(rows)


def main(argv=None) -> dict:
    p = arg_parser(__doc__)
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default 0,1; 0,1,2 where time allows)")
    p.add_argument("--merge", action="append", default=None, help="another process's --work folder whose "
                   "finished steps join this one's results (repeatable)")
    p.add_argument("--only", default=None, help="comma-separated long-run labels to run (and no summary): "
                   "shares the study between processes, each with its own --work")
    args = p.parse_args(argv)
    # The study's sizes (study.py) with 4x its 8 epochs for the long runs.
    full = dict(pretrain_images=20000, mae_epochs=12, sup_epochs=4, distill_images=2000, probe_images=2000,
                test_images=1000, shard_size=250, views=8, views_sweep=(1, 2, 4, 8), student_epochs=8, batch_size=128,
                lrs=(6e-3, 2e-2, 6e-2, 2e-1), long_epochs=32, resample=0.75, resample_views=(2, 8), seeds=(0, 1),
                finetune_epochs=2, finetune_lr=2e-3, long_finetune_epochs=5)
    quick = dict(pretrain_images=96, mae_epochs=1, sup_epochs=1, distill_images=48, probe_images=40, test_images=20,
                 shard_size=16, views=2, views_sweep=(1, 2), student_epochs=1, batch_size=8, lrs=(2e-3, 2e-2),
                 long_epochs=2, resample=0.75, resample_views=(2,), seeds=(0, 1), finetune_epochs=1,
                 finetune_lr=2e-3, long_finetune_epochs=1)
    given_seeds = args.seeds
    for k, v in (quick if args.quick else full).items():
        setattr(args, k, v)
    if given_seeds:
        args.seeds = tuple(int(s) for s in given_seeds.split(","))
    return run(args)


if __name__ == "__main__":
    main()

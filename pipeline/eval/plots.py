"""Figures and DVC plot tables for `hdpipe analyze`, several models overlaid.

Input is the `models` mapping of the analysis result (see `stages/analyze.py`):
`{label: {"layers": [1..L], "attention_distance": [[H]·L], "nmi": [[H]·L], "entropy": [[H]·L],
"spectrum_token": [[r]·L], "spectrum_image": [[r]·L], ...}}`.

Figures follow the papers: head distance as a scatter with every head a dot per layer (hybrid
distillation Fig. 1/3/5a), NMI per layer (Fig. 2/5b; understanding-MD Fig. 6a), per-head entropy
(understanding-MD Fig. 10), relative log singular value spectra with lighter colours for deeper
layers (understanding-MD Fig. 4/5) and their per-layer averages (Fig. 6b/c). Every summary figure has
one labelled series per model and a legend.

DVC tables (CSV) for `dvc plots show`: `head_distance.csv` is long (model, layer, head, distance_px);
`nmi.csv`, `entropy.csv`, `spectrum_token.csv`, `spectrum_image.csv` are wide: a `layer` column and one
column per model (head mean, or mean relative log singular value), e.g. in dvc.yaml
`plots: [{reports/analyze/nmi.csv: {x: layer, y: [<model>, ...]}}]` or a top-level plots entry.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Mapping

import matplotlib

matplotlib.use("Agg")  # files only: never needs a display (servers, CI, dask workers)
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from pipeline.urls import atomic_write_bytes  # noqa: E402

PER_HEAD = ("attention_distance", "nmi", "entropy")
SPECTRA = ("spectrum_token", "spectrum_image")
_YLABEL = {
    "attention_distance": "mean attention distance (pixels)",
    "nmi": "normalized mutual information",
    "entropy": "attention entropy (nats)",
    "spectrum_token": "mean Δ log singular value (token level)",
    "spectrum_image": "mean Δ log singular value (image level)",
}


def _colors(n: int):
    cmap = plt.get_cmap("tab10")
    return [cmap(i % 10) for i in range(n)]


def _save(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    atomic_write_bytes(str(path), buf.getvalue())
    plt.close(fig)


def plot_per_head(models: Mapping[str, dict], metric: str, path: Path):
    """Scatter of every head per layer (dots) plus the head mean per layer (line), one colour per model.

    The legend has one entry per model (the mean line carries the label; the dots are unlabelled).
    Returns the (closed) figure so callers and tests can inspect its artists.
    """
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    n = len(models)
    for i, (color, (label, m)) in enumerate(zip(_colors(n), models.items())):
        layers = np.asarray(m["layers"], dtype=float)
        vals = np.asarray(m[metric], dtype=float)  # [L, H]
        # Offset models a little along x so overlaid dots of different models stay visible.
        dx = (i - (n - 1) / 2) * 0.12 if n > 1 else 0.0
        xs = np.repeat(layers + dx, vals.shape[1])
        ax.scatter(xs, vals.reshape(-1), s=14, color=color, alpha=0.6, linewidths=0)
        ax.plot(layers + dx, vals.mean(axis=1), "-o", color=color, ms=3, lw=1.4, label=label)
    ax.set_title("dots: heads, line: mean over heads", fontsize=9)
    ax.set_xlabel("layer (block)")
    ax.set_ylabel(_YLABEL[metric])
    ax.set_xticks(sorted({layer for m in models.values() for layer in m["layers"]}))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)
    return fig


def plot_spectra(models: Mapping[str, dict], level: str, path: Path):
    """Relative log singular value curves: one panel per model, one curve per layer (lighter = deeper)."""
    key = f"spectrum_{level}"
    n = max(len(models), 1)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.6), squeeze=False)
    for ax, (label, m) in zip(axes[0], models.items()):
        spectra = m[key]
        cmap = plt.get_cmap("viridis")
        for j, (layer, curve) in enumerate(zip(m["layers"], spectra)):
            ax.plot(np.arange(1, len(curve) + 1), curve, color=cmap(j / max(len(spectra) - 1, 1)), lw=1.1,
                    label=f"layer {layer}")
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("singular value index")
        ax.set_ylabel(f"Δ log singular value ({level} level)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    _save(fig, path)
    return fig


def plot_spectrum_summary(models: Mapping[str, dict], path: Path):
    """Mean relative log singular value per layer, token and image level side by side, one line per model."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key in zip(axes, SPECTRA):
        for color, (label, m) in zip(_colors(len(models)), models.items()):
            ax.plot(m["layers"], [float(np.mean(c)) for c in m[key]], "-o", color=color, ms=3, label=label)
        ax.set_xlabel("layer (block)")
        ax.set_ylabel(_YLABEL[key])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    _save(fig, path)
    return fig


def _csv_bytes(header: list[str], rows: list[list]) -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue().encode()


def write_tables(models: Mapping[str, dict], out_dir: Path) -> dict[str, Path]:
    """Write the DVC plot CSVs described in the module docstring; returns {table name: path}."""
    out: dict[str, Path] = {}
    rows = []
    for label, m in models.items():
        for layer, heads in zip(m["layers"], m["attention_distance"]):
            rows.extend([label, layer, h, float(v)] for h, v in enumerate(heads))
    p = out_dir / "head_distance.csv"
    atomic_write_bytes(str(p), _csv_bytes(["model", "layer", "head", "distance_px"], rows))
    out["head_distance"] = p
    labels = list(models)
    for key in ("nmi", "entropy") + SPECTRA:
        layers = sorted({layer for m in models.values() for layer in m["layers"]})
        table = []
        for layer in layers:
            row: list = [layer]
            for m in models.values():
                if layer in m["layers"]:
                    row.append(float(np.mean(m[key][m["layers"].index(layer)])))
                else:
                    row.append("")  # a shallower model has no such layer
            table.append(row)
        p = out_dir / f"{key}.csv"
        atomic_write_bytes(str(p), _csv_bytes(["layer"] + labels, table))
        out[key] = p
    return out


def write_all(models: Mapping[str, dict], out_dir: Path) -> dict[str, Path]:
    """Every PNG and CSV for one analysis; returns {artifact name: path}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for metric in PER_HEAD:
        paths[f"{metric}_png"] = out_dir / f"{metric}.png"
        plot_per_head(models, metric, paths[f"{metric}_png"])
    for level in ("token", "image"):
        paths[f"spectrum_{level}_png"] = out_dir / f"spectrum_{level}.png"
        plot_spectra(models, level, paths[f"spectrum_{level}_png"])
    paths["spectrum_summary_png"] = out_dir / "spectrum_summary.png"
    plot_spectrum_summary(models, paths["spectrum_summary_png"])
    paths.update({f"{k}_csv": v for k, v in write_tables(models, out_dir).items()})
    return paths

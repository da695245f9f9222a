#!/usr/bin/env bash
# GPU check (issue 12): on a CUDA machine, ViT-B geometry on the bundled sample, within 8 minutes:
#   1. extraction (bf16 autocast, selected automatically on CUDA) against the bare teacher forward
#      (benchmarks/bench_extract.py, ViT-B/16 MIM teacher, 128 and 256 images);
#   2. stage two (bf16 autocast, pinned host batches copied one step ahead, distill's default loader
#      workers) against its ceiling and online distillation (benchmarks/bench_distill.py --geometry base);
#   3. the host CPU per image of stage two and per view of extraction at the ViT-B defaults, targets
#      encoded and decoded on the GPU (benchmarks/bench_host.py --device cuda, one round).
# Prints images/s for the teacher forward, extraction, the stage-two ceiling and cached stage two,
# and peak GPU memory; the JSON results go to $GPU_CHECK_OUT (default benchmarks/results/gpu).
# Without a CUDA GPU it fails at once, loudly: its numbers would mean nothing on a CPU.
#
#     bash benchmarks/gpu_check.sh            # PYTHON=... to pick the interpreter (default: python)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
OUT="${GPU_CHECK_OUT:-benchmarks/results/gpu}"
BUDGET_S="${GPU_CHECK_BUDGET_S:-480}"  # the whole check: 8 minutes

if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: FAILED: no CUDA GPU is visible to $PY (torch.cuda.is_available() is False)." >&2
    echo "gpu_check: this check measures GPU throughput and must run on a CUDA machine; nothing was measured." >&2
    exit 2
fi
"$PY" -c 'import torch; print("gpu_check:", torch.cuda.get_device_name(0), "torch", torch.__version__)'
mkdir -p "$OUT"
start=$(date +%s)
left() { echo $(( BUDGET_S - ($(date +%s) - start) )); }

timeout "$(left)" "$PY" benchmarks/bench_extract.py --model vit_base_patch16_224 --images 128 --factor 2 \
    --batch-size 64 --shard-size 64 --repeats 3 --device cuda --results "$OUT/extract.json"
timeout "$(left)" "$PY" benchmarks/bench_distill.py --geometry base --device cuda --images 256 --batch 64 \
    --steps 16 --rounds 2 --threads 4 --out "$OUT/distill.json"

timeout "$(left)" "$PY" benchmarks/bench_host.py --device cuda --images 128 --rounds 1 --out "$OUT/host.json"

"$PY" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
ext = json.loads((out / "extract.json").read_text())
dis = json.loads((out / "distill.json").read_text())
big = ext["runs"][max(ext["runs"], key=lambda k: ext["runs"][k]["images"])]
rows = [
    ("teacher forward (ViT-B MIM, bf16)", big["images"] / big["forward_s"], big.get("peak_cuda_mib")),
    ("extraction (MIM store)", big["images"] / big["extract_s"], big.get("peak_cuda_mib")),
    ("stage two ceiling (no loading)", dis["images_per_s"]["ceiling"]["median"], dis["peak_cuda_mb"]["ceiling"]),
    ("stage two cached (loader + step)", dis["images_per_s"]["cached"]["median"], dis["peak_cuda_mb"]["cached"]),
    ("online (both teachers + step)", dis["images_per_s"]["online"]["median"], dis["peak_cuda_mb"]["online"]),
]
print(f"\n{'gpu_check':36s}{'images/s':>12s}{'peak GPU MiB':>14s}")
for name, speed, mem in rows:
    print(f"{name:36s}{speed:12.1f}{(mem or 0):14.0f}")
host = json.loads((out / "host.json").read_text())
for precision, res in host["precisions"].items():
    ext = res["extraction"]
    print(f"host CPU ms, {precision}: stage two {res['pixels/encoded']['host_ms']['median']:.3f} per image "
          f"(+ GPU decode {res['pixels/encoded']['device_decode_ms']['median']:.3f}); extraction store work "
          + ", ".join(f"{role} {ext[role]['store work']['median']:.3f}" for role in ("mim", "disc")) + " per view")
r = dis["ratios_wall"]["cached_over_ceiling"]
print(f"cached / ceiling: {r['min']:.2f} (min over rounds); extraction / forward: "
      + ", ".join(f"{k} {v['median']:.3f}" for k, v in ext["overhead_ratio"].items()))
EOF
echo "gpu_check: done in $(( $(date +%s) - start )) s; results in $OUT"

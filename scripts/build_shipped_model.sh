#!/usr/bin/env bash
# Rebuilds everything masa-rt ships, from nothing, on a CPU machine:
#   masa_rt/assets/masa_hands_causal.pt    the default model (weights + config, no optimizer)
#   masa_rt/assets/masa_hands_causal.onnx  its streaming step, so serving needs no torch
#   examples/demos/<activity>.npz          clean synthetic demonstrations (joints + phases)
#   examples/<activity>.npz                references built from them by the shipped model,
#                                          each with its phase decoder (4,800 steps, 13-23 min)
#   examples/lookahead3/<activity>.npz     the same with a 3-frame lookahead decoder (opt-in:
#                                          estimates describe the user 100 ms ago)
# Training takes ~60 min on one CPU core in one stage (configs/hands_shipped.yaml says why).
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${RUN:-runs/hands_shipped}

masa-rt synth --out data/synth --per-activity 40 --examples examples/demos  # + every demo
masa-rt synth --out data/synth80 --activities hands --per-activity 80 --examples ''
if ! grep -q '"status": "done"' "$RUN/summary.json" 2>/dev/null; then  # one stage
  OMP_NUM_THREADS=1 masa-rt train --data data/synth80 --out "$RUN" --config configs/hands_shipped.yaml
fi
python -c "from masa_rt.checkpoint import strip_checkpoint as s; \
s('$RUN/last.pt', 'masa_rt/assets/masa_hands_causal.pt')"
masa-rt export --checkpoint masa_rt/assets/masa_hands_causal.pt \
  --out masa_rt/assets/masa_hands_causal.onnx
for a in pour_milk open_bottle stir_cup pick_and_place screw_lid wipe_table; do
  masa-rt reference build "examples/demos/$a.npz" \
    --checkpoint masa_rt/assets/masa_hands_causal.pt -o "examples/$a.npz"
  masa-rt reference build "examples/demos/$a.npz" --decoder-lookahead 3 \
    --checkpoint masa_rt/assets/masa_hands_causal.pt -o "examples/lookahead3/$a.npz"
done

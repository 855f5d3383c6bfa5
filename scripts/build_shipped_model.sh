#!/usr/bin/env bash
# Rebuilds everything masa-rt ships, from nothing, on a CPU machine:
#   masa_rt/assets/masa_hands_causal.pt    the default model (weights + config, no optimizer)
#   masa_rt/assets/masa_hands_causal.onnx  its streaming step, so serving needs no torch
#   examples/demos/<activity>.npz          clean synthetic demonstrations (joints + phases)
#   examples/<activity>.npz                references built from them by the shipped model
# Training takes ~65 min on 2 CPU cores in three stages (the configs say why each value).
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${RUN:-runs/hands_causal}
FT=${FT:-runs/hands_causal_ft}
VP=${VP:-runs/hands_causal_vpos}

masa-rt synth --out data/synth --per-activity 40 --examples examples/demos
if [ ! -f "$RUN/last.pt" ]; then   # stage 1: 60 epochs, the paper's augmentation
  masa-rt train --data data/synth/hands --out "$RUN" --config configs/hands_causal.yaml
fi
if ! grep -q '"epochs_completed": 90' "$FT/summary.json" 2>/dev/null; then  # stage 2: 30 more with joint dropout, milder rotation
  [ -d "$FT" ] || cp -r "$RUN" "$FT"
  masa-rt train --data data/synth/hands --out "$FT" --config configs/hands_causal_ft.yaml --resume
fi
if ! grep -q '"epochs_completed": 115' "$VP/summary.json" 2>/dev/null; then  # stage 3: 25 more, view positions + warp
  [ -d "$VP" ] || cp -r "$FT" "$VP"
  masa-rt train --data data/synth/hands --out "$VP" --config configs/hands_causal_vpos.yaml --resume
fi
python -c "from masa_rt.checkpoint import strip_checkpoint as s; \
s('$VP/last.pt', 'masa_rt/assets/masa_hands_causal.pt')"
masa-rt export --checkpoint masa_rt/assets/masa_hands_causal.pt \
  --out masa_rt/assets/masa_hands_causal.onnx
for a in pour_milk open_bottle stir_cup pick_and_place screw_lid wipe_table; do
  masa-rt reference build "examples/demos/$a.npz" \
    --checkpoint masa_rt/assets/masa_hands_causal.pt -o "examples/$a.npz"
done

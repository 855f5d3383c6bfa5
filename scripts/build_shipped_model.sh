#!/usr/bin/env bash
# Rebuilds everything masa-rt ships, from nothing, on a CPU machine:
#   masa_rt/assets/masa_hands_causal.pt    the default model (weights + config, no optimizer)
#   masa_rt/assets/masa_hands_causal.onnx  its streaming step, so serving needs no torch
#   masa_rt/assets/masa_penn13_causal.pt   the 2D body model (penn13) and its .onnx:
#                                          configs/penn13_body.yaml on Penn Action's train
#                                          split (PENN=PATH/TO/pennaction/labels; ~60 min)
#   masa_rt/assets/masa_body25_causal.pt   the 3D body model (body25) and its .onnx, from
#                                          synthetic bodies only (configs/body25_synth.yaml)
#   examples/demos/<activity>.npz          clean synthetic demonstrations (joints + phases)
#   examples/<activity>.npz                references built from them by the shipped model,
#                                          each with an ensemble of three phase decoders
#                                          (two bone- and finger-jittered, 4,800 steps,
#                                          seeds 0 and 1; one of 8,000 steps:
#                                          docs/changelog.md, "Fifteenth", "Seventeenth"
#                                          and "Eighteenth round"; 65-80 min)
#   examples/lookahead3/<activity>.npz     the same with 3-frame lookahead decoders (opt-in:
#                                          estimates describe the user 100 ms ago; two of
#                                          4,800 steps, one bone- and finger-jittered)
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
# Each decoder is its own build (builds of one demo may run on several machines at once);
# `reference ensemble` then puts a reference's decoders into one file.
PARTS=${PARTS:-runs/reference_parts}
mkdir -p "$PARTS"
build() {  # build ACTIVITY OUT [decoder flags...]
  local a=$1 out=$2; shift 2
  masa-rt reference build "examples/demos/$a.npz" \
    --checkpoint masa_rt/assets/masa_hands_causal.pt -o "$out" "$@"
}
for a in pour_milk open_bottle stir_cup pick_and_place screw_lid wipe_table; do
  build "$a" "$PARTS/$a.bone.npz" --decoder-bone-jitter 0.08 --decoder-finger-jitter 0.05
  build "$a" "$PARTS/$a.8000.npz" --decoder-steps 8000
  build "$a" "$PARTS/$a.bone1.npz" --decoder-bone-jitter 0.08 --decoder-finger-jitter 0.05 \
    --decoder-seed 1
  masa-rt reference ensemble "$PARTS/$a.bone.npz" "$PARTS/$a.8000.npz" "$PARTS/$a.bone1.npz" \
    -o "examples/$a.npz"
  build "$a" "$PARTS/$a.l3bone.npz" --decoder-lookahead 3 --decoder-bone-jitter 0.08 \
    --decoder-finger-jitter 0.05
  build "$a" "$PARTS/$a.l3.npz" --decoder-lookahead 3
  masa-rt reference ensemble "$PARTS/$a.l3bone.npz" "$PARTS/$a.l3.npz" \
    -o "examples/lookahead3/$a.npz"
done

# The body model, where Penn Action's labels are at hand (PENN=.../pennaction/labels).
if [ -n "${PENN:-}" ]; then
  BODY=${BODY:-runs/penn13_body}
  masa-rt import-penn "$PENN" --out data/penn
  if ! grep -q '"status": "done"' "$BODY/summary.json" 2>/dev/null; then
    OMP_NUM_THREADS=1 masa-rt train --data data/penn --out "$BODY" --config configs/penn13_body.yaml
  fi
  python -c "from masa_rt.checkpoint import strip_checkpoint as s; \
s('$BODY/last.pt', 'masa_rt/assets/masa_penn13_causal.pt')"
  masa-rt export --checkpoint masa_rt/assets/masa_penn13_causal.pt \
    --out masa_rt/assets/masa_penn13_causal.onnx
fi

# The 3D body model (body25), from synthetic bodies only (no real 3D body data at hand):
# configs/body25_synth.yaml, a 28-minute budget at two threads.
BODY3D=${BODY3D:-runs/body25_synth}
masa-rt synth --out data/synth_body --activities body --per-activity 60 --examples ''
if [ ! -f "$BODY3D/summary.json" ]; then  # one budgeted run: "done" or "time" both ship
  OMP_NUM_THREADS=2 masa-rt train --data data/synth_body --out "$BODY3D" \
    --config configs/body25_synth.yaml --max-minutes 28
fi
python -c "from masa_rt.checkpoint import strip_checkpoint as s; \
s('$BODY3D/last.pt', 'masa_rt/assets/masa_body25_causal.pt')"
masa-rt export --checkpoint masa_rt/assets/masa_body25_causal.pt \
  --out masa_rt/assets/masa_body25_causal.onnx

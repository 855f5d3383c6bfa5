#!/bin/bash
# Table 4 ablations at the collapse-check budget (240 steps), matched with runs/hands10_sg.
cd "$(dirname "$0")/.."
S="--set train.epochs=20 --set train.lr_halve_every=7"
for spec in "noself model.use_self_attention=false" "nocross model.use_cross_attention=false" "nodual augment.dual=false" "notrim augment.crop=off"; do
  set -- $spec
  name=$1; sw=$2
  [ -f runs/abl10_$name/summary.json ] || masa-rt train --data data/synth/hands --out runs/abl10_$name --config configs/hands_causal.yaml $S --set $sw > runs/abl10_$name.log 2>&1
done
for r in hands10_sg hands10_nosg abl10_noself abl10_nocross abl10_nodual abl10_notrim; do
  [ -f reports/hands_$r/metrics.json ] || masa-rt eval --checkpoint runs/$r --data data/synth/hands --out reports/hands_$r > reports/hands_$r.log 2>&1
done
echo done > reports/abl10.done

"""What the references' phase decoders cost a pipeline round: the bench's reference with its
whole decoder ensemble, with its first member alone, and with none, stepped in alternating
blocks in one process (so that a shared machine's other jobs load every arm alike).

Prints the CPU time per round (p50, p99) of each arm; the first block is a warm-up. The
arms' answers differ (fewer or no decoders): this measures cost, not accuracy.

    python benchmarks/decoder_cost.py --streams 256
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from engine.backends import get_backend, read_model_info
from engine.bench import BenchConfig, load_frames
from engine.pipeline import Pipeline
from engine.serve_commands import prepare
from engine.threads import limit_blas_threads
from masa_rt.align import Reference
from masa_rt.phase_decoder import DecoderEnsemble
from masa_rt.preprocess import InputSpec


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--streams", type=int, default=256)
    p.add_argument("--blocks", type=int, default=7, help="blocks per arm (the first: warm-up)")
    p.add_argument("--rounds", type=int, default=30, help="rounds per block")
    args = p.parse_args(argv)
    limit_blas_threads()  # as masa-rt serve and bench run
    cfg = BenchConfig()
    model, refs = prepare(None, [cfg.reference])
    spec = InputSpec.from_dict(read_model_info(model).input_spec)
    arms = {"whole ensemble": Reference.load(refs[0]), "first member": Reference.load(refs[0]),
            "no decoder": Reference.load(refs[0])}
    arms["first member"].decoder = DecoderEnsemble([arms["first member"].decoder.members[0]])
    arms["no decoder"].decoder = None
    pipes = {name: Pipeline(get_backend("onnxruntime", model, args.streams), spec, [ref])
             for name, ref in arms.items()}
    frames, layout, fps = load_frames(cfg.recording)
    ids = [f"s{i}" for i in range(args.streams)]
    for pipe in pipes.values():
        for sid in ids:
            pipe.open_session(sid, layout, fps)
    cpu = {name: [] for name in pipes}
    step = dict.fromkeys(pipes, 0)
    for block in range(args.blocks):
        for name, pipe in pipes.items():
            for _ in range(args.rounds):
                k = step[name]
                step[name] += 1
                c0 = time.process_time()
                for i, sid in enumerate(ids):
                    pipe.submit(sid, k, k / fps, frames[(k + 7 * i) % len(frames)])
                pipe.step()
                if block:
                    cpu[name].append(time.process_time() - c0)
    for name, c in cpu.items():
        ms = np.array(c) * 1e3
        print(f"{args.streams} streams, {name}: cpu p50 {np.percentile(ms, 50):.1f} ms, "
              f"p99 {np.percentile(ms, 99):.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

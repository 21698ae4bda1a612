"""Time the deep path's tiled inference against one whole-image pass, and the restorers end to end.

Not a test: prints seconds and ratios measured in the same run (these machines are noisy).
Example: python bench/bench_deep.py --size 768x624 --tiles 128 256 512
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from dicom_node.restore.deep import default_model_dir, load_model, tiled_inference
from dicom_node.restore.noise import NoiseModel
from dicom_node.restore.registry import create_restorer
from dicom_node.sim.acquisition import acquire
from dicom_node.sim.phantom import make_phantom

NOISE = NoiseModel(0.1, 3.0, 50.0)


def best_of(repeats: int, run) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="768x624")
    parser.add_argument("--tiles", type=int, nargs="+", default=[128, 256, 512])
    parser.add_argument("--model", default="hresnet-phantom-50")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    rows, cols = (int(v) for v in args.size.split("x"))

    net, card = load_model(default_model_dir(), args.model)
    raw = acquire(make_phantom((rows, cols), seed=1).signal, NOISE, 0.5, rng_or_seed=2).astype(np.float64)
    x = card.normaliser.to_network(raw, NOISE, 0.5)  # as the deep restorer feeds the network
    print(
        f"{args.model} ({card.network}, radius {net.receptive_field_radius}) on {rows}×{cols}, "
        f"{torch.get_num_threads()} threads, best of {args.repeats}"
    )

    def whole() -> None:
        with torch.inference_mode():
            net(torch.from_numpy(x)[None, None])

    reference = best_of(args.repeats, whole)
    print(f"whole image: {reference:.2f} s (reference)")
    for tile in args.tiles:
        seconds = best_of(args.repeats, lambda tile=tile: tiled_inference(net, x, tile=tile))
        print(f"tile {tile}: {seconds:.2f} s  ratio {seconds / reference:.2f}")

    deep = create_restorer("deep", model=args.model)
    mb = create_restorer("gat-bm3d")
    deep_s = best_of(args.repeats, lambda: deep.restore(raw, NOISE, 0.5))
    mb_s = best_of(1, lambda: mb.restore(raw, NOISE, 0.5))
    print(f"restore end to end: deep {deep_s:.2f} s, gat-bm3d {mb_s:.2f} s, ratio deep/MB {deep_s / mb_s:.2f}")


if __name__ == "__main__":
    main()

"""1 x 1 convolutions on the CPU: oneDNN's convolution against the matrix product `distillkit/conv_taps.py` uses.

    python benchmarks/pointwise_conv.py [--threads 1] [--rounds 50]

For each shape (batch x input channels -> output channels, square map), forward + backward of a channels-last
input, as training runs it: `F.conv2d` against `conv_taps.pointwise` (and, for a 1 x 1 depthwise kernel,
`conv_taps.channelwise`), interleaved, the median of `--rounds` timings each. Prints a table and one JSON line.
The shapes are MobileNetV3-Small's at 32 px (1 x 1 to 8 x 8 maps) and two larger maps, where oneDNN is kept.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from distillkit.conv_taps import SMALL_MAP_PIXELS, channelwise, pointwise

# (batch, in channels, map side, out channels); out None = depthwise
SHAPES = [
    (128, 576, 1, 1024),
    (128, 96, 1, 576),
    (128, 576, 1, 96),
    (128, 40, 2, 240),
    (128, 16, 8, 72),
    (32, 32, 16, 128),
    (32, 64, 56, 256),
    (128, 576, 1, None),
]


def timed(fn, x, weight, bias) -> float:
    start = time.perf_counter()
    fn(x, weight, bias).sum().backward()
    return (time.perf_counter() - start) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for batch, channels, side, out in SHAPES:
        depthwise = out is None
        x = torch.randn(batch, channels, side, side).to(memory_format=torch.channels_last).requires_grad_()
        weight = torch.randn(channels if depthwise else out, 1 if depthwise else channels, 1, 1, requires_grad=True)
        bias = torch.randn(weight.shape[0], requires_grad=True)
        groups = channels if depthwise else 1
        candidates = {
            "onednn": lambda x, w, b, groups=groups: F.conv2d(x, w, b, groups=groups),
            "matrix": channelwise if depthwise else pointwise,
        }
        times: dict[str, list[float]] = {name: [] for name in candidates}
        for round_ in range(args.rounds + 3):
            for name, fn in candidates.items():
                elapsed = timed(fn, x, weight, bias)
                if round_ >= 3:  # warm-up
                    times[name].append(elapsed)
        medians = {name: statistics.median(values) for name, values in times.items()}
        rows.append(
            {
                "shape": f"{batch} x {channels} -> {'depthwise' if depthwise else out}, {side} x {side}",
                "onednn_ms": round(medians["onednn"], 3),
                "matrix_ms": round(medians["matrix"], 3),
                "speedup": round(medians["onednn"] / medians["matrix"], 2),
                "matrix_path_used": side * side <= SMALL_MAP_PIXELS,
            }
        )
        r = rows[-1]
        print(f"{r['shape']:<32} oneDNN {r['onednn_ms']:8.2f} ms   matrix {r['matrix_ms']:8.2f} ms   {r['speedup']}x")
    print(json.dumps({"threads": args.threads, "rounds": args.rounds, "rows": rows}))


if __name__ == "__main__":
    main()

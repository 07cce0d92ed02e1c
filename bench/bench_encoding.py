"""Hidden-state encoding: safetensors bytes of a [layers, tokens, hidden] tensor against a plain memory copy.

(a) `bytes(x)`: one plain copy of the buffer (the floor), (b) `safetensors.torch.save`, (c) patchscope's
`wire.encode_tensor` (header and buffer joined once), and decoding: (d) `safetensors.torch.load`,
(e) `wire.decode_tensor` (validates, then one float32 copy so the result never aliases the message),
(f) a zero-copy view (`torch.frombuffer` on the payload). Median of --repeats (in blocks, after warm-up);
prints GB/s and ratios to (a), never asserts them.
"""

from __future__ import annotations

import argparse
import statistics
import time

import safetensors.torch
import torch

from patchscope.wire import decode_tensor, encode_tensor


def gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--shape", default="30,64,576", help="layers,tokens,hidden (default: smollm2, 64 tokens)"
    )
    parser.add_argument("--repeats", type=int, default=21)
    args = parser.parse_args()
    torch.set_num_threads(1)
    x = torch.randn(*map(int, args.shape.split(",")))
    n = x.numel() * 4
    data = encode_tensor(x)
    header = 8 + int.from_bytes(data[:8], "little")
    ways = {
        "(a) plain copy bytes(x)": lambda: x.numpy().tobytes(),
        "(b) safetensors.torch.save": lambda: safetensors.torch.save({"states": x}),
        "(c) wire.encode_tensor": lambda: encode_tensor(x),
        "(d) safetensors.torch.load": lambda: safetensors.torch.load(data),
        "(e) wire.decode_tensor (validated copy)": lambda: decode_tensor("s", data, max_bytes=1 << 40),
        "(f) zero-copy view": lambda: torch.frombuffer(
            bytearray(0) or memoryview(data)[header:], dtype=torch.float32
        ),
    }
    # Each way runs in a block after a warm-up: interleaving ways of different allocation sizes makes the
    # allocator fall back to fresh pages (page faults) and measures that instead of the encoding.
    times: dict[str, list[float]] = {k: [] for k in ways}
    for _ in range(3):
        for name, fn in ways.items():
            for k in range(args.repeats // 3 + 2):
                started = time.perf_counter()
                fn()
                if k >= 2:
                    times[name].append(time.perf_counter() - started)
    floor = statistics.median(times["(a) plain copy bytes(x)"])
    print(
        f"# encoding a float32 tensor of shape {list(x.shape)} ({n / 1e6:.1f} MB), median of {args.repeats}"
    )
    for name, ts in times.items():
        t = statistics.median(ts)
        print(
            f"{name:<42} {t * 1000:8.2f} ms  {gbps(n, t):6.2f} GB/s  {floor / t * 100:6.1f}% of a plain copy"
        )


if __name__ == "__main__":
    import warnings

    warnings.simplefilter("ignore", UserWarning)  # frombuffer on read-only bytes
    main()

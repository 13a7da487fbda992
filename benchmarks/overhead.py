"""Per-call CPU overhead of the LoRA op layer: a 1 x 16 x 16 call, where the math is nothing and
the time is argument checks, dispatch and autograd.

    python benchmarks/overhead.py          # best of 5 blocks of 2000 calls, 1 thread, process time

Prints microseconds per training call (forward and backward) and per inference call (no grad).
To compare two trees, run it with PYTHONPATH pointing at each, alternating, several times.
"""

import time
import warnings

import torch

import lorakern


def main() -> None:
    warnings.simplefilter("ignore")  # the one-time backend notice
    torch.set_num_threads(1)
    x, W, b = torch.randn(1, 16), torch.randn(16, 16), torch.randn(16)
    A, B = torch.randn(4, 16, requires_grad=True), torch.randn(16, 4, requires_grad=True)

    def train():
        lorakern.lora_linear(x, W, b, A, B, 0.5, backend="reference").sum().backward()

    def infer():
        with torch.no_grad():
            lorakern.lora_linear(x, W, b, A, B, 0.5, backend="reference")

    for fn in (train, infer):
        for _ in range(500):
            fn()
        best = []
        for _ in range(5):
            t = time.process_time()
            for _ in range(2000):
                fn()
            best.append((time.process_time() - t) / 2000 * 1e6)
        print(f"{fn.__name__}: {min(best):.1f} us per call")


if __name__ == "__main__":
    main()

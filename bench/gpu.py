"""Every GPU figure in one command: `python -m bench.gpu` (under 8 minutes on one H100/H200).

Runs bench.sam_latency on the GPU for the `sam` engine with vit_h (random weights): first eager
(SDPA + bf16, dynamic batches of 8), then with SAM_COMPILE (torch.compile of the encoder, compiled
at startup), each against bare segment-anything in the same run; then the `sam2` (SAM 2.1
hiera-tiny) and `sam3` engines against bare transformers calls. Prints JSON lines only; needs
nothing beyond what the project installs. Refuses to run without CUDA (the CPU figures come from
`python -m bench.sam_latency`).
"""

from __future__ import annotations

import argparse
import sys

import torch

from bench import sam_latency


def main(argv: list[str] | None = None) -> int:
    options = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    options.add_argument("--model-type", default="vit_h")
    options.add_argument("--skip-compile", action="store_true", help="leave out the torch.compile run")
    args = options.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench.gpu needs a CUDA device; on a CPU run `python -m bench.sam_latency`", file=sys.stderr)
        return 2
    common = [
        "--engine",
        "sam",
        "--model-type",
        args.model_type,
        "--device",
        "cuda",
        "--repeats",
        "10",
        "--batch",
        "8",
        "--burst",
        "32",
        "--clicks",
        "50",
        "--annotators",
        "8",
    ]
    sam_latency.main(common)
    if not args.skip_compile:
        sam_latency.main(common + ["--compile"])
    for engine in ("sam2", "sam3"):  # real-size architectures (SAM 2.1 hiera-tiny, SAM 3), random weights
        sam_latency.main(["--engine", engine, *common[4:]])
    return 0


if __name__ == "__main__":
    sys.exit(main())

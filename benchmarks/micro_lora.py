"""One LoRA linear, forward + backward: frozen layer vs the module path vs the fused function.

    python benchmarks/micro_lora.py                      # minilm's q/v shape: 16 x 128 tokens, 384 -> 384, r 12
    python benchmarks/micro_lora.py --d-in 768 --d-out 768 --r 8 --reps 400
    python benchmarks/micro_lora.py --inference --r 25   # forward only, no grad (evaluation)

Interleaved in one process (every rep runs the three contenders, order rotated), torch
threads fixed (default 1; then the clock is the thread's CPU time, which a busy machine's
descheduling does not inflate; with more threads, wall time); prints medians and the medians of per-rep ratios to the frozen
layer, so machine drift hits all three alike. The input requires grad, as inside a model
whose lower layers train, so every contender computes the input gradient. ``--inference``: forward only under
``torch.no_grad()``; the contenders are the frozen layer, the module path, the autograd node
(``_FusedLoRA``, what evaluation ran before the no-grad path) and the no-grad path (what
``LoRALinear`` runs now when no gradient is wanted).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import paired_ratio, rotated_calls  # noqa: E402
from step_time import reexec_with_malloc_settings  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=16 * 128)
    p.add_argument("--d-in", type=int, default=384)
    p.add_argument("--d-out", type=int, default=384)
    p.add_argument("--r", type=int, default=12)
    p.add_argument("--reps", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--inference", action="store_true", help="forward only, under no_grad")
    args = p.parse_args(argv)
    reexec_with_malloc_settings()  # glibc's default thresholds turn fresh (N, d) outputs into page faults
    torch.set_num_threads(args.threads)
    from peftbench.blocks.lora_linear import LoRALinear, _FusedLoRA

    torch.manual_seed(0)
    base = nn.Linear(args.d_in, args.d_out).requires_grad_(False)
    lora = LoRALinear(base, args.r, 2.0 * args.r)
    nn.init.normal_(lora.lora_B.weight, std=0.02)
    x = torch.randn(args.tokens // 128, 128, args.d_in, requires_grad=not args.inference)
    g = torch.randn(args.tokens // 128, 128, args.d_out)
    if args.inference:
        return inference(args, base, lora, x, _FusedLoRA)

    def frozen():
        base(x).backward(g)

    def module_path():
        lora.fused = False  # what forward did before the fused function
        try:
            lora(x).backward(g)
        finally:
            lora.fused = True

    def fused():
        lora(x).backward(g)

    contenders = {"frozen": frozen, "module path": module_path, "fused": fused}
    names = list(contenders)

    def reset() -> None:
        x.grad = None
        lora.zero_grad(set_to_none=True)

    clock = time.thread_time if args.threads == 1 else time.perf_counter
    times = rotated_calls(contenders, args.reps, warmup=10, clock=clock, before=reset)
    floor = times["frozen"]
    print(f"tokens {args.tokens}, {args.d_in} -> {args.d_out}, r {args.r}, {args.threads} thread(s), {args.reps} reps")
    for name in names:
        ratio = paired_ratio(times[name], floor)
        print(f"  {name:12s} median {1e3 * statistics.median(times[name]):7.3f} ms   x{ratio:.3f} the frozen layer")
    ratio = paired_ratio(times["fused"], times["module path"])
    print(f"  fused / module path: x{ratio:.3f}")


def inference(args, base, lora, x, node) -> None:
    def module_path():
        lora.fused = False
        try:
            lora(x)
        finally:
            lora.fused = True

    def autograd_node():  # evaluation before the no-grad path
        node.apply(x, base.weight, base.bias, lora.lora_A.weight, lora.lora_B.weight, lora.scaling, None, False)

    contenders = {"frozen": lambda: base(x), "module path": module_path, "autograd node": autograd_node,
                  "no-grad path": lambda: lora(x)}
    clock = time.thread_time if args.threads == 1 else time.perf_counter
    with torch.no_grad():
        lora.fused = False
        ref = lora(x)
        lora.fused = True
        err = float((lora(x) - ref).abs().max())
        times = rotated_calls(contenders, args.reps, warmup=10, clock=clock)
    floor = times["frozen"]
    print(f"inference (no grad): tokens {args.tokens}, {args.d_in} -> {args.d_out}, r {args.r}, {args.threads} "
          f"thread(s), {args.reps} reps; max |no-grad path - module path| {err:.1e}")
    for name in contenders:
        ratio = paired_ratio(times[name], floor)
        print(f"  {name:13s} median {1e3 * statistics.median(times[name]):7.3f} ms   x{ratio:.3f} the frozen layer")
    for name in ("autograd node", "no-grad path"):
        print(f"  {name} / module path: x{paired_ratio(times[name], times['module path']):.3f}")


if __name__ == "__main__":
    main()

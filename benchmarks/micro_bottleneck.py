"""One bottleneck adapter on its site, forward + backward: frozen site vs the module path vs the fused function.

    python benchmarks/micro_bottleneck.py                  # minilm at 1%: 16 x 128 tokens, d 384, m 23, swish
    python benchmarks/micro_bottleneck.py --d 768 --m 48 --act relu --reps 400
    python benchmarks/micro_bottleneck.py --inference      # forward only, no grad (evaluation)

The site is a frozen d -> d linear (an output projection); the adapter sits on it as a forward
hook, the way houlsby and pfeiffer insert it. Interleaved in one process (every rep runs the
three contenders, order rotated), torch threads fixed (default 1; then the clock is the
thread's CPU time, which a busy machine's descheduling does not inflate; with more threads,
wall time); prints medians and the medians of per-rep ratios to the frozen site, so machine
drift hits all three alike. The input requires grad, as inside a model whose lower layers
train, so every contender computes the input gradient. ``--inference``: forward only under
``torch.no_grad()``; the contenders are the frozen site, the module path, the autograd node
(``_FusedBottleneck``, what evaluation ran before the no-grad path) and the no-grad path
(what ``Bottleneck`` runs now when no gradient is wanted). Like step_time.py, the script
re-executes itself with glibc's malloc thresholds raised (else every (N, d) temporary is a
fresh mmap and page faults dominate).
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
    p.add_argument("--d", type=int, default=384)
    p.add_argument("--m", type=int, default=23)
    p.add_argument("--act", default="swish", help="relu, gelu, swish, silu, tanh (default swish: houlsby's)")
    p.add_argument("--reps", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--inference", action="store_true", help="forward only, under no_grad")
    args = p.parse_args(argv)
    reexec_with_malloc_settings()
    torch.set_num_threads(args.threads)
    from peftbench_plugins.bottleneck import Bottleneck, _FusedBottleneck

    torch.manual_seed(0)
    site = nn.Linear(args.d, args.d).requires_grad_(False)
    adapted = nn.Linear(args.d, args.d).requires_grad_(False)
    adapted.load_state_dict(site.state_dict())
    # weights large enough that the delta is not lost in h's rounding (the check below means something)
    adapter = Bottleneck(args.d, args.m, args.act, init="normal", init_scale=0.1)
    adapted.register_forward_hook(lambda module, a, out: adapter(out))
    x = torch.randn(args.tokens // 128, 128, args.d, requires_grad=not args.inference)
    g = torch.randn(args.tokens // 128, 128, args.d)
    if args.inference:
        return inference(args, site, adapted, adapter, x, _FusedBottleneck)

    def frozen():
        site(x).backward(g)

    def module_path():
        adapter.fused = False  # what forward did before the fused function
        try:
            adapted(x).backward(g)
        finally:
            adapter.fused = True

    def fused():
        adapted(x).backward(g)

    with torch.no_grad():  # same numbers both ways
        adapter.fused = False
        ref = adapted(x)
        adapter.fused = True
        err = float((adapted(x) - ref).abs().max() / (ref - site(x)).abs().max())
    contenders = {"frozen site": frozen, "module path": module_path, "fused": fused}
    names = list(contenders)

    def reset() -> None:
        x.grad = None
        adapter.zero_grad(set_to_none=True)

    clock = time.thread_time if args.threads == 1 else time.perf_counter
    times = rotated_calls(contenders, args.reps, warmup=10, clock=clock, before=reset)
    floor = times["frozen site"]
    print(f"tokens {args.tokens}, d {args.d}, m {args.m}, {args.act}, {args.threads} thread(s), {args.reps} reps; "
          f"max |fused - module path| / max |delta| {err:.1e}")
    for name in names:
        ratio = paired_ratio(times[name], floor)
        print(f"  {name:12s} median {1e3 * statistics.median(times[name]):7.3f} ms   x{ratio:.3f} the frozen site")
    extra = [(f - s) / (m - s) for f, m, s in zip(times["fused"], times["module path"], floor)]
    ratio = paired_ratio(times["fused"], times["module path"])
    print(f"  fused / module path: x{ratio:.3f}; adapter's own time, fused / module path: "
          f"x{statistics.median(extra):.3f}")


def inference(args, site, adapted, adapter, x, node) -> None:
    def autograd_node(module, a, out):  # evaluation before the no-grad path: the autograd node
        return node.apply(out, adapter.down.weight, adapter.down.bias, adapter.up.weight, adapter.up.bias,
                          adapter.non_linearity)

    noded = nn.Linear(args.d, args.d).requires_grad_(False)
    noded.load_state_dict(site.state_dict())
    noded.register_forward_hook(autograd_node)

    def module_path():
        adapter.fused = False
        try:
            adapted(x)
        finally:
            adapter.fused = True

    contenders = {"frozen site": lambda: site(x), "module path": module_path, "autograd node": lambda: noded(x),
                  "no-grad path": lambda: adapted(x)}
    clock = time.thread_time if args.threads == 1 else time.perf_counter
    with torch.no_grad():
        adapter.fused = False
        ref = adapted(x)
        adapter.fused = True
        err = max(float((f() - ref).abs().max()) for f in (lambda: adapted(x), lambda: noded(x)))
        times = rotated_calls(contenders, args.reps, warmup=10, clock=clock)
    floor = times["frozen site"]
    print(f"inference (no grad): tokens {args.tokens}, d {args.d}, m {args.m}, {args.act}, {args.threads} thread(s), "
          f"{args.reps} reps; max |fast paths - module path| {err:.1e}")
    for name in contenders:
        ratio = paired_ratio(times[name], floor)
        print(f"  {name:13s} median {1e3 * statistics.median(times[name]):7.3f} ms   x{ratio:.3f} the frozen site")
    for name in ("autograd node", "no-grad path"):
        own = [(t - s) / (m - s) for t, m, s in zip(times[name], times["module path"], floor)]
        print(f"  {name} / module path: x{paired_ratio(times[name], times['module path']):.3f}; adapter's own time: "
              f"x{statistics.median(own):.3f}")


if __name__ == "__main__":
    main()

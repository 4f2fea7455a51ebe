"""Training-step time of every method against the floor, full fine-tuning and peft.

    python benchmarks/step_time.py                            # minilm, 1% budget, 16 x 128
    python benchmarks/step_time.py --backbone bert-base-shape  # random BERT-base, 16 x 128
    python benchmarks/step_time.py --backbone smollm2          # decoder, causal LM
    python benchmarks/step_time.py --smoke                     # tiny random BERT, 2 steps

All contenders live in one process and are stepped round-robin (step i of every one before
step i + 1, order rotated each round), torch threads fixed. Ratios are medians over rounds
of per-round ratios, so drift of a shared machine hits both sides of a ratio alike. Peak
RSS is measured in a short subprocess per contender (RSS cannot be attributed inside one
process holding all of them). Writes ``reports/bench/step_time[_<backbone>].md`` and prints it.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

MALLOC = {"MALLOC_MMAP_THRESHOLD_": "17179869184", "MALLOC_TRIM_THRESHOLD_": "17179869184"}
REEXEC_FLAG = "PEFTBENCH_BENCH_REEXEC"
ROOT = Path(__file__).resolve().parent.parent


def reexec_with_malloc_settings() -> None:
    """glibc's default thresholds turn CPU steps into page-fault storms: restart with them raised."""
    if sys.platform != "linux" or all(k in os.environ for k in MALLOC):
        return
    env = {**os.environ, **{k: os.environ.get(k, v) for k, v in MALLOC.items()}, REEXEC_FLAG: "1"}
    print("step_time: re-executing with " + " ".join(f"{k}={env[k]}" for k in MALLOC), file=sys.stderr, flush=True)
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default=None, help="minilm (default), bert-base-shape, smollm2, tiny-bert, tiny-llama")
    p.add_argument("--budget", default="1%", help="matched budget of trainable parameters (default 1%%)")
    p.add_argument("--methods", default=None, help="comma list of contenders (default: all; floor is always in), "
                                                   "e.g. lora,peft:lora,houlsby")
    p.add_argument("--no-peft", action="store_true", help="leave out peft's equivalents")
    p.add_argument("--batch", type=int, default=None, help="batch size (default per backbone)")
    p.add_argument("--length", type=int, default=None, help="sequence length (default per backbone)")
    p.add_argument("--steps", type=int, default=10, help="measured steps per contender (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="warm-up steps per contender, not kept (default 2)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default 2; --smoke: 1)")
    p.add_argument("--latency-reps", type=int, default=10, help="forward passes per model for inference latency")
    p.add_argument("--no-memory", action="store_true", help="skip the per-contender peak-RSS subprocesses")
    p.add_argument("--memory", default=None, help="comma list: peak RSS only for these contenders")
    p.add_argument("--memory-jobs", type=int, default=2, help="peak-RSS subprocesses run side by side (default 2)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--adapters-python", default=None, help="python of a venv with the adapters library: "
                                                            "also time its methods there (benchmarks/adapters_peer.py)")
    p.add_argument("--out", default=None, help="markdown output (default reports/bench/step_time[_<backbone>].md)")
    p.add_argument("--smoke", action="store_true", help="tiny random backbone, 2 steps: checks the script runs")
    p.add_argument("--_peak", default=None, help=argparse.SUPPRESS)  # internal: peak RSS of one contender
    args = p.parse_args(argv)
    if args.smoke:
        args.backbone = args.backbone or "tiny-bert"
        args.steps, args.warmup, args.latency_reps = 2, 1, 2
        args.memory = args.memory or "lora"  # one subprocess: checks the path, costs one import
    args.backbone = args.backbone or "minilm"
    args.threads = args.threads or (1 if args.smoke else 2)
    return args


def setup(args):
    import torch

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import peftbench
    from peftbench.backbones.backbone import quiet_transformers

    import contenders as C

    quiet_transformers()
    import warnings

    warnings.filterwarnings("ignore")
    device = torch.device(args.device)
    base = C.load(args.backbone)
    base.model.to(device)
    base.freeze()
    batch_size, length, _ = C.BACKBONES[args.backbone]
    batch = C.make_batch(base, args.batch or batch_size, args.length or length)
    batch = {k: v.to(device) for k, v in batch.items()}
    return peftbench.get_registry(), device, base, batch


def contender_names(args, base, registry) -> list[str]:
    import contenders as C

    names = C.default_names(base, registry)
    if args.methods:
        wanted = [m.strip() for m in args.methods.split(",") if m.strip()]
        unknown = [m for m in wanted if m not in names and not m.startswith("floor+")]
        if unknown:
            sys.exit(f"step_time: unknown contenders {unknown}; known: {', '.join(names)}")
        names = ["floor"] + [m for m in wanted if m != "floor"]
    if args.no_peft:
        names = [n for n in names if not n.startswith("peft:")]
    # ours first (peft's twins copy their weights), then peft's
    return sorted(names, key=lambda n: n.startswith("peft:"))


def lengthened_floors(built: dict) -> list[str]:
    """floor+n for every input prompt present: its n virtual tokens lengthen the sequence."""
    return list(dict.fromkeys(f"floor+{c.virtual_tokens}" for c in built.values() if c.virtual_tokens))


# -- one contender's peak RSS (run in a fresh process) --------------------------------------------------
def peak_main(args) -> None:
    import json

    import contenders as C
    import measure

    registry, device, base, batch = setup(args)
    c = C.build(args._peak, base, batch, args.budget, registry, share=False)
    print(json.dumps(measure.peak_report(c, device)))


# -- the run ----------------------------------------------------------------------------------------
def main(argv=None) -> None:
    args = parse_args(argv)
    reexec_with_malloc_settings()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    if args._peak:
        return peak_main(args)
    import contenders as C
    import measure
    import report

    started = time.perf_counter()
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    registry, device, base, batch = setup(args)
    log(f"step_time: {base!r}, batch {tuple(batch['input_ids'].shape)}, {args.threads} threads")
    built: dict[str, C.Contender] = {}
    names = contender_names(args, base, registry)
    for name in names:
        built[name] = C.build(name, base, batch, args.budget, registry, ours=built)
    for name in lengthened_floors(built):
        built[name] = C.build(name, base, batch, args.budget, registry)
    contenders = list(built.values())
    for c in contenders:
        measure.prepare(c)
    log(f"step_time: {len(contenders)} contenders: {', '.join(built)}")
    measure.interleaved(contenders, args.warmup, args.steps, device, log)

    log("step_time: inference latency")
    latency = inference(built, base, batch, args.latency_reps, device)
    checkpoints = {c.name: measure.checkpoint_bytes(c) for c in contenders}
    peaks = {}
    if not args.no_memory:
        wanted = [m.strip() for m in args.memory.split(",")] if args.memory else list(built)
        log(f"step_time: peak RSS, one subprocess per contender, {args.memory_jobs} at a time")
        peaks = measure.peaks_in_subprocesses(__file__, child_argv(args), wanted, args.memory_jobs, log)
    adapters = None
    if args.adapters_python:
        import adapters_side

        log("step_time: the adapters library, in its own environment")
        adapters = adapters_side.run(args, base, built, registry)
    elapsed = time.perf_counter() - started
    text = report.render(args=args, base=base, batch=batch, built=built, latency=latency, checkpoints=checkpoints,
                         peaks=peaks, adapters=adapters, environment=environment(device), elapsed=elapsed,
                         command=command_line(argv))
    out = output_path(args)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    log(f"step_time: wrote {out} ({elapsed:.0f} s)")


def inference(built: dict, base, batch: dict, reps: int, device) -> dict:
    """Forward latency vs the plain backbone: unmerged LoRA, adapters, prompts; then LoRA merged.

    Finalizes every injection first, so the latency and the checkpoint sizes measured after
    it are those of what a method infers with and stores.
    """
    import contenders as C
    import measure

    inputs = {k: v for k, v in batch.items() if k != "labels"}
    plain = C.clone(base, share=True).model  # the frozen backbone, nothing added
    models = {"plain": plain}
    for name, c in built.items():
        # training is over: every method infers (and saves) its finalized form; a no-op for most,
        # prefix tuning keeps its flattened table, P-tuning its n x d prompt (not the encoder)
        if c.injection is not None and not c.injection.finalized:
            c.injection.finalize()
        if c.kind in ("ours", "peft") and name != "qlora":  # 4-bit on CPU is not about speed
            models[name] = c.model
    result = {"unmerged": measure.latency(models, inputs, reps, device)}
    merged = {"plain": plain}
    for name in ("lora", "peft:lora"):
        if name in built:
            c = built[name]
            c.injection.merge() if c.injection is not None else c.model.merge_adapter()
            merged[name] = c.model
    if len(merged) > 1:
        result["merged"] = measure.latency(merged, inputs, reps, device)
    return result


def child_argv(args) -> list[str]:
    # one thread: peak memory does not depend on it, and two children share the two cores
    out = ["--backbone", args.backbone, "--budget", args.budget, "--threads", "1", "--device", args.device]
    if args.batch:
        out += ["--batch", str(args.batch)]
    if args.length:
        out += ["--length", str(args.length)]
    return out


def output_path(args) -> Path:
    if args.out:
        return Path(args.out)
    if args.smoke:
        return Path(tempfile.gettempdir()) / f"step_time_smoke_{os.getpid()}.md"
    suffix = "" if args.backbone == "minilm" else f"_{args.backbone}"
    return ROOT / "reports" / "bench" / f"step_time{suffix}.md"


def command_line(argv) -> str:
    return "python benchmarks/step_time.py " + " ".join(argv if argv is not None else sys.argv[1:])


def environment(device) -> dict:
    import peftbench.running.costs as costs

    env = costs.environment(device)
    for dist in ("peft", "bitsandbytes"):
        try:
            env["versions"][dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    env["malloc"] = " ".join(f"{k}={os.environ.get(k, 'unset')}" for k in MALLOC)
    if os.environ.get(REEXEC_FLAG):
        env["malloc"] += " (set by the script: it re-executed itself)"
    env["date"] = datetime.datetime.now().isoformat(timespec="minutes")
    env["load"] = " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    env["host"] = platform.node()
    return env


if __name__ == "__main__":
    main()

"""``--adapters-python PATH``: time the adapters library's methods in its own environment.

adapters pins transformers 4.57, so it never runs in our environment: its Python runs
``adapters_peer.py`` on the same batch with the sizes our solver chose. The two processes do
not share rounds, so the comparison is of ratios to each side's own floor:
ours/theirs = (ours × our floor) / (theirs × their floor).
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path

import torch

from measure import paired_ratio

#: their contender -> ours
OURS = {"houlsby": "houlsby", "pfeiffer": "pfeiffer", "lora": "lora", "prefix_flat": "ptuning_v2"}


def run(args, base, built: dict, registry) -> str:
    from contenders import solved_config
    from peftbench.backbones.assets import resolve_source

    if base.task != "classification" or base.spec.model_type != "bert":
        return "## The adapters library\n\nNot run: the comparison script covers BERT classification backbones only."
    spec = base.spec
    sizes = {}
    for name in ("houlsby", "pfeiffer", "lora", "ptuning_v2"):
        cfg, _ = solved_config(registry.method(name), spec, args.budget)
        sizes[name] = cfg
    with tempfile.TemporaryDirectory() as tmp:
        batch_file = Path(tmp) / "batch.pt"
        torch.save({k: v.cpu() for k, v in built["floor"].batch.items()}, batch_file)
        random = args.backbone not in ("minilm",)  # random backbones travel as their config
        job = {
            "model": None if random else resolve_source(args.backbone),
            "config": base.config.to_dict() if random else None, "batch": str(batch_file), "num_labels": base.config.num_labels, "hidden": spec.hidden,
            "threads": args.threads, "warmup": args.warmup, "steps": args.steps,
            "houlsby_m": sizes["houlsby"].m or spec.hidden // 16, "pfeiffer_m": sizes["pfeiffer"].m or spec.hidden // 16,
            "lora_r": sizes["lora"].r, "lora_alpha": sizes["lora"].alpha, "prefix_n": sizes["ptuning_v2"].n,
        }
        job_file = Path(tmp) / "job.json"
        job_file.write_text(json.dumps(job))
        script = Path(__file__).with_name("adapters_peer.py")
        done = subprocess.run([args.adapters_python, str(script), str(job_file)], capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return "## The adapters library\n\nFailed: " + " / ".join(tail)
    return render(json.loads(lines[-1]), built, job)


def render(result: dict, built: dict, job: dict) -> str:
    times, params = result["times"], result["params"]
    v = result["versions"]
    rows = []
    for theirs, ours in OURS.items():
        their_x = paired_ratio(times[theirs], times["floor"])
        mine = built.get(ours)
        our_x = paired_ratio(mine.times, built["floor"].times) if mine is not None else None
        rows.append(f"| `{theirs}` | `{ours}` | {params[theirs]:,} | {'—' if mine is None else f'{mine.trainable:,}'} | "
                    f"{their_x:.2f}× | {'—' if our_x is None else f'{our_x:.2f}×'} | "
                    f"{'—' if our_x is None else f'{our_x / their_x:.2f}'} |")
    return "\n".join([
        "## The adapters library (its own environment)",
        "",
        f"adapters {v['adapters']}, transformers {v['transformers']}, torch {v['torch']}; same batch, same threads, "
        f"{job['steps']} measured rounds after {job['warmup']}; sizes from our solver (houlsby m={job['houlsby_m']}, "
        f"pfeiffer m={job['pfeiffer_m']}, LoRA r={job['lora_r']} on q,v, flat prefix n={job['prefix_n']}). "
        "Their Houlsby does not train the LayerNorms (ours does). ours/theirs compares ratios to each side's floor.",
        "",
        "| theirs | ours | their params | our params | theirs × their floor | ours × our floor | ours/theirs |",
        "|---|---|---|---|---|---|---|",
        *rows,
    ])

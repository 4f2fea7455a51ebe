"""Run by the adapters library's own Python (it pins transformers 4.57): time its methods.

    <adapters-python> benchmarks/adapters_peer.py SPEC.json  ->  one JSON line on stdout

SPEC names the model (a local folder, or the config of a random backbone), the batch file (torch.save of the
same batch step_time.py uses), threads, warm-up and measured steps, and the sizes step_time.py
solved for our methods. Contenders (floor, houlsby, pfeiffer, lora, flat prefix) are stepped
round-robin like step_time.py's; only the adapters library, torch and transformers are imported.
"""

from __future__ import annotations

import json
import sys
import time


def main(path: str) -> None:
    spec = json.load(open(path))
    import torch

    torch.set_num_threads(spec["threads"])
    torch.set_num_interop_threads(1)
    import adapters
    import transformers

    transformers.logging.set_verbosity_error()
    batch = torch.load(spec["batch"])

    def fresh():
        torch.manual_seed(0)
        if spec["config"] is not None:  # a random backbone (bert-base-shape, tiny-bert): same config
            config = transformers.BertConfig(**{k: v for k, v in spec["config"].items() if k != "transformers_version"})
            model = transformers.AutoModelForSequenceClassification.from_config(config, attn_implementation="sdpa")
        else:
            model = transformers.AutoModelForSequenceClassification.from_pretrained(
                spec["model"], num_labels=spec["num_labels"], attn_implementation="sdpa")
        return model

    d = spec["hidden"]
    # adapters sizes the bottleneck as d // reduction_factor: d / (m + 0.5) gives exactly m
    configs = {
        "houlsby": adapters.DoubleSeqBnConfig(reduction_factor=d / (spec["houlsby_m"] + 0.5)),
        "pfeiffer": adapters.SeqBnConfig(reduction_factor=d / (spec["pfeiffer_m"] + 0.5)),
        "lora": adapters.LoRAConfig(r=spec["lora_r"], alpha=spec["lora_alpha"], attn_matrices=["q", "v"]),
        "prefix_flat": adapters.PrefixTuningConfig(flat=True, prefix_length=spec["prefix_n"]),
    }
    models = {}
    floor = fresh()  # frozen; one scalar on the word-embedding output; the head trains
    for p in floor.parameters():
        p.requires_grad_(False)
    emb = floor.get_input_embeddings()
    emb.floor_scale = torch.nn.Parameter(torch.ones(()))
    emb.register_forward_hook(lambda m, a, out: out * m.floor_scale)
    models["floor"] = floor
    for name, config in configs.items():
        model = fresh()
        adapters.init(model)
        model.add_adapter(name, config=config)
        model.train_adapter(name)
        models[name] = model
    params = {}
    for name, model in models.items():
        for n, p in model.named_parameters():
            if n.startswith("classifier."):
                p.requires_grad_(True)  # every contender trains the task head, as in step_time.py
        params[name] = sum(p.numel() for n, p in model.named_parameters()
                           if p.requires_grad and not n.startswith("classifier."))
        model.train()
    optims = {n: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4, fused=True) for n, m in models.items()}
    times = {n: [] for n in models}
    names = list(models)
    for round_ in range(spec["warmup"] + spec["steps"]):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            t0 = time.perf_counter()
            optims[name].zero_grad(set_to_none=True)
            models[name](**batch).loss.backward()
            optims[name].step()
            if round_ >= spec["warmup"]:
                times[name].append(time.perf_counter() - t0)
    versions = {"adapters": adapters.__version__, "transformers": transformers.__version__, "torch": torch.__version__}
    print(json.dumps({"times": times, "params": params, "versions": versions}))


if __name__ == "__main__":
    main(sys.argv[1])

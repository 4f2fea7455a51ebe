"""A final trial that its search already trained: the selected search trial, evaluated on test.

A group's search trials are seeded like its first final seed and train under the final trials'
schedule, so the final trial of that seed at the selected values trains exactly what the selected
search trial trained (its pruner never fired: a pruned trial is never reused). Training it again
would only repeat the numbers; instead ``evaluate_reused`` loads the search trial's saved adapter
(and head) into a fresh, verified injection, reads test once, and copies the search trial's folder
(adapter, logs, TensorBoard events) into the final trial's; its tracker runs get the search trial's
curves and its own test metrics. Everything but the test metrics (validation, curves, steps, times,
memory, and the machine's load while they were taken) is the search trial's own measurement;
``environment.reused_search_trial`` names it.
The runner only reuses a search trial whose folder is local and holds its adapter; otherwise the
final trial trains as any other.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from peftbench.contract.injection import CONFIG_FILE, WEIGHTS_FILE
from peftbench.results.records import TrialRecord, TrialResult, TrialSpec
from peftbench.running.artifacts import is_remote
from peftbench.running.trackers import TrialTracking

ADAPTER = "adapter"
HEAD = "head."


def reusable(final: TrialSpec, search: TrialRecord | None) -> bool:
    """Whether ``search`` (the group's selected search trial) trained exactly what ``final`` would."""
    if search is None or search.status != "done" or search.result is None or search.result.pruned:
        return False
    s = search.spec
    same = (s.seed, s.lr, s.training, s.method_config, s.init_from) == \
        (final.seed, final.lr, final.training, final.method_config, final.init_from)
    folder = search.result.artifacts
    return same and bool(folder) and not is_remote(folder) and (Path(folder) / ADAPTER / WEIGHTS_FILE).is_file()


def evaluate_reused(spec: TrialSpec, search: TrialRecord, options, artifacts: str | None, registry) -> TrialResult:
    """``spec``'s result from ``search``'s trained adapter: test read once, the rest the search's."""
    from safetensors.torch import load_file

    from peftbench.running.costs import environment
    from peftbench.running.device import resolve_device, resolve_precision
    from peftbench.running.train import predict
    from peftbench.running.trial import _generation_eval, applied, load_trial_backbone, majority_scores
    from peftbench.tasks.data import encoded_data, raw_data, task_for
    from peftbench.tasks.metrics import compute_metrics

    cfg = spec.training
    device = resolve_device(options.device)
    precision = resolve_precision(cfg.precision, device)
    task = task_for(spec.task, registry)
    raw_data(task, spec.task, cfg)
    backbone = load_trial_backbone(spec.backbone, task, spec.seed, device, registry)
    data = encoded_data(task, spec.task, backbone, cfg)
    injection = applied(registry.method(spec.method), backbone, spec)
    source = Path(search.result.artifacts) / ADAPTER
    if json.loads((source / CONFIG_FILE).read_text()).get("finalized"):
        injection.finalize()  # saved in its finalized form (prefix tuning's MLP folded): load it as such
    state = load_file(str(source / WEIGHTS_FILE))
    injection.load_state_dict({k: v for k, v in state.items() if not k.startswith(HEAD)})
    backbone.load_head({k[len(HEAD):]: v for k, v in state.items() if k.startswith(HEAD)})
    backbone.model.to(device).eval()
    chance = {}
    if task.kind == "generation":
        test_metrics = _generation_eval(task, backbone, spec, device)(data["test"])
    else:
        predictions, labels = predict(backbone, data["test"], task, cfg, device, precision)
        test_metrics = compute_metrics(task, predictions, labels)
        chance = majority_scores(task, data["train"]["labels"], labels)
    if artifacts is not None:
        shutil.copytree(search.result.artifacts, artifacts, dirs_exist_ok=True)
    was = search.result
    with TrialTracking(spec, options, Path(artifacts) if artifacts is not None else None) as tracking:
        tracking.tag(reused_search_trial=search.trial_id)  # its own run: the search trial's curves, its test
        tracking.adopt_events(search.spec)
        tracking.log_curves(was.curves, spec.primary_metric)
        tracking.log_test(test_metrics, was.best_step or was.steps)
    return was.model_copy(update={
        "metrics": test_metrics, "chance": chance, "artifacts": artifacts,
        "examples": {**was.examples, "test": len(data["test"])},
        "environment": {**environment(device), **was.environment, "reused_search_trial": search.trial_id},
        "splits": {**was.splits, "validation": f"selects checkpoints and search values: "
                                               f"{task.origins.get('validation', '')}",
                   "test": f"read once, by this final trial: {task.origins.get('test', '')}"},
    })

"""Two-stage training (``init_from``): a trial that starts from a trained adapter.

The planner resolves a method entry's ``InitFrom`` for each of its trials (``resolve``): it finds the
source adapter as ``peftbench.load`` would (a suite folder plus selectors, a trial folder, an adapter
folder) and refuses, before anything trains, a source of another method, another config (so another
size: the trial keeps its budget and the solver's size), another backbone, or a head for another
number of labels. The trial records the source, its folder and its weights' sha256 (the sha256 and
``head`` enter the trial's id, the folder does not). When the trial runs (``start_from``), the fresh
injection is checked by instantiation as every trial's is, then the source's base-weight hash is
compared with this backbone's and the weights are loaded into the injection (and into the head when
``head`` is set); training then goes on from there under the trial's own schedule.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from peftbench.contract.injection import CONFIG_FILE, WEIGHTS_FILE
from peftbench.errors import ConfigError

HEAD = "head."


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def resolve(init, trial, num_labels: int, registry) -> dict:
    """``init`` (a config ``InitFrom``) for ``trial`` (its ``TrialSpec``, size solved; its task has
    ``num_labels``): the record the trial carries, or a one-line ``ConfigError`` naming what does not fit."""
    from peftbench.running.suite_dir import STORE_FILE
    from peftbench.using.locate import locate
    from peftbench.using.meta import adapter_meta

    where = f"method {trial.display}: init_from {init.path}"
    path = Path(init.path).expanduser()
    method = registry.canonical(init.method) if init.method else trial.method
    try:
        if (path / STORE_FILE).is_file():
            found = locate(path, method, budget=init.budget or trial.budget,
                           seed=trial.seed if init.seed is None else init.seed, task=init.task,
                           backbone=init.backbone, variant=init.variant, registry=registry)
        else:
            found = locate(path, registry=registry)
        if found.export:
            raise ConfigError("an exported folder: init_from takes a suite, trial or adapter folder")
        meta = adapter_meta(found.path)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    source = (f"trial {found.trial_id} ({found.spec.label})" if found.spec is not None else str(found.path))
    if meta["method"] != trial.method:
        raise ConfigError(f"{where}: {source} is a {meta['method']!r} adapter; this trial trains {trial.method!r}")
    if meta["backbone"] != trial.backbone:
        raise ConfigError(f"{where}: {source} was trained on backbone {meta['backbone']!r}; this trial's is "
                          f"{trial.backbone!r}")
    # both through the method's config class: fields left out of a stored config mean their defaults
    make = registry.method(trial.method).config
    ours, theirs = (make(c).model_dump(mode="json") for c in (trial.method_config, meta["config"]))
    differ = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
    if differ:
        shown = "; ".join(f"{k}: source {theirs.get(k)!r}, this trial {ours.get(k)!r}" for k in differ[:4])
        raise ConfigError(f"{where}: {source} has another config than this trial's ({shown}); train the source at "
                          f"the same budget and config, so both have one size")
    if init.head:
        theirs = meta.get("num_labels")
        if theirs is None:
            raise ConfigError(f"{where}: head: true needs a source that records its labels (format 1); {source} "
                              f"does not")
        labels = meta.get("labels") or []
        if theirs != num_labels:
            raise ConfigError(f"{where}: head: true, but {source}'s head has {theirs} labels {labels}; this task "
                              f"has {num_labels}")
    return {"source": source, "path": str(found.path.resolve()), "weights_sha256": _sha256(found.path / WEIGHTS_FILE),
            "backbone_sha256": meta.get("backbone_sha256"), "task_head": init.head}


def start_from(injection, backbone, trial, base_sha256: str | None) -> None:
    """Load the trial's ``init_from`` adapter into its fresh ``injection`` (and head, if asked);
    ``base_sha256``: this backbone's weights hash, taken before the method was applied."""
    from safetensors.torch import load_file

    init = trial.init_from
    folder = Path(init["path"])
    where = f"init_from {init['source']}"
    weights = folder / WEIGHTS_FILE
    if not weights.is_file() or not (folder / CONFIG_FILE).is_file():
        raise ConfigError(f"{where}: {folder} no longer holds an adapter ({CONFIG_FILE}, {WEIGHTS_FILE})")
    if _sha256(weights) != init["weights_sha256"]:
        raise ConfigError(f"{where}: {weights} changed since the trial was planned (its sha256 differs): rerun "
                          f"the command to plan against the new weights")
    if init.get("backbone_sha256") and base_sha256 and init["backbone_sha256"] != base_sha256:
        raise ConfigError(f"{where} was trained on other base weights than {trial.backbone!r} has here "
                          f"(weights hash {init['backbone_sha256'][:19]}...)")
    state = load_file(str(weights))
    head = {k[len(HEAD):]: v for k, v in state.items() if k.startswith(HEAD)}
    try:
        injection.load_state_dict({k: v for k, v in state.items() if not k.startswith(HEAD)})
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc} (an adapter saved after finalize(), such as prefix tuning's with its MLP "
                          f"folded away, cannot start a trial that trains the unfolded form)") from None
    if init["task_head"]:
        backbone.load_head(head)

"""Which saved adapter a user means: a suite folder plus method/budget/seed (and, where the suite has
several, task/backbone/variant), a trial folder, its ``adapter`` folder, or an exported folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from peftbench.budget import parse_budget
from peftbench.contract.injection import CONFIG_FILE, WEIGHTS_FILE
from peftbench.errors import ConfigError
from peftbench.results.records import TrialSpec
from peftbench.running.artifacts import is_remote
from peftbench.running.suite_dir import STORE_FILE

#: what an exported folder carries beside the checkpoint: peftbench's record of what it is
EXPORT_META = "peftbench.json"
TRIALS = "trials"
ADAPTER = "adapter"


@dataclass
class Located:
    """An adapter folder (a trial's) with its spec when a suite's store knows it, or an export."""

    path: Path
    export: bool = False
    spec: TrialSpec | None = None
    trial_id: str | None = None


def _same_budget(a: str | None, b: str) -> bool:
    if a is None:
        return False
    return parse_budget(a).key == parse_budget(b).key


def _records(suite: Path):
    from peftbench.results.store import Store

    with Store(suite / STORE_FILE, create=False) as store:
        return store.records()


def _narrow(found: list, name: str, value, key, what: str, flag: str) -> list:
    """Keep the trials whose ``key(spec)`` is ``value``; None: require that only one value is left."""
    if value is not None:
        kept = [r for r in found if key(r.spec) == value or (name == "budget" and _same_budget(r.spec.budget, value))]
        if not kept:
            have = sorted({str(key(r.spec)) for r in found})
            raise ConfigError(f"no finished trial of {what} has {name} {value!r}; it has: {', '.join(have)}")
        return kept
    values = sorted({str(key(r.spec)) for r in found})
    if len(values) > 1:
        raise ConfigError(f"the suite has {what} at {len(values)} {name}s ({', '.join(values)}): choose one "
                          f"with {flag}")
    return found


def find_trial(suite: Path, method: str, *, budget: str | None = None, seed: int = 0, task: str | None = None,
               backbone: str | None = None, variant: str | None = None, registry=None):
    """The finished final trial of ``method`` in the suite folder (one, or a one-line error)."""
    if registry is not None:
        method = registry.canonical(method)
    records = [r for r in _records(suite) if r.spec.role == "final"]
    if not records:
        raise ConfigError(f"{suite} holds no trials yet")
    mine = [r for r in records if r.spec.method == method]
    if not mine:
        raise ConfigError(f"{suite} has no trial of method {method!r}; it has: "
                          f"{', '.join(sorted({r.spec.method for r in records}))}")
    done = [r for r in mine if r.done]
    if not done:
        states = ", ".join(sorted({r.status for r in mine}))
        raise ConfigError(f"method {method!r} has no finished trial in {suite} (its trials are: {states})")
    what = f"method {method!r}"
    found = _narrow(done, "task", task, lambda s: s.task.name, what, "--task")
    found = _narrow(found, "backbone", backbone, lambda s: s.backbone, what, "--backbone")
    found = _narrow(found, "budget", budget, lambda s: s.budget, what, "--budget")
    found = _narrow(found, "variant", variant, lambda s: s.variant, what, "--variant")
    found = _narrow(found, "seed", seed, lambda s: s.seed, what, "--seed")
    return found[0]


def trial_adapter(suite: Path, record) -> Path:
    """The trial's ``adapter`` folder (an error saying why when it kept none)."""
    spec = record.spec
    label = f"trial {record.trial_id} ({spec.label})"
    artifacts = record.result.artifacts if record.result else None
    if artifacts and is_remote(artifacts):
        raise ConfigError(f"{label} keeps its artifacts at {artifacts}: copy that folder here and pass it instead")
    for folder in ([Path(artifacts)] if artifacts else []) + [suite / TRIALS / record.trial_id]:
        if (folder / ADAPTER / WEIGHTS_FILE).is_file():
            return folder / ADAPTER
    raise ConfigError(f"{label} saved no adapter weights (looked in {artifacts or suite / TRIALS / record.trial_id}); "
                      f"it ran without saving weights, or its folder was removed")


def _spec_of_adapter(adapter: Path):
    """(spec, trial_id) of a trial's adapter folder inside a suite folder, else (None, None)."""
    trial = adapter.parent
    suite = trial.parent.parent
    if trial.parent.name != TRIALS or not (suite / STORE_FILE).is_file():
        return None, None
    for record in _records(suite):
        if record.trial_id == trial.name:
            return record.spec, record.trial_id
    return None, None


def locate(path: str | Path, method: str | None = None, *, budget: str | None = None, seed: int = 0,
           task: str | None = None, backbone: str | None = None, variant: str | None = None,
           registry=None) -> Located:
    """Resolve ``path`` (and, for a suite folder, the trial's selectors) to what ``load`` reads."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ConfigError(f"{path} does not exist")
    if (path / STORE_FILE).is_file():
        if not method:
            raise ConfigError(f"{path} is a suite folder: name the trial's method (--method M, load(..., method=M))")
        record = find_trial(path, method, budget=budget, seed=seed, task=task, backbone=backbone, variant=variant,
                            registry=registry)
        return Located(trial_adapter(path, record), spec=record.spec, trial_id=record.trial_id)
    if method or budget:
        raise ConfigError(f"method and budget select a trial in a suite folder; {path} holds no {STORE_FILE}")
    if (path / EXPORT_META).is_file():
        return Located(path, export=True)
    if (path / ADAPTER / CONFIG_FILE).is_file():
        path = path / ADAPTER
    if (path / CONFIG_FILE).is_file() and (path / WEIGHTS_FILE).is_file():
        spec, trial_id = _spec_of_adapter(path)
        return Located(path, spec=spec, trial_id=trial_id)
    raise ConfigError(f"{path} is neither a suite folder ({STORE_FILE}), a trial folder ({ADAPTER}/{CONFIG_FILE}), "
                      f"an adapter folder ({CONFIG_FILE} + {WEIGHTS_FILE}) nor an exported folder ({EXPORT_META})")

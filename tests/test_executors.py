"""Executors: the grid on a local Ray instance gives the local executor's rows; failures, crashed
workers and reruns behave as with ``local``; artifacts go to any fsspec URL; run options never
change trial ids.

Ray tests need Ray (``pip install -e ".[test,ray]"``, as the README's test command and CI do): without it they fail.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from peftbench.errors import ConfigError
from peftbench.running.plan import make_plan
from peftbench.running.runner import main_run, resolve_suite
from test_runner import BROKEN_PLUGIN, base_args, env, parse, rows, run  # noqa: F401 - env is a fixture

CRASH_PLUGIN = '''
import os
import peftbench

class Crash(peftbench.Method):
    name = "crash"
    knob = None
    budgeted = False
    inserts = "nothing: its process exits while injecting (a test plugin)"

    def param_count(self, cfg, spec):
        return 0

    def inject(self, backbone, cfg):
        os._exit(3)

@peftbench.hookimpl
def register_methods(register):
    register(Crash)
'''

#: what a trial computes (timings and paths differ between executors; these must not)
COMPUTED = ("metrics", "val_metrics", "best_step", "curves", "steps", "stored_bytes")


@pytest.fixture(scope="module")
def ray_local():
    try:
        import ray
    except ImportError as exc:  # the test command installs the extra: a missing Ray is a broken set-up, not a skip
        pytest.fail(f"Ray is not installed ({exc}); the tests need it: pip install -e \".[test,ray]\"")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


def _computed(out: Path, suite: str) -> dict:
    found = {}
    for r in rows(out, suite):  # the whole spec (config, lr, sizes) and what the trial computed
        found[r.trial_id] = {"status": r.status, "spec": r.spec.model_copy(update={"suite": ""}),
                             **{k: getattr(r.result, k) for k in COMPUTED}}
    return found


def test_ray_gives_the_local_rows_and_a_rerun_skips(env, ray_local, tmp_path, capsys):
    out = tmp_path / "reports"
    grid = ("--methods", "lora,head", "--budget", "5%", "--seeds", "1")
    assert run(base_args(env, out, *grid, "--suite", "local")) == 0
    assert run(base_args(env, out, *grid, "--suite", "ray", "--executor", "ray", "--cpus-per-trial", "1")) == 0
    local, distributed = _computed(out, "local"), _computed(out, "ray")
    assert len(local) == 2 and set(local) == set(distributed)  # same trial ids: the executor is a run option
    assert all(r["status"] == "done" for r in local.values())
    assert distributed == local  # same seeds, same threads: the same numbers
    suites = [json.loads((out / s / "suite.json").read_text()) for s in ("local", "ray")]
    assert suites[0]["hash"] == suites[1]["hash"]
    for r in rows(out, "ray"):  # the driver wrote each worker's artifacts path; the worker wrote the files
        assert Path(r.result.artifacts).is_absolute()
        assert (Path(r.result.artifacts) / "adapter" / "adapter_model.safetensors").is_file()
    assert "head" in (out / "ray" / "report.md").read_text()
    capsys.readouterr()

    before = {r.trial_id: r.finished_at for r in rows(out, "ray")}
    assert run(base_args(env, out, *grid, "--suite", "ray", "--executor", "ray")) == 0
    assert "2 skipped" in capsys.readouterr().out
    assert {r.trial_id: r.finished_at for r in rows(out, "ray")} == before


def test_ray_records_a_raising_trial_and_a_dead_worker_as_failed(env, ray_local, tmp_path):
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "broken.py").write_text(BROKEN_PLUGIN)
    (plugins / "crash.py").write_text(CRASH_PLUGIN)
    out = tmp_path / "reports"
    args = parse(base_args(env, out, "--methods", "broken,crash,head", "--seeds", "1", "--suite", "bad",
                           "--executor", "ray"))
    args.plugins_dir = str(plugins)  # the workers load the same folder
    assert main_run(args) == 1
    found = {r.spec.method: r for r in rows(out, "bad")}
    assert found["head"].status == "done", found["head"].error
    assert found["broken"].status == "failed" and "RuntimeError: boom" in found["broken"].error
    assert "boom" in (Path(found["broken"].result.artifacts) / "error.txt").read_text()
    crash = found["crash"]
    assert crash.status == "failed" and crash.error.startswith("ray: WorkerCrashedError"), crash.error
    assert "WorkerCrashedError" in (Path(crash.result.artifacts) / "error.txt").read_text()
    report = (out / "bad" / "report.md").read_text()
    assert "WorkerCrashedError" in report and "boom" in report


def test_ray_missing_is_a_clear_error_and_nothing_is_written(env, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails as if it were not installed
    out = tmp_path / "reports"
    with pytest.raises(ConfigError, match=r'--executor ray needs Ray.*pip install "peftbench\[ray\]"'):
        run(base_args(env, out, "--methods", "head", "--seeds", "1", "--executor", "ray"))
    assert not out.exists()


def test_artifacts_go_to_an_fsspec_url(env, tmp_path):
    import fsspec

    out = tmp_path / "reports"
    assert run(base_args(env, out, "--methods", "head", "--seeds", "1", "--suite", "url",
                         "--artifacts-dir", "memory://peftbench-test/arts")) == 0
    (row,) = rows(out, "url")
    assert row.status == "done" and row.result.artifacts == f"memory://peftbench-test/arts/{row.trial_id}"
    fs = fsspec.filesystem("memory")
    files = {p.rsplit("/", 1)[-1] for p in fs.find(f"/peftbench-test/arts/{row.trial_id}")}
    assert {"adapter_model.safetensors", "curves.json", "log.jsonl"} <= files
    assert not (out / "url" / "trials").exists()
    missing = "gcsfs"  # a filesystem package that is not installed gives a clear error
    try:
        __import__(missing)
    except ImportError:
        with pytest.raises(ConfigError, match=r"--artifacts-dir gs://b/x.*gcsfs"):
            run(base_args(env, out, "--methods", "head", "--seeds", "1", "--suite", "gs", "--artifacts-dir", "gs://b/x"))
        assert not (out / "gs").exists()


def test_executor_options_are_checked_and_never_change_trial_ids(env, registry):
    plain = make_plan(resolve_suite(parse(base_args(env, env["root"], "--methods", "lora,head", "--budget", "5%")),
                                    registry), registry)
    options = ("--executor", "ray", "--ray-address", "auto", "--gpus-per-trial", "0.5", "--cpus-per-trial", "2",
               "--artifacts-dir", "s3://bucket/runs")
    suite = resolve_suite(parse(base_args(env, env["root"], "--methods", "lora,head", "--budget", "5%", *options)),
                          registry)
    assert (suite.ray.address, suite.ray.gpus_per_trial, suite.ray.cpus_per_trial) == ("auto", 0.5, 2)
    assert suite.hash() == plain.suite.hash()
    assert [t.trial_id for t in make_plan(suite, registry).trials] == [t.trial_id for t in plain.trials]
    with pytest.raises(ConfigError, match=r"Ray address 'nowhere' is not one of auto, ray://HOST:PORT"):
        resolve_suite(parse(base_args(env, env["root"], "--executor", "ray", "--ray-address", "nowhere")), registry)
    with pytest.raises(ConfigError, match=r"--ray-address, --cpus-per-trial apply to --executor ray"):
        run(base_args(env, env["root"] / "none", "--ray-address", "auto", "--cpus-per-trial", "2"))
    with pytest.raises(ConfigError, match=r"--device cuda:1 with --executor ray: Ray assigns"):
        run(base_args(env, env["root"] / "none", "--executor", "ray", "--device", "cuda:1"))
    with pytest.raises(ConfigError, match=r"cpus_per_trial"):
        resolve_suite(parse(base_args(env, env["root"], "--executor", "ray", "--cpus-per-trial", "0")), registry)
    assert not (env["root"] / "none").exists()

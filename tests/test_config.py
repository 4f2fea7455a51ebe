"""Suite configs: validation with field paths, include:, command-line overrides, defaults."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from peftbench.errors import ConfigError
from peftbench.running.config import SuiteConfig, build_suite, default_methods, read_yaml
from peftbench.running.plan import declared_lrs, make_plan
from peftbench.running.runner import add_run_arguments, resolve_suite

ROOT = Path(__file__).resolve().parents[1]


def args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_run_arguments(parser)
    return parser.parse_args(list(argv))


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, field", [
    ("training:\n  epocs: 2\n", "training.epocs"),
    ("methods:\n  - lora\n  - {name: houlsby, confg: {m: 3}}\n", "methods.1.confg"),
    ("tasks:\n  - {name: 'file:x.csv', text_column: t}\n", "tasks.0.text_column"),
    ("budget: 3%\n", "budget"),
    ("budgets: ['3']\n", "budgets"),
    ("training:\n  device: gpu\n", "training.device"),
    ("seeds: 0\n", "seeds"),
    ("training:\n  lr: {lora: -1}\n", "training.lr"),
])
def test_bad_field_is_named_with_its_path_and_file(tmp_path, text, field):
    path = write(tmp_path / "suite.yaml", text)
    with pytest.raises(ConfigError) as err:
        build_suite(path)
    message = str(err.value)
    assert f"field '{field}'" in message
    assert str(path) in message


def test_include_merges_relative_files_later_wins(tmp_path):
    write(tmp_path / "common" / "base.yaml",
          "budgets: ['1%', '3%']\ntraining:\n  epochs: 2\n  batch_size: 8\n  lr: {lora: 0.001}\n")
    write(tmp_path / "common" / "fast.yaml", "include: base.yaml\ntraining:\n  batch_size: 4\n  max_steps: 7\n")
    suite = write(tmp_path / "suites" / "mine.yaml",
                  "include: [../common/fast.yaml]\nbudgets: ['0.5%']\ntraining:\n  lr: {houlsby: 0.002}\n  max_steps: 9\n")
    cfg = build_suite(suite)
    assert cfg.budgets == ["0.5%"]  # lists are replaced, not concatenated
    assert cfg.training.epochs == 2  # from base, two includes down
    assert cfg.training.batch_size == 4  # fast overrides base
    assert cfg.training.max_steps == 9  # the including file wins
    assert cfg.training.lr == {"lora": 0.001, "houlsby": 0.002}  # mappings merge key by key


def test_include_cycle_and_missing_file_are_errors(tmp_path):
    write(tmp_path / "a.yaml", "include: b.yaml\n")
    write(tmp_path / "b.yaml", "include: a.yaml\n")
    with pytest.raises(ConfigError, match="includes itself"):
        read_yaml(tmp_path / "a.yaml")
    write(tmp_path / "c.yaml", "include: nowhere.yaml\n")
    with pytest.raises(ConfigError, match=r"nowhere\.yaml.*does not exist.*included from"):
        read_yaml(tmp_path / "c.yaml")


def test_command_line_overrides_yaml_and_keeps_method_details(tmp_path, registry):
    path = write(tmp_path / "s.yaml",
                 "methods:\n  - {name: lora, config: {alpha: 4}, lr: 0.002}\n  - houlsby\n"
                 "budgets: ['1%']\nseeds: 5\ntraining:\n  epochs: 3\n  lr: {houlsby: 0.01}\n")
    cfg = resolve_suite(args("--config", str(path), "--methods", "lora,adapter", "--budget", "3%",
                             "--budget", "0.5%,2%", "--seeds", "2", "--max-steps", "11", "--lr", "adapter=5e-3"), registry)
    assert [m.name for m in cfg.methods] == ["lora", "houlsby"]  # alias resolved
    assert cfg.methods[0].config == {"alpha": 4} and cfg.methods[0].lr == 0.002  # YAML details kept
    assert cfg.budgets == ["3%", "0.5%", "2%"]
    assert cfg.seed_list() == [0, 1]
    assert cfg.training.epochs == 3 and cfg.training.max_steps == 11
    assert cfg.training.lr["houlsby"] == 5e-3  # --lr adapter=... is houlsby's, and the flag beats the YAML
    assert cfg.training.lr["pfeiffer"] == declared_lrs(registry)["pfeiffer"] == 1e-2  # the method's declared rate stays


def test_lr_flag_must_be_method_equals_value(registry):
    with pytest.raises(ConfigError, match="METHOD=VALUE"):
        resolve_suite(args("--lr", "lora"), registry)
    with pytest.raises(ConfigError, match="METHOD=VALUE"):
        resolve_suite(args("--lr", "lora=fast"), registry)


def test_unknown_method_and_duplicates_name_the_entry(registry):
    with pytest.raises(ConfigError, match=r"methods\.1.*unknown method 'lorra'.*did you mean 'lora'"):
        resolve_suite(args("--methods", "head,lorra"), registry)
    suite = resolve_suite(args("--methods", "houlsby,adapter,lora,lora", "--budget", "1%,3 %,1.0%,3%"), registry)
    assert [e.name for e in suite.methods] == ["houlsby", "lora"] and suite.budgets == ["1%", "3%"]
    assert suite._notes == ["method 'houlsby' is listed twice ('adapter' is 'houlsby'); it runs once",
                            "method 'lora' is listed twice; it runs once",
                            "budget 1% is listed twice; it runs once", "budget 3% is listed twice; it runs once"]
    assert suite.hash() == resolve_suite(args("--methods", "houlsby,lora", "--budget", "1%,3%"), registry).hash()


def test_hash_ignores_how_a_suite_runs_but_not_what_it_computes():
    base = SuiteConfig()
    assert SuiteConfig(out="elsewhere", training={"device": "cpu", "threads": 1}).hash() == base.hash()
    assert SuiteConfig(training={"epochs": 2}).hash() != base.hash()
    assert SuiteConfig(seeds=4).hash() != base.hash()


def test_default_yaml_is_the_built_in_default(registry):
    from_yaml = resolve_suite(args("--config", str(ROOT / "configs" / "default.yaml")), registry)
    from_flags = resolve_suite(args(), registry)
    assert from_yaml.hash() == from_flags.hash()
    assert from_flags.suite == from_yaml.suite == "default"
    names = [m.name for m in from_flags.methods]
    assert {"full", "head"} <= set(names) and "topk" not in names
    assert names == default_methods(registry) and names[:2] == ["full", "head"]
    # the default suite is the one that wrote the committed example: the redesign kept its identity
    assert from_flags.hash() == json.loads((ROOT / "reports" / "example" / "suite.json").read_text())["hash"]
    assert from_flags.tasks[0].name == "movie_sentiment" and from_flags.backbones == ["minilm"]
    assert from_flags.budgets == ["0.1%"] and from_flags.seed_list() == [0, 1, 2]


def test_example_suite_with_include_resolves(registry):
    """configs/example.yaml includes default.yaml and changes only the grid's axes."""
    cfg = resolve_suite(args("--config", str(ROOT / "configs" / "example.yaml")), registry)
    default = resolve_suite(args(), registry)
    assert cfg.training == default.training  # inherited through include:
    assert cfg.suite == "budgets" and cfg.budgets == ["0.5%", "1%", "3%"]
    assert [m.name for m in cfg.methods] == ["full", "head", "houlsby", "lora", "prefix"]


def test_knob_in_method_config_pins_the_size(registry, tmp_path):
    from run_helpers import make_sentiment_csv

    csv = make_sentiment_csv(tmp_path / "d.csv", rows=40)
    suite = SuiteConfig(tasks=[{"name": f"file:{csv}", "text_columns": ["review"], "label_column": "sentiment"}],
                        backbones=["minilm"], methods=[{"name": "lora", "config": {"r": 8}}], budgets=["1%"])
    (trial,) = make_plan(suite, registry).trials[:1]
    assert trial.pinned and trial.method_config["r"] == 8 and trial.knob_value == 8  # the user's size, kept
    assert not trial.matched and trial.target_params == 227_132 and "-67.5%" in trial.note  # 73,728 vs 227,132


def test_precision_needs_cuda_and_device_names_are_checked():
    import torch

    from peftbench.running.device import resolve_device, resolve_precision

    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == "fp32"
    for precision in ("bf16", "fp16"):
        with pytest.raises(ConfigError, match=f"precision '{precision}' needs a CUDA device"):
            resolve_precision(precision, cpu)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="sees no CUDA device"):
            resolve_device("cuda:0")
    with pytest.raises(ConfigError, match=r"field 'training.device'.*cuda:N"):
        build_suite(overrides={"training": {"device": "gpu"}})


def test_preset_and_step_cap(registry):
    from peftbench.results.records import TrainingSpec
    from peftbench.running.train import plan_steps

    cfg = resolve_suite(args("--preset", "converged", "--eval-every", "20"), registry)
    assert (cfg.training.epochs, cfg.training.step_cap, cfg.training.patience) == (20, 3000, 5)
    assert cfg.training.eval_every == 20  # a flag beats the preset
    assert cfg.hash() != resolve_suite(args(), registry).hash()
    with pytest.raises(ConfigError, match="'fast' is not a schedule preset; allowed: converged"):
        resolve_suite(args("--preset", "fast"), registry)
    assert plan_steps(800, TrainingSpec(epochs=20, step_cap=300)) == 300  # 20 epochs of 50 steps, capped
    assert plan_steps(800, TrainingSpec(epochs=2, step_cap=300)) == 100  # the cap does not lengthen
    assert plan_steps(800, TrainingSpec(max_steps=7, step_cap=3)) == 7  # max_steps is exact


def test_a_method_twice_needs_two_configs(registry):
    suite = SuiteConfig(methods=[{"name": "prefix"}, {"name": "prefix", "config": {"reparameterize": False}}])
    assert [(e.name, e.config) for e in suite.method_entries(registry)] == [
        ("prefix", {}), ("prefix", {"reparameterize": False})]
    notes = []
    same = SuiteConfig(methods=[{"name": "prefix", "config": {"n": 3}}, {"name": "prefix-tuning", "config": {"n": 3}}])
    assert [(e.name, e.config) for e in same.method_entries(registry, notes)] == [("prefix", {"n": 3})]
    assert notes == ["method 'prefix' is listed twice ('prefix-tuning' is 'prefix'); it runs once"]
    with pytest.raises(ConfigError, match=r"methods\.1.*'prefix' is listed twice with the same config but with "
                                          r"learning rates 0.01 and 0.001"):
        SuiteConfig(methods=[{"name": "prefix", "config": {"n": 3}, "lr": 1e-2},
                             {"name": "prefix", "config": {"n": 3}, "lr": 1e-3}]).method_entries(registry)


def test_a_method_twice_gets_two_variants_in_the_plan(registry, tmp_path):
    from run_helpers import make_sentiment_csv

    csv = make_sentiment_csv(tmp_path / "d.csv", rows=40)
    suite = SuiteConfig(tasks=[{"name": f"file:{csv}", "text_columns": ["review"], "label_column": "sentiment"}],
                        backbones=["minilm"], budgets=["1%"], seeds=1,
                        methods=["lora", "prefix", {"name": "prefix", "config": {"reparameterize": False}}])
    by = {t.display: t for t in make_plan(suite, registry).trials}
    assert set(by) == {"lora", "prefix (defaults)", "prefix (reparameterize=False)"}
    assert by["prefix (defaults)"].method_config["hidden"] == 43 and by["prefix (defaults)"].knob_value == 20
    assert by["prefix (reparameterize=False)"].knob_value == 49  # L·2·n·kv_dim = 4,608 n: n=49 at 1%
    assert by["lora"].variant == "" and len({t.trial_id for t in by.values()}) == 3

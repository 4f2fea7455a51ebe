"""Plugin system: discovery, third-party plugins, blocking, duplicates, culprits named."""

from __future__ import annotations

import inspect
import json
import textwrap
from pathlib import Path

import pytest

import peftbench
from peftbench.contract import hookspecs
from peftbench.cli import main
from peftbench.contract.registry import get_registry

README = Path(__file__).resolve().parents[1] / "README.md"

THIRD_PARTY = '''
import peftbench
from torch import nn


class RowsConfig(peftbench.MethodConfig):
    n: int = 1


class Rows(peftbench.Method):
    """A toy method: n trainable rows hung on the embeddings (no effect on outputs)."""

    name = "{name}"
    knob = "n"
    inserts = "n rows of width d on the embeddings (test plugin)"
    Config = RowsConfig

    def knob_range(self, cfg, spec):
        return 1, 1000

    def param_count(self, cfg, spec):
        return cfg.n * spec.hidden {extra}

    def inject(self, backbone, cfg):
        injection = peftbench.Injection(backbone, self, cfg)
        module = nn.Module()
        module.rows = nn.Parameter(nn.init.normal_(backbone.embeddings().weight.new_empty(cfg.n, backbone.spec.hidden)))
        injection.attach(backbone.embeddings(), "rows", module)
        return injection


@peftbench.hookimpl
def register_methods(register):
    register(Rows, aliases=("{alias}",))
'''


def write_plugin(directory: Path, filename: str, name="rows", alias="row-method", extra="") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / filename
    path.write_text(THIRD_PARTY.format(name=name, alias=alias, extra=extra))
    return path


def test_every_hookspec_is_documented_in_readme_with_its_signature():
    text = README.read_text()
    specs = [f for name, f in inspect.getmembers(hookspecs, inspect.isfunction) if hasattr(f, "peftbench_spec")]
    assert {f.__name__ for f in specs} == {
        "register_methods", "register_architectures", "register_tasks", "resolve_layout", "report_sections"
    }
    for f in specs:
        signature = f"{f.__name__}({', '.join(inspect.signature(f).parameters)})"
        assert signature in text, f"README does not document {signature}"


def test_builtins_come_through_the_entry_point_group():
    reg = get_registry(fresh=True)
    dists = {reg.pm.get_name(p): d.project_name for p, d in reg.pm.list_plugin_distinfo()}
    for plugin in ("architectures", "baselines"):
        assert dists.get(plugin) == "peftbench"
    assert reg.methods["full"].plugin == "baselines"
    assert {"bert", "roberta", "distilbert", "gpt2", "llama"} <= set(reg.architectures)


def test_third_party_plugin_shows_up_in_methods(tmp_path, capsys):
    write_plugin(tmp_path / "plugs", "rows_plugin.py")
    assert main(["--plugins-dir", str(tmp_path / "plugs"), "methods", "--json"]) == 0
    items = {i["name"]: i for i in json.loads(capsys.readouterr().out)}
    assert items["rows"]["plugin"] == "rows_plugin"
    assert items["rows"]["knob"] == "n"
    assert "row-method" in items["rows"]["aliases"]
    assert main(["--plugins-dir", str(tmp_path / "plugs"), "methods"]) == 0
    assert "rows_plugin" in capsys.readouterr().out


def test_blocking_by_environment(monkeypatch):
    monkeypatch.setenv("PEFTBENCH_DISABLE_PLUGINS", "baselines, architectures")
    reg = get_registry(fresh=True)
    try:
        assert "full" not in reg.methods
        assert not reg.architectures
        assert "baselines" not in reg.plugin_names()
    finally:
        monkeypatch.delenv("PEFTBENCH_DISABLE_PLUGINS")
        get_registry(fresh=True)


def test_duplicate_method_names_fail_naming_both_plugins(tmp_path):
    write_plugin(tmp_path, "dup_plugin.py", name="full", alias="whatever")
    with pytest.raises(peftbench.PluginError) as err:
        get_registry(plugins_dir=tmp_path)
    assert "'baselines'" in str(err.value) and "'dup_plugin'" in str(err.value) and "'full'" in str(err.value)


def test_duplicate_alias_fails(tmp_path):
    write_plugin(tmp_path, "alias_plugin.py", name="fresh", alias="finetune")
    with pytest.raises(peftbench.PluginError, match="'finetune' is registered twice"):
        get_registry(plugins_dir=tmp_path)


def test_plugin_raising_during_registration_is_named(tmp_path):
    (tmp_path / "broken.py").write_text(textwrap.dedent('''
        import peftbench

        @peftbench.hookimpl
        def register_methods(register):
            raise RuntimeError("boom")
    '''))
    with pytest.raises(peftbench.PluginError, match="plugin 'broken' raised during register_methods: RuntimeError: boom"):
        get_registry(plugins_dir=tmp_path)


def test_plugin_failing_to_import_is_named(tmp_path):
    (tmp_path / "bad_import.py").write_text("import no_such_module_xyz\n")
    with pytest.raises(peftbench.PluginError, match="plugin 'bad_import'.*failed to import"):
        get_registry(plugins_dir=tmp_path)


def test_plugin_with_unknown_hook_fails_check_pending(tmp_path):
    (tmp_path / "typo.py").write_text(textwrap.dedent('''
        import peftbench

        @peftbench.hookimpl
        def register_method(register):  # typo: not a hook
            pass
    '''))
    with pytest.raises(Exception, match="register_method"):
        get_registry(plugins_dir=tmp_path)


def test_wrong_param_count_is_caught_by_verify_and_solve(tmp_path, capsys):
    write_plugin(tmp_path, "liar.py", name="liar", alias="liar-alias", extra="+ 1")
    reg = get_registry(plugins_dir=tmp_path)
    from conftest import tiny_backbone

    backbone = tiny_backbone("bert")
    method = reg.method("liar")
    with pytest.raises(peftbench.VerificationError, match=r"method 'liar' \(n=2\): param_count says 65 but inject made 64"):
        peftbench.apply(method, backbone, method.config(n=2))
    assert backbone.count_trainable() == 0 and not hasattr(backbone.embeddings(), "peftbench_rows")  # removed
    code = main(["--plugins-dir", str(tmp_path), "solve", "--backbone", "minilm", "--methods", "liar", "--budget", "100k"])
    assert code == 1
    assert "NO (measured" in capsys.readouterr().out


def test_unknown_method_did_you_mean():
    reg = get_registry()
    with pytest.raises(peftbench.ConfigError, match="unknown method 'ful'.*did you mean 'full'"):
        reg.method("ful")
    assert reg.canonical("FULL-FT") == "full"


def test_resolve_layout_hook_answers_for_unknown_models(monkeypatch):
    from transformers import BertConfig

    layout = get_registry().architectures["bert"].obj

    class Resolver:
        @peftbench.hookimpl
        def resolve_layout(self, config):
            if config.model_type == "my-bert":
                return layout
            return None

    class Silent:
        @peftbench.hookimpl
        def resolve_layout(self, config):
            return None

    reg = get_registry(extra=[Resolver()])
    config = BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16, vocab_size=20)
    config.model_type = "my-bert"
    assert reg.layout_for(config) is layout  # a plugin's resolver answers before the built-in inference
    inferred = get_registry().layout_for(config)  # no resolver: inferred from its (BERT) module names
    assert inferred.model_type == "my-bert" and dict(inferred.sites) == dict(layout.sites)
    monkeypatch.setenv("PEFTBENCH_DISABLE_PLUGINS", "architectures")  # no inference either: the registry's error
    with pytest.raises(peftbench.LayoutError, match="(?s)no layout for model_type .my-bert.*register_architectures"):
        get_registry(extra=[Silent()]).layout_for(config)


def test_readme_plugin_example_works(tmp_path, capsys):
    """The plugin shown in the README registers, solves and verifies as written."""
    text = README.read_text()
    code = text.split("```python\n# my_plugin.py\n", 1)[1].split("```", 1)[0]
    (tmp_path / "my_plugin.py").write_text(code)
    reg = get_registry(plugins_dir=tmp_path)
    method = reg.method("ia3-lite")
    from conftest import batch_for, tiny_backbone

    backbone = tiny_backbone("bert")
    verified = peftbench.apply(method, backbone, method.config(n=2))  # param_count checked against inject
    assert verified.trainable_params == 2 * 32
    verified.remove()
    injection = peftbench.apply(method, backbone, method.config(n=1))
    out = backbone.model(**batch_for(backbone)).logits
    out.sum().backward()
    assert all(p.grad is not None for p in injection.named_parameters().values())
    assert main(["--plugins-dir", str(tmp_path), "solve", "--backbone", "minilm", "--methods", "scale",
                 "--budget", "1000", "--no-verify"]) == 0
    assert "n=3" in capsys.readouterr().out  # 3 x 384 = 1,152 is closest to 1,000


def test_plugins_dir_module_may_use_dataclasses(tmp_path):
    """A --plugins-dir module is in sys.modules while it runs, as an imported one is (dataclasses need it)."""
    (tmp_path / "dc_plugin.py").write_text(
        "from dataclasses import dataclass\nimport peftbench\n\n@dataclass\nclass Size:\n    n: int = 1\n\n"
        "@peftbench.hookimpl\ndef register_methods(register):\n    pass\n")
    reg = get_registry(plugins_dir=tmp_path)
    assert "dc_plugin" in reg.plugin_names()

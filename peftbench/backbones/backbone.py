"""Backbone: a loaded Hugging Face model, its ArchLayout, and its BackboneSpec.

A method never sees module names: it asks the backbone for sites (``backbone.sites("q")``)
and for dimensions (``backbone.spec``). The spec is plain data, so budget arithmetic needs
no weights (``spec_for`` builds the model on the meta device). The functions that build a
backbone take the registry that knows the layouts (``registry=peftbench.get_registry()``,
or anything with ``.layout_for(config)``); nothing here looks one up.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from peftbench.errors import ConfigError
from peftbench.backbones.layout import LINEAR_SITES, ArchLayout, Site, get_path, linear_shape, resolve_site

TaskKind = Literal["classification", "causal_lm"]
TASK_KINDS = ("classification", "causal_lm")


@dataclass(frozen=True)
class BackboneSpec:
    """Dimensions and counts of a backbone: everything ``param_count`` may use."""

    name: str
    model_type: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    max_positions: int
    base_params: int  # every backbone parameter, the task head excluded
    head_params: int
    is_decoder: bool
    task: str = "classification"
    #: per-layer linear site name -> (in_features, out_features) of layer 0's site, for the closed-form
    #: ``param_count``: only the sites this backbone has (``"q" in spec.site_shapes``); a fused slice
    #: (GPT-2's q, k, v) has its slice's width, not the fused module's; GQA's k and v have
    #: kv_heads * head_dim outputs. Every layer has the same shapes
    site_shapes: dict[str, tuple[int, int]] = field(default_factory=dict)
    #: per-layer layer-norm site -> number of parameters
    norm_params: dict[str, int] = field(default_factory=dict)
    #: parameters of one transformer block
    layer_params: int = 0
    #: width of the input embeddings: ``hidden`` except where a family projects them up (ELECTRA-small: 128 -> 256)
    embed_dim: int = 0
    #: per-layer site (linear and layer-norm) -> path of its module within a block; the slices of a fused
    #: projection share one path (GPT-2's q, k, v: ``attn.c_attn``)
    site_paths: dict[str, str] = field(default_factory=dict)

    @property
    def kv_dim(self) -> int:
        """Width of one layer's keys (or values): num_key_value_heads * head_dim."""
        return self.kv_heads * self.head_dim

    def has_site(self, name: str) -> bool:
        return name in self.site_shapes or name in self.norm_params

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _config_int(config, *names: str, default: int | None = None) -> int:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    if default is not None:
        return default
    raise ConfigError(f"model config ({config.model_type}) has none of {names}")


class Backbone:
    """A transformers model with a layout; the object every method's ``inject`` receives."""

    def __init__(self, model: nn.Module, layout: ArchLayout, name: str | None = None, tokenizer=None, task: str = "classification"):
        if task not in TASK_KINDS:
            raise ConfigError(f"task kind {task!r} is not supported; allowed: {', '.join(TASK_KINDS)}")
        self.model = model
        self.layout = layout
        self.tokenizer = tokenizer
        self.task = task
        self.name = name or getattr(model.config, "_name_or_path", None) or layout.model_type
        self.base_model = model.base_model
        self._base_prefix = self._find_prefix(self.base_model)
        self._layers = get_path(self.base_model, layout.layers, "layers")
        if not isinstance(self._layers, (nn.ModuleList, list, tuple)):
            raise ConfigError(f"layout {layout.model_type!r}: layers path {layout.layers!r} is not a list of blocks")
        self._heads = self._attention_dims()
        heads, kv_heads, head_dim = self._heads
        #: widths of fused q/k/v slices (GQA's k and v are narrower than q)
        self._slice_widths = {"q": heads * head_dim, "k": kv_heads * head_dim, "v": kv_heads * head_dim}
        self.spec = self._measure()

    # -- structure -----------------------------------------------------------------------
    @property
    def config(self):
        return self.model.config

    def _find_prefix(self, module: nn.Module) -> str:
        for name, m in self.model.named_modules():
            if m is module:
                return name
        return ""

    def layer_path(self, i: int) -> str:
        parts = [p for p in (self._base_prefix, self.layout.layers, str(i)) if p]
        return ".".join(parts)

    def layer_modules(self) -> list[nn.Module]:
        return list(self._layers)

    def site(self, layer: int, name: str) -> Site:
        if not 0 <= layer < len(self._layers):
            raise ConfigError(f"layer {layer} does not exist ({self.name} has {len(self._layers)} layers)")
        return resolve_site(self.layout, self._layers[layer], layer, name, self.layer_path(layer), self._slice_widths)

    def sites(self, name: str, layers: list[int] | None = None) -> list[Site]:
        """The site ``name`` (a layout site name, ``peftbench.SITE_NAMES``) of every layer, or of
        ``layers`` (indices), in layer order, resolved now: a module another method replaced is
        found as its wrapper. LayoutError when the layout has no such site."""
        return [self.site(i, name) for i in (layers if layers is not None else range(len(self._layers)))]

    def has_site(self, name: str) -> bool:
        return name in self.layout.site_names()

    def embeddings(self) -> nn.Embedding:
        return get_path(self.base_model, self.layout.embeddings, "embeddings")

    # -- parameters ----------------------------------------------------------------------
    def head_parameters(self) -> dict[str, nn.Parameter]:
        """The task head's parameters (outside the base model); none for a causal LM."""
        if self.task == "causal_lm":
            return {}
        base = {id(p) for p in self.base_model.parameters()}
        return {n: p for n, p in self.model.named_parameters() if id(p) not in base}

    def load_head(self, state: dict[str, torch.Tensor]) -> None:
        params = self.head_parameters()
        unknown = sorted(set(state) - set(params))
        if unknown:
            raise ConfigError(f"saved head has parameters this backbone lacks: {unknown}")
        wrong = [f"{n} saved {tuple(t.shape)}, backbone {tuple(params[n].shape)}" for n, t in state.items()
                 if tuple(t.shape) != tuple(params[n].shape)]
        if wrong:
            raise ConfigError(f"saved head has other shapes than this backbone's ({'; '.join(wrong)}): "
                              f"a different number of labels?")
        with torch.no_grad():
            for name, tensor in state.items():
                params[name].copy_(tensor.to(params[name].device, params[name].dtype))

    def _output_layers(self) -> dict[str, nn.Linear]:
        """The head's output layers: its ``nn.Linear`` modules with one output per label
        (``config.num_labels``), e.g. BERT's ``classifier``, RoBERTa's ``classifier.out_proj``, GPT-2's
        ``score``; none for a causal LM."""
        if self.task == "causal_lm":
            return {}
        base = {id(m) for m in self.base_model.modules()}
        n = self.config.num_labels
        return {name: m for name, m in self.model.named_modules()
                if id(m) not in base and isinstance(m, nn.Linear) and m.out_features == n}

    def head_shapes(self, num_labels: int | None = None) -> dict[str, tuple[int, ...]]:
        """The head's parameter shapes by name, as they are, or as ``resize_head(num_labels)`` makes them."""
        shapes = {n: tuple(p.shape) for n, p in self.head_parameters().items()}
        if num_labels is not None and num_labels != self.config.num_labels:
            for name, layer in self._output_layers().items():
                for pname, p in layer.named_parameters(recurse=False):
                    shapes[f"{name}.{pname}"] = (num_labels, *tuple(p.shape)[1:])
        return shapes

    def resize_head(self, num_labels: int) -> None:
        """Give the task head ``num_labels`` outputs: each output layer (see ``head_shapes``) is replaced by
        a new ``nn.Linear`` of that width, zero-filled (``load_head`` fills it), on the old one's device and
        dtype, and ``config.num_labels`` is set (its ``id2label`` reset to ``LABEL_i``). The base model's
        modules and weights are not touched; nothing happens when the head already has that width."""
        if self.task == "causal_lm":
            raise ConfigError(f"{self.name} is a causal LM: it has no task head to resize")
        if not isinstance(num_labels, int) or num_labels < 1:
            raise ConfigError(f"a task head needs at least one label, not {num_labels!r}")
        if num_labels == self.config.num_labels:
            return
        layers = self._output_layers()
        if not layers:
            raise ConfigError(f"{self.name}: no layer of the task head has {self.config.num_labels} outputs "
                              f"(config.num_labels) to resize")
        for name, old in layers.items():
            new = nn.Linear(old.in_features, num_labels, bias=old.bias is not None, device="meta",
                            dtype=old.weight.dtype).to_empty(device=old.weight.device)
            with torch.no_grad():
                for p in new.parameters():
                    p.zero_()
            new.requires_grad_(old.weight.requires_grad)
            parent, _, attr = name.rpartition(".")
            setattr(self.model.get_submodule(parent), attr, new)
        self.config.num_labels = num_labels
        if isinstance(getattr(self.model, "num_labels", None), int):  # transformers' classifiers keep a copy
            self.model.num_labels = num_labels
        from peftbench.backbones.quant import logical_numel

        self.spec = dataclasses.replace(self.spec, head_params=sum(logical_numel(p) for p in
                                                                   self.head_parameters().values()))

    def freeze(self) -> None:
        """Freeze every backbone parameter; the task head stays trainable."""
        head = {id(p) for p in self.head_parameters().values()}
        for p in self.model.parameters():
            p.requires_grad_(id(p) in head)

    def trainable_parameters(self, include_head: bool = False) -> dict[str, nn.Parameter]:
        head = {id(p) for p in self.head_parameters().values()}
        return {
            n: p
            for n, p in self.model.named_parameters()
            if p.requires_grad and (include_head or id(p) not in head)
        }

    def count_trainable(self) -> int:
        """Parameters that require grad, task head excluded (logical counts for 4-bit)."""
        from peftbench.backbones.quant import logical_numel

        return sum(logical_numel(p) for p in self.trainable_parameters().values())

    # -- spec ----------------------------------------------------------------------------
    def _attention_dims(self) -> tuple[int, int, int]:
        """(heads, kv_heads, head_dim) from the config."""
        config, names = self.model.config, self.layout.config_names
        hidden = _config_int(config, names.get("hidden", "hidden_size"))
        heads = _config_int(config, names.get("heads", "num_attention_heads"))
        kv_heads = _config_int(config, names.get("kv_heads", "num_key_value_heads"), "num_key_value_heads", default=heads)
        return heads, kv_heads, _config_int(config, "head_dim", default=hidden // heads)

    def _measure(self) -> BackboneSpec:
        config = self.model.config
        names = self.layout.config_names
        hidden = _config_int(config, names.get("hidden", "hidden_size"))
        heads, kv_heads, head_dim = self._heads
        from peftbench.backbones.quant import logical_numel

        base_ids, base_params = set(), 0
        for p in self.base_model.parameters():
            if id(p) not in base_ids:
                base_ids.add(id(p))
                base_params += logical_numel(p)
        head_params = sum(logical_numel(p) for p in self.head_parameters().values())
        if self.task == "causal_lm":  # an untied LM head belongs to the (frozen) backbone
            base_params = sum(logical_numel(p) for p in {id(p): p for p in self.model.parameters()}.values())
        block = self._layers[0]
        site_shapes, norm_params, site_paths = {}, {}, {}
        for name in self.layout.site_names():
            site = resolve_site(self.layout, block, 0, name, self.layer_path(0), self._slice_widths)
            if name in LINEAR_SITES or name.endswith("_norm"):
                site_paths[name] = site.path.removeprefix(self.layer_path(0) + ".")
            if name in LINEAR_SITES:
                site_shapes[name] = (site.in_features, site.out_features)
            elif name.endswith("_norm"):
                norm_params[name] = sum(logical_numel(p) for p in site.module.parameters())
        return BackboneSpec(
            name=str(self.name),
            model_type=self.layout.model_type,
            hidden=hidden,
            layers=len(self._layers),
            heads=heads,
            kv_heads=kv_heads,
            head_dim=head_dim,
            intermediate=_config_int(config, names.get("intermediate", "intermediate_size"), "n_inner", "hidden_dim", default=4 * hidden),
            vocab=_config_int(config, "vocab_size"),
            max_positions=_config_int(config, "max_position_embeddings", "n_positions", default=512),
            base_params=base_params,
            head_params=head_params,
            is_decoder=self.layout.causal or bool(getattr(config, "is_decoder", False)),
            task=self.task,
            site_shapes=site_shapes,
            norm_params=norm_params,
            layer_params=sum(logical_numel(p) for p in block.parameters()),
            embed_dim=int(self.embeddings().weight.shape[-1]),
            site_paths=site_paths,
        )

    def __repr__(self) -> str:
        return f"<Backbone {self.name} {self.spec.model_type} L={self.spec.layers} d={self.spec.hidden} params={self.spec.base_params:,}>"


def quiet_transformers() -> None:
    """Load reports and weight-loading bars are noise in a benchmark's output."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _auto_class(task: str):
    import transformers

    if task == "classification":
        return transformers.AutoModelForSequenceClassification
    if task == "causal_lm":
        return transformers.AutoModelForCausalLM
    raise ConfigError(f"task kind {task!r} is not supported; allowed: {', '.join(TASK_KINDS)}")


def _prepare_config(config, task: str, num_labels: int, pad_token_id: int | None):
    if task == "classification":
        config.num_labels = num_labels
        if getattr(config, "pad_token_id", None) is None:
            # decoders classify from the last non-pad token and need a pad id
            eos = getattr(config, "eos_token_id", None)
            config.pad_token_id = pad_token_id if pad_token_id is not None else (eos[0] if isinstance(eos, list) else eos)
    return config


def from_config(config, task: str = "classification", num_labels: int = 2, *, registry, name: str | None = None,
                seed: int = 0) -> Backbone:
    """A randomly initialised backbone from a transformers ``*Config`` (tests, benchmarks)."""
    config = _prepare_config(config, task, num_labels, None)
    torch.manual_seed(seed)
    model = _auto_class(task).from_config(config)  # transformers' default: SDPA where the family has it, else eager
    model.eval()
    return Backbone(model, registry.layout_for(config), name=name or f"tiny-{config.model_type}", task=task)


def load_backbone(name: str, task: str = "classification", num_labels: int = 2, *, registry, dtype=torch.float32,
                  device: str | None = None) -> Backbone:
    """Load ``minilm``, ``smollm2``, a local HF folder or a hub id with a task head."""
    import transformers

    from peftbench.backbones.assets import resolve_source

    source = resolve_source(name)
    quiet_transformers()
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    except Exception as exc:  # offline hub id or broken folder
        raise ConfigError(f"cannot load the tokenizer of backbone {name!r} ({source}): {type(exc).__name__}: {exc}") from exc
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    config = transformers.AutoConfig.from_pretrained(source)
    layout = registry.layout_for(config)
    config = _prepare_config(config, task, num_labels, tokenizer.pad_token_id)
    # transformers' default attention: SDPA where the family has it (eager for Gemma 2's soft-capping, DeBERTa)
    model = _auto_class(task).from_pretrained(source, config=config, dtype=dtype)
    if device:
        model.to(device)
    model.eval()
    return Backbone(model, layout, name=name, tokenizer=tokenizer, task=task)


#: (name, task, num_labels, id(registry)) -> (registry, spec); the registry is kept so its id stays its own
_SPEC_CACHE: dict[tuple, tuple[object, BackboneSpec]] = {}


def spec_for(name: str, task: str = "classification", num_labels: int = 2, *, registry) -> BackboneSpec:
    """The BackboneSpec of a named backbone without loading weights (meta device)."""
    import transformers

    from peftbench.backbones.assets import resolve_source

    key = (name, task, num_labels, id(registry))
    cached = _SPEC_CACHE.get(key)
    if cached is not None and cached[0] is registry:
        return cached[1]
    source = resolve_source(name)
    try:
        config = transformers.AutoConfig.from_pretrained(source)
    except Exception as exc:
        raise ConfigError(f"cannot load the config of backbone {name!r} ({source}): {type(exc).__name__}: {exc}") from exc
    layout = registry.layout_for(config)
    config = _prepare_config(config, task, num_labels, None)
    with torch.device("meta"):
        model = _auto_class(task).from_config(config)
    spec = Backbone(model, layout, name=name, task=task).spec
    _SPEC_CACHE[key] = (registry, spec)
    return spec

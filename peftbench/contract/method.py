"""The Method contract every PEFT method (built-in or third-party) implements.

A method has a name, a pydantic ``Config`` (extra fields forbidden), one integer ``knob``
the budget solver turns, a closed-form ``param_count(cfg, spec)`` (pure arithmetic, no
torch) and ``inject(backbone, cfg)`` which returns a removable, savable ``Injection``.
``inject`` is the method's per-site work only: ``peftbench.apply`` validates the config,
calls ``check``, freezes the backbone, calls ``inject`` and verifies the count.
The class attributes below are what the core asks of a method; it never names one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from peftbench.contract.placement import LAYERS_ALLOWED, parse_layers, resolve_layers
from peftbench.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from peftbench.backbones.backbone import Backbone, BackboneSpec
    from peftbench.contract.injection import Injection


class MethodConfig(BaseModel):
    """Base for method configs: unknown fields are errors, values are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class PerLayerConfig(MethodConfig):
    """Base config of a per-layer method: ``layers``, ``layer_sizes``, ``allocation`` (``contract.placement``)."""

    layers: list[int] | str | None = Field(None, description=f"layers to adapt: {LAYERS_ALLOWED}; default all")
    layer_sizes: list[int] | None = Field(None, min_length=1, description="one knob value per chosen layer, bottom "
                                          "to top, instead of the uniform knob (pins the size)")
    allocation: Literal["uniform", "importance"] = Field(
        "uniform", description="uniform: the knob in every chosen layer; importance: after a warm-up of the uniform "
                               "method, the same total spread over the layers by first-order Taylor importance")
    allocation_steps: int = Field(20, ge=1, description="warm-up optimizer steps that measure the importance")

    #: fields kept in a trial's id even at their default (``results.records.method_config_dump``): a method
    #: that had one of them before it became common lists it, so its stored trials keep their ids
    id_fields_at_default: ClassVar[tuple[str, ...]] = ()

    _layers = field_validator("layers", mode="before")(lambda value: parse_layers(value))

    @model_validator(mode="after")
    def _sizes(self):
        if self.layer_sizes is not None and any(s < 1 for s in self.layer_sizes):
            raise ValueError(f"layer_sizes {self.layer_sizes} must all be >= 1")
        return self


def format_validation_error(prefix: str, exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        path = ".".join(str(p) for p in err["loc"]) or "(config)"
        got = f" (got {err['input']!r})" if "input" in err and not isinstance(err["input"], dict) else ""
        parts.append(f"{prefix}field {path!r}: {err['msg']}{got}")
    return "; ".join(parts)


def _type_name(annotation) -> str:
    """``int``, ``float | None``, ``list[str] | Literal['all-linear']``: a type as one writes it."""
    import types
    import typing

    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in args)
    if annotation is type(None):
        return "None"
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(_type_name(a) for a in args)}]"
    return getattr(annotation, "__name__", str(annotation).replace("typing.", ""))


def _json_ready(value):
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    return str(value)


class PeftAdapter(NamedTuple):
    """An injection in peft's saved format (``Method.peft_adapter``): ``config`` holds the method's
    ``adapter_config.json`` fields (``peft_type``, ``r``, ``target_modules`` as module paths, ...);
    ``tensors`` its weights under the names peft saves them by (``base_model.model.<module path>.lora_A.weight``
    for a tuner, ``prompt_embeddings`` for prompt learning); ``head_prefix`` is what peft puts before
    the task head's parameter names. The exporter adds the task type, the head (``modules_to_save``)
    and the base model.

    ``base_quantization``: for a method that runs the base quantised (QLoRA's 4-bit layers), the
    transformers ``quantization_config`` (a dict, as in ``config.json``) that loads those layers. The
    exporter then saves the base as the injected model holds it, its quantised layers in their library's
    own serialization, under that config, so transformers loads the very weights the method ran on
    instead of quantising the full-precision ones again."""

    config: dict[str, Any]
    tensors: dict[str, Any]
    head_prefix: str = "base_model.model."
    base_quantization: dict[str, Any] | None = None


class Method:
    """Subclass this, set the class attributes, implement ``param_count`` and ``inject``."""

    name: ClassVar[str] = ""
    #: field of ``Config`` that the budget solver sets (an int), or None when not budgeted
    knob: ClassVar[str | None] = None
    #: one line for ``peftbench methods``: what the method inserts and where
    inserts: ClassVar[str] = ""
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    aliases: ClassVar[tuple[str, ...]] = ()
    #: the method's textbook learning rate (PEFT methods want more than full fine-tuning): used when
    #: no other is set, and the centre of the equal-effort search's default space (``--search-trials``
    #: samples lr log-uniformly over one decade each side of it, ``running.search``)
    default_lr: ClassVar[float] = 1e-3
    #: learning rate tuned for peftbench's default schedule (50 steps of 16 on MiniLM, linear
    #: decay), or None to use ``default_lr`` there. The built-in values are the best of three per
    #: method by best-checkpoint VALIDATION accuracy in a one-seed sweep on movie_sentiment
    #: (``benchmarks/lr_sweep.py``); each plugin keeps its three values' accuracies next to its
    #: value (200 validation examples, 0.46 = the majority class). Test accuracy played no part.
    schedule_lr: ClassVar[float | None] = None
    #: False leaves the method out of the default grid (it runs when named in ``--methods``)
    in_default_grid: ClassVar[bool] = True
    #: a reference baseline the report compares against (not budget-solved): None for an
    #: ordinary method; "ceiling" for full fine-tuning (the zero of the relative plot); "floor"
    #: for training the task head alone (``peftbench.results.records.REFERENCE_ROLES``)
    reference: ClassVar[str | None] = None
    #: a method the budget does not apply to (full fine-tuning, the head alone) says so here
    budgeted: ClassVar[bool] = True
    #: config fields that fix the method's size: a user who sets one pins the size (the solver
    #: then leaves it, and the trial is reported with its achieved budget); default: the knob alone
    size_fields: ClassVar[tuple[str, ...]] = ()
    #: a secondary width (prefix tuning's MLP, P-tuning's encoder) the solver may choose together
    #: with the knob when the knob alone cannot reach a budget; ``secondary_values`` lists its
    #: candidates, largest first. None: the method has none
    secondary: ClassVar[str | None] = None
    #: ``Injection.merge()`` folds everything the method adds into the backbone's own weights, so
    #: the merged model is a plain transformers checkpoint (``peftbench export --format merged``)
    mergeable: ClassVar[bool] = False
    #: a per-layer method (Config a ``peftbench.PerLayerConfig``) whose knob may differ by layer
    #: (``layer_sizes``, ``allocation: importance``); False: it takes ``layers`` but one size for all
    per_layer_sizes: ClassVar[bool] = True

    # -- configs ---------------------------------------------------------------------------
    def config(self, values: dict[str, Any] | MethodConfig | None = None, **overrides) -> MethodConfig:
        """Validated config; errors name the method and the field."""
        if isinstance(values, MethodConfig):
            values = values.model_dump()
        data = {**(values or {}), **overrides}
        try:
            return self.Config(**data)
        except ValidationError as exc:
            raise ConfigError(format_validation_error(f"method {self.name!r}: ", exc)) from None

    def with_knob(self, cfg: MethodConfig, value: int) -> MethodConfig:
        if self.knob is None:
            raise ConfigError(f"method {self.name!r} has no size knob")
        return self.config(cfg, **{self.knob: int(value)})

    def knob_value(self, cfg: MethodConfig) -> int | None:
        return None if self.knob is None else getattr(cfg, self.knob)

    # -- sizes -----------------------------------------------------------------------------
    def knob_range(self, cfg: MethodConfig, spec: "BackboneSpec") -> tuple[int, int]:
        """Smallest and largest allowed knob values on this backbone (inclusive)."""
        raise NotImplementedError(f"method {self.name!r} defines no knob_range")

    def knob_values(self, cfg: MethodConfig, spec: "BackboneSpec") -> list[int] | None:
        """The knob's allowed values on this backbone, ascending, when not every integer of ``knob_range``
        is one (a block size that must divide a width): the solver searches this list and ``check`` refuses
        other values. None (the default): every integer of ``knob_range``."""
        return None

    def param_count(self, cfg: MethodConfig, spec: "BackboneSpec") -> int:
        """Trainable parameters ``inject`` creates or unfreezes (task head excluded)."""
        raise NotImplementedError

    def stored_count(self, cfg: MethodConfig, spec: "BackboneSpec") -> int:
        """Parameters kept after training (prefix tuning drops its MLP). Default: param_count."""
        return self.param_count(cfg, spec)

    def pinned_fields(self, values: dict[str, Any]) -> list[str]:
        """The size fields a user's config ``values`` sets (the knob and ``size_fields``)."""
        fields = (*([self.knob] if self.knob else []), *self.size_fields, "layer_sizes")
        return [f for f in dict.fromkeys(fields) if values.get(f) is not None]

    # -- placement (``peftbench.contract.placement``) -------------------------------------------
    def layer_indices(self, cfg: MethodConfig, spec: "BackboneSpec") -> list[int]:
        """The layers ``cfg`` adapts, ascending: its ``layers`` resolved on ``spec`` (every layer when the
        config has no ``layers``); ConfigError for layers the backbone lacks or an allocation the method refuses."""
        where = f"method {self.name!r}: "
        if not self.per_layer_sizes and (getattr(cfg, "layer_sizes", None) is not None
                                         or getattr(cfg, "allocation", "uniform") != "uniform"):
            raise ConfigError(f"{where}one size in every layer: fields 'layer_sizes' and 'allocation' "
                              f"are not allowed (allowed: 'layers')")
        return resolve_layers(getattr(cfg, "layers", None), spec.layers, where)

    def layer_knobs(self, cfg: MethodConfig, spec: "BackboneSpec", uniform: int | None = None) -> dict[int, int]:
        """``{layer: knob value}`` over ``layer_indices``: ``cfg.layer_sizes`` when set (checked against the
        layers and ``knob_range``), else ``uniform`` (default: the knob's value) in every layer."""
        layers = self.layer_indices(cfg, spec)
        sizes = getattr(cfg, "layer_sizes", None)
        if sizes is None:
            return dict.fromkeys(layers, self.knob_value(cfg) if uniform is None else uniform)
        where = f"method {self.name!r}: field 'layer_sizes'"
        if len(sizes) != len(layers):
            raise ConfigError(f"{where} has {len(sizes)} values for {len(layers)} layers {layers} "
                              f"(allowed: one per chosen layer, bottom to top)")
        lo, hi = self.knob_range(cfg, spec)
        bad = [s for s in sizes if not lo <= s <= hi]
        if bad:
            raise ConfigError(f"{where} has {bad}, out of range on {spec.name} (allowed {lo}..{hi})")
        return dict(zip(layers, sizes))

    def secondary_values(self, cfg: MethodConfig, spec: "BackboneSpec") -> list[int]:
        """Candidates for ``secondary``, largest first (the solver takes the largest that reaches)."""
        return []

    def identity_at_init(self, cfg: MethodConfig) -> bool:
        """True when the model injected with ``cfg`` computes exactly what the bare backbone does until
        it is trained (LoRA's zero B, a bottleneck's zero up-projection, methods that only unfreeze);
        ``peftbench.testing`` then checks it. Default: False (nothing is promised)."""
        return False

    def check(self, cfg: MethodConfig, spec: "BackboneSpec") -> None:
        """Raise ConfigError when ``cfg`` cannot be built on ``spec`` (knob out of range ...)."""
        if self.knob is None:
            return
        value = getattr(cfg, self.knob)
        values = self.knob_values(cfg, spec)
        if values is not None:
            if value not in values:
                shown = ", ".join(map(str, values[:12])) + (f", ... ({len(values)} values)" if len(values) > 12 else "")
                raise ConfigError(f"method {self.name!r}: field {self.knob!r} = {value} is not allowed on "
                                  f"{spec.name} (allowed {shown})")
            return
        lo, hi = self.knob_range(cfg, spec)
        if not lo <= value <= hi:
            raise ConfigError(
                f"method {self.name!r}: field {self.knob!r} = {value} is out of range on "
                f"{spec.name} (allowed {lo}..{hi})"
            )
        self.layer_knobs(cfg, spec)  # placement (a per-layer config): its layers and per-layer sizes

    # -- building --------------------------------------------------------------------------
    def inject(self, backbone: "Backbone", cfg: MethodConfig) -> "Injection":
        """The method's per-site work on a frozen backbone; ``cfg`` is validated and checked.

        Call ``peftbench.apply(method, backbone, cfg)``, not this: it does the rest.
        """
        raise NotImplementedError

    def peft_adapter(self, injection: "Injection") -> PeftAdapter | None:
        """The trained ``injection`` in peft's format (``peftbench export --format peft``), or None when
        peft has no equivalent of the method (the default)."""
        return None

    def config_fields(self) -> list[dict[str, Any]]:
        """Each field of ``Config``: name, type, default (JSON-ready) and description (``peftbench methods``)."""
        out = []
        for name, info in self.Config.model_fields.items():
            default = info.get_default(call_default_factory=True)
            out.append({"name": name, "type": _type_name(info.annotation), "default": _json_ready(default),
                        "description": info.description or "", "knob": name == self.knob})
        return out

    def describe(self) -> dict[str, Any]:
        """What ``peftbench methods`` shows: the class attributes the core asks and the config's fields."""
        return {
            "name": self.name,
            "knob": self.knob,
            "inserts": self.inserts,
            "aliases": list(self.aliases),
            "budgeted": self.budgeted,
            "default_lr": self.default_lr,
            "schedule_lr": self.schedule_lr,
            "in_default_grid": self.in_default_grid,
            "reference": self.reference,
            "mergeable": self.mergeable,
            "config": self.config_fields(),
        }

    def __repr__(self) -> str:
        return f"<Method {self.name}>"

"""Budgets: parsing, the solver (with a method defined here), monotone counts, infeasibility."""

from __future__ import annotations

import pytest
from torch import nn

import peftbench
from conftest import tiny_backbone

MINILM = peftbench.spec_for("minilm", registry=peftbench.get_registry())


class SquareConfig(peftbench.MethodConfig):
    n: int = 1


class Square(peftbench.Method):
    """n x n parameters per layer: a count that grows quadratically in the knob."""

    name = "square"
    knob = "n"
    Config = SquareConfig

    def knob_range(self, cfg, spec):
        return 1, spec.hidden

    def param_count(self, cfg, spec):
        return spec.layers * cfg.n * cfg.n

    def inject(self, backbone, cfg):
        injection = peftbench.Injection(backbone, self, cfg)
        for block in backbone.layer_modules():
            module = nn.Module()
            module.w = nn.Parameter(backbone.embeddings().weight.new_zeros(cfg.n, cfg.n))
            injection.attach(block, "square", module)
        return injection


@pytest.mark.parametrize("text,fraction,count", [
    ("3%", 0.03, None), ("0.5%", 0.005, None), ("100%", 1.0, None), ("500k", None, 500_000),
    ("2M", None, 2_000_000), ("123456", None, 123_456), ("1.5m", None, 1_500_000),
])
def test_parse_budget(text, fraction, count):
    b = peftbench.parse_budget(text)
    assert b.fraction == pytest.approx(fraction) if fraction else b.fraction is None
    assert b.count == count


@pytest.mark.parametrize("text,normal", [("3 %", "3%"), ("1.0%", "1%"), (" 0.10 % ", "0.1%"), (".5%", "0.5%"),
                                         ("500K", "500k"), ("2m", "2M"), ("1.50M", "1.5M"), ("123456", "123456")])
def test_budget_text_is_normalised(text, normal):
    assert peftbench.parse_budget(text).text == normal


@pytest.mark.parametrize("text", ["3", "-1%", "abc", "150%", "0%", "", "1.5", "2.5k5", "0.0001k", "k"])
def test_malformed_budgets(text):
    with pytest.raises(peftbench.BudgetError, match="allowed: a percentage"):
        peftbench.parse_budget(text)


def test_bare_small_number_is_ambiguous():
    with pytest.raises(peftbench.BudgetError, match="ambiguous: write 3% for a fraction"):
        peftbench.parse_budget("3")


def test_target_of_fraction_and_count():
    assert peftbench.parse_budget("1%").target(22_713_216) == 227_132
    assert peftbench.parse_budget("500k").target(22_713_216) == 500_000


def test_solver_finds_the_closest_knob():
    method = Square()
    spec = tiny_backbone("bert").spec  # 2 layers, hidden 32
    for target in range(2, 2 * 32 * 32, 37):
        sol = peftbench.solve(method, method.config(), spec, str(max(target, 100)) if target >= 100 else f"{100 * target / spec.base_params}%")
        t = sol.target
        best = min(range(1, 33), key=lambda n: (abs(2 * n * n - t), n))
        assert abs(sol.params - t) == abs(2 * best * best - t)
        assert sol.verified is None


def test_solver_reports_achieved_and_error():
    method = Square()
    spec = MINILM
    sol = peftbench.solve(method, method.config(), spec, "0.01%")
    assert sol.target == round(0.0001 * spec.base_params)
    assert sol.value == 19 and sol.params == 6 * 19 * 19
    assert sol.achieved == pytest.approx(sol.params / spec.base_params)
    assert sol.rel_error == pytest.approx((sol.params - sol.target) / sol.target)


def test_infeasible_budget_names_the_range():
    method = Square()
    spec = tiny_backbone("bert").spec
    sol = peftbench.solve(method, method.config(), spec, "90%")
    assert not sol.reachable
    assert "spans 2..2,048 params" in sol.note and "nearest feasible: n=32" in sol.note
    with pytest.raises(peftbench.BudgetError, match="not reachable: square spans"):
        peftbench.solve_or_raise(method, method.config(), spec, "90%")


def test_verify_by_instantiation():
    method = Square()
    backbone = tiny_backbone("llama")
    assert peftbench.measure(method, backbone, method.config(n=5)) == 50
    assert backbone.count_trainable() == 0  # measure removed its injection
    injection = peftbench.apply(method, backbone, {"n": 5})  # verified against param_count, kept
    assert injection.trainable_params == backbone.count_trainable() == 50
    injection.remove()
    assert backbone.count_trainable() == 0


REGISTRY = peftbench.get_registry()
BUDGETED = sorted(n for n, e in REGISTRY.methods.items() if e.obj.budgeted and e.obj.knob)


@pytest.mark.parametrize("name", BUDGETED)
def test_builtin_counts_are_monotone_and_solved_within_granularity(name):
    method = REGISTRY.method(name)
    for spec in (MINILM, tiny_backbone("llama").spec):
        cfg = method.config()
        lo, hi = method.knob_range(cfg, spec)
        allowed = method.knob_values(cfg, spec)  # a knob of listed values only (peft:boft's block sizes)
        ks = sorted(allowed) if allowed else sorted({lo, *range(lo, min(hi, lo + 40) + 1), hi, (lo + hi) // 2})
        counts = [method.param_count(method.with_knob(cfg, k), spec) for k in ks]
        assert counts == sorted(counts), f"{name}: param_count not monotone in {method.knob}"
        for budget in ("0.1%", "1%", "3%", "50k"):
            sol = peftbench.solve(method, cfg, spec, budget)
            if not sol.reachable:
                assert sol.target < sol.low or sol.target > sol.high
                continue
            k = sol.value
            if allowed:
                at = allowed.index(k)
                near = [allowed[j] for j in (at - 1, at + 1) if 0 <= j < len(allowed)]
            else:
                near = [j for j in (k - 1, k + 1) if lo <= j <= hi]
            neighbours = [method.param_count(method.with_knob(cfg, j), spec) for j in near]
            assert all(abs(sol.params - sol.target) <= abs(c - sol.target) for c in neighbours)


@pytest.mark.parametrize("name, secondary, floor", [("prefix", 43, 10), ("ptuning", 221, 20)])
def test_the_solver_narrows_a_secondary_width_the_user_left_unset(registry, name, secondary, floor):
    """Prefix tuning's MLP (8.5% of MiniLM) and P-tuning's encoder (1.95%) cannot fit 1% at their default
    widths: the solver takes the largest width with which the knob reaches the budget at >= its default."""
    spec = peftbench.spec_for("minilm", registry=registry)
    method = registry.method(name)
    cfg = method.config()
    sol = peftbench.solve(method, cfg, spec, "1%")
    assert sol.reachable and sol.updates == {"hidden": secondary} and sol.value >= floor
    assert abs(sol.params - sol.target) <= sol.step and "chosen by the solver" in sol.note
    assert sol.params == method.param_count(method.with_knob(method.config(cfg, **sol.updates), sol.value), spec)
    wider = peftbench.solve(method, method.config(cfg, hidden=secondary + 1), spec, "1%")
    assert not wider.reachable or wider.value < floor  # the next width up would not do
    pinned = peftbench.solve(method, method.config(hidden=200), spec, "1%", fixed={"hidden"})
    assert pinned.updates == {} and ("hidden=200" not in pinned.note)  # a width the user set is never replaced
    assert not peftbench.solve(registry.method("prompt"), registry.method("prompt").config(), spec, "1%").reachable


class EvenSquare(Square):
    """Square whose n must divide the hidden width: the solver searches ``knob_values`` only."""

    name = "even-square"

    def knob_values(self, cfg, spec):
        return [d for d in range(1, spec.hidden + 1) if spec.hidden % d == 0]


def test_solver_searches_only_the_declared_knob_values():
    method, spec = EvenSquare(), MINILM  # hidden 384: divisors ... 16, 24, 32, 48 ...
    sol = peftbench.solve(method, {}, spec, str(spec.layers * 30 * 30))
    assert sol.value in method.knob_values(None, spec) and sol.value in (24, 32)
    assert (sol.knob_low, sol.knob_high) == (1, 384) and sol.params == spec.layers * sol.value ** 2
    far = peftbench.solve(method, {}, spec, "100%")
    assert not far.reachable and "n in 1..384" in far.note and far.value == 384
    with pytest.raises(peftbench.ConfigError, match="'n' = 30 is not allowed on minilm .allowed 1, 2, 3, 4, 6"):
        method.check(method.config(n=30), spec)
    method.check(method.config(n=32), spec)


def test_spec_names_each_sites_module_and_fused_slices_share_one():
    gpt2 = tiny_backbone("gpt2").spec
    assert gpt2.site_paths["q"] == gpt2.site_paths["v"] == "attn.c_attn" and gpt2.site_paths["ffn_norm"] == "ln_2"
    assert MINILM.site_paths["q"] == "attention.self.query" and MINILM.site_paths["ffn_out"] == "output.dense"

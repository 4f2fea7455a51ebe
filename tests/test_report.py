"""The report on a stored fixture run: golden markdown, plots, statistics, diagnostics, ranking apart,
search, plugin sections, CLI.

Regenerate the golden file after an intended change with
``PEFTBENCH_UPDATE_GOLDEN=1 python -m pytest tests/test_report.py``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
from pathlib import Path

import pluggy
import pytest
from scipy import stats as sps

import peftbench
from peftbench import report
from peftbench.contract import hookspecs
from peftbench.contract.costs import Cost
from peftbench.report import diagnostics, stats
from peftbench.report.diagnostics import FLAGGED, NOT_APPLICABLE, NOT_COMPUTED, NOT_RECORDED, OK
from peftbench.errors import ConfigError
from peftbench.contract.registry import Registry
from peftbench.results.records import (CEILING, FLOOR, CurvePoint, MachineLoad, TrainingSpec, TrialRecord, TrialResult,
                                      TrialSpec)
from peftbench.results.store import Store
from peftbench.tasks.entry import TaskEntry

GOLDEN = Path(__file__).parent / "golden" / "report.md"
EXAMPLE = Path(__file__).parent.parent / "reports" / "example"
#: the example as the first round committed it: a schema-1 store of the 1% default (24 trials done,
#: 9 unreachable) and its report as rendered after the records redesign, before the diagnostics
V1_EXAMPLE = Path(__file__).parent / "data" / "v1_example"
BASE, HEAD = 22_713_216, 770
TARGET = {"1%": 227_132, "3%": 681_396}
ENV = {"versions": {"peftbench": "0.1.0", "torch": "2.13.0", "transformers": "5.23.0"},
       "hardware": "2 CPU cores", "device": "cpu", "threads": 1}
SUITE_JSON = {"suite": "fixture", "hash": "0123456789abcdef",
              "command": ["peftbench", "run", "--methods",
                          "lora,houlsby,pfeiffer,prefix,qlora,ptuning,ptuning_v2,prompt,full,head",
                          "--budget", "1%", "--budget", "3%", "--suite", "fixture"]}
REFERENCE = {"full": CEILING, "head": FLOOR}  # the reference roles the baselines declare

# method, budget, knob, knob value, knob step, trainable params, accuracies of seeds 0.. (str: not done)
PLAN = [
    ("full", None, None, None, None, BASE, [0.861, 0.855, 0.867]),
    ("head", "n/a", None, None, None, 0, [0.701, 0.712, 0.695]),  # a baseline stored under another text
    ("lora", "1%", "r", 25, 9_216, 230_400, [0.850, 0.846, 0.858]),
    ("lora", "3%", "r", 74, 9_216, 681_984, [0.857, 0.851, "running"]),
    ("houlsby", "1%", "m", 12, 18_456, 231_744, [0.848, 0.852, "failed"]),
    ("houlsby", "3%", "m", 36, 18_456, 674_688, [0.855, 0.860, "diverged"]),
    ("prefix", "1%", "n", 10, 4_608, 281_088, [0.802, 0.815, 0.809]),  # off budget by > 1 step
    ("qlora", "1%", "r", 25, 9_216, 230_400, [0.839, 0.844, 0.836]),
    ("ptuning", "1%", "n", 591, None, 226_944, [0.781]),  # one seed; no step recorded
    ("prompt", "3%", "n", 1_774, 384, 681_216, ["unreachable"]),
    ("pfeiffer", "1%", "m", 24, 9_552, 229_248, [0.502, 0.515, 0.496]),  # at the majority class: did not learn
    ("ptuning_v2", "3%", "n", 128, 4_608, 589_824, [0.871, 0.866, 0.874]),  # unreachable, trained at nearest size
]
NEAREST = ("not reachable: ptuning_v2 spans 4,608..589,824 params (0.0203%..2.60%) with n in 1..128; "
           "nearest feasible: n=128 (589,824 params)")
SPACE = {"lr": {"low": 1e-4, "high": 1e-2, "log": True}}
# spec fields that differ from the plan's defaults, by (method, budget): the searched ones trained at their chosen lr
SPEC_CHANGES = {
    ("ptuning_v2", "3%"): dict(reachable=False, matched=False, note=NEAREST),
    ("lora", "1%"): dict(lr=3e-3, search_params={"lr": 3e-3}, search_space=SPACE),
    ("houlsby", "1%"): dict(lr=9e-3, search_params={"lr": 9e-3}, search_space=SPACE),  # in the top 10%: edge
}
#: the machine's load at a trial's start and end: two CPUs, one busy with the trial (0.6 per CPU)
IDLE = MachineLoad(load_1min=1.2, cpu_count=2, usable_cpus=2)
#: ... and on a machine where other work kept 4.6 threads runnable on 2 CPUs (2.3 per CPU: costs flagged)
BUSY = MachineLoad(load_1min=4.6, cpu_count=2, usable_cpus=2)
# result fields that differ, by (method, budget, seed): its best validation at its last pass, not stopped early;
# a trial that ended on a loaded machine
RESULT_CHANGES = {("qlora", "1%", 1): dict(best_step=300), ("houlsby", "3%", 1): dict(load_end=BUSY)}
EXAMPLES = {"train": 800, "validation": 200, "test": 500}
#: the schedule the fixture's curves follow: 6 epochs of 50 steps, validation every 100
TRAINING = TrainingSpec(epochs=6, eval_every=100)
# the search of the 1% budget: method -> [(lr, validation accuracy or an outcome)]; the first trial was pruned
SEARCHES = {
    "lora": [(1e-4, 0.70), (3e-4, 0.78), (1e-3, 0.84), (3e-3, 0.87), (8e-3, 0.83)],
    "houlsby": [(2e-4, 0.74), (6e-4, 0.80), (2e-3, 0.85), (9e-3, 0.88), (5e-3, "failed")],
}
CHANCE = {"accuracy": 0.5, "macro_f1": 0.3333}  # test metrics of always predicting train's majority class
CARVED = "carved from train (10% of each label, split seed 0)"
SPLITS = {"validation": f"selects checkpoints: {CARVED}",
          "test": "read once, by this final trial: the task's own test split"}
SEARCH_SPLITS = {"validation": f"selects checkpoints and search values: {CARVED}"}
ERRORS = {
    "failed": "RuntimeError: boom | a pipe\nand a second line",
    "diverged": "loss became NaN at step 40",
    "unreachable": "not reachable: prompt spans 384..196,608 params (0.00169%..0.866%) with n in 1..512",
}


def make_spec(method, budget, knob, value, step, trainable, seed, **changes) -> TrialSpec:
    """One planned trial of the fixture suite (``changes`` override fields)."""
    fields = dict(
        suite="fixture", task=TaskEntry(name="movie_sentiment"), backbone="minilm", method=method,
        method_config={knob: value} if knob else {}, budget=budget, seed=seed, lr=1e-3,
        primary_metric="accuracy", direction="max", knob=knob, knob_value=value, knob_step=step,
        target_params=TARGET.get(budget), trainable_params=trainable, stored_params=trainable, head_params=HEAD,
        base_params=BASE, reference=REFERENCE.get(method), training=TRAINING,
    )
    return TrialSpec(**{**fields, **changes})


def make_result(method, seed, accuracy, **changes) -> TrialResult:
    """What a finished fixture trial returned (``changes`` override fields): best validation before the last pass."""
    steps = 300 if method != "lora" else 280 + 10 * seed
    fields = dict(
        metrics={"accuracy": accuracy, "macro_f1": round(accuracy - 0.004, 4)},
        val_metrics={"accuracy": round(accuracy + 0.01, 4)},
        costs={"4-bit weights": Cost(value=10_500_000, unit="bytes")} if method == "qlora" else {},
        step_time_s=0.2 + 0.01 * seed + (0.3 if method == "qlora" else 0.0),
        peak_mem_bytes=400 * 2**20 + seed * 2**20, mem_kind="rss",
        inference_overhead=1.0 if method in ("full", "head") else 1.05,
        train_time_s=95.0 + seed, steps=steps, best_step=200, last_eval_step=steps, planned_steps=300,
        stopped_early=steps < 300, chance=CHANCE, splits=SPLITS, examples=EXAMPLES, load_start=IDLE, load_end=IDLE,
        curves=[CurvePoint(step=s, loss=round(0.7 - 0.1 * i - 0.01 * seed, 3),
                           val_metric=round(accuracy - 0.05 + 0.02 * i, 3)) for i, s in enumerate((100, 200, 300))],
        environment=ENV,
    )
    return TrialResult(**{**fields, **changes})


def fixture_trials():
    """(spec, result-or-status) pairs of the fixture run, in a fixed order."""
    out = []
    sizes = {}
    for method, budget, knob, value, step, trainable, outcomes in PLAN:
        sizes[(method, budget)] = (knob, value, step, trainable)
        for seed, outcome in enumerate(outcomes):
            spec = make_spec(method, budget, knob, value, step, trainable, seed, **SPEC_CHANGES.get((method, budget), {}))
            if isinstance(outcome, str):
                out.append((spec, outcome))
                continue
            result = make_result(method, seed, outcome, stored_bytes=4 * trainable,
                                 artifacts=f"trials/{method}-{budget}-{seed}",
                                 **RESULT_CHANGES.get((method, budget, seed), {}))
            out.append((spec, result))
    for method, trials in SEARCHES.items():
        for index, (lr, outcome) in enumerate(trials):
            spec = make_spec(method, "1%", *sizes[(method, "1%")], 0, role="search", lr=lr, search_index=index,
                             search_params={"lr": lr}, search_space=SPACE)
            if isinstance(outcome, str):
                out.append((spec, outcome))
                continue
            out.append((spec, make_result(method, 0, outcome, metrics={}, val_metrics={"accuracy": outcome},
                                          chance={}, splits=SEARCH_SPLITS, pruned=index == 0,
                                          examples={"train": 800, "validation": 200})))
    return out


def write_trials(store: Store, trials) -> Store:
    """Store (spec, outcome) pairs as a run would: started, then finished, failed or left running."""
    for spec, outcome in trials:
        if outcome == "unreachable":
            store.unreachable(spec.model_copy(update={"reachable": False, "note": ERRORS["unreachable"]}))
            continue
        store.start(spec)
        if isinstance(outcome, TrialResult):
            store.finish(spec.trial_id, outcome)
        elif outcome in ("failed", "diverged"):
            store.fail(spec.trial_id, outcome, ERRORS[outcome])
        # "running": left as a kill -9 would leave it
    return store


def build_store(suite_dir: Path) -> Store:
    suite_dir.mkdir(parents=True, exist_ok=True)
    (suite_dir / "suite.json").write_text(json.dumps(SUITE_JSON))
    return write_trials(Store(suite_dir / "results.sqlite"), fixture_trials())


class SectionPlugin:
    """A third-party plugin that appends a section to every report."""

    __name__ = "section_plugin"

    @peftbench.hookimpl
    def report_sections(self, suite, store):
        n = sum(r.status == "done" for r in store.records())
        return [f"## Extra from a plugin\n\nSuite {suite} has {n} finished trials.", ""]


def bare_registry(*plugins) -> Registry:
    """A registry holding only ``plugins`` (the golden output must not depend on installed ones)."""
    pm = pluggy.PluginManager("peftbench")
    pm.add_hookspecs(hookspecs)
    for p in plugins:
        pm.register(p, name=getattr(p, "__name__", None))
    return Registry(pm=pm)


@pytest.fixture(scope="module")
def fixture_run(tmp_path_factory):
    """The fixture run's store and its report, rendered once for the module (plots take seconds)."""
    suite_dir = tmp_path_factory.mktemp("reports") / "fixture"
    store = build_store(suite_dir)
    text = report.write_report(suite_dir, store, bare_registry(SectionPlugin())).read_text(encoding="utf-8")
    yield suite_dir, store, text
    store.close()


def table_rows(markdown: str, heading: str) -> dict[str, dict[str, str]]:
    """The first table after ``heading`` (empty: the first table): first cell -> {header: cell}."""
    lines = (markdown.split(heading, 1)[1] if heading else markdown).splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("|"))
    block = []
    for ln in lines[start:]:
        if not ln.startswith("|"):
            break
        block.append([c.strip() for c in re.split(r"(?<!\\)\|", ln)[1:-1]])
    header, _, *body = block
    return {cells[0]: dict(zip(header, cells)) for cells in body}


def results_of(markdown: str, budget: str) -> dict[str, dict]:
    return table_rows(markdown, f"### Budget {budget}")


# -- golden markdown -----------------------------------------------------------------------
def test_report_matches_golden(fixture_run):
    suite_dir, store, text = fixture_run
    if os.environ.get("PEFTBENCH_UPDATE_GOLDEN") == "1":
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(text, encoding="utf-8")
    assert GOLDEN.is_file(), "no golden file: run with PEFTBENCH_UPDATE_GOLDEN=1 once and review it"
    assert text == GOLDEN.read_text(encoding="utf-8"), (
        "report.md differs from tests/golden/report.md; if intended, regenerate with PEFTBENCH_UPDATE_GOLDEN=1"
    )


def test_report_is_honest_about_its_method(fixture_run):
    text = fixture_run[2]
    assert "backbone's parameters without the task head" in text and "its own column (Head)" in text
    assert "Welch's t-test" in text and "α = 0.05" in text
    assert "- **Seeds:** 3 (0, 1, 2) per method and budget" in text
    assert "peftbench run --methods lora,houlsby" in text  # the exact command, from suite.json
    assert "torch 2.13.0" in text and "device: cpu" in text
    # prefix misses its target by more than one knob step; ptuning is within its estimated step
    one = results_of(text, "1%")
    assert one["prefix"]["Achieved"].endswith(report.OFF_BUDGET)
    assert "**prefix** misses the budget: 281,088 trainable parameters vs the target 227,132" in text
    assert not any(r["Achieved"].endswith(report.OFF_BUDGET) for m, r in one.items() if m != "prefix")
    # baselines are marked as not budget-solved
    assert one["full"]["Achieved"] == f"100% {report.NOT_SOLVED}" and one["head"]["Achieved"] == f"0% {report.NOT_SOLVED}"
    assert "full, head: reference baseline(s), not budget-solved" in text
    # failed / diverged / unreachable / killed trials are listed with their reasons
    failures = text.split("## Failed and unfinished trials", 1)[1]
    for status, reason in [("failed", "RuntimeError: boom \\| a pipe and a second line"),
                           ("diverged", "loss became NaN at step 40"), ("unreachable", "not reachable: prompt spans"),
                           ("running", "unfinished: still running, or the run was killed")]:
        assert re.search(rf"\| {status}\s+\|\s+1\s+\| {re.escape(reason)}", failures), status
    assert one["houlsby"]["Seeds"] == "2 of 3"
    # tables line up: every line of a table has its pipes in the same columns
    for block in re.findall(r"(?:^\|.*\n)+", text, flags=re.M):
        widths = {len(ln) for ln in block.splitlines()}
        assert len(widths) == 1, block


def test_numbers_are_formatted():
    assert report.fmt_params(22_713_216) == "22,713,216"
    assert [report.fmt_pct(v) for v in (1.0, 0.031234, 100.0, 12.345)] == ["1.00%", "0.0312%", "100%", "12.3%"]
    assert report.fmt_short(22_713_216) == "22.7M" and report.fmt_short(227_132) == "227k" and report.fmt_short(1e6) == "1M"
    assert report.fmt_bytes(921_600) == "900 KiB" and report.fmt_bytes(10_500_000) == "10.0 MiB"
    assert report.fmt_seconds(0.2) == "200 ms" and report.fmt_seconds(95.0) == "95.0 s"
    assert report.fmt_num(0.85, report.decimals_for([0.85])) == "0.850"
    assert report.decimals_for([68.2]) == 2 and report.decimals_for([0.5, -0.2]) == 3


# -- statistics, checked against independent computations ---------------------------------
def welch_by_hand(a, b):
    """Welch's t-test written out: t, Welch-Satterthwaite df, two-sided p."""
    na, nb = len(a), len(b)
    ma, mb = sum(a) / na, sum(b) / nb
    va = sum((x - ma) ** 2 for x in a) / (na - 1)
    vb = sum((x - mb) ** 2 for x in b) / (nb - 1)
    se2 = va / na + vb / nb
    t = (ma - mb) / math.sqrt(se2)
    df = se2**2 / ((va / na) ** 2 / (na - 1) + (vb / nb) ** 2 / (nb - 1))
    return 2 * sps.t.sf(abs(t), df)


def test_statistics_against_independent_values(fixture_run):
    one = results_of(fixture_run[2], "1%")
    accs = {m: [x for x in v if isinstance(x, float)] for m, b, *_, v in PLAN if b in (None, "n/a", "1%")}
    refs = {"full", "head"}  # baselines outside the budget: tested against the best budget-matched method, not ranked
    best = max((v for k, v in accs.items() if k not in refs and len(v) > 1), key=lambda v: sum(v) / len(v))
    assert best == accs["lora"]
    for method, values in accs.items():
        n = len(values)
        if n < 2:
            continue  # checked below
        m, s = sum(values) / n, math.sqrt(sum((x - sum(values) / n) ** 2 for x in values) / (n - 1))
        lo, hi = sps.t.interval(0.95, n - 1, loc=m, scale=sps.sem(values))
        assert stats.ci(values) == pytest.approx((lo, hi), abs=1e-12)
        assert stats.std(values) == pytest.approx(s, abs=1e-15)
        row = one[method]
        assert row["accuracy (mean ± std)"] == f"{m:.3f} ± {s:.3f}"
        assert row["95% CI"] == f"[{lo:.3f}, {hi:.3f}]"
        if method == "lora":
            assert row["vs best (Welch)"] == "best" and row["Rank"] == "1"
            continue
        assert row["Rank"] == ("ref" if method in refs else row["Rank"])
        p = welch_by_hand(best, values)
        assert stats.welch(best, values) == pytest.approx(p, rel=1e-9)
        mark = "*" if p < 0.05 else "n.s."
        shown = "p<0.001" if p < 0.001 else f"p={p:.3f}"
        assert row["vs best (Welch)"] == f"{mark} {shown}", method
    # the marks the fixture was built to show
    assert one["head"]["vs best (Welch)"].startswith("*") and one["houlsby"]["vs best (Welch)"].startswith("n.s.")
    # ranks follow the means, best first; one seed: no interval, no test
    means = sorted(((sum(v) / len(v), k) for k, v in accs.items() if k not in refs), reverse=True)
    assert [one[k]["Rank"] for _, k in means] == [str(i) for i in range(1, len(means) + 1)]
    assert one["full"]["Rank"] == one["head"]["Rank"] == "ref"
    assert one["full"]["vs best (Welch)"].startswith("n.s.")  # full FT is above lora here, but not significantly
    assert one["ptuning"]["95% CI"] == "—" and one["ptuning"]["vs best (Welch)"] == "—"
    assert one["ptuning"]["accuracy (mean ± std)"] == "0.781"


def test_rank_direction_and_degenerate_cases():
    lower = [stats.Summary("a", [3.0, 3.2]), stats.Summary("b", [2.0, 2.1]), stats.Summary("c", [2.0, 2.1])]
    ordered = stats.rank(lower, "min")
    assert [s.key for s in ordered] == ["b", "c", "a"] and [s.rank for s in ordered] == [1, 1, 3]
    assert stats.rank([stats.Summary("x", [1.0]), stats.Summary("y", [2.0])], "maximize")[0].key == "y"
    assert stats.welch([1.0, 1.0], [1.0, 1.0]) == 1.0 and stats.welch([1.0, 1.0], [2.0, 2.0]) == 0.0
    assert stats.welch([1.0], [1.0, 2.0]) is None and stats.ci([1.0]) is None
    with pytest.raises(ValueError, match="direction"):
        stats.direction_of("sideways")
    assert report.pareto_front([(10, 0.8), (20, 0.7), (30, 0.9), (5, 0.5)], "max") == [(5, 0.5), (10, 0.8), (30, 0.9)]
    assert report.pareto_front([(10, 2.0), (20, 1.0), (30, 1.5)], "min") == [(10, 2.0), (20, 1.0)]


# -- plots ---------------------------------------------------------------------------------
def test_plots_exist_and_are_png(fixture_run):
    suite_dir, _, text = fixture_run
    links = re.findall(r"!\[[^\]]*\]\((plots/[^)]+)\)", text)
    names = {Path(link).name for link in links}
    assert {"pareto-movie_sentiment-minilm.png", "relative-movie_sentiment-minilm.png",
            "curves-movie_sentiment-minilm-1pct.png", "curves-movie_sentiment-minilm-3pct.png",
            "sensitivity-movie_sentiment-minilm-1pct.png"} == names
    for link in links:
        data = (suite_dir / link).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
        width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        assert width >= 300 and height >= 200 and len(data) > 5_000
    assert sorted(p.name for p in (suite_dir / "plots").iterdir()) == sorted(names)


# -- plugin sections -----------------------------------------------------------------------
def test_report_sections_hook_is_appended(fixture_run):
    text = fixture_run[2]
    assert text.index("## Extra from a plugin") > text.index("## Failed and unfinished trials")
    assert text.endswith("\n\n## Extra from a plugin\n\nSuite fixture has 37 finished trials.\n")
    assert text.count("## Extra from a plugin") == 1
    suite_dir, store, _ = fixture_run
    assert report.plugin_sections(bare_registry(), report.build_context(suite_dir, store), store) == []


def test_report_sections_through_get_registry(fixture_run):
    suite_dir, store, _ = fixture_run
    registry = peftbench.get_registry(extra=[SectionPlugin()])
    sections = report.plugin_sections(registry, report.build_context(suite_dir, store), store)
    assert "## Extra from a plugin" in "\n".join(s.markdown for s in sections)


def test_a_failing_plugin_section_names_the_plugin(fixture_run):
    class Broken:
        __name__ = "broken_plugin"

        @peftbench.hookimpl
        def report_sections(self, suite, store):
            raise KeyError("oops")

    suite_dir, store, _ = fixture_run
    with pytest.raises(peftbench.PluginError, match="broken_plugin.*report_sections.*oops"):
        report.plugin_sections(bare_registry(Broken()), report.build_context(suite_dir, store), store)


class PlacedPlugin:
    """A plugin written against the context: sections placed after, before and at the end."""

    __name__ = "placed_plugin"

    @peftbench.hookimpl
    def report_sections(self, context):
        budget_1 = report.section_key("results", "movie_sentiment", "minilm", "1%")
        return [
            context.section("Read the setup first.", title="Plugin after setup", after="setup"),
            report.Section("#### Plugin note on 1%\n\nInside the 1% budget.", after=budget_1),
            context.section("Just before the failures.", title="Plugin before failures", before="failures"),
            context.section("Second after setup.", title="Plugin after setup, second", after="Setup"),  # a title
            "## Plugin at the end\n\nPlain markdown goes last.",
        ]


def test_plugin_sections_go_where_they_ask(fixture_run, tmp_path):
    suite_dir, store, _ = fixture_run
    text = report.render(tmp_path / "fixture", store, bare_registry(SectionPlugin(), PlacedPlugin()))
    heads = [line for line in text.splitlines() if line.startswith("#")]
    assert heads.index("## Plugin after setup") == heads.index("## Setup") + 1  # right after the named section
    assert heads.index("## Plugin after setup, second") == heads.index("## Plugin after setup") + 1  # in order
    assert heads.index("## Diagnostics") == heads.index("## Plugin after setup, second") + 1
    assert heads.index("## movie_sentiment on minilm") == heads.index("## Diagnostics") + 1
    # after a budget: after its table, notes, costs and its search subsection, before the next budget's heading
    budget_1 = next(i for i, h in enumerate(heads) if h.startswith("### Budget 1%"))
    assert heads[budget_1 + 1:budget_1 + 3] == ["#### Search", "#### Plugin note on 1%"]
    assert heads[budget_1 + 3].startswith("### Budget 3%")
    assert text.index("Inside the 1% budget.") > text.index("![Search sensitivity to the learning rate, movie_sentiment")
    assert heads.index("## Failed and unfinished trials") == heads.index("## Plugin before failures") + 1
    # without a place: at the end, in pluggy's call order (the last registered plugin first)
    assert heads[-2:] == ["## Plugin at the end", "## Extra from a plugin"]
    # the built-in sections are unchanged around them
    golden = GOLDEN.read_text(encoding="utf-8")
    for part in ("### Budget 1%", "### Budget 3%", "### Parameters vs accuracy", "## Failed and unfinished trials"):
        block = golden.split(part, 1)[1].split("\n#", 1)[0]
        assert part + block in text


def test_a_misplaced_plugin_section_names_the_plugin_and_the_keys(fixture_run, tmp_path):
    class Lost:
        __name__ = "lost_plugin"

        @peftbench.hookimpl
        def report_sections(self, context):
            return context.section("nowhere", title="Lost", after="results/movie_sentiment/minilm/2%")

    with pytest.raises(peftbench.PluginError, match=r"lost_plugin.*'results/movie_sentiment/minilm/2%' names no "
                                                    r"section; known: .*results/movie_sentiment/minilm/1%.*setup"):
        report.render(tmp_path / "fixture", fixture_run[1], bare_registry(Lost()))
    with pytest.raises(ValueError, match="not both"):
        report.Section("x", after="setup", before="failures")


def test_plugin_sections_get_the_context_of_the_built_in_sections(fixture_run, tmp_path, monkeypatch):
    """A plugin reads the same groups, records and formatters as the built-in sections, and can place by group."""
    from peftbench.report import sections as builtin

    seen = {}
    budget_section = builtin.budget_section

    def spy(ctx, g):
        seen.setdefault("builtin", ctx)
        return budget_section(ctx, g)

    def rank_text(summary, fmt):  # a plugin writes ranks apart with the same mark as the tables
        if summary.rank is None:
            return "ref"
        return f"{summary.rank} {fmt.APART}" if summary.apart else str(summary.rank)

    class RankPlugin:
        __name__ = "rank_plugin"

        @peftbench.hookimpl
        def report_sections(self, context, suite, store):
            seen["plugin"], seen["suite"], seen["store"] = context, suite, store
            out = []
            for g in context.groups:
                decimals = context.fmt.decimals_for([v for m in g.finished for v in m.values(g.primary)])
                rows = [[m.label, rank_text(m.summary, context.fmt), str(len(m.done)),
                         context.fmt.fmt_num(m.summary.mean, decimals)] for m in g.finished]
                table = context.fmt.table(["Method", "Rank", "Seeds", "Mean"], rows, {1, 2, 3})
                out.append(context.section("\n".join(table), title=f"Plugin ranks {g.budget}", level=4,
                                           after=report.section_key("results", g.task, g.backbone, g.budget)))
            return out

    monkeypatch.setattr(builtin, "budget_section", spy)
    store = fixture_run[1]
    text = report.render(tmp_path / "fixture", store, bare_registry(RankPlugin()))
    assert seen["plugin"] is seen["builtin"] and seen["suite"] == "fixture" and seen["store"] is store
    assert seen["plugin"].records == store.records() and len(seen["plugin"].groups) == 2
    for budget in ("1%", "3%"):
        ours, theirs = results_of(text, budget), table_rows(text, f"#### Plugin ranks {budget}")
        assert list(theirs) == list(ours)  # same methods, same order
        for method, row in theirs.items():
            assert row["Rank"] == ours[method]["Rank"]
            assert ours[method]["Seeds"].split(" of ")[0] == row["Seeds"]
            assert ours[method]["accuracy (mean ± std)"].split(" ± ")[0] == row["Mean"]


# -- columns read from the records ---------------------------------------------------------
def small_context(tmp_path, trials):
    """The report context of a few stored trials (no plots drawn)."""
    store = write_trials(Store(tmp_path / "small" / "results.sqlite"), trials)
    return report.build_context(tmp_path / "small", store), store


def test_the_lr_column_is_the_specs_learning_rate(tmp_path):
    from peftbench.report.tables import costs_table

    trials = [
        # the spec's lr is the trial's learning rate; an 'lr' inside a method's config is not read
        (make_spec("lora", "1%", "r", 25, 9_216, 230_400, 0, lr=5e-3, method_config={"r": 25, "lr": 0.5}),
         make_result("lora", 0, 0.85)),
        (make_spec("houlsby", "1%", "m", 12, 18_456, 231_744, 0, lr=3e-4), make_result("houlsby", 0, 0.84)),
        (make_spec("full", None, None, None, None, BASE, 0, lr=2e-5), make_result("full", 0, 0.86)),
    ]
    context, store = small_context(tmp_path, trials)
    with store:
        rows = table_rows("\n".join(costs_table(context.groups[0])), "")
    assert {m: r["LR"] for m, r in rows.items()} == {"lora": "0.005", "houlsby": "0.0003", "full": "2e-05"}


def test_cost_columns_come_from_the_results_costs(tmp_path):
    from peftbench.report.tables import costs_table

    def costs(seed):
        return {"4-bit weights": Cost(value=10_500_000 + seed * 2**20, unit="bytes"),
                "merge": Cost(value=0.25 * (seed + 1), unit="seconds"), "shards": Cost(value=3, unit="count"),
                "frozen": Cost(value=1_000_000 + seed, unit="params"), "speed-up": Cost(value=1.5, unit="ratio")}

    trials = [(make_spec("qlora", "1%", "r", 25, 9_216, 230_400, seed), make_result("qlora", seed, 0.84 + seed / 100,
                                                                                    costs=costs(seed)))
              for seed in (0, 1)]
    trials.append((make_spec("lora", "1%", "r", 25, 9_216, 230_400, 0), make_result("lora", 0, 0.85)))
    context, store = small_context(tmp_path, trials)
    with store:
        lines = costs_table(context.groups[0])
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    # one column per label (sorted), between the stored size and the step time
    assert header[:8] == ["Method", "Stored params", "Stored size", "4-bit weights", "frozen", "merge", "shards",
                          "speed-up"] and header[8] == "Step time"
    rows = table_rows("\n".join(lines), "")
    # means over seeds, each in its unit's format, with the range when seeds differ; a method without the figure
    # shows a dash
    assert [rows["qlora"][k] for k in header[3:8]] == ["10.5 MiB (10.0–11.0)", "1,000,000 (1,000,000–1,000,001)",
                                                       "375 ms (250–500)", "3", "1.50×"]
    assert [rows["lora"][k] for k in header[3:8]] == ["—"] * 5
    # no figure anywhere: no such column
    plain = [(make_spec("lora", "1%", "r", 25, 9_216, 230_400, 0), make_result("lora", 0, 0.85))]
    context, store = small_context(tmp_path / "plain", plain)
    with store:
        assert costs_table(context.groups[0])[0].split("|")[4].strip() == "Step time"


def test_search_trials_stay_out_of_the_tables(tmp_path):
    from peftbench.report.setup import setup_section

    final = make_spec("lora", "1%", "r", 25, 9_216, 230_400, 0)
    search = make_spec("lora", "1%", "r", 25, 9_216, 230_400, 0, role="search", lr=1e-2)
    trials = [(final, make_result("lora", 0, 0.85)),
              (search, make_result("lora", 0, 0.80, metrics={}))]  # validation only
    context, store = small_context(tmp_path, trials)
    with store:
        assert len(context.records) == 2 and context.finals == [store.get(final.trial_id)]
        [group] = context.groups
        assert [len(m.done) for m in group.methods] == [1] and group.methods[0].spec.lr == final.lr
        setup = setup_section(context).markdown
    assert "- **Trials:** 1 (1 done)" in setup
    assert "- **Search trials:** 1 (1 done); selected on validation, not in the tables" in setup


# -- diagnostics ---------------------------------------------------------------------------
def record(spec: TrialSpec, result: TrialResult | None = None, status: str = "done") -> TrialRecord:
    return TrialRecord(trial_id=spec.trial_id, spec=spec, status=status, result=result)


def lora_seeds(values, chance: float | None = 0.5, direction="max", **result_changes) -> list[TrialRecord]:
    """Finished lora seeds with these test accuracies and this majority-class accuracy (None: none recorded)."""
    scores = {} if chance is None else {"accuracy": chance}
    return [record(make_spec("lora", "1%", "r", 25, 9_216, 230_400, seed, direction=direction),
                   make_result("lora", seed, v, **{"chance": scores, **result_changes}))
            for seed, v in enumerate(values)]


def test_golden_diagnostics_flag_exactly_the_rows_built_for_them(fixture_run):
    text = fixture_run[2]
    assert {m: r["Diagnostics"] for m, r in results_of(text, "1%").items()} == {
        "lora": "ok", "houlsby": "edge", "qlora": "cap", "prefix": "ok", "ptuning": "ok", "pfeiffer": "chance",
        "full": "ok", "head": "ok"}
    assert {m: r["Diagnostics"] for m, r in results_of(text, "3%").items()} == {
        "houlsby": "diverged", "lora": "ok", "ptuning_v2": "ok", "full": "ok", "head": "ok"}
    section = text.split("\n## Diagnostics\n", 1)[1].split("\n## ", 1)[0]
    assert text.index("## Setup") < text.index("## Diagnostics") < text.index("## movie_sentiment on minilm")
    flagged = [ln for ln in section.splitlines() if ln.startswith("- movie_sentiment")]
    assert [(ln.split(", **")[1].split("**")[0], ln.split("`")[1]) for ln in flagged] == [
        ("houlsby", "edge"), ("qlora", "cap"), ("pfeiffer", "chance"), ("houlsby", "diverged")]
    p = sps.ttest_1samp([0.002, 0.015, -0.004], 0, alternative="greater").pvalue  # pfeiffer's seeds − chance
    assert f"accuracy 0.504 ± 0.010 over 3 seeds vs 0.500 for the majority class: not significantly better " \
           f"(one-sided t-test, p={p:.3f} ≥ α = 0.05)" in flagged[2]
    assert "seed 1: best validation at step 300, the last validation pass" in flagged[1]
    assert "lr=0.009 is in the highest 10% of 0.0001..0.01 (log scale)" in flagged[0]
    assert "budget 3%" in flagged[3] and "seed 2 of 3 diverged" in flagged[3]
    assert "Not checked" not in section  # every fixture trial recorded what the checks need
    assert ("- **Splits:** validation: carved from train (10% of each label, split seed 0) — selects checkpoints "
            "and search values; test: the task's own test split — read once, by final trials\n") in text


def test_did_not_learn_is_a_one_sided_t_test_against_the_majority_class():
    # a known value: [1, 2, 3] against 0 gives t = 2·√3 with 2 degrees of freedom, one-sided p = 0.0370900
    assert stats.better_than_p([1.0, 2.0, 3.0], 0.0) == pytest.approx(0.0370899501137, rel=1e-9)
    assert stats.better_than_p([1.0, 2.0, 3.0], 0.0) == pytest.approx(sps.t.sf(2 * math.sqrt(3), 2), rel=1e-12)
    assert stats.better_than_p([-1.0, -2.0, -3.0], 0.0, "min") == pytest.approx(0.0370899501137, rel=1e-9)
    assert stats.better_than_p([1.0], 0.0) is None and stats.better_than_p([2.0, 2.0], 0.0) is None
    # by hand against scipy's one-sample test: above chance, but not significantly (p ≈ 0.078)
    values = [0.52, 0.55, 0.51]
    m = sum(values) / 3
    s = math.sqrt(sum((v - m) ** 2 for v in values) / 2)
    p = sps.t.sf((m - 0.5) / (s / math.sqrt(3)), 2)
    assert p == pytest.approx(sps.ttest_1samp(values, 0.5, alternative="greater").pvalue, rel=1e-9)
    check = diagnostics.did_not_learn(lora_seeds(values), "accuracy", "max")
    assert check.state == FLAGGED and f"p={p:.3f} ≥ α = 0.05" in check.why and 0.05 < p < 0.1
    learned = diagnostics.did_not_learn(lora_seeds([0.60, 0.62, 0.61]), "accuracy", "max")
    assert learned.state == OK and "significantly better (one-sided t-test, p=0.001 < α = 0.05)" in learned.why
    # lower is better: an error rate significantly below the majority class's has learned
    assert diagnostics.did_not_learn(lora_seeds([0.30, 0.32, 0.31], direction="min"), "accuracy", "min").state == OK
    assert diagnostics.did_not_learn(lora_seeds([0.60, 0.62, 0.61], direction="min"), "accuracy", "min").state == FLAGGED
    # one seed, or no spread: the mean against the majority class, no test
    for values, state in [([0.50], FLAGGED), ([0.55], OK), ([0.5, 0.5, 0.5], FLAGGED), ([0.6, 0.6], OK)]:
        check = diagnostics.did_not_learn(lora_seeds(values), "accuracy", "max")
        assert check.state == state and "no test" in check.why, values
    # nothing to compare with: not recorded (an old store), not computed (a task without one), no seed
    old = lora_seeds([0.8], chance=None, splits={}, planned_steps=None, last_eval_step=None)
    assert diagnostics.did_not_learn(old, "accuracy", "max").state == NOT_RECORDED
    assert diagnostics.did_not_learn(lora_seeds([0.8], chance=None), "accuracy", "max").state == NOT_COMPUTED
    assert diagnostics.did_not_learn([], "accuracy", "max").state == NOT_APPLICABLE


def test_still_improving_needs_the_best_step_at_the_last_pass_without_an_early_stop():
    def improving(*seeds):  # one finished seed per dict of result fields
        spec = make_spec("lora", "1%", "r", 25, 9_216, 230_400, 0)
        return diagnostics.still_improving([record(spec.model_copy(update={"seed": seed}),
                                                   make_result("lora", seed, 0.8, **changes))
                                            for seed, changes in enumerate(seeds)])

    hit = improving(dict(best_step=300, last_eval_step=300, steps=300, stopped_early=False))
    assert hit.state == FLAGGED and hit.why.startswith("seed 0: best validation at step 300")
    assert improving(dict(best_step=300, last_eval_step=300, stopped_early=True)).state == OK
    assert improving(dict(best_step=200, last_eval_step=300, stopped_early=False)).state == OK
    two = improving(dict(best_step=200, last_eval_step=300, stopped_early=False),
                    dict(best_step=250, last_eval_step=250, stopped_early=False))
    assert two.state == FLAGGED and two.why.startswith("seed 1:")
    assert improving(dict(best_step=None, last_eval_step=None, stopped_early=None)).state == NOT_RECORDED
    assert diagnostics.still_improving([]).state == NOT_APPLICABLE


def test_a_chosen_value_at_the_edge_of_its_space():
    log, linear, choices = SPACE["lr"], {"low": 0, "high": 1}, {"choices": [8, 16, 32]}
    assert diagnostics.edge_of(9e-3, log) == "in the highest 10% of 0.0001..0.01 (log scale)"
    assert diagnostics.edge_of(1.5e-4, log).startswith("in the lowest 10%")  # log position 0.088
    assert diagnostics.edge_of(1.7e-4, log) == ""  # 0.115: inside (on a linear scale it would be at the edge)
    assert diagnostics.edge_of(3e-3, log) == "" and diagnostics.edge_of(0.5, linear) == ""
    assert diagnostics.edge_of(0.95, linear).startswith("in the highest") and diagnostics.edge_of(0.05, linear)
    assert diagnostics.edge_of(8, choices) == "the first of [8, 16, 32]"
    assert diagnostics.edge_of(32, choices) == "the last of [8, 16, 32]" and diagnostics.edge_of(16, choices) == ""
    assert diagnostics.edge_of(8, {"values": [16, 8]}) == "the first of [8, 16]"  # the search's own key, any order
    assert diagnostics.edge_of("sgd", {"choices": ["adamw", "sgd"]}) == ""  # names have no order, no edge
    assert diagnostics.edge_of(0.1, {"mu": 0, "sigma": 1}) is None and diagnostics.edge_of(0.1, None) is None

    def final(params, space):
        return [record(make_spec("lora", "1%", "r", 25, 9_216, 230_400, 0, search_params=params, search_space=space),
                       make_result("lora", 0, 0.8))]

    both = {"lr": SPACE["lr"], "alpha": choices}
    check = diagnostics.at_edge(final({"lr": 3e-3, "alpha": 32}, both))
    assert check.state == FLAGGED and check.why == "alpha=32 is the last of [8, 16, 32]"
    assert diagnostics.at_edge(final({"lr": 3e-3, "alpha": 16}, both)).state == OK
    assert diagnostics.at_edge(final({"lr": 3e-3}, {})).state == NOT_RECORDED
    assert diagnostics.at_edge(final({"lr": 3e-3}, {"lr": {"mu": 0}})).state == NOT_COMPUTED
    assert diagnostics.at_edge(final({}, {})).state == NOT_APPLICABLE


def test_a_diverged_seed_is_flagged():
    ok = lora_seeds([0.8, 0.81])
    assert diagnostics.diverged(ok).state == OK
    bad = record(make_spec("lora", "1%", "r", 25, 9_216, 230_400, 2), status="diverged")
    check = diagnostics.diverged([*ok, bad])
    assert check.state == FLAGGED and check.why == "seed 2 of 3 diverged"
    assert [c.code for c in diagnostics.diagnose(ok, [bad], "accuracy", "max")] == list(diagnostics.CHECKS)
    assert diagnostics.cell(diagnostics.diagnose(ok, [bad], "accuracy", "max")) == "diverged"


# -- ranked apart --------------------------------------------------------------------------
def test_methods_that_are_not_budget_matched_are_ranked_apart():
    from peftbench.report.tables import results_table

    replaced = "reduction_factor=8 chosen by the solver: the largest of [16, 8] with which m reaches the budget"
    plan = [  # make_spec's arguments but the seed, spec changes, accuracies
        (("lora", "1%", "r", 25, 9_216, 230_400), {}, [0.85, 0.86]),
        (("houlsby", "1%", "m", 40, 18_456, 760_000), dict(pinned=True, matched=False), [0.90, 0.91]),
        (("prefix", "1%", "n", 1, 4_608, 1_922_304),
         dict(reachable=False, matched=False, note=NEAREST.replace("ptuning_v2", "prefix")), [0.87, 0.88]),
        (("pfeiffer", "1%", "m", 49, 4_000, 228_390), dict(note=replaced), [0.80, 0.81]),
        (("full", None, None, None, None, BASE), {}, [0.86, 0.87]),
    ]
    records = [record(make_spec(*args, seed, **changes), make_result(args[0], seed, acc))
               for args, changes, accs in plan for seed, acc in enumerate(accs)]
    [group] = report.build_groups(records)
    lines, notes = results_table(group)
    rows = table_rows("\n".join(lines), "")
    # houlsby and prefix score best but never take rank 1: they follow the matched ones, with their own ranks
    assert list(rows) == ["lora", "pfeiffer", "houlsby", "prefix", "full"]
    assert [rows[m]["Rank"] for m in rows] == ["1", "2", f"1 {report.APART}", f"2 {report.APART}", "ref"]
    assert rows["lora"]["vs best (Welch)"] == "best" and [m.method for m in group.methods if m.summary.best] == ["lora"]
    p = stats.welch([0.85, 0.86], [0.90, 0.91])
    assert rows["houlsby"]["vs best (Welch)"] == ("*" if p < 0.05 else "n.s.") + f" p={p:.3f}"
    assert rows["houlsby"]["Achieved"] == f"3.35% {report.APART}" and rows["houlsby"]["Knob"] == "m=40 (pinned size)"
    assert rows["prefix"]["Achieved"] == f"8.46% {report.APART}"  # the apart mark, not the off-budget one
    assert not any(report.OFF_BUDGET in r["Achieved"] for r in rows.values())
    apart = [n for n in notes if n.startswith(report.APART)]
    assert len(apart) == 2
    assert "**houlsby** is ranked apart (pinned size outside the budget's tolerance): 760,000 trainable" in apart[0]
    assert ("**prefix** is ranked apart (the budget is out of its reach: trained at its nearest feasible size)"
            in apart[1] and "Solver: not reachable: prefix spans" in apart[1])
    assert f"**pfeiffer**: {replaced}." in notes  # the solver's note on a matched method, under the table


def test_golden_ranks_the_unreachable_method_apart(fixture_run):
    three = results_of(fixture_run[2], "3%")
    assert three["houlsby"]["Rank"] == "1" and three["houlsby"]["vs best (Welch)"] == "best"
    assert three["ptuning_v2"]["Rank"] == f"1 {report.APART}" and three["ptuning_v2"]["Achieved"] == "2.60% ‡"
    assert list(three) == ["houlsby", "lora", "ptuning_v2", "full", "head"]
    assert f"- {report.APART} **ptuning_v2** is ranked apart" in fixture_run[2]


# -- search --------------------------------------------------------------------------------
def test_search_section_and_sensitivity_plot(fixture_run):
    suite_dir, _, text = fixture_run
    block = text.split("#### Search\n", 1)[1].split("\n### ", 1)[0]
    rows = table_rows(block, "")
    assert rows["lora"] == {"Method": "lora", "Space": "lr ∈ [0.0001, 0.01] (log)", "Trials": "5", "Pruned": "1",
                            "Chosen": "lr=0.003", "Validation accuracy (chosen)": "0.870"}
    assert rows["houlsby"]["Trials"] == "5 (1 failed)" and rows["houlsby"]["Chosen"] == "lr=0.009"
    assert rows["houlsby"]["Validation accuracy (chosen)"] == "0.880"
    assert text.index("#### Search") < text.index("### Budget 3%")  # inside its budget; 3% ran no search
    assert text.count("#### Search") == 1
    [link] = re.findall(r"!\[[^\]]*\]\((plots/sensitivity[^)]+)\)", block)
    assert link == "plots/sensitivity-movie_sentiment-minilm-1pct.png"
    data = (suite_dir / link).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5_000
    # search trials stay out of the results tables
    assert sum(int(r["Seeds"].split()[0]) for r in results_of(text, "1%").values()) == 3 + 3 + 3 + 2 + 3 + 3 + 1 + 3


def test_search_spaces_of_other_shapes_are_shown_as_text():
    from peftbench.report.search import space_text

    def trial(space):
        return record(make_spec("lora", "1%", "r", 25, 9_216, 230_400, 0, role="search", search_space=space))

    assert space_text([trial({"alpha": {"choices": [8, 16, 32]}, "lr": SPACE["lr"]})]) == \
        "alpha ∈ {8, 16, 32}; lr ∈ [0.0001, 0.01] (log)"
    assert space_text([trial({"dropout": {"low": 0.0, "high": 0.3}})]) == "dropout ∈ [0, 0.3]"
    assert space_text([trial({"alpha": {"values": [8, 16]}})]) == "alpha ∈ {8, 16}"
    assert space_text([trial({"lr": {"mu": -3, "sigma": 1}})]) == 'lr: {"mu":-3,"sigma":1}'
    assert space_text([trial({})]) == "not recorded"


# -- an old store --------------------------------------------------------------------------
#: the lines that set the costs tables and the learning curves apart since the diagnostics (spreads, kept steps,
#: load; the curves' and the Pareto plot's captions); ``costs_match`` checks the tables' numbers instead
LATER = ("- **Training:**", "Costs (", "Per method: the mean over seeds")


def without_additions(markdown: str) -> str:
    """The report less what the diagnostics added (the Splits line, the Diagnostics section, column and legend) and
    less what came later: the Training line, the costs tables and their caption, the plots' captions."""
    lines, out, cut, costs = markdown.splitlines(), [], False, False
    for line in lines:
        if line.startswith("## "):
            cut = line == "## Diagnostics"
        costs = line.startswith("Costs (") or (costs and (line.startswith("|") or not line))
        if cut or costs or line.startswith("- **Splits:**") or line.startswith("- Diagnostics: `chance`") or \
                line.startswith(LATER):
            continue
        out.append(line.split(" Right of it, each budget's matched methods")[0])
    joined = re.sub(r"\n{3,}", "\n\n", "\n".join(out))  # a dropped caption leaves no gap
    text, tables = joined, re.findall(r"(?:^\|.*\n?)+", joined, flags=re.M)
    for block in tables:
        if block.splitlines()[0].rstrip().endswith("| Diagnostics |") or "| Diagnostics " in block.splitlines()[0]:
            text = text.replace(block, "\n".join(re.sub(r" [^|]*\|$", "", ln) for ln in block.splitlines())
                                + ("\n" if block.endswith("\n") else ""))
    return text


def test_an_old_store_renders_with_not_recorded_diagnostics(tmp_path):
    suite_dir = tmp_path / "example"
    shutil.copytree(V1_EXAMPLE, suite_dir)  # never the committed store in place: opening it migrates it
    registry = peftbench.get_registry()  # to migrate the store if it is older than the code
    with Store(suite_dir / "results.sqlite", create=False, registry=registry) as store:
        text = report.render(suite_dir, store, bare_registry())
    assert "- **Splits:** not recorded (trials stored before the splits' origins were recorded)" in text
    rows = results_of(text, "1%")
    assert rows and {r["Diagnostics"] for r in rows.values()} == {"chance? cap?"}
    section = text.split("\n## Diagnostics\n", 1)[1].split("\n## ", 1)[0]
    assert "Flagged: none." in section
    assert "- `chance` (did not learn) not recorded for every row: no majority-class score stored" in section
    assert "- `cap` (still improving at the cap) not recorded for every row" in section
    # nothing else changed; the costs tables' means are the old tables' values, peak memory's top its old maximum
    old = (V1_EXAMPLE / "report.md").read_text(encoding="utf-8")
    assert without_additions(text) == without_additions(old)
    for budget in ("1%",):  # the one budget of the 1% default
        before, after = (table_rows(t.split(f"### Budget {budget}", 1)[1], "Costs (") for t in (old, text))
        assert before.keys() == after.keys() and before
        for method, row in after.items():
            for column in ("Stored size", "Step time", "Inference ×", "Train time", "Steps", "LR"):
                assert row[column].split(" (")[0] == before[method][column], (budget, method, column)
            mean, _, spread = row["Peak memory (RSS)"].partition(" (")
            number, unit = mean.split(" ")
            assert f"{spread.split('–')[1].rstrip(')') if spread else number} {unit} (RSS)" == \
                before[method]["Peak memory"]


# -- the command ---------------------------------------------------------------------------
def _args(argv):
    parser = argparse.ArgumentParser()
    report.add_report_arguments(parser)
    return parser.parse_args(argv)


def test_cli_report_writes_and_lists_suites(fixture_run, tmp_path, monkeypatch, capsys):
    import peftbench.contract.registry as plugins

    out = tmp_path / "reports"
    shutil.copytree(fixture_run[0], out / "fixture", ignore=shutil.ignore_patterns("report.md", "plots"))
    (out / "other").mkdir()  # a folder without a store is not a suite
    monkeypatch.setattr(plugins, "_DEFAULT", bare_registry(SectionPlugin()))  # what `peftbench report` uses
    assert report.main_report(_args(["fixture", "--out", str(out)])) == 0
    assert (out / "fixture" / "report.md").read_text(encoding="utf-8") == fixture_run[2]
    assert "wrote" in capsys.readouterr().out
    # a caller's registry is used as given (here without the plugin: no plugin section)
    assert report.main_report(_args(["fixture", "--out", str(out)]), registry=bare_registry()) == 0
    without = fixture_run[2].split("\n\n## Extra from a plugin")[0] + "\n"
    assert (out / "fixture" / "report.md").read_text(encoding="utf-8") == without
    with pytest.raises(ConfigError, match=r"no suite 'fixtur'.*did you mean 'fixture'.*suites there: fixture$"):
        report.main_report(_args(["fixtur", "--out", str(out)]))
    with pytest.raises(ConfigError, match=r"no suite 'other'.*suites there: fixture$"):
        report.main_report(_args(["other", "--out", str(out)]))
    with pytest.raises(ConfigError, match="no suites there yet"):
        report.main_report(_args(["fixture", "--out", str(tmp_path / "nowhere")]))
    assert not (tmp_path / "nowhere").exists() and not (out / "other" / "results.sqlite").exists()


def test_cli_entry_point_reports_errors_on_one_line(tmp_path, capsys):
    from peftbench.cli import main

    assert main(["report", "missing", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no suite 'missing'" in err


def test_the_committed_example_renders_as_committed(tmp_path):
    """`peftbench report example` on a copy of the committed store gives the committed report (and plots)."""
    suite_dir = tmp_path / "example"
    shutil.copytree(EXAMPLE, suite_dir, ignore=shutil.ignore_patterns("report.md", "plots"))
    registry = peftbench.get_registry()
    with Store(suite_dir / "results.sqlite", create=False, registry=registry) as store:
        path = report.write_report(suite_dir, store, registry)
    assert path.read_text(encoding="utf-8") == (EXAMPLE / "report.md").read_text(encoding="utf-8")
    assert sorted(p.name for p in (suite_dir / "plots").iterdir()) == sorted(p.name for p in (EXAMPLE / "plots").iterdir())

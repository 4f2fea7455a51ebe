"""The report states its setup and its machine: the training each group ran under, the kept step per seed,
the majority-class score, costs with their spread, the machine's load with a warning; and plots a reader can
use (distinct colours, mean lines with bands, a linear panel per crowded budget, labelled ticks).

Records are built with known values and stored through the store API (``write_trials``); one tiny real run
checks that a trial records what these read.
"""

from __future__ import annotations

import itertools
import math
import sqlite3

import pytest

from peftbench.report import format as fmt
from peftbench.report import load, palette, plots
from peftbench.report.sections import budget_section
from peftbench.report.setup import setup_section
from peftbench.report.tables import costs_caption, costs_table, results_table
from peftbench.results.records import CurvePoint, MachineLoad, TrainingSpec
from peftbench.results.store import Store
from peftbench.tasks.entry import TaskEntry
from test_report import make_result, make_spec, small_context, table_rows, write_trials
from test_runner import base_args, env, rows, run  # noqa: F401 - env is a fixture

SCHEDULE = TrainingSpec(epochs=2, step_cap=30, batch_size=8, eval_batch_size=32, grad_accum=2, eval_every=10,
                        patience=2, warmup_ratio=0.1, weight_decay=0.05, max_length=64, train_limit=120,
                        eval_limit=40, test_limit=50, data_seed=3)
USED = {"train": 120, "validation": 40, "test": 50}


def lora(seed, training=SCHEDULE, **result):
    spec = make_spec("lora", "1%", "r", 25, 9_216, 230_400, seed, training=training)
    return spec, make_result("lora", seed, 0.85, **{"examples": USED, "planned_steps": 30, **result})


def head(seed, training=SCHEDULE, **result):
    spec = make_spec("head", None, None, None, None, 0, seed, training=training)
    return spec, make_result("head", seed, 0.70, **{"examples": USED, "planned_steps": 30, **result})


def setup_of(tmp_path, trials) -> str:
    context, store = small_context(tmp_path, trials)
    with store:
        return setup_section(context).markdown


def training_line(setup: str) -> str:
    return next(line for line in setup.splitlines() if line.startswith("- **Training:**"))


# -- setup -----------------------------------------------------------------------------------
def test_setup_states_the_training_each_group_ran_under(tmp_path):
    searched = SCHEDULE.model_copy(update={"weight_decay": 0.1})  # a search chose lora's weight decay
    trials = [lora(0, searched, steps=20), lora(1, searched, steps=30), *(head(seed, steps=30) for seed in range(3))]
    trials[0] = (trials[0][0].model_copy(update={"search_params": {"lr": 1e-3, "weight_decay": 0.1}}), trials[0][1])
    trials[1] = (trials[1][0].model_copy(update={"search_params": {"lr": 1e-3, "weight_decay": 0.1}}), trials[1][1])
    line = training_line(setup_of(tmp_path, trials))
    # what was used and planned: 30 steps of 8 x 2 examples over 120 examples are 4 passes over them
    assert ("examples: train 120, validation 40, test 50 (seeded subsamples up to train_limit, eval_limit and "
            "test_limit, data seed 3)") in line
    assert "2 epochs, capped at 30 steps: 30 planned steps (4 epochs of data), 20–30 trained" in line
    assert "batch 8 × 2 accumulated, eval batch 32" in line
    assert "validation every 10 steps, early stopping after 2 passes without improvement" in line
    assert "the best validation step's weights kept" in line
    # a setting that differs between methods: the common value, then the others by method
    assert "warmup 10% of the planned steps, weight decay 0.05 (lora: 0.1), gradient norm clipped at 1" in line
    assert "max_length 64 tokens" in line
    assert "learning rate searched on validation for lora (see *Search*); fixed before training for head" in line


def test_setup_of_several_tasks_and_of_an_old_store(tmp_path):
    other = TaskEntry(name="trec")
    no_counts = dict(examples={}, planned_steps=None)  # stored before the counts were recorded
    trials = [lora(0, **no_counts),
              (make_spec("lora", "1%", "r", 25, 9_216, 230_400, 0, training=SCHEDULE.model_copy(
                  update={"eval_every": None, "patience": None, "step_cap": None, "max_steps": 40}), task=other),
               make_result("lora", 0, 0.6, examples={}, planned_steps=None,
                           curves=[CurvePoint(step=s, val_metric=0.5) for s in (10, 20, 30, 40)]))]
    setup = setup_of(tmp_path, trials)
    lines = setup.splitlines()
    start = lines.index("- **Training:**")
    movie, trec = lines[start + 1], lines[start + 2]
    assert movie.startswith("  - movie_sentiment on minilm: examples: train ≤ 120, validation ≤ 40, test ≤ 50 ")
    assert "data seed 3; counts used not recorded)" in movie
    assert trec.startswith("  - trec on minilm: ") and "40 steps (max_steps)" in trec
    assert "validation every 10 steps (eval_every unset)" in trec and "no early stopping" in trec
    # the fixture's default result recorded the machine's load; none above the threshold
    assert "- **Machine load:** 1-minute load average per CPU at the finished trials' starts and ends: 0.60–0.60" \
           in setup and "no trial above 1.5" in setup


# -- per trial: kept step, majority class --------------------------------------------------
def test_kept_steps_and_the_majority_class_stand_beside_the_results(tmp_path):
    trials = [lora(0, best_step=20), lora(2, best_step=30), lora(1, best_step=10), head(0, best_step=None)]
    context, store = small_context(tmp_path, trials)
    with store:
        [g] = context.groups
        quality, notes = results_table(g)
        costs = table_rows("\n".join(costs_table(g)), "")
    assert {m: r["Kept step"] for m, r in costs.items()} == {"lora": "s0 20, s1 10, s2 30", "head": "—"}
    rows_ = table_rows("\n".join(quality), "")
    columns = [c.strip() for c in quality[0].strip("|").split("|")]
    assert columns[columns.index("accuracy (mean ± std)") + 2] == "Majority class"  # beside the metric and its CI
    assert rows_["lora"]["Majority class"] == rows_["head"]["Majority class"] == "0.500"
    assert any(n.startswith("Majority class: the accuracy of always predicting train's most frequent label")
               for n in notes)
    # a group whose trials recorded no majority-class score (a generation task, an old store): no such column
    context, store = small_context(tmp_path / "none", [lora(0, chance={})])
    with store:
        assert "Majority class" not in results_table(context.groups[0])[0][0]


# -- costs with their spread ----------------------------------------------------------------
def test_cost_figures_show_their_spread_over_seeds(tmp_path):
    values = {0: (0.2, 400, 1.00, 50.0), 1: (0.4, 420, 1.50, 70.0), 2: (0.3, 410, 1.25, 60.0)}
    trials = [lora(seed, step_time_s=s, peak_mem_bytes=mib * 2**20, inference_overhead=inf, train_time_s=t)
              for seed, (s, mib, inf, t) in values.items()]
    trials.append(head(0, step_time_s=0.1, peak_mem_bytes=300 * 2**20, inference_overhead=1.0, train_time_s=20.0))
    context, store = small_context(tmp_path, trials)
    with store:
        lines = costs_table(context.groups[0])
    rows_ = table_rows("\n".join(lines), "")
    assert lines[0].split("|")[5].strip() == "Peak memory (RSS)"  # one kind in the table: named once, in the header
    lora_row, head_row = rows_["lora"], rows_["head"]
    # mean (min–max), the range in the mean's unit
    assert lora_row["Step time"] == "300 ms (200–400)" and lora_row["Train time"] == "60.0 s (50.0–70.0)"
    assert lora_row["Peak memory (RSS)"] == "410 MiB (400–420)" and lora_row["Inference ×"] == "1.25× (1.00–1.50)"
    # one seed: no range
    assert (head_row["Step time"], head_row["Peak memory (RSS)"], head_row["Inference ×"]) == ("100 ms", "300 MiB",
                                                                                             "1.00×")
    assert fmt.fmt_spread([], "seconds") == "—" and fmt.fmt_spread([2.0, 2.0], "seconds") == "2.00 s"
    assert fmt.fmt_spread([90.0, 150.0], "seconds") == "2.00 min (1.50–2.50)"  # the mean picks the unit
    assert fmt.fmt_spread([2**30, 3 * 2**30], "bytes") == "2.00 GiB (1.00–3.00)"
    assert costs_caption(context.groups[0]).startswith("Costs (mean over finished seeds, (min–max) when seeds differ")


# -- the machine's load ---------------------------------------------------------------------
def loaded(per_cpu: float, cpus: int = 2) -> MachineLoad:
    return MachineLoad(load_1min=per_cpu * cpus, cpu_count=cpus, usable_cpus=cpus)


def test_a_loaded_machine_is_flagged_and_an_idle_one_is_not(tmp_path):
    at_threshold = [lora(0, load_start=loaded(0.5), load_end=loaded(load.THRESHOLD)),
                    head(0, load_start=loaded(1.2), load_end=loaded(0.9))]
    context, store = small_context(tmp_path / "idle", at_threshold)
    with store:
        [g] = context.groups
        assert store.get(at_threshold[0][0].trial_id).result.load_end == loaded(load.THRESHOLD)  # stored and read
        costs = table_rows("\n".join(costs_table(g)), "")
        section = budget_section(context, g).markdown
    assert {m: r["Load/CPU"] for m, r in costs.items()} == {"lora": "1.50", "head": "1.20"}
    assert load.warning(g) is None and "Loaded machine" not in section

    busy = [lora(0, load_start=loaded(0.5), load_end=loaded(0.8)),
            lora(1, load_start=MachineLoad(load_1min=6.4, cpu_count=4, usable_cpus=2), load_end=loaded(1.0)),
            head(0)]
    context, store = small_context(tmp_path / "busy", busy)
    with store:
        [g] = context.groups
        costs = table_rows("\n".join(costs_table(g)), "")
        section = budget_section(context, g).markdown
        setup = setup_section(context).markdown
    assert costs["lora"]["Load/CPU"] == "1.60 ⚠" and costs["head"]["Load/CPU"] == "0.60"
    warning = ("> ⚠ **Loaded machine:** 1 of 3 trials here ran with a 1-minute load average above 1.5 per CPU "
               "(highest 1.60: load 6.40 on 4 CPUs, **lora** seed 1). Their step times, train times and inference "
               "ratios may be inflated by other work on the machine; compare them with care.")
    assert warning in section
    table_end = section.index("\n\n", section.index("| head", section.index("Costs (")))
    assert section.index(warning) == table_end + 2  # right under the costs table
    assert "starts and ends: 0.50–1.60" in setup and "1 of 3 trials above 1.5 (warned about under their costs tables)" in setup

    # trials that recorded no load: no column, no warning, and the caption says so
    context, store = small_context(tmp_path / "old", [lora(0, load_start=None, load_end=None)])
    with store:
        [g] = context.groups
        assert "Load/CPU" not in costs_table(g)[0] and load.warning(g) is None
        assert costs_caption(g).endswith("the machine's load was not recorded for these trials):")
        assert load.setup_line(context.finals) == []


def test_a_read_only_store_without_the_newer_columns_still_reads(tmp_path):
    path = tmp_path / "s" / "results.sqlite"
    write_trials(Store(path), [lora(0)]).close()
    db = sqlite3.connect(path)
    for column in ("load_start", "load_end", "examples"):  # as a store written before these fields existed
        db.execute(f"ALTER TABLE trials DROP COLUMN {column}")
    db.commit()
    db.close()
    path.chmod(0o444)
    path.parent.chmod(0o555)
    try:
        with Store(path, create=False, readonly=True) as store:
            [record] = store.records()
    finally:
        path.parent.chmod(0o755)
        path.chmod(0o644)
    assert record.result.load_start is None and record.result.examples == {} and record.result.best_step == 200


def test_a_trial_records_its_examples_and_the_machines_load(env, tmp_path):
    import os

    out = tmp_path / "reports"
    assert run(base_args(env, out, "--methods", "head", "--seeds", "1", "--suite", "tiny")) == 0
    [record] = rows(out, "tiny")
    result = record.result
    # 60 rows: 10% of each label carved for validation and for test (3 + 3 each), the rest trains
    assert result.examples == {"train": 48, "validation": 6, "test": 6}
    for sample in (result.load_start, result.load_end):
        assert sample.cpu_count == os.cpu_count() and sample.usable_cpus == len(os.sched_getaffinity(0))
        assert sample.load_1min is not None and sample.load_1min >= 0
    text = (out / "tiny" / "report.md").read_text()
    assert "- **Training:** examples: train 48, validation 6, test 6 " in text
    assert "3 steps (max_steps): 3 planned steps" in text
    assert "- **Machine load:** 1-minute load average per CPU" in text and "| Load/CPU |" in text


# -- plots -----------------------------------------------------------------------------------
def test_the_palette_has_no_near_duplicates():
    names = [f"method {i:02d}" for i in range(len(palette.PALETTE))]
    chosen = palette.colors(names)
    assert len(set(chosen.values())) == len(names)
    for a, b in itertools.combinations(chosen.values(), 2):
        assert not palette.near_duplicates(a, b), (a, b)
        assert math.dist(palette.oklab(a), palette.oklab(b)) >= palette.MIN_DISTANCE
    # the rule catches what tab20 did (lora and pfeiffer both green) and tab10's red and brown
    assert palette.near_duplicates("#2ca02c", "#98df8a") and palette.near_duplicates("#d62728", "#8c564b")
    assert palette.hue_difference("#2ca02c", "#98df8a") < palette.MIN_HUE
    # assigned by sorted name: the same colours whatever order the methods come in
    assert palette.colors(["pfeiffer", "lora", "head"]) == palette.colors(["head", "lora", "pfeiffer", "lora"])
    # past the palette the colours repeat, but never with the same line style
    many = [f"m{i:02d}" for i in range(2 * len(palette.PALETTE))]
    colours, styles = palette.colors(many), palette.linestyles(many)
    assert len({(colours[m], styles[m]) for m in many}) == len(many)


def test_log_axes_have_labelled_ticks_whatever_their_span():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    for low, high in [(18_000, 23_000), (18_000, 90_000), (20_000, 22_713_216), (2e-4, 9e-3)]:
        fig = Figure()
        FigureCanvasAgg(fig)
        ax = fig.subplots()
        ax.plot([low, high], [0, 1])
        plots.log_ticks(ax)
        fig.canvas.draw()
        view = sorted(ax.get_xlim())
        labels = [t.get_text() for t in ax.get_xticklabels() if t.get_text() and view[0] <= t.get_position()[0] <= view[1]]
        assert len(labels) >= 2, (low, high, labels)


def test_curves_and_pareto_plots_are_drawn_from_the_seeds(tmp_path):
    # the smoothing and the aggregation over seeds, on known values
    assert plots.smooth([1.0, 1.0, 1.0]) == pytest.approx([1.0, 1.0, 1.0])  # bias-corrected: no pull towards 0
    assert plots.smooth([0.0, 1.0], 0.5) == pytest.approx([0.0, 2 / 3])
    assert plots.across_seeds([[(1, 1.0), (2, 3.0)], [(1, 3.0)]]) == [(1, 2.0, 1.0, 3.0), (2, 3.0, 3.0, 3.0)]
    # methods of one size are set side by side; distinct sizes stay where they are
    assert plots.dodge([100.0, 100.0, 200.0]) == pytest.approx([99.0, 101.0, 200.0])
    trials = [lora(seed) for seed in range(3)] + [head(seed) for seed in range(2)]
    trials += [(make_spec("qlora", "1%", "r", 25, 9_216, 230_400, seed), make_result("qlora", seed, 0.84))
               for seed in range(2)]
    trials += [(make_spec("lora", "3%", "r", 74, 9_216, 681_984, 0), make_result("lora", 0, 0.86))]
    context, store = small_context(tmp_path, trials)
    with store:
        groups = context.groups
        assert [g.budget for g in plots.clustered(groups)] == ["1%"]  # two matched methods at 1%, one at 3%
        pareto, curves = tmp_path / "p" / "pareto.png", tmp_path / "p" / "curves.png"
        plots.pareto_plot(groups, context.colors, pareto)
        assert plots.curves_plot(groups[0], context.colors, curves)
    for path in (pareto, curves):
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5_000
    width = int.from_bytes(pareto.read_bytes()[16:20], "big")
    assert width > 1000  # the main panel and the 1% budget's linear panel side by side

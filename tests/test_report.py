"""Run report: one row per checkpoint with measured or estimated throughput, and a readable Pareto PNG."""

import json

import pytest

from hybridize.errors import UserError
from hybridize.modeling.configuration_hybrid import HybridConfig
from hybridize.report import build_report
from hybridize.report.pareto import pareto_front, plot_pareto

TASKS = ("arithmetic", "multi_digit")
LAYERS = 8


def _eval(accuracies, kl=None, tokens=None, teacher=None):
    result = {"count": 40, "task_mean_accuracy": sum(accuracies) / len(accuracies),
              "tasks": {t: {"count": 20, "accuracy": a} for t, a in zip(TASKS, accuracies)}}
    if kl is not None:
        result["teacher_forced"] = {"tokens": 900, "kl_teacher_model": kl, "agreement": 0.9}
    if tokens is not None:
        result["tokens"] = tokens
    if teacher is not None:
        result["teacher"] = teacher
    return result


def _checkpoint(run, name, mixers, evaluation, bench=None, state=None):
    folder = run / name
    folder.mkdir(parents=True)
    kinds = ["mamba" if i in mixers else "attention" for i in range(LAYERS)]
    (folder / "layers.json").write_text(json.dumps({"mixer_types": kinds}))
    HybridConfig(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=LAYERS,
                 num_attention_heads=4, num_key_value_heads=2, mixer_types=kinds).to_json_file(folder / "config.json")
    (folder / "eval.json").write_text(json.dumps(evaluation))
    if bench is not None:
        (folder / "bench.json").write_text(json.dumps({"throughput_ratio": bench}))
    if state is not None:
        (folder / "state.json").write_text(json.dumps(state))


TEACHER = {"task_mean_accuracy": 0.8, "tasks": {"arithmetic": {"accuracy": 0.9}, "multi_digit": {"accuracy": 0.7}}}


@pytest.fixture
def run(tmp_path):
    run = tmp_path / "demo"
    _checkpoint(run, "stage1", {1, 5}, _eval([0.85, 0.65], kl=0.05, tokens=2_000_000, teacher=TEACHER), bench=1.3)
    _checkpoint(run, "stage2", {1, 3, 5, 7}, _eval([0.6, 0.4], kl=0.2), state={"tokens": 5_500_000})
    (run / "notes").mkdir()  # not a checkpoint: ignored
    return run


def _table_rows(report):
    return [line for line in report.splitlines() if line.startswith("| ") and not line.startswith("| checkpoint")]


def test_report_has_a_row_per_checkpoint_and_a_pareto_png(run):
    report_path, plot_path = build_report(run)
    report = report_path.read_text()
    rows = _table_rows(report)
    assert [r.split(" | ")[0] for r in rows] == ["| teacher", "| stage1", "| stage2"]
    assert rows[1].split(" | ")[1:] == ["2/8", "2.0M", "85.0%", "65.0%", "75.0%", "93.8%", "0.0500", "90.0%",
                                        "1.30x (measured) |"]
    stage2 = rows[2].split(" | ")
    assert stage2[1:3] == ["4/8", "5.5M"] and stage2[5] == "50.0%" and stage2[6] == "62.5%"
    assert stage2[-1].endswith("x (estimated) |") and float(stage2[-1].split("x")[0]) > 1.0
    assert "upper bound" in report and "pareto.png" in report
    png = plot_path.read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 20_000
    assert sorted(p.name for p in run.iterdir()) == ["notes", "pareto.png", "report.md", "stage1", "stage2"]


def test_teacher_eval_file_takes_precedence_over_a_stage_teacher_section(run):
    teacher = {"task_mean_accuracy": 0.5, "tasks": {"arithmetic": {"accuracy": 0.5}, "multi_digit": {"accuracy": 0.5}}}
    (run / "teacher_eval.json").write_text(json.dumps(teacher))
    rows = _table_rows(build_report(run)[0].read_text())
    assert rows[0].split(" | ")[2:6] == ["-", "50.0%", "50.0%", "50.0%"]
    assert rows[1].split(" | ")[6] == "150.0%"


def test_report_without_any_teacher_accuracy_leaves_retention_blank(tmp_path):
    _checkpoint(tmp_path, "only", {0}, _eval([0.5, 0.5]))
    report_path, plot_path = build_report(tmp_path)
    rows = _table_rows(report_path.read_text())
    assert len(rows) == 1 and rows[0].split(" | ")[6] == "-"
    assert plot_path.stat().st_size > 10_000


def test_pareto_front_keeps_points_no_other_beats_on_both_axes():
    points = [(1.0, 0.8), (1.3, 0.75), (1.4, 0.5), (1.7, 0.6), (2.0, 0.6), (1.2, 0.6)]
    assert pareto_front(points) == [(1.0, 0.8), (1.3, 0.75), (2.0, 0.6)]


def test_reference_points_of_another_study_are_drawn_but_stay_off_the_frontier(tmp_path, monkeypatch):
    import matplotlib.axes

    drawn = []
    original = matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "plot", lambda ax, xs, ys, *a, **k: drawn.append(list(xs)) or original(ax, xs, ys, *a, **k))
    path = plot_pareto([(1.9, 0.7, "h15", True), (2.3, 0.6, "h18", True)], tmp_path / "p.png", "t", 1.0,
                       references=[(4.0, 0.99, "paper")], reference_label="paper", ylabel="retained (%)")
    assert path.stat().st_size > 10_000
    assert drawn == [[1.0, 1.9, 2.3]]  # the frontier line: teacher and ours, not the (dominating) reference


def test_unusable_run_directories_are_refused(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        build_report(tmp_path / "missing")
    with pytest.raises(UserError, match="no checkpoint folders"):
        build_report(tmp_path)
    _checkpoint(tmp_path, "broken", {0}, {})
    (tmp_path / "broken" / "eval.json").write_text("{not json")
    with pytest.raises(UserError, match="eval.json is not readable JSON"):
        build_report(tmp_path)

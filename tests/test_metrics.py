"""Accuracy-matrix metrics, text tables and plots, on small hand-computed matrices."""

import math

import pytest

from cmtl.metrics import compare_table, format_matrix, mean_std, paired_differences, summarize

# R[i][j]: accuracy on task j after training task i.
R3 = [
    [0.90],
    [0.80, 0.95],
    [0.70, 0.90, 0.96],
]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_summarize_three_tasks_by_hand():
    s = summarize(R3)
    assert s["num_tasks"] == 3
    assert s["final_average_accuracy"] == pytest.approx((0.70 + 0.90 + 0.96) / 3)
    row_means = [0.90, (0.80 + 0.95) / 2, (0.70 + 0.90 + 0.96) / 3]
    assert s["average_incremental_accuracy"] == pytest.approx(sum(row_means) / 3)
    # task 0: best before the end is 0.90 (after 0), final 0.70; task 1: best 0.95, final 0.90
    assert s["per_task_forgetting"] == pytest.approx([0.20, 0.05])
    assert s["forgetting"] == pytest.approx(0.125)
    assert s["bwt"] == pytest.approx(((0.70 - 0.90) + (0.90 - 0.95)) / 2)


def test_forgetting_uses_the_best_earlier_accuracy_not_the_first():
    # Task 0 improves after task 1 (0.5 -> 0.8) before dropping: forgetting counts from 0.8, BWT from 0.5.
    s = summarize([[0.5], [0.8, 0.9], [0.6, 0.9, 1.0]])
    assert s["per_task_forgetting"] == pytest.approx([0.2, 0.0])
    assert s["forgetting"] == pytest.approx(0.1)
    assert s["bwt"] == pytest.approx(((0.6 - 0.5) + (0.9 - 0.9)) / 2)


def test_summarize_joint_single_row():
    s = summarize([[0.9, 0.8, 0.7, 0.6]])
    assert s["num_tasks"] == 4
    assert s["final_average_accuracy"] == pytest.approx(0.75)
    assert s["average_incremental_accuracy"] == pytest.approx(0.75)
    assert s["forgetting"] is None and s["bwt"] is None
    assert s["per_task_forgetting"] == []


def test_summarize_one_by_one():
    s = summarize([[1.0]])
    assert s == {
        "final_average_accuracy": 1.0,
        "average_incremental_accuracy": 1.0,
        "forgetting": None,
        "bwt": None,
        "per_task_forgetting": [],
        "num_tasks": 1,
    }


@pytest.mark.parametrize(
    "matrix, match",
    [
        ([], "empty"),
        ([[]], "empty"),
        ([[0.9, 0.1], [0.8, 0.9]], "lower-triangular"),  # square, not triangular
        ([[0.9], [0.8]], "lower-triangular"),
        ([[0.9], [0.8, 0.9, 0.7]], "lower-triangular"),
        ([[0.9], [0.8, 1.5]], r"R\[1\]\[1\]"),
        ([[-0.1]], r"\[0, 1\]"),
        ([[0.9], [math.nan, 0.9]], r"R\[1\]\[0\]"),
        ([[math.inf]], "finite"),
        ([["0.9"]], "number"),
    ],
)
def test_invalid_matrices_raise(matrix, match):
    with pytest.raises(ValueError, match=match):
        summarize(matrix)


def test_format_matrix_values_and_blank_upper_triangle():
    text = format_matrix(R3)
    lines = text.splitlines()
    assert lines[0].split() == ["task", "0", "1", "2"]
    assert lines[1].split() == ["after", "0", "90.0"]  # nothing above the diagonal
    assert lines[2].split() == ["after", "1", "80.0", "95.0"]
    assert lines[3].split() == ["after", "2", "70.0", "90.0", "96.0"]
    # values line up under their task column
    assert lines[0].index("2") + 1 == lines[3].index("96.0") + len("96.0")
    assert "0.960" in format_matrix(R3, percent=False)


def test_format_matrix_joint_and_invalid():
    assert format_matrix([[1.0, 0.5]]).splitlines()[1].split() == ["joint", "100.0", "50.0"]
    with pytest.raises(ValueError):
        format_matrix([[0.9, 0.9], [0.9]])


def test_mean_std():
    assert mean_std([None, None]) is None
    assert mean_std([]) is None
    assert mean_std([0.5]) == (0.5, 0.0)
    mean, std = mean_std([0.2, None, 0.4])
    assert mean == pytest.approx(0.3) and std == pytest.approx(0.1)  # population std


def test_paired_differences_by_seed():
    ref = {0: 0.90, 1: 0.80, 2: 0.85, 5: 0.99}
    other = {0: 0.88, 1: 0.84, 2: 0.80, 3: 0.70}  # seeds 3 and 5 are not in both: left out
    got = paired_differences(ref, other)
    assert got["seeds"] == [0, 1, 2] and got["ahead"] == 2
    assert got["differences"] == pytest.approx([0.02, -0.04, 0.05])
    assert got["mean"] == pytest.approx(0.01)
    # sample std of (0.02, -0.04, 0.05) is sqrt(0.0042 / 2); over sqrt(3)
    assert got["standard_error"] == pytest.approx((0.0042 / 2) ** 0.5 / 3**0.5)
    assert paired_differences({0: 0.5}, {0: 0.4}) is None  # one common seed: no spread to report


def test_compare_table_text_and_markdown():
    rows = [
        {
            "strategy": "emtal",
            "num_seeds": 3,
            "final_average_accuracy": (0.9512, 0.0123),
            "forgetting": (0.021, 0.004),
            "wall_time": (12.34, 0.56),
        },
        {"strategy": "naive", "num_seeds": 3, "final_average_accuracy": 0.701, "forgetting": None},
    ]
    columns = [
        ("strategy", "Strategy"),
        ("final_average_accuracy", "Final acc. (%)"),
        ("forgetting", "Forgetting (%)"),
        ("wall_time", "Time (s)"),
    ]
    text, markdown = compare_table(rows, columns)
    for table in (text, markdown):
        assert "emtal" in table and "naive" in table
        assert "95.1 ± 1.2" in table and "2.1 ± 0.4" in table and "12.3 ± 0.6" in table
        assert "70.1" in table and "–" in table
    md = markdown.splitlines()
    assert md[0] == "| Strategy | Final acc. (%) | Forgetting (%) | Time (s) |"
    assert md[1] == "| --- | ---: | ---: | ---: |"
    assert len(md) == 4
    assert len(text.splitlines()) == 4  # header, rule, two rows


def test_compare_table_hides_std_of_a_single_seed():
    rows = [{"strategy": "lora", "num_seeds": 1, "bwt": (-0.05, 0.0), "epochs": 3}]
    text, markdown = compare_table(rows, [("strategy", "S"), ("bwt", "BWT"), ("epochs", "Epochs")])
    assert "±" not in text and "±" not in markdown
    assert "-5.0" in text and "| 3 |" in markdown


def test_compare_table_custom_percent_keys():
    text, _ = compare_table([{"acc": 0.5}], [("acc", "Acc")], percent_keys={"acc"})
    assert "50.0" in text
    text, _ = compare_table([{"acc": 0.5}], [("acc", "Acc")], percent_keys=())
    assert "0.5" in text and "50.0" not in text


@pytest.mark.parametrize(
    "matrix",
    [R3, [[0.9, 0.8, 0.7]], [[0.5]]],
    ids=["triangular", "joint", "1x1"],
)
@pytest.mark.parametrize("plot", ["plot_accuracy_matrix", "plot_accuracy_per_task"])
def test_plots_write_png_atomically(tmp_path, matrix, plot):
    from cmtl import plots

    out = tmp_path / "figs" / "acc.png"
    written = getattr(plots, plot)(matrix, out, title="digits")
    assert written == out
    data = out.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 1000
    assert [p.name for p in out.parent.iterdir()] == ["acc.png"]  # no temporary file left behind


def test_plot_overwrites_and_validates(tmp_path):
    from cmtl.plots import plot_accuracy_matrix

    out = tmp_path / "m.png"
    plot_accuracy_matrix(R3, out, task_names=["a", "b", "c"])
    first = out.read_bytes()
    plot_accuracy_matrix([[0.1], [0.2, 0.3], [0.4, 0.5, 0.6]], out)
    assert out.read_bytes() != first
    with pytest.raises(ValueError, match="task_names"):
        plot_accuracy_matrix(R3, out, task_names=["a"])
    with pytest.raises(ValueError):
        plot_accuracy_matrix([[0.9], [2.0, 0.9]], tmp_path / "bad.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.png"]


def test_import_plots_does_not_import_matplotlib():
    import subprocess
    import sys

    code = "import sys, cmtl.plots; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"

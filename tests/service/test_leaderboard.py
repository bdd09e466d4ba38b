"""The leaderboard over real finished jobs (leaderboard_runs.py: the demo model, two checkpoints of the tiny
model as a group), run once per session by the live service's scheduler; the tests rank them through the CLI."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from clitools import run_main
from runs import write_run

from evalfleet.orchestrator import JobStore
from evalfleet.service.compare import load_results
from evalfleet.service.leaderboard import Entry, build

def board(capsys, monkeypatch, runs, *args: str) -> dict:
    code, out, err = run_main(["leaderboard", *args, "--format", "json", "--db", str(runs.db)], capsys, monkeypatch)
    assert code == 0, err
    return json.loads(out)


def section_of(document: dict, job: str) -> dict:
    """The section holding `job`'s row (the service's store holds other tests' jobs too)."""
    (section,) = [s for s in document["sections"] if any(job in row["sources"] for row in s["rows"])]
    return section


def row_of(section: dict, label: str) -> dict:
    (row,) = [row for row in section["rows"] if row["label"] == label]
    return row


def test_baseline_tests_are_compares_tests(leaderboard_jobs, capsys, monkeypatch):
    runs = leaderboard_jobs
    section = section_of(board(capsys, monkeypatch, runs, "--models", "demo,step-100", "--baseline", "step-100"),
                         runs.jobs["step-100"])
    demo = row_of(section, "demo")
    code, out, err = run_main(["compare", demo["sources"][0], runs.jobs["step-100"], "--json", "--db", str(runs.db)],
                              capsys, monkeypatch)
    assert code == 0, err
    compared = {(t["task"], m["metric"]): m for t in json.loads(out)["tasks"] for m in t["metrics"]}
    assert [c["task"] for c in section["columns"]] == ["demo_arith", "demo_mc"]
    for column in section["columns"]:
        cell, expected = demo["cells"][column["name"]], compared[(column["task"], column["metric"])]
        assert cell["p_value"] is not None
        assert (cell["test"], cell["p_value"], cell["difference"]) == (expected["test"], expected["p_value"],
                                                                       expected["difference"])
    mc = demo["cells"]["demo_mc"]
    assert mc["p_value"] < 0.05 and mc["verdict"] == "+" and mc["best"]
    assert row_of(section, "step-100")["baseline"] and not row_of(section, "step-100")["cells"]["demo_mc"]["best"]


def test_swapped_per_sample_results_change_the_verdict(leaderboard_jobs, capsys, monkeypatch):
    runs = leaderboard_jobs
    args = ("--models", "demo,step-100,step-20", "--baseline", "step-100")
    before = section_of(board(capsys, monkeypatch, runs, *args), runs.jobs["step-100"])
    assert row_of(before, "demo")["cells"]["demo_mc"]["verdict"] == "+"
    assert row_of(before, "step-20")["cells"]["demo_mc"]["verdict"] == "≈"  # the same weights as the baseline
    with JobStore(runs.db) as store:
        files = [Path(store.get(job).result_path).parent / "samples_demo_mc.jsonl"
                 for job in (runs.jobs["demo"], runs.jobs["step-20"])]
    texts = [f.read_text() for f in files]
    try:
        files[0].write_text(texts[1])
        files[1].write_text(texts[0])
        after = section_of(board(capsys, monkeypatch, runs, *args), runs.jobs["step-100"])
    finally:
        files[0].write_text(texts[0])
        files[1].write_text(texts[1])
    assert row_of(after, "demo")["cells"]["demo_mc"]["verdict"] == "≈"
    assert row_of(after, "demo")["cells"]["demo_mc"]["p_value"] == 1.0
    assert row_of(after, "step-20")["cells"]["demo_mc"]["p_value"] < 0.05


def test_runs_with_other_settings_are_never_ranked_together(leaderboard_jobs, capsys, monkeypatch):
    runs = leaderboard_jobs
    document = board(capsys, monkeypatch, runs, "--models", "demo,step-100")
    zero, one = section_of(document, runs.jobs["demo"]), section_of(document, runs.jobs["demo-1shot"])
    assert zero is not one and document["sections"][0] == zero
    assert [r["sources"] for r in one["rows"]] == [[runs.jobs["demo-1shot"]]]
    assert one["reason"].startswith("not ranked with section 1, whose settings differ: "), one["reason"]
    assert "num_fewshot 1 (0 there)" in one["reason"] and "demo_mc n-shot 1 (0 there)" in one["reason"]
    for section in document["sections"]:
        assert len({row["model"] for row in section["rows"]}) == len(section["rows"])


def test_a_group_of_checkpoints_is_ordered_by_step(leaderboard_jobs, capsys, monkeypatch):
    runs = leaderboard_jobs
    (section,) = board(capsys, monkeypatch, runs, "--group", runs.group)["sections"]
    assert section["checkpoints"] and [r["step"] for r in section["rows"]] == [20, 100]
    assert [r["sources"] for r in section["rows"]] == [[runs.jobs["step-20"]], [runs.jobs["step-100"]]]
    code, out, err = run_main(["leaderboard", "--group", runs.group, "--db", str(runs.db)], capsys, monkeypatch)
    assert code == 0 and out.index("step-20 ") < out.index("step-100"), err


def test_the_html_page_charts_each_task_by_step_and_links_nowhere(leaderboard_jobs, capsys, monkeypatch, tmp_path):
    """`--format html`: the page a user opens at the end of a watched run, with no service running."""
    from html.parser import HTMLParser

    runs = leaderboard_jobs
    (section,) = board(capsys, monkeypatch, runs, "--group", runs.group)["sections"]
    page = tmp_path / "board.html"
    code, _, err = run_main(["leaderboard", "--group", runs.group, "--format", "html", "--output", str(page),
                             "--db", str(runs.db)], capsys, monkeypatch)
    assert code == 0, err

    class Read(HTMLParser):
        def __init__(self):
            super().__init__()
            self.charts, self.points, self.cells, self.links, self.styles, self._cell = {}, {}, [], [], 0, None

        def handle_starttag(self, tag, attrs):
            attrs = dict(attrs)
            if tag == "svg" and "step-chart" in attrs.get("class", ""):
                self._chart = attrs["data-task"]
                self.charts[self._chart] = 0
            elif tag == "circle":
                self.charts[self._chart] += 1
            elif tag == "title" and getattr(self, "_chart", None):
                self._cell = "title"
            elif tag == "td" and "num" in attrs.get("class", ""):
                self._cell = "td"
            self.links += [attrs[k] for k in ("href", "src") if k in attrs]
            self.styles += tag == "style"

        def handle_endtag(self, tag):
            if tag == "svg":
                self._chart = None

        def handle_data(self, data):
            if self._cell == "td" and data.strip():
                self.cells.append(data.strip().split()[0])
            elif self._cell == "title" and data.startswith("step "):
                step, value = data[5:].split(":")
                self.points.setdefault(self._chart, []).append((int(step), float(value.split("±")[0])))
            self._cell = None

    read = Read()
    read.feed(page.read_text())
    columns = {c["name"]: c["task"] for c in section["columns"]}
    assert read.links == [] and read.styles == 1  # self-contained: the style inlined, nothing fetched or linked
    assert set(read.charts) == set(columns.values()) and all(n == 2 for n in read.charts.values()), read.charts
    for name, task in columns.items():
        expected = [(row["step"], round(row["cells"][name]["value"], 4)) for row in section["rows"]]
        assert [(step, round(value, 4)) for step, value in read.points[task]] == expected
    expected = [f"{value:.4f}" for row in section["rows"]
                for value in [*(row["cells"][name]["value"] for name in columns), row["mean"]["value"]]]
    assert [cell for cell in read.cells if not cell.isdigit()] == expected  # the step column is digits


def test_the_api_serves_the_same_leaderboard(leaderboard_jobs, live_service, capsys, monkeypatch):
    runs = leaderboard_jobs
    cli = board(capsys, monkeypatch, runs, "--group", runs.group, "--baseline", "step-100")
    served = live_service.client.get("/api/v1/leaderboard", params={"group": runs.group, "baseline": "step-100"})
    assert served.status_code == 200 and served.json() == cli
    missing = live_service.client.get("/api/v1/leaderboard", params={"group": "nosuchgroup"})
    assert missing.status_code == 404 and missing.json() == {"detail": "no group with id 'nosuchgroup'"}


def test_markdown_and_csv_parse_back_to_the_json_numbers(leaderboard_jobs, capsys, monkeypatch, tmp_path):
    runs = leaderboard_jobs
    args = ("--models", "demo,step-100,step-20", "--baseline", "step-100", "--db", str(runs.db))
    document = board(capsys, monkeypatch, runs, *args[:-2])
    expected = {(section_number, row["model"], column["task"]): row["cells"][column["name"]]
                for section_number, section in enumerate(document["sections"], 1) for row in section["rows"]
                for column in section["columns"] if column["name"] in row["cells"]}
    for number, section in enumerate(document["sections"], 1):
        for row in section["rows"]:
            if row["mean"]:
                expected[(number, row["model"], "mean")] = row["mean"]
    assert len(expected) >= 9  # at least 3 rows x (2 tasks + mean)

    for output_format in ("csv", "md"):
        code, _, err = run_main(["leaderboard", *args, "--format", output_format, "--output",
                                 str(tmp_path / f"board.{output_format}")], capsys, monkeypatch)
        assert code == 0, err
    lines = list(csv.DictReader(io.StringIO((tmp_path / "board.csv").read_text())))
    assert len(lines) == len(expected)
    for line in lines:
        cell = expected[(int(line["section"]), line["model"], line["task"])]
        assert float(line["value"]) == cell["value"] and float(line["stderr"]) == cell["stderr"]
        assert (line["best"] == "True") == cell["best"] and line["verdict"] == (cell["verdict"] or "")
        assert (float(line["p_value"]) if line["p_value"] else None) == cell["p_value"]

    markdown = (tmp_path / "board.md").read_text()
    parsed = {}
    for number, block in enumerate(markdown.split("## Section ")[1:], 1):
        table = [line for line in block.splitlines() if line.startswith("|")]
        headings = [h.strip() for h in table[0].strip("|").split("|")]
        for line in table[2:]:
            texts = [t.strip() for t in line.strip("|").split("|")]
            for heading, text in zip(headings[1:], texts[1:]):
                if text:
                    parsed[(number, texts[0].removesuffix(" (baseline)"), heading.split(" (")[0])] = text
    assert len(parsed) == len(expected)
    labels = {row["model"]: row["label"] for section in document["sections"] for row in section["rows"]}
    for (number, model, task), cell in expected.items():
        text = parsed[(number, labels[model], task)]
        assert text.startswith("**") == cell["best"]
        value, _, rest = text.strip("*").partition(" ± ")
        assert float(value) == pytest.approx(cell["value"], abs=5e-5)
        assert float(rest.split()[0].strip("*")) == pytest.approx(cell["stderr"], abs=5e-5)
        assert text.strip("*").endswith(cell["verdict"] or rest.split()[0].strip("*"))


@pytest.mark.parametrize("args, message", [
    (["--group", "nosuchgroup"], "error: no group with id 'nosuchgroup'"),
    (["--models", "nosuchmodel"], "error: nosuchmodel is neither a finished job, a model with finished jobs"),
    (["--models", "demo", "--baseline", "step-100"], "error: the baseline step-100 is none of the leaderboard's models"),
    (["--format", "xml"], "error: --format must be one of table, md, csv, json, html, not 'xml'"),
])
def test_bad_input_is_one_sentence(leaderboard_jobs, capsys, monkeypatch, args, message):
    code, out, err = run_main(["leaderboard", *args, "--db", str(leaderboard_jobs.db)], capsys, monkeypatch)
    assert code == 2 and out == "" and err.count("\n") == 1 and err.startswith(message), err


def test_the_same_model_with_the_same_settings_is_one_row_the_newest(tmp_path):
    older = load_results(write_run(tmp_path / "old", "t", [1, 0, 0, 0]))
    newer = load_results(write_run(tmp_path / "new", "t", [1, 1, 0, 0]))
    other = load_results(write_run(tmp_path / "other", "t", [1, 1, 1, 0]))
    (section,) = build([Entry("/m/a", older, 1.0, "j-old"), Entry("/m/a", newer, 2.0, "j-new"),
                        Entry("/m/b", other, 1.5, "j-b")]).sections
    assert [(row.label, row.sources, row.cells["t"].value) for row in section.rows] == [
        ("b", ["j-b"], 0.75), ("a", ["j-new"], 0.5)]
    assert section.rows[0].cells["t"].best and not section.rows[1].cells["t"].best


def test_the_ranked_runs_are_written_in_lm_evals_layout(leaderboard_jobs, capsys, monkeypatch, tmp_path):
    runs = leaderboard_jobs
    code, _, err = run_main(["leaderboard", "--group", runs.group, "--format", "csv", "--output", str(tmp_path / "b.csv"),
                             "--lm-eval-layout", str(tmp_path / "out"), "--db", str(runs.db)], capsys, monkeypatch)
    assert code == 0 and "2 run(s) written in lm-eval's layout" in err, err
    with JobStore(runs.db) as store:
        originals = {store.get(runs.jobs[name]).request["model"]["path"]: store.get(runs.jobs[name]).result_path
                     for name in ("step-20", "step-100")}
    for model, result_path in originals.items():
        (folder,) = [f for f in (tmp_path / "out").iterdir() if f.name == model.replace("/", "__")]
        (results,) = folder.glob("results_*.json")
        stamp = results.stem.removeprefix("results_")
        written, original = json.loads(results.read_text()), json.loads(Path(result_path).read_text())
        assert written["results"] == original["results"] and written["model_name"] == model
        assert written["task_hashes"] == original["task_hashes"] != {}  # lm-eval's hashes of our samples: the same
        for task in ("demo_mc", "demo_arith"):
            rows = [json.loads(line) for line in (folder / f"samples_{task}_{stamp}.jsonl").read_text().splitlines()]
            assert [row["doc_id"] for row in rows] == list(range(12)) and "gen_args_0" in rows[0]["arguments"]

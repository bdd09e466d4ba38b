"""Dashboard pieces that need no workers: sample rendering, form errors, charts, and the pages' 404s."""

from __future__ import annotations

from conftest import TOKEN

from evalfleet.monitoring.snapshot import HostMetrics, MetricsSnapshot
from evalfleet.service.charts import pool_charts
from evalfleet.service.samples import describe_sample

AUTH = {"Authorization": f"Bearer {TOKEN}", "Accept": "text/html"}


def test_multiple_choice_sample_shows_choices_and_the_chosen_one():
    row = {"doc_id": 3, "target": 1, "arguments": [["Q:", " a"], ["Q:", " b"]],
           "resps": [[[-2.5, False]], [[-0.5, True]]], "filter": "none", "metrics": ["acc"], "acc": 1.0}
    sample = describe_sample(row)
    assert sample["prompt"] == "Q:" and sample["target"] == "1:  b" and sample["response"] == " b"
    assert [(c["text"], c["loglikelihood"], c["greedy"], c["chosen"]) for c in sample["choices"]] == [
        (" a", -2.5, False, False), (" b", -0.5, True, True)]
    assert sample["scores"] == {"acc": 1.0}
    older = {**row, "arguments": {"gen_args_1": {"arg_0": "Q:", "arg_1": " b"}, "gen_args_0": {"arg_0": "Q:", "arg_1": " a"}},
             "resps": [[["-2.5", "False"]], [["-0.5", "True"]]]}
    assert describe_sample(older)["choices"] == sample["choices"]


def test_generation_and_rolling_samples_show_the_response():
    generated = describe_sample({"doc_id": 0, "target": "29", "arguments": [["0+29=", {"until": ["\n"]}]],
                                 "resps": [["29 "]], "filtered_resps": ["29"], "metrics": ["exact_match"],
                                 "exact_match": 1.0})
    assert generated["response"] == "29" and generated["choices"] == [] and generated["prompt"] == "0+29="
    rolling = describe_sample({"doc_id": 0, "arguments": [["some text"]], "resps": [[-12.5]],
                               "metrics": ["word_perplexity"], "word_perplexity": [-12.5, 2]})
    assert rolling["response"] == -12.5 and rolling["scores"] == {"word_perplexity": [-12.5, 2]}


def test_the_form_reports_a_refusal_on_the_page(client, tmp_path):
    page = client.post("/jobs", data={"model": str(tmp_path), "tasks": "demo_mc"}, headers=AUTH)
    assert page.status_code == 422 and "outside the allowed model roots" in page.text
    assert f'value="{tmp_path}"' in page.text  # the form keeps what was typed
    bad_limit = client.post("/jobs", data={"model": "demo", "limit": "many"}, headers=AUTH)
    assert bad_limit.status_code == 422 and "invalid value for &#39;limit&#39;" in bad_limit.text


def test_pages_of_missing_things_are_404_pages(client):
    for path in ("/jobs/nosuchjob", "/jobs/nosuchjob/results", "/jobs/nosuchjob/samples/t/0"):
        page = client.get(path, headers=AUTH)
        assert page.status_code == 404 and "no job with id &#39;nosuchjob&#39;" in page.text, path
    assert client.get("/compare?a=x&b=y", headers=AUTH).text.count("no job with id") == 1


def _snapshot(at: float, cpu: float) -> MetricsSnapshot:
    host = HostMetrics(cpu_percent=cpu, per_cpu_percent=[cpu], cpu_count=1, memory_used_bytes=1,
                       memory_total_bytes=4, memory_percent=25.0)
    return MetricsSnapshot(timestamp=at, nvml="unavailable: test", host=host)


def test_charts_draw_the_history():
    cpu, memory = pool_charts([_snapshot(100.0, 0.0), _snapshot(160.0, 50.0), _snapshot(220.0, 100.0)])
    assert "host CPU" in cpu and "CPU: 100%" in cpu and "last 2.0 min" in cpu
    assert 'points="24.0,86.0 190.0,55.0 356.0,24.0"' in cpu
    assert "memory: 25%" in memory
    assert "no samples yet" in pool_charts([])[0]

"""lm-eval's task templates compiled once per jinja environment (`tasks.templates_compiled_once`):
the same requests as lm-eval builds them, and the sandbox still in force."""

from __future__ import annotations

import pytest
from jinja2.exceptions import SecurityError
from lm_eval import utils

from evalfleet.tasks import build_task_manager, sandboxed_templates, templates_compiled_once

ESCAPE = "{{ lipsum.__globals__.__name__ }}"  # reaches Python through a jinja global


@pytest.fixture
def compilations(monkeypatch):
    """Templates lm-eval's own environment compiles, by text."""
    seen: list[str] = []
    compile_ = utils.env.from_string

    def counted(source, *args, **kwargs):
        seen.append(source)
        return compile_(source, *args, **kwargs)

    monkeypatch.setattr(utils.env, "from_string", counted)
    return seen


def _arith_requests() -> list[tuple]:
    """demo_arith's requests as lm-eval builds them: 2-shot contexts from its train split."""
    task = build_task_manager(["demo_arith"]).load(["demo_arith"])["tasks"]["demo_arith"]
    task.set_config("num_fewshot", 2)
    task.set_fewshot_seed(seed=1234)  # the same examples in both builds
    task.build_all_requests(limit=20, rank=0, world_size=1)
    return [instance.args for instance in task.instances]


def test_requests_are_built_the_same_with_each_template_compiled_once(compilations):
    plain = _arith_requests()
    plain_compilations = len(compilations)
    compilations.clear()
    with templates_compiled_once():
        once = _arith_requests()
    assert once == plain
    assert plain_compilations >= 60  # 20 questions, each with 2 examples of text and target
    assert sorted(compilations) == ["{{answer}}", "{{question}}"]
    with templates_compiled_once():  # rendered as lm-eval renders: spaces and a last newline kept
        assert [utils.apply_template(" {{ a }}\n", {"a": a}) for a in (1, 2)] == [" 1\n", " 2\n"]
    assert utils.apply_template("{{answer}}!", {"answer": 3}) == "3!"  # lm-eval's own again after the block


def test_a_template_compiled_outside_the_sandbox_is_refused_inside_it():
    with templates_compiled_once():
        assert utils.apply_template(ESCAPE, {}) == "jinja2.utils"  # lm-eval's own environment lets it through
        with sandboxed_templates(True), pytest.raises(SecurityError):
            utils.apply_template(ESCAPE, {})
        assert utils.apply_template("{{ a }}", {"a": 1}) == "1"

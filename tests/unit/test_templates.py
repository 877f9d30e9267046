"""Templates: the seed's Go-style syntax on Jinja2, native values, missing fields."""

from __future__ import annotations

import time
import tracemalloc
from typing import Any

import pytest

from bridge import templates
from bridge.templates import TemplateError, render

CTX: dict[str, Any] = {
    "trigger": {"orderId": "A1", "amount": 150, "items": [{"sku": "x"}], "keys": "k", "meta": {"a": 1}},
    "event": {"name": "order.created", "id": "e-1"},
    "input": {"kind": "order"},
    "tasks": {"first": {"n": 2}},
}


def test_go_style_leading_dot() -> None:
    assert render("Processing order {{ .trigger.orderId }}", CTX) == "Processing order A1"


def test_plain_jinja_without_dot_also_works() -> None:
    assert render("{{ trigger.orderId }}-{{ event.name }}", CTX) == "A1-order.created"


def test_text_without_blocks_is_returned_unchanged() -> None:
    assert render("no .templates here", CTX) == "no .templates here"


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("{{ .trigger.meta }}", {"a": 1}),
        ("{{ .trigger.items }}", [{"sku": "x"}]),
        ("{{ .trigger.amount }}", 150),
        ("  {{ .trigger.amount * 2 }}  ", 300),
        ("{{ .tasks.first.n }}", 2),
    ],
)
def test_single_expression_returns_native_value(template: str, expected: Any) -> None:
    assert render(template, CTX) == expected


def test_two_expressions_render_text() -> None:
    assert render("{{ .trigger.amount }}{{ .trigger.amount }}", CTX) == "150150"


@pytest.mark.parametrize("key", ["items", "keys", "values", "get"])
def test_payload_keys_shadow_dict_methods(key: str) -> None:
    ctx = {"trigger": {key: "from payload"}}
    assert render(f"{{{{ .trigger.{key} }}}}", ctx) == "from payload"
    assert render(f"got {{{{ .trigger.{key} }}}}", ctx) == "got from payload"


def test_missing_field_single_expression_is_none() -> None:
    assert render("{{ .trigger.nope }}", CTX) is None
    assert render("{{ .trigger.nope.deeper.still }}", CTX) is None


def test_missing_field_in_text_renders_empty() -> None:
    assert render("[{{ .trigger.nope.deeper }}]", CTX) == "[]"


def test_nested_dicts_and_lists_are_rendered() -> None:
    value = {
        "order": "{{ .trigger.orderId }}",
        "lines": ["{{ .trigger.items }}", "n={{ .trigger.amount }}", 3, None],
        "deep": {"flag": True, "kind": "{{ .input.kind }}"},
    }
    assert render(value, CTX) == {
        "order": "A1",
        "lines": [[{"sku": "x"}], "n=150", 3, None],
        "deep": {"flag": True, "kind": "order"},
    }


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ('{{ "see .trigger here" }}', "see .trigger here"),
        ("{{ 'v .x' }}", "v .x"),
        ('{{ .trigger.orderId ~ " .suffix" }}', "A1 .suffix"),
    ],
)
def test_dot_inside_string_literal_is_left_alone(template: str, expected: str) -> None:
    assert render(template, CTX) == expected


def test_attribute_dots_and_decimals_are_kept() -> None:
    assert render("{{ .trigger.meta.a + 0.5 }}", CTX) == 1.5
    assert render("{{ .trigger.items[0].sku }}", CTX) == "x"
    assert render("{{ (.trigger.meta).a }}", CTX) == 1


def test_control_blocks_accept_leading_dot() -> None:
    assert render("{% if .trigger.amount > 100 %}big{% else %}small{% endif %}", CTX) == "big"


@pytest.mark.parametrize("bad", ["{{ .trigger.orderId | }}", "{% if %}", "{{ .trigger.a ) }}"])
def test_syntax_errors_raise_template_error(bad: str) -> None:
    with pytest.raises(TemplateError, match="does not parse"):
        render(bad, CTX)
    with pytest.raises(TemplateError):
        templates.check({"nested": [bad]})


def test_check_accepts_good_templates_anywhere() -> None:
    templates.check({"a": ["{{ .trigger.x }}", {"b": "{% for i in .trigger.items %}{{ i }}{% endfor %}"}], "n": 1})


def test_sandbox_hides_internals_and_refuses_mutation() -> None:
    assert render("{{ .trigger.__class__ }}", CTX) is None
    with pytest.raises(TemplateError, match="unsafe"):
        render('{{ .trigger.pop("orderId") }}', CTX)
    assert CTX["trigger"]["orderId"] == "A1"


# --- URLs: every value one segment or query value -------------------------------------------


@pytest.mark.parametrize(
    ("value", "url"),
    [
        ("../../admin?x=", "https://shop.test/orders/..%2F..%2Fadmin%3Fx%3D?q=1"),
        ("a b&c=d#e", "https://shop.test/orders/a%20b%26c%3Dd%23e?q=1"),
        ("%2e%2e", "https://shop.test/orders/%252e%252e?q=1"),
        ("ünï", "https://shop.test/orders/%C3%BCn%C3%AF?q=1"),
        (42, "https://shop.test/orders/42?q=1"),
    ],
)
def test_url_values_are_percent_encoded(value: Any, url: str) -> None:
    assert templates.render_url("https://shop.test/orders/{{ .trigger.id }}?q=1", {"trigger": {"id": value}}) == url


def test_url_query_values_cannot_add_parameters() -> None:
    url = templates.render_url("https://shop.test/s?q={{ .trigger.q }}&n=1", {"trigger": {"q": "x&admin=1"}})
    assert url == "https://shop.test/s?q=x%26admin%3D1&n=1"


@pytest.mark.parametrize("value", [".", ".."])
def test_a_dot_segment_value_is_refused(value: str) -> None:
    with pytest.raises(TemplateError, match="relative path segment"):
        templates.render_url("https://shop.test/orders/{{ .trigger.id }}/items", {"trigger": {"id": value}})


def test_the_url_text_itself_is_not_encoded_and_a_missing_value_is_empty() -> None:
    url = templates.render_url("https://u:p@shop.test:8443/a/b?x=1&y={{ .trigger.nope }}", {"trigger": {}})
    assert url == "https://u:p@shop.test:8443/a/b?x=1&y="


def test_names_are_the_top_level_names_templates_read() -> None:
    value = ["{{ .trigger.a }}/{{ tasks['x'].b }}", {"h": "{% if event.id %}1{% endif %}"}, "no template", 5]
    assert templates.names(value) == {"trigger", "tasks", "event"}
    assert templates.names("${TOKEN}") == set()


def test_a_failure_names_where_the_template_is_never_its_text() -> None:
    """The message reaches the event's sender (a webhook's 422), and the text may hold a value the
    config took from the environment: ``${PARTNER_KEY}`` is replaced at load."""
    value = {"note": ["ok", "lead {{ payload.score + 1 }} via sk_live_SECRETVALUE123"]}
    with pytest.raises(TemplateError) as caught:
        render(value, {"payload": {"score": "x"}})
    message = str(caught.value)
    assert "SECRETVALUE" not in message and "payload.score" not in message
    assert message.startswith("the template at note[1] failed: TypeError: ")


@pytest.mark.parametrize("template", ["cart-{{ [1, 2, 3]|random }}", "{{ .trigger.items|random }}"])
def test_a_template_whose_value_could_differ_on_replay_is_refused_at_load(template: str) -> None:
    """The dispatcher renders ids and inputs in workflow code: `random` rendered a new value on
    replay, a nondeterminism error that stopped the dispatcher."""
    with pytest.raises(TemplateError, match="No filter named 'random'"):
        templates.check(template)


def test_lipsum_is_not_there_to_render() -> None:
    with pytest.raises(TemplateError, match="'lipsum' is undefined"):
        render("{{ lipsum(1) }}", {})


def test_a_filter_jinja_lacks_is_refused_at_load_not_at_the_first_event() -> None:
    with pytest.raises(TemplateError, match="No filter named 'nosuch'"):
        templates.check({"input": {"x": "{{ .trigger.x|nosuch }}"}})
    templates.check({"input": {"x": "{{ .trigger.x|default('n')|upper }}"}})


@pytest.mark.parametrize(
    "text",
    [
        "{{ .trigger.qty * .trigger.price }}",  # "x" * 600,000,000: 5.9 s and 1.8 GB in a workflow task
        "{{ .trigger.price * .trigger.items }}",
        "{{ .trigger.price ** .trigger.price }}",
        "{{ 10 ** .trigger.big }}",
        "{{ .trigger.huge * .trigger.huge }}",
    ],
)
def test_arithmetic_on_an_events_values_cannot_make_a_value_larger_than_a_run_could_take(text: str) -> None:
    context = {"trigger": {"qty": "x", "price": 600_000_000, "items": [1, 2], "big": 100_000, "huge": 1 << 40_000}}
    with pytest.raises(TemplateError, match="SecurityError"):
        render(text, context)


def test_arithmetic_within_bounds_renders_as_before() -> None:
    context = {"trigger": {"amount": 12.5, "n": 3, "price": 600_000_000}}
    assert render("{{ .trigger.amount * 2 }}", context) == 25.0
    assert render("{{ 'ab' * .trigger.n }}", context) == "ababab"
    assert render("{{ .trigger.price * .trigger.price }}", context) == 360_000_000_000_000_000
    assert render("{{ 2 ** 10 }}, {{ 2.5 ** 3 }}", context) == "1024, 15.625"


# -- steps ----------------------------------------------------------------------------------------

NESTED = "{% for a in .trigger.xs %}{% for b in .trigger.ys %}{{ a }}{{ b }},{% endfor %}{% endfor %}"


def test_loops_inside_each_other_over_an_events_lists_stop_at_the_step_limit() -> None:
    """Two lists of 250,000 items (one event of 1 MiB) under two loops are 62,500,000,000 steps:
    it held the dispatcher's workflow task for hours. It fails past MAX_STEPS, naming the limit."""
    big = {"trigger": {"xs": [0] * 250_000, "ys": [1] * 250_000}}
    with pytest.raises(TemplateError, match=r"the template at body failed: SecurityError: it took more than 100,000"):
        render({"body": NESTED}, big)


def test_loops_within_the_limit_render_as_before() -> None:
    ctx = {"trigger": {"xs": [1, 2], "ys": ["a", "b"]}}
    assert render(NESTED, ctx) == "1a,1b,2a,2b,"
    side = int(templates.MAX_STEPS**0.5) - 1  # a product just under the limit, the outer loop's steps too
    assert len(render(NESTED, {"trigger": {"xs": [0] * side, "ys": [0] * side}})) == side * side * 3


@pytest.mark.parametrize(
    "text",
    [
        "{% for a in .trigger.xs %}{% if loop.last %}{{ a }}{% endif %}{% endfor %}",  # the loop variable
        "{% for a in .trigger.xs if a %}{{ a }}{% endfor %}",  # a loop filter
        "{% for a in .trigger.xs recursive %}{{ a }}{% endfor %}",
        "{% for a in .trigger.xs|list %}{{ a }}{% endfor %}",  # a filter's new list
        "{% for a in range(.trigger.n) %}{% for b in range(.trigger.n) %}{% endfor %}{% endfor %}",
    ],
    ids=["loop-variable", "loop-filter", "recursive", "filtered", "ranges"],
)
def test_every_kind_of_loop_counts_its_steps(text: str) -> None:
    ctx = {"trigger": {"xs": [1] * (templates.MAX_STEPS + 1), "n": 400}}
    with pytest.raises(TemplateError, match="steps"):
        render(text, ctx)


def test_calls_count_so_a_macro_that_calls_itself_twice_stops() -> None:
    """2 ** 30 calls, each taking several microseconds, from a number the event gives."""
    text = "{% macro f(n) %}{% if n > 0 %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(.trigger.n) }}"
    assert render(text, {"trigger": {"n": 3}}) == ""
    with pytest.raises(TemplateError, match="steps"):
        render(text, {"trigger": {"n": 30}})


def test_a_url_template_counts_its_steps_too() -> None:
    url = "http://shop/{% for a in .trigger.xs %}{% for b in .trigger.xs %}{% endfor %}{% endfor %}x"
    assert templates.render_url(url, {"trigger": {"xs": [1, 2]}}) == "http://shop/x"
    with pytest.raises(TemplateError, match="steps"):
        templates.render_url(url, {"trigger": {"xs": [1] * 1_000}})


def test_metered_counts_the_steps_of_every_rendering_inside_and_none_limits_nothing() -> None:
    """What the dispatcher adds to its workflow task's work; and runs begun before the limit render
    with none, as they did (their histories replay alike)."""
    ctx = {"trigger": {"xs": [0] * 400, "ys": [0] * 400}}
    with templates.metered() as meter:
        render("{% for a in .trigger.xs %}{% endfor %}", ctx)
        render({"a": "{% for a in .trigger.xs %}{% endfor %}", "b": "{{ .trigger.xs|length }}"}, ctx)
    assert meter.steps == 800 + 1  # the loops, and the filter
    with templates.metered(None) as unlimited:
        assert len(render(NESTED, ctx)) == 400 * 400 * 3
        # Nothing counted, nothing bounded: Jinja's own filters, keys and dict() as they were.
        assert render("{{ [1, 1.0]|unique|list }}", ctx) == [1]
        assert render("{{ dict([[1, 2]]) }}", ctx) == {1: 2}
    assert unlimited.steps == 0
    with pytest.raises(TemplateError, match="steps"):  # outside it, the limit again
        render(NESTED, ctx)


def test_each_rendering_has_its_own_limit() -> None:
    """Renderings one after another do not share the limit: a dispatcher renders many an event."""
    ctx = {"trigger": {"xs": [0] * (templates.MAX_STEPS // 2)}}
    with templates.metered() as meter:
        for _ in range(4):
            render("{% for a in .trigger.xs %}{% endfor %}", ctx)
    assert meter.steps == 2 * templates.MAX_STEPS


FOR, END = "{% for x in .trigger.a %}", "{% endfor %}"
KEYS = [str(i) for i in range(30_000)]
NS = "{% set ns = namespace(s='') %}"


@pytest.mark.parametrize(
    ("text", "trigger"),
    [
        (FOR + "{{ .trigger.b|join(',')|length }}" + END, {"a": [0] * 2_000, "b": [0] * 200_000}),
        (FOR + "{{ .trigger.b|sort|first }}" + END, {"a": [0] * 200, "b": [0] * 200_000}),
        (FOR + "{% if x in .trigger.b %}y{% endif %}" + END, {"a": [0] * 5_000, "b": [1] * 50_000}),
        (
            "{% for x in .trigger.a recursive %}{% if loop.depth == 1 %}{{ loop(.trigger.a) }}{% endif %}" + END,
            {"a": [0] * 3_000},
        ),
        (NS + FOR + "{% set ns.s = ns.s ~ x %}" + END + "{{ ns.s|length }}", {"a": ["xxxxxxxxxx"] * 50_000}),
        ("{% set ns = namespace(s=[]) %}" + FOR + "{% set ns.s = ns.s + [x] %}" + END, {"a": [0] * 3_000}),
        (FOR + "{{ .trigger.big }}" + END, {"a": [0] * 2_000, "big": "z" * 100_000}),
        ("{{ .trigger.s|replace('x', .trigger.big)|length }}", {"s": "x" * 20_000, "big": "y" * 20_000}),
        ("{{ .trigger.s|center(.trigger.n)|length }}", {"s": "x", "n": 300_000_000}),
        ("{{ .trigger.s.ljust(.trigger.n)|length }}", {"s": "x", "n": 300_000_000}),
        ("{{ .trigger.a|join(.trigger.sep)|length }}", {"a": [0] * 100_000, "sep": "," * 1_000}),
        ("{{ .trigger.a|batch(.trigger.n, 0)|list|length }}", {"a": [0], "n": 10**9}),
        (FOR + "{% if x is in .trigger.b %}y{% endif %}" + END, {"a": [0] * 20_000, "b": [1] * 80_000}),
        ("{{ .trigger.a|select('in', .trigger.b)|list|length }}", {"a": [0] * 20_000, "b": [1] * 80_000}),
        (FOR + "{{ .trigger.f }},{{ x }}\n" + END, {"a": [0] * 90_000, "f": "x" * 300}),
        (FOR + "{{ .trigger.a[x:]|length }}" + END, {"a": list(range(90_000))}),
        (NS + FOR + "{% set ns.s %}{{ ns.s }}{{ x }}{% endset %}" + END, {"a": ["x" * 500_000] + [1] * 80_000}),
        (FOR + "{{ .trigger.msg|wordwrap(72) }}" + END, {"a": [0] * 100, "msg": "word " * 180_000}),
        (
            FOR + "{% if .trigger.old != .trigger.new %}y{% endif %}" + END,
            {"a": [0] * 5_000, "old": dict.fromkeys(KEYS, 0), "new": dict.fromkeys(KEYS, 1)},
        ),
        (FOR + "{% if x in range(1024, 65536) %}y{% endif %}" + END, {"a": ["8080"] * 1_000}),
        (FOR + "{% if x in .trigger.m.values() %}y{% endif %}" + END, {"a": [0] * 20_000, "m": dict.fromkeys(KEYS, 1)}),
        (
            "{% set b %}" + FOR + "{{ .trigger.h }} {{ x }}" + END + "{% endset %}{{ b|length }}",
            {"a": [0] * 1_000, "h": "x" * 500_000},
        ),
        ("{{ (.trigger.tags * .trigger.n)|join(',') }}", {"tags": ["x" * 900_000], "n": 1_000}),
        ("{{ .trigger.path.lstrip(.trigger.base) }}", {"path": "a" * 500_000, "base": "b" * 500_000}),
        ("{{ '%*s'|format(.trigger.w, 'x') }}", {"w": 300_000_000}),
    ],
    ids=[
        "join-in-loop",
        "sort-in-loop",
        "in-a-list-in-loop",
        "recursive-inner-levels",
        "text-built-a-piece-at-a-time",
        "list-built-a-piece-at-a-time",
        "written-out",
        "replace-by-a-large-value",
        "center-to-an-events-width",
        "ljust-to-an-events-width",
        "join-with-a-large-separator",
        "batch-filled-to-an-events-count",
        "is-in-test-in-loop",
        "select-in",
        "written-in-small-pieces",
        "slices-in-loop",
        "set-block-built-a-piece-at-a-time",
        "wordwrap-in-loop",
        "comparison-of-large-mappings-in-loop",
        "text-in-a-range-in-loop",
        "in-a-mappings-values-in-loop",
        "set-block-written-large",
        "join-of-a-repeated-large-text",
        "strip-by-an-events-characters",
        "format-to-an-events-width",
    ],
)
def test_work_inside_a_step_is_charged_too(text: str, trigger: dict[str, Any]) -> None:
    """A loop's iteration is one step whatever its body does: a filter over a large list in it, a
    value looked up in a list, a text built up a piece at a time, or what it writes out took
    seconds to minutes for a few thousand steps (and a filter's argument taken from the event made a
    value of gigabytes in one step). Each is charged what it reads and makes, before it makes it
    where its arguments set the size."""
    with pytest.raises(TemplateError, match=r"steps|characters"):
        render(text, {"trigger": trigger})


def test_what_costs_nothing_more_than_its_step_is_not_charged_more() -> None:
    """A value handed on or looked up costs nothing: each item of a loop looked up in a large
    mapping of the event, or a list's length beside its index, stays one item's steps."""
    lookup = {str(i): i for i in range(50_000)}
    ctx = {"trigger": {"a": [str(i) for i in range(5_000)], "lookup": lookup, "keys": set(lookup)}}
    with templates.metered() as meter:
        out = render("{% for x in .trigger.a %}{{ .trigger.lookup[x] }}/{{ .trigger.a|length }},{% endfor %}", ctx)
        assert out.startswith("0/5000,1/5000,")
        assert (
            render("{% for x in .trigger.a %}{% if x in .trigger.keys %}y{% endif %}{% endfor %}", ctx) == "y" * 5_000
        )
    assert meter.steps <= 2 * 2 * 5_000 + 10, (
        meter.steps
    )  # two steps an item in each: its own, and one filter or search


def test_the_limit_holds_for_all_the_strings_of_one_value_together() -> None:
    """A runner task's or a webhook's ``input:`` is a mapping of templates: each string held to the
    limit alone, ten of them took ten times as long as one may."""
    one = FOR + "{% if loop.last %}{% endif %}" + END
    ctx = {"trigger": {"a": [0] * 30_000}}
    assert render({"f0": one, "f1": one}, ctx) == {"f0": "", "f1": ""}
    with pytest.raises(TemplateError, match="the template at f3 failed: SecurityError: it took more than 100,000"):
        render({f"f{i}": one for i in range(10)}, ctx)


@pytest.mark.parametrize("name", ["pprint", "urlize"])
def test_filters_whose_time_no_step_count_bounds_are_refused(name: str) -> None:
    """``urlize`` takes time quadratic in runs of punctuation (200 KB ran past a minute); ``pprint``
    seconds on deeply nested values. A counted rendering refuses them; a run begun before the
    limit (nothing counted) renders them as it did."""
    text = "{{ .trigger.text|" + name + " }}"
    with pytest.raises(TemplateError, match=f"the {name} filter is not available"):
        render(text, {"trigger": {"text": "see www.example.com"}})
    with templates.metered(None):
        assert "example.com" in render(text, {"trigger": {"text": "see www.example.com"}})


@pytest.mark.parametrize(
    ("text", "trigger", "length"),
    [
        (
            FOR + "{% if x.id in .trigger.selected %}y{% endif %}" + END,
            {"a": [{"id": i} for i in range(1_000)], "selected": list(range(0, 2_000, 2))},
            500,
        ),
        (NS + FOR + "{% set ns.s = ns.s ~ x ~ ',' ~ x ~ '\n' %}" + END + "{{ ns.s }}", {"a": list(range(3_000))}, 0),
        ("{{ .trigger.a|tojson }}", {"a": list(range(100_000))}, 0),
        (
            FOR + "{{ x.name|upper }},{{ x.id }},{{ x.get('note', '') }}\n" + END,
            {"a": [{"id": i, "name": "n"} for i in range(5_000)]},
            0,
        ),
    ],
    ids=[
        "id-in-a-list-of-1000-for-1000-rows",
        "csv-built-with-tilde-3000-rows",
        "tojson-of-100000",
        "rows-with-calls-and-filters-5000",
    ],
)
def test_reasonable_templates_on_large_events_still_render(text: str, trigger: dict[str, Any], length: int) -> None:
    out = render(text, {"trigger": trigger})
    assert len(out) >= length


COLLIDING = [(2**61 - 1) * (i + 1) for i in range(40_000)]  # Python hashes these alike


@pytest.mark.parametrize(
    "text",
    ["{{ .trigger.ids|unique|list|length }}", "{{ .trigger.rows|unique(attribute='id')|list|length }}"],
    ids=["unique", "unique-by-attribute"],
)
def test_numbers_an_event_chooses_do_not_collide_in_unique(text: str) -> None:
    """40,000 integers that Python hashes alike took 19 s in ``unique``'s set: keyed by their text,
    they take what any 40,000 do."""
    started = time.perf_counter()
    ctx = {"trigger": {"ids": COLLIDING, "rows": [{"id": i} for i in COLLIDING]}}
    assert render(text, ctx) == 40_000
    assert render("{{ [1, 1.0, '1', 2]|unique|list }}", {}) == [1, 1.0, "1", 2]
    assert time.perf_counter() - started < 5  # 19 s before; a wide margin for a loaded machine


def test_dict_takes_text_keys_only_so_none_can_collide() -> None:
    assert render("{{ dict(a=1, b=2) }}", {}) == {"a": 1, "b": 2}
    assert render("{{ dict(.trigger.pairs) }}", {"trigger": {"pairs": [["a", 1]]}}) == {"a": 1}
    with pytest.raises(TemplateError, match="text keys only"):
        render("{{ dict(.trigger.pairs)|length }}", {"trigger": {"pairs": [[k, 0] for k in COLLIDING]}})


@pytest.mark.parametrize(
    ("text", "trigger", "expected"),
    [
        ("{{ .trigger.body|truncate(280)|length <= 280 }}", {"body": "word " * 200_000}, True),
        (FOR + "{% if x in range(1024, 65536) %}y{% endif %}" + END, {"a": list(range(60_000, 70_000))}, "y" * 5_536),
        ("{{ .trigger.a|map(attribute='t')|sum(start=[])|length }}", {"a": [{"t": [0]}] * 60_000}, 60_000),
        ("{{ .trigger.a|sum(start=[])|length }}", {"a": [[0]] * 45_000}, 45_000),
    ],
    ids=["truncate-a-large-body", "integers-in-a-range", "flatten-a-generator", "flatten-lists"],
)
def test_reasonable_uses_that_read_little_of_a_large_input_render(
    text: str, trigger: dict[str, Any], expected: Any
) -> None:
    assert render(text, {"trigger": trigger}) == expected


FORMAT_STRING = "{% set f = .trigger.f %}"  # a format the event chooses (its "}}" cannot be in a template's text)


@pytest.mark.parametrize(
    ("text", "trigger"),
    [
        ("{{ '%*d' % (.trigger.w, 1) }}", {"w": 100_000_000}),
        ("{{ '%.*f' % (.trigger.w, 1.5) }}", {"w": 100_000_000}),
        ("{{ .trigger.f % 1 }}", {"f": "%100000000d"}),
        ("{{ .trigger.f|format(1) }}", {"f": "%.100000000x"}),
        (FORMAT_STRING + "{{ f.format('x', .trigger.w) }}", {"f": "{:>{}}", "w": 100_000_000}),
        (FORMAT_STRING + "{{ f.format(1.5, .trigger.w) }}", {"f": "{:.{}f}", "w": 100_000_000}),
        (FORMAT_STRING + "{{ f.format_map(.trigger) }}", {"f": "{x:>{w}}", "x": "a", "w": 100_000_000}),
        ("{{ .trigger.f % 1.0 }}", {"f": "%#.100000000g"}),  # with # the zeros stay
        (FORMAT_STRING + "{{ f.format(1.0) }}", {"f": "{:#.100000000}"}),
        ("{% set f = .trigger.f|safe %}{{ f.format('y') }}", {"f": "{:>100000000}"}),
        ("{{ .trigger.f|format('x') }}", {"f": ["%100000000s"]}),  # Jinja formats the list's text
        ("{{ .trigger.f % .trigger.m }}", {"f": "%((x))100000000s", "m": {"(x)": "a"}}),
        ("{{ .trigger.f % .trigger.m }}", {"f": "%(a)8000000s" * 13, "m": {"a": "x"}}),  # each under, all over
        (FORMAT_STRING + "{{ f.format_map(.trigger.m) }}", {"f": "{a:8000000}" * 13, "m": {"a": "x"}}),
    ],
    ids=[
        *("printf-width", "printf-precision", "printf-format", "format-filter", "str-format", "float-precision"),
        *("map", "printf-kept-zeros", "spec-kept-zeros", "markup-format", "format-filter-of-a-list", "nested-key"),
        *("printf-fields-together", "spec-fields-together"),
    ],
)
def test_a_width_or_precision_past_the_text_limit_is_refused_before_its_text_is_made(
    text: str, trigger: dict[str, Any]
) -> None:
    """A width the event chose took its memory (100 MB here, up to about 570 MB) before the text
    made was refused as too long."""
    tracemalloc.start()
    try:
        with pytest.raises(TemplateError, match=r"asks for [0-9,]+ characters"):
            render(text, {"trigger": trigger})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 10 * 1024 * 1024, f"{peak:,} bytes taken"


def test_widths_and_precisions_that_cut_or_stay_under_the_limit_render_as_before() -> None:
    trigger = {"s": "abc", "x": 1.5, "w": 100_000_000, "f": "{:>8}|{:.3f}|{:,}"}
    assert render("{{ '%.100000000s|%.100000000g' % (.trigger.s, .trigger.x) }}", {"trigger": trigger}) == "abc|1.5"
    assert render("{{ '%5.2f|%-4s|%%' % (.trigger.x, 'x') }}", {"trigger": trigger}) == " 1.50|x   |%"
    assert render("{{ .trigger.f.format('a', 2.5, 1234567) }}", {"trigger": trigger}) == "       a|2.500|1,234,567"
    assert render("{{ '{:.100000000}'.format(.trigger.s) }}", {"trigger": trigger}) == "abc"
    assert render("{{ '%s-%s'|format(1, 2) }}", {"trigger": trigger}) == "1-2"
    # A float that is no number ignores its precision: it renders as before.
    infinite = {"trigger": {"x": float("inf"), "p": 100_000_000}}
    assert render("{{ '%#.*g|%.*f' % (.trigger.p, .trigger.x, .trigger.p, .trigger.x) }}", infinite) == "inf|inf"
    # As Python reads them: a negative precision is none, leading zeros are no more characters.
    assert render("{{ '%.*f|%.*d|%*d' % (-9000000, 1.5, -9000000, 7, -3, 1) }}", {"trigger": trigger}) == "2|7|1  "
    assert render("{{ '{:0000000000005}|%.0000000000005d'.format(1) % 1 }}", {"trigger": trigger}) == "00001|00001"
    with templates.metered(None):  # a run begun before the limit renders what it asks for, as then
        assert len(render("{{ '%*d' % (.trigger.w // 10, 1) }}", {"trigger": trigger})) == 10_000_000

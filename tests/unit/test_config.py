"""Loading config files: interpolation, unknown keys, and load-time errors that say where."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from bridge import snapshot
from bridge.config import HISTORY_EVENTS_ACTIVITY, HISTORY_EVENTS_CHILD, BridgeConfig
from bridge.errors import ConfigError
from bridge.runtime.cli import main

ROOT = Path(__file__).resolve().parents[2]
SHOP = ROOT / "examples" / "shop.yaml"
CONSOLE_SCRIPT = Path(sys.executable).parent / "signal-bridge"


def load_config(path: Path, env: dict[str, str] | None = None) -> BridgeConfig:
    """A file through the whole load: read, validate, compile (what `serve` and `validate` do)."""
    return snapshot.load(path, env).config


def parse_config(data: Any, origin: str = "config") -> BridgeConfig:
    return snapshot.parse(data, origin=origin).config


def write(tmp_path: Path, text: str, name: str = "bridge.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def write_data(tmp_path: Path, data: dict[str, Any], name: str = "bridge.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def workflow(wid: str = "wf-one", **fields: Any) -> dict[str, Any]:
    return {"id": wid, "workflow_type": "Target", "triggers": [{"name": "order.created"}], **fields}


def load_error(tmp_path: Path, *workflows: dict[str, Any]) -> str:
    path = write_data(tmp_path, {"project": "shop", "workflows": list(workflows)})
    with pytest.raises(ConfigError) as exc:
        load_config(path, env={})
    message = str(exc.value)
    assert str(path) in message
    return message


# --- interpolation -----------------------------------------------------------------------


def test_env_variable_is_interpolated(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        project: shop
        temporal: {address: "${TEMPORAL_HOST}:7233"}
        http: {auth: {tokens: ["${BRIDGE_TOKEN}"]}}
        """,
    )
    cfg = load_config(path, env={"TEMPORAL_HOST": "temporal", "BRIDGE_TOKEN": "s3cret"})
    assert cfg.temporal.address == "temporal:7233"
    assert cfg.http.auth.tokens == ["s3cret"]


def test_env_default_is_used_only_when_unset(tmp_path: Path) -> None:
    path = write(tmp_path, 'project: shop\nhttp: {auth: {tokens: ["${BRIDGE_TOKEN:-dev-token}"]}}\n')
    assert load_config(path, env={}).http.auth.tokens == ["dev-token"]
    assert load_config(path, env={"BRIDGE_TOKEN": "real"}).http.auth.tokens == ["real"]


def test_unset_env_variable_is_an_error_naming_it_and_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, 'project: shop\nhttp: {auth: {tokens: ["${NOT_SET_ANYWHERE}"]}}\n')
    with pytest.raises(ConfigError, match="NOT_SET_ANYWHERE") as exc:
        load_config(path, env={})
    assert str(path) in str(exc.value)


@pytest.mark.parametrize("secret", ["back\\slash", 'quo"te', "hash #tag", "colon: space"])
def test_interpolated_secret_is_taken_verbatim(tmp_path: Path, secret: str) -> None:
    """A token from the environment must reach the config unchanged, whatever it contains."""
    path = write(tmp_path, 'project: shop\nhttp: {auth: {tokens: ["${BRIDGE_TOKEN}"]}}\n')
    assert load_config(path, env={"BRIDGE_TOKEN": secret}).http.auth.tokens == [secret]


@pytest.mark.parametrize("tokens", ['[""]', '["${UNSET_TOKEN:-}"]', '["ok-token", "  "]'])
def test_an_empty_bearer_token_is_refused(tmp_path: Path, tokens: str) -> None:
    path = write(tmp_path, f"project: shop\nhttp: {{auth: {{tokens: {tokens}}}}}\n")
    with pytest.raises(ConfigError, match=r"http, auth, tokens: a bearer token is empty"):
        load_config(path, env={})


def test_variable_mentioned_in_a_comment_is_not_required(tmp_path: Path) -> None:
    path = write(tmp_path, "# export ${SOME_UNSET_VAR} to change the token\nproject: shop\n")
    assert load_config(path, env={}).project == "shop"


# --- ${VAR} in tasks: kept for the runner, refused where history records it ----------------

HTTP_TASK = {
    "id": "notify",
    "type": "http",
    "config": {
        "url": "https://hooks.test/${HOOK_PATH}?key=${HOOK_KEY:-none}",
        "method": "${HOOK_METHOD:-POST}",
        "headers": {"Authorization": "Bearer ${HOOK_TOKEN}"},
        "body": {"text": "{{ .trigger.orderId }} ${HOOK_TOKEN}"},
        "timeout_seconds": "${HOOK_TIMEOUT}",
    },
}


def runner_workflow(*tasks: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"id": "notify", "triggers": [{"name": "order.created"}], "tasks": list(tasks), **fields}


def test_an_http_tasks_references_are_kept_and_checked_everything_else_is_replaced(tmp_path: Path) -> None:
    path = write_data(
        tmp_path,
        {"project": "${PROJECT}", "workflows": [runner_workflow(HTTP_TASK, description="${PROJECT}")]},
    )
    env = {"PROJECT": "shop", "HOOK_PATH": "p", "HOOK_TOKEN": "t0ken", "HOOK_TIMEOUT": "7"}
    cfg = load_config(path, env=env)
    [task] = cfg.workflows[0].tasks
    assert task.config.model_dump() == {
        **HTTP_TASK["config"],
        "timeout_seconds": 7.0,  # numbers are no secrets: replaced at load like the rest of the file
        "max_attempts": 5,
    }
    assert (cfg.project, cfg.workflows[0].description) == ("shop", "shop")


def test_an_unset_variable_in_an_http_task_still_fails_the_load(tmp_path: Path) -> None:
    path = write_data(tmp_path, {"project": "shop", "workflows": [runner_workflow(HTTP_TASK)]})
    with pytest.raises(ConfigError, match="HOOK_TOKEN") as exc:
        load_config(path, env={"HOOK_PATH": "p", "HOOK_TIMEOUT": "7"})
    assert str(path) in str(exc.value) and "'notify'" in str(exc.value)


@pytest.mark.parametrize(
    "task",
    [
        {"id": "say", "config": {"template": "token ${HOOK_TOKEN}"}},
        {"id": "say", "type": "template", "config": {"template": {"deep": ["${HOOK_TOKEN:-x}"]}}},
    ],
)
def test_a_template_task_may_not_read_the_environment(tmp_path: Path, task: dict[str, Any]) -> None:
    """Its output is recorded in Temporal's history: a secret there would be in every run."""
    path = write_data(tmp_path, {"project": "shop", "workflows": [runner_workflow(task)]})
    with pytest.raises(ConfigError, match=r"task 'say': \$\{HOOK_TOKEN\} in a template task"):
        load_config(path, env={"HOOK_TOKEN": "t0ken"})


# --- runner -------------------------------------------------------------------------------


def test_runner_defaults() -> None:
    runner = parse_config({"project": "shop"}).runner
    assert (runner.allow_hosts, runner.max_response_bytes, runner.timeout_seconds) == (None, 1024 * 1024, 30.0)
    assert runner.allowed is None


def test_allow_hosts_are_read_as_host_and_port() -> None:
    hosts = ["API.example.com", "hooks.test:8443", "10.0.0.5", "127.0.0.1:9000", "[::1]:8080", "::1", "x."]
    runner = parse_config({"project": "shop", "runner": {"allow_hosts": hosts}}).runner
    assert runner.allowed == [
        ("api.example.com", None),
        ("hooks.test", 8443),
        ("10.0.0.5", None),
        ("127.0.0.1", 9000),
        ("::1", 8080),
        ("::1", None),
        ("x", None),
    ]


@pytest.mark.parametrize(
    ("runner", "message"),
    [
        ({"allow_hosts": []}, "allow_hosts is empty"),
        ({"allow_hosts": ["https://hooks.test"]}, "is not a hostname"),
        ({"allow_hosts": ["hooks.test:0"]}, "port must be a number from 1 to 65535"),
        ({"allow_hosts": ["hooks.test/path"]}, "is not a hostname"),
        ({"allow_hosts": ["[::1"]}, "IPv6"),
        ({"max_response_bytes": 0}, "greater than or equal to 1"),
        ({"timeout_seconds": 0}, "greater than 0"),
        ({"allowed_hosts": ["x"]}, "allowed_hosts: unknown key"),
    ],
)
def test_bad_runner_settings_are_load_errors(runner: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_config({"project": "shop", "runner": runner})


# --- structure -----------------------------------------------------------------------------


def test_unknown_top_level_key_is_named(tmp_path: Path) -> None:
    path = write_data(tmp_path, {"project": "shop", "workflowz": []})
    with pytest.raises(ConfigError, match=r"workflowz: unknown key"):
        load_config(path, env={})


def test_unknown_trigger_key_names_key_workflow_and_trigger(tmp_path: Path) -> None:
    wf = workflow(triggers=[{"name": "order.created", "fliter": "payload.x > 1"}])
    message = load_error(tmp_path, wf)
    assert "fliter" in message
    assert "unknown key" in message
    assert "'wf-one'" in message
    assert "'order.created'" in message


def test_file_that_is_not_a_mapping_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, "- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(path, env={})


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.yaml", env={})


# --- load-time errors name file, workflow and trigger -----------------------------------


def test_unsupported_trigger_type(tmp_path: Path) -> None:
    message = load_error(tmp_path, workflow(triggers=[{"type": "webhook", "name": "order.created"}]))
    assert "'wf-one'" in message
    assert "'order.created'" in message
    assert "unsupported trigger type 'webhook'" in message


def test_empty_trigger_name(tmp_path: Path) -> None:
    message = load_error(tmp_path, workflow(triggers=[{"name": "order.paid"}, {"name": ""}]))
    assert "'wf-one'" in message
    assert "trigger #2" in message
    assert "name is required" in message


def test_same_trigger_twice_in_a_workflow(tmp_path: Path) -> None:
    message = load_error(tmp_path, workflow(triggers=[{"name": "order.created"}, {"name": "order.created"}]))
    assert "'wf-one'" in message
    assert "'order.created'" in message
    assert "twice" in message


def test_same_trigger_in_two_workflows_is_fine(tmp_path: Path) -> None:
    path = write_data(tmp_path, {"project": "shop", "workflows": [workflow("a"), workflow("b")]})
    assert [w.id for w in load_config(path, env={}).workflows] == ["a", "b"]


def test_schema_that_does_not_compile(tmp_path: Path) -> None:
    bad = {"type": "object", "properties": {"amount": {"minimum": "ten"}}}
    message = load_error(tmp_path, workflow(triggers=[{"name": "order.created", "schema": bad}]))
    assert "'wf-one'" in message
    assert "'order.created'" in message
    assert "schema does not compile" in message
    assert "properties/amount/minimum" in message


def test_filter_that_does_not_compile(tmp_path: Path) -> None:
    trig = {"name": "order.created", "filter": "payload.amount >"}
    message = load_error(tmp_path, workflow(triggers=[trig]))
    assert "'wf-one'" in message
    assert "'order.created'" in message
    assert "does not compile" in message


def test_two_workflows_with_one_id(tmp_path: Path) -> None:
    message = load_error(tmp_path, workflow("dup"), workflow("dup"))
    assert "'dup'" in message
    assert "same id" in message


def test_task_template_that_does_not_parse(tmp_path: Path) -> None:
    wf = {
        "id": "runner",
        "triggers": [{"name": "order.created"}],
        "tasks": [{"id": "say", "config": {"template": "{{ .trigger.orderId | }}"}}],
    }
    message = load_error(tmp_path, wf)
    assert "'runner'" in message
    assert "does not parse" in message


def test_input_template_that_does_not_parse(tmp_path: Path) -> None:
    message = load_error(tmp_path, workflow(input={"order": "{% if %}"}))
    assert "'wf-one'" in message
    assert "does not parse" in message


def test_workflow_needs_type_or_tasks(tmp_path: Path) -> None:
    message = load_error(tmp_path, {"id": "empty", "triggers": [{"name": "x"}]})
    assert "'empty'" in message
    assert "workflow_type" in message


def test_seed_task_shape_loads_as_is() -> None:
    cfg = parse_config(
        {
            "project": "shop",
            "workflows": [
                {
                    "id": "process-order",
                    "triggers": [{"type": "signal", "name": "order.created"}],
                    "tasks": [
                        {"id": "process-order", "config": {"template": "Processing order {{ .trigger.orderId }}"}}
                    ],
                }
            ],
        }
    )
    [task] = cfg.workflows[0].tasks
    assert task.type == "template"
    assert task.config.template == "Processing order {{ .trigger.orderId }}"


def test_example_shop_config_validates() -> None:
    cfg = load_config(SHOP, env={})
    assert cfg.project == "shop"
    assert [w.id for w in cfg.workflows] == ["process-order", "big-order-alert", "audit"]


# --- CLI -----------------------------------------------------------------------------------


def test_cli_validate_ok(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(SHOP)]) == 0
    out = capsys.readouterr()
    assert "ok" in out.out
    assert out.err == ""


def test_cli_validate_error_goes_to_stderr(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_data(tmp_path, {"project": "shop", "workflows": [workflow("dup"), workflow("dup")]})
    assert main(["validate", str(path)]) == 1
    out = capsys.readouterr()
    assert "same id" in out.err
    assert str(path) in out.err
    assert out.out == ""


def test_cli_routes_prints_name_to_workflows(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["routes", str(SHOP)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["order.created -> process-order, big-order-alert", "order.* -> audit"]


def test_console_script_reports_errors_with_exit_code_1(tmp_path: Path) -> None:
    """One run of the installed ``signal-bridge`` script: the entry point and exit code are wired."""
    bad = write_data(tmp_path, {"project": "shop", "workflows": [workflow(triggers=[{"name": ""}])]})
    run = subprocess.run([CONSOLE_SCRIPT, "validate", bad], capture_output=True, text=True, timeout=60)
    assert run.returncode == 1
    assert "name is required" in run.stderr
    assert run.stdout == ""


@pytest.mark.parametrize(
    ("dispatcher", "threshold"),
    [
        ({}, HISTORY_EVENTS_ACTIVITY),
        ({"start_mode": "activity"}, HISTORY_EVENTS_ACTIVITY),
        ({"start_mode": "child"}, HISTORY_EVENTS_CHILD),
        ({"start_mode": "child", "history_events_threshold": 700}, 700),
        ({"history_events_threshold": 900}, 900),
    ],
)
def test_the_continue_as_new_threshold_defaults_by_start_mode(dispatcher: dict[str, Any], threshold: int) -> None:
    """Short runs for activity mode (a replay under load stays short); child mode's runs spend
    about four events per target, so they keep the long default. A given value is kept."""
    data = {"project": "shop", "workflows": [{"id": "w", "workflow_type": "W", "triggers": [{"name": "e"}]}]}
    cfg = parse_config({**data, "dispatcher": dispatcher})
    assert cfg.dispatcher.history_events_threshold == threshold
    assert HISTORY_EVENTS_ACTIVITY < HISTORY_EVENTS_CHILD


@pytest.mark.parametrize("field", ["name_from", "id_from", "key_from"])
@pytest.mark.parametrize("header", ["x-original-topic", "X-Original-Message-Id", "x-dead-letter-reason"])
@pytest.mark.parametrize("adapter", ["kafka", "amqp"])
def test_an_event_read_from_a_header_of_the_bridges_dead_letters_is_refused(
    field: str, header: str, adapter: str
) -> None:
    """A replay drops those headers to rebuild the message: the replayed event would get another
    id (and start again), or lose its name or key. ``x-event-id`` and ``x-event-name`` it keeps."""
    entry: dict[str, Any] = {"event": {field: f"header:{header}"}}
    if adapter == "kafka":
        entry.update(bootstrap_servers="127.0.0.1:9092", topics=["t"], group_id="g")
    else:
        entry.update(url="amqp://127.0.0.1/", queue="q")
    with pytest.raises(ConfigError, match=f"{field}: header '{header}' is one the bridge writes on its dead letters"):
        parse_config({"project": "p", adapter: [entry]}, origin="t")
    for allowed in ("x-tenant-event-id", "x-event-id", "x-event-name"):  # a replay keeps these two
        entry["event"] = {field: f"header:{allowed}"}
        assert parse_config({"project": "p", adapter: [entry]}, origin="t")


@pytest.mark.parametrize(
    ("adapter", "first", "second"),
    [
        (
            "kafka",
            {"bootstrap_servers": "a:9092", "topics": ["t"]},
            {"bootstrap_servers": "b:9092", "topics": ["x", "t"]},
        ),
        (
            "amqp",
            {"url": "amqp://u:p@broker-a/tenant-a", "queue": "q"},
            {"url": "amqp://u:p@broker-b/tenant-a", "queue": "q"},
        ),
        (
            "amqp",
            {"url": "amqp://u:p@broker/tenant-a", "queue": "q"},
            {"url": "amqp://u:p@broker/tenant-b", "queue": "q"},
        ),
        ("amqp", {"url": "amqp://broker:5672/", "queue": "q"}, {"url": "amqp://broker:5673/", "queue": "q"}),
    ],
    ids=["kafka-clusters", "amqp-brokers", "amqp-vhosts", "amqp-ports"],
)
def test_one_topic_or_queue_name_on_two_clusters_brokers_or_vhosts_is_refused(
    adapter: str, first: dict[str, Any], second: dict[str, Any]
) -> None:
    """An event's scope is ``kafka:{topic}`` or ``amqp:{queue}``: the record at one cluster's offset,
    or a message id both producers use, took the run ids of the other's, which then started nothing."""
    with pytest.raises(ConfigError, match=r"\[1\].* scoped by the (topic|queue)'s name alone"):
        parse_config({"project": "p", adapter: [first, second]}, origin="t")


@pytest.mark.parametrize(
    ("adapter", "first", "second"),
    [
        (
            "kafka",
            {"bootstrap_servers": "a:9092,b:9092", "topics": ["t"]},
            {"bootstrap_servers": "B:9092, a:9092", "topics": ["t"], "group_id": "g2"},
        ),
        ("kafka", {"bootstrap_servers": "a:9092", "topics": ["t"]}, {"bootstrap_servers": "b:9092", "topics": ["u"]}),
        (
            "amqp",
            {"url": "amqp://u:p@broker/", "queue": "q"},
            {"url": "amqp://other:secret@BROKER:5672/?heartbeat=5", "queue": "q"},
        ),
        ("amqp", {"url": "amqp://broker-a/", "queue": "q"}, {"url": "amqp://broker-b/", "queue": "r"}),
        ("amqp", {"url": "amqp://u:pa[ss@broker/", "queue": "q"}, {"url": "amqp://broker-b/", "queue": "r"}),
    ],
    ids=[
        "kafka-one-cluster-listed-alike",
        "kafka-other-topics",
        "amqp-one-broker",
        "amqp-other-queues",
        "amqp-odd-url",
    ],
)
def test_one_name_read_twice_from_one_place_or_other_names_from_others_load(
    adapter: str, first: dict[str, Any], second: dict[str, Any]
) -> None:
    assert parse_config({"project": "p", adapter: [first, second]}, origin="t")


@pytest.mark.parametrize("secret", ["s3cret-token\n", " s3cret-token", "s3cret-tok\u00e9n", "s3cret\x01token"])
def test_a_bearer_token_no_request_could_match_is_refused_at_load(tmp_path: Path, secret: str) -> None:
    """A token read from a file with its newline (a Kubernetes secret) loaded, and every request
    with the right token was answered 401, with nothing to say why."""
    path = write(tmp_path, 'project: shop\nhttp: {auth: {tokens: ["${BRIDGE_TOKEN}"]}}\n')
    with pytest.raises(ConfigError, match="no request could match it"):
        load_config(path, env={"BRIDGE_TOKEN": secret})


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ('secret: "LITERAL-webhook-secret-123\\q"', "found unknown escape character 'q' at line 6, column"),
        ("secret: LITERAL-webhook-secret-123\x01", "character U+0001 is not allowed"),
        ("secret: [LITERAL-webhook-secret-123", "at line 6, column"),
        ("secret: *LITERAL-webhook-secret-123", "found undefined alias '…' at line 6, column"),
        ("secret: !LITERAL-webhook-secret-123 x", "at line 6, column"),
        ("secret: LITERAL\t-webhook: x", "at line 6, column"),
    ],
    ids=["bad-escape", "control-character", "unclosed", "alias", "tag", "tab"],
)
def test_a_file_yaml_cannot_read_is_refused_without_quoting_its_lines(tmp_path: Path, line: str, problem: str) -> None:
    """PyYAML's error quotes the lines around the place it stopped: a secret written in the file
    beside a bad escape went into the refusal, and the reload's ERROR line."""
    path = tmp_path / "bridge.yaml"
    path.write_text(
        "project: shop\nhttp:\n  auth: {tokens: [t0ken-value]}\nwebhooks:\n  - slug: gh\n"
        f"    verify: {{kind: github, {line}}}\n    events: [{{name: push}}]\n"
    )
    with pytest.raises(ConfigError) as refused:
        snapshot.load(path)
    assert "not valid YAML" in str(refused.value) and problem in str(refused.value)
    assert "LITERAL" not in str(refused.value) and "t0ken" not in str(refused.value)


@pytest.mark.parametrize("kind", ["github", "stripe", "hmac"])
def test_a_webhook_secret_with_a_trailing_newline_is_refused_at_load(kind: str) -> None:
    """A secret made from a file kept its newline: it loaded, verified no delivery, and every one
    was refused 401, as bearer tokens with the same mistake no longer are."""
    hook = {
        "slug": "gh",
        "verify": {"kind": kind, "secrets": ["old-secret", "the-secret\n"]},
        "events": [{"name": "x"}],
    }
    with pytest.raises(ConfigError, match=r"secret #2 begins or ends with whitespace") as refused:
        snapshot.parse({"project": "shop", "http": {"auth": {"tokens": ["t0ken-value"]}}, "webhooks": [hook]})
    assert "the-secret" not in str(refused.value)


def test_webhooks_sharing_a_secret_are_named_at_load(caplog: pytest.LogCaptureFixture) -> None:
    """No signature covers the URL: a delivery captured on one verifies on the other."""
    hooks = [
        {"slug": slug, "verify": {"kind": "github", "secret": "org-wide-secret-0123"}, "events": [{"name": "x"}]}
        for slug in ("docs", "deploy")
    ]
    hooks.append(
        {"slug": "own", "verify": {"kind": "github", "secret": "its-own-secret-0123"}, "events": [{"name": "x"}]}
    )
    snapshot.parse({"project": "shop", "http": {"auth": {"tokens": ["t0ken-value"]}}, "webhooks": hooks})
    [line] = [r.getMessage() for r in caplog.records if "share a secret" in r.getMessage()]
    assert "'docs', 'deploy'" in line and "own" not in line.split("share")[0]
    assert "org-wide-secret-0123" not in line


async def test_an_api_key_without_tls_set_connects_with_tls(monkeypatch: pytest.MonkeyPatch) -> None:
    """``tls`` defaulted to false and was passed on as such: the SDK then sends an API key over
    plaintext, and Temporal Cloud refused the connection. Left out, it is the SDK's choice."""
    from temporalio.client import Client

    from bridge.runtime import app

    asked: list[Any] = []

    async def connect(address: str, **kw: Any) -> Any:
        asked.append(kw["tls"])
        return object()

    monkeypatch.setattr(Client, "connect", connect)
    cfg = snapshot.parse(
        {"project": "shop", "temporal": {"address": "x.tmprl.cloud:7233", "api_key": "k"}, "workflows": []}
    ).config
    await app.connect("x.tmprl.cloud:7233", "ns", api_key=cfg.temporal.api_key, tls=cfg.temporal.tls)
    explicit = snapshot.parse({"project": "shop", "temporal": {"tls": False}, "workflows": []}).config
    assert asked == [None] and explicit.temporal.tls is False

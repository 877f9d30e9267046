"""The README and docs/ cannot drift from the code: every YAML example in them loads.

A ```yaml block with a top-level ``project:`` is a complete config: it is loaded through the real
loader (interpolation, the config models that refuse unknown keys, then the compiled snapshot:
schemas, CEL filters, templates, webhook verifiers). A block without ``project:`` is a fragment:
it must parse as YAML, and when it is made of top-level sections only it is loaded too, under a
stand-in project. Links between the pages must resolve, the README keeps `make run` and
`make test` as its first two commands (CI runs the README's test command), and the component is
called an adapter.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from bridge.config import BridgeConfig
from bridge.errors import ConfigError
from bridge.snapshot import Snapshot, load

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]
EXAMPLES = [ROOT / "examples" / "shop.yaml", ROOT / "compose" / "config.yaml"]

FENCE = re.compile(r"^```(?P<lang>[\w-]*)[^\n]*\n(?P<body>.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)")
LINK = re.compile(r"\[[^\]]*\]\((?P<target>[^)\s]+)\)")
# One value for every ${VAR} an example references: base64 of a 25-byte string, so it passes as a
# token, a password, an HMAC secret and a standard-webhooks key (which must decode to 16+ bytes).
FAKE_SECRET = "c2lnbmFsLWJyaWRnZS1kb2NzLXNlY3JldA=="


@dataclass(frozen=True)
class Block:
    page: Path
    line: int
    text: str

    def __str__(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def fenced(page: Path) -> list[tuple[str, int, str]]:
    """(language, first line of the body, body) of every fenced block on a page."""
    text = page.read_text()
    return [(m.group("lang"), text.count("\n", 0, m.start("body")) + 1, m.group("body")) for m in FENCE.finditer(text)]


def yaml_blocks() -> list[Block]:
    return [Block(page, line, body) for page in PAGES for lang, line, body in fenced(page) if lang == "yaml"]


BLOCKS = yaml_blocks()


def fake_env(text: str) -> dict[str, str]:
    return {name: FAKE_SECRET for name in VARIABLE.findall(text)}


def load_text(text: str, where: str, tmp_path: Path) -> Snapshot:
    """Load ``text`` as a config file through the real loader, naming ``where`` in any error."""
    path = tmp_path / "example.yaml"
    path.write_text(text)
    try:
        return load(path, env=fake_env(text))
    except ConfigError as exc:
        pytest.fail(f"{where}: the example does not load:\n{exc}")


def is_complete(data: Any) -> bool:
    return isinstance(data, dict) and "project" in data


def is_top_level_fragment(data: Any) -> bool:
    return isinstance(data, dict) and bool(data) and set(data) <= set(BridgeConfig.model_fields)


# --- the examples --------------------------------------------------------------------------------


def test_the_pages_exist_and_hold_examples() -> None:
    names = {p.name for p in PAGES}
    for page in (
        "configuration.md",
        "http-api.md",
        "webhooks.md",
        "kafka.md",
        "rabbitmq.md",
        "cloudevents.md",
        "operations.md",
        "benchmarks.md",
    ):
        assert page in names, f"docs/{page} is missing"
    complete = [b for b in BLOCKS if is_complete(yaml.safe_load(b.text))]
    assert len(complete) >= 10, f"only {len(complete)} complete config examples found: is the fence pattern right?"


def test_every_yaml_fence_is_spelled_yaml() -> None:
    """A ```yml block would escape the check below."""
    for page in PAGES:
        for lang, line, _ in fenced(page):
            assert lang != "yml", f"{page.relative_to(ROOT)}:{line}: write ```yaml so the example is checked"


@pytest.mark.parametrize("block", BLOCKS, ids=str)
def test_yaml_example_loads(block: Block, tmp_path: Path) -> None:
    try:
        data = yaml.safe_load(block.text)
    except yaml.YAMLError as exc:
        pytest.fail(f"{block}: not valid YAML: {exc}")
    if is_complete(data):
        load_text(block.text, str(block), tmp_path)
    elif is_top_level_fragment(data):
        load_text(yaml.safe_dump({"project": "docs", **data}, sort_keys=False), str(block), tmp_path)


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: str(p.relative_to(ROOT)))
def test_the_example_files_the_docs_point_to_load(example: Path, tmp_path: Path) -> None:
    load_text(example.read_text(), str(example.relative_to(ROOT)), tmp_path)


WORKFLOW = "project: shop\nworkflows:\n  - id: a\n    workflow_type: A\n    triggers: [{trigger}]\n"


def test_a_typo_in_an_example_fails(tmp_path: Path) -> None:
    """The check above has teeth: the config models refuse an unknown key."""
    typo = WORKFLOW.format(trigger="{name: x, fitler: 'true'}")
    with pytest.raises(pytest.fail.Exception, match="fitler: unknown key"):
        load_text(typo, "typo", tmp_path)


def test_a_bad_filter_in_an_example_fails(tmp_path: Path) -> None:
    """Complete examples are compiled too, not only validated."""
    bad = WORKFLOW.format(trigger="{name: x, filter: 'payload.a >'}")
    with pytest.raises(pytest.fail.Exception, match="does not compile"):
        load_text(bad, "bad filter", tmp_path)


# --- the pages -----------------------------------------------------------------------------------


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower-case, punctuation dropped, spaces as '-', repeats numbered."""
    text = FENCE.sub("", page.read_text())
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve(page: Path) -> None:
    text = FENCE.sub("", page.read_text())
    for match in LINK.finditer(text):
        target = match.group("target")
        if re.match(r"^[a-z]+:", target):
            continue  # https:, mailto:
        path_part, _, anchor = target.partition("#")
        dest = (page.parent / path_part).resolve() if path_part else page
        assert dest.exists(), f"{page.relative_to(ROOT)}: link to {target}: no such file"
        if anchor and dest.suffix == ".md":
            assert anchor in anchors(dest), f"{page.relative_to(ROOT)}: link to {target}: no such heading"


def test_the_readme_links_every_page() -> None:
    readme = README.read_text()
    for page in DOCS.glob("*.md"):
        assert f"(docs/{page.name})" in readme, f"README.md does not link docs/{page.name}"


def test_the_readme_is_a_landing_page_whose_first_commands_are_run_and_test() -> None:
    lines = README.read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; the reference belongs in docs/"
    first_sh = next(body for lang, _, body in fenced(README) if lang == "sh")
    commands = [line.split("#")[0].strip() for line in first_sh.splitlines() if line.strip()]
    assert commands[:2] == ["make run", "make test"]


def test_the_component_is_called_an_adapter() -> None:
    """'door' only where the metric label's rename is explained."""
    for page in PAGES:
        for number, line in enumerate(page.read_text().splitlines(), 1):
            if re.search(r"\bdoors?\b", line, re.IGNORECASE):
                assert "`door`" in line, f"{page.relative_to(ROOT)}:{number}: say adapter"


def test_every_test_the_fault_table_names_exists() -> None:
    """The fault table (docs/operations.md) is only worth its rows if the tests it cites exist."""
    text = (DOCS / "operations.md").read_text()
    cited = re.findall(r"`((?:unit|integration)/[\w/]+\.py)(?:::(\w+))?`", text)
    assert len(cited) > 30
    for module, name in cited:
        path = ROOT / "tests" / module
        assert path.exists(), f"the fault table cites {module}, which does not exist"
        if name:
            assert re.search(rf"^(async )?def {name}\(", path.read_text(), re.M), f"{module} has no test {name}"

"""The docs stay true: the configuration reference is generated from the schema and checked against it, every
link between the README and docs/ lands on a page and a heading that exist, and the README's test command is
what CI runs."""

import importlib.util
import re
from pathlib import Path

from gkd_async.config.schema import GKDConfig, valid_keys

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def reference_script():
    spec = importlib.util.spec_from_file_location("config_reference", REPO / "scripts" / "config_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_configuration_reference_is_what_the_schema_generates():
    """A key added, a default or a description changed without `python scripts/config_reference.py`: fails."""
    assert (REPO / "docs" / "configuration.md").read_text() == reference_script().render()


def documented_defaults():
    rows = {}
    for line in (REPO / "docs" / "configuration.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[0].startswith("`") and "." in cells[0]:
            for key in re.findall(r"`([a-z_]+\.[a-z_.]+)`", cells[0]):
                rows[key] = cells[1].strip("`")
    return rows


def shown(value):
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def test_every_config_key_is_documented_with_its_default():
    rows = documented_defaults()
    defaults = GKDConfig().model_dump(mode="json")
    for key in valid_keys():
        value = defaults
        for part in key.split("."):
            value = value[part]
        assert key in rows, f"docs/configuration.md does not document {key}"
        assert rows[key] == shown(value), f"docs/configuration.md's default of {key} is wrong"
    assert set(rows) <= set(valid_keys()), set(rows) - set(valid_keys())


def anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings (outside code blocks)."""
    found, fence = set(), False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            fence = not fence
        elif not fence and (m := re.match(r"^#+ (.*)", line)):
            found.add(re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-"))
    return found


def test_every_link_between_the_pages_lands_on_a_page_and_heading_that_exist():
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"^(https?:|mailto:)", target):
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if not linked.exists() or (anchor and linked.suffix == ".md" and anchor not in anchors(linked)):
                broken.append(f"{page.relative_to(REPO)}: {target}")
    assert broken == []


def test_readme_test_command_is_what_ci_runs():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    assert "make test" in readme and "make test" in ci

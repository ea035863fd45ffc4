"""The README's config reference must list every key with its real default."""

import re
from pathlib import Path

from gkd_async.config.schema import GKDConfig, valid_keys

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def documented_defaults():
    rows = {}
    for line in README.splitlines():
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
        assert key in rows, f"README does not document {key}"
        assert rows[key] == shown(value), f"README default of {key} is wrong"
    assert set(rows) <= set(valid_keys()), set(rows) - set(valid_keys())


def test_readme_test_command_is_what_ci_runs():
    ci = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()
    assert "make test" in README and "make test" in ci

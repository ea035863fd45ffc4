"""Docker cannot run on the development machines; check what can be checked: the compose file parses,
every command it runs exists in the CLI with the options it passes, and the files the image copies exist."""

import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

from gkd_async.config.loading import load_config

REPO = Path(__file__).resolve().parents[1]


def test_compose_commands_exist_in_the_cli():
    compose = yaml.safe_load((REPO / "docker" / "compose.yaml").read_text())
    stages = {name: svc for name, svc in compose["services"].items() if name != "redis"}
    assert set(stages) == {"learner", "rollout", "teacher"}
    for name, service in stages.items():
        command = service["command"]
        assert command[:2] == ["worker", name]
        helped = subprocess.run(
            [sys.executable, "-m", "cli.main", "worker", "--help"],
            capture_output=True,
            text=True,
            cwd=REPO,
            env={**os.environ, "COLUMNS": "200"},
        )
        assert helped.returncode == 0
        for option in (a for a in command if a.startswith("--")):
            assert option in helped.stdout, option
        config = command[command.index("--config") + 1].replace("/app/", "")
        overrides = [a for a in command[2:] if "=" in a and not a.startswith("--")]
        load_config(REPO / config, overrides)
        assert service["volumes"] == ["runs:/app/runs"]
        # The password reaches workers through the environment, never a command line.
        assert "--redis-url" not in command
        assert service["environment"]["GKD_REDIS_URL"].startswith("redis://:${REDIS_PASSWORD:?")
    redis_service = compose["services"]["redis"]
    assert "ports" not in redis_service  # reachable from the compose network only
    assert "requirepass" in " ".join(redis_service["entrypoint"]) and "--requirepass" not in str(redis_service)


def test_dockerfile_copies_what_exists_and_runs_the_cli():
    text = (REPO / "docker" / "Dockerfile").read_text()
    for line in re.findall(r"^COPY (.+)$", text, flags=re.M):
        for source in line.split()[:-1]:
            assert (REPO / source).exists(), source
    assert 'ENTRYPOINT ["gkd-async"]' in text
    assert "scripts/setup.sh" in text

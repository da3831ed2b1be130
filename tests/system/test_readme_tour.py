"""The README's tour, copy-paste, in order: the commands are read out of README.md itself
(so a change to the tour that breaks it fails here), run by bash from a fresh directory
with only the venv's ``budgeter`` on PATH and no Redis of the user's own.

- ``budgeter up --mock --tenant acme`` (with ``--port 0`` added, and the URL it prints
  used wherever the README says ``localhost:8080``);
- the operator commands of the by-hand block (``tenants set``, ``submit --wait``,
  ``results``, ``usage``; the ``export`` lines and the ``&`` processes are the production
  variant, which ``up`` stands for here), with ``prompts.jsonl`` as the README shows it;
- the Message Batches section's ``curl`` calls (PATCH the policy, create a key) and its
  Python SDK example, with the key just created.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from budgeter.store.shared_redis import SharedRedis
from tests.helpers import read_port_blocking

README = Path(__file__).resolve().parents[2] / "README.md"
pytestmark = pytest.mark.timeout(600)


def _section(text: str, start: str, end: str) -> str:
    return text[text.index(start) : text.index(end, text.index(start))]


def _blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", text, re.MULTILINE | re.DOTALL)


def _lines(block: str) -> list[str]:
    """A block's commands, a line continued with a trailing backslash joined to the next."""
    return block.replace("\\\n", " ").splitlines()


def _command(line: str) -> str:
    """The command of a README line, without its trailing ``# comment``."""
    return re.sub(r"\s+#\s.*$", "", line).strip()


def _bash(line: str, env: dict[str, str], cwd: Path) -> str:
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", line],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, f"{line}\nrc {done.returncode}\n{done.stdout}\n{done.stderr}"
    assert "Traceback" not in done.stderr, done.stderr
    return done.stdout


def test_the_readme_tour_runs_copy_paste(tmp_path: Path) -> None:
    readme = README.read_text()
    tour = _section(readme, "## A 5-minute tour", "### The shared embedded Redis")
    batches = _section(readme, "## The Message Batches API", "SDK 1.x sends")
    by_hand = [b for b in _blocks(tour, "sh") if "budgeter up" in b]
    production = [b for b in _blocks(tour, "sh") if "budgeter submit" in b]
    assert len(by_hand) == 1 and len(production) == 1, "the tour's two sh blocks moved"
    up_line = next(_command(x) for x in by_hand[0].splitlines() if x.startswith("budgeter up"))
    operator = [
        _command(line)
        for line in production[0].splitlines()
        if line.startswith("budgeter ") and not _command(line).endswith("&")
    ]
    assert [c.split()[1] for c in operator] == ["tenants", "submit", "results", "usage"]
    (prompts,) = _blocks(tour, "json")
    curls = [_command(x) for x in _lines(_blocks(batches, "sh")[0]) if x.startswith("curl")]
    (sdk_example,) = _blocks(batches, "python")
    admin_token = re.search(r"^export BUDGETER_ADMIN_TOKEN=(\S+)$", batches, re.MULTILINE)
    assert admin_token and curls and "anthropic.Anthropic(" in sdk_example

    data_dir = tmp_path / "data"
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUDGETER_")}
    env |= {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        "HOME": str(home),
        "BUDGETER_DATA_DIR": str(data_dir),
        "BUDGETER_ADMIN_TOKEN": admin_token.group(1),  # as the Batches section exports it
        "BUDGETER_LOG_LEVEL": "WARNING",
    }
    (tmp_path / "prompts.jsonl").write_text(prompts)
    port_file = tmp_path / "up.port"
    up_argv = ["bash", "-c", f"exec {up_line} --port 0 --port-file {port_file}"]
    with open(tmp_path / "up.out", "wb") as out, open(tmp_path / "up.err", "wb") as err:
        up = subprocess.Popen(up_argv, env=env, cwd=tmp_path, stdout=out, stderr=err)
    try:
        base = f"127.0.0.1:{read_port_blocking(port_file, up, timeout_s=300)}"

        outputs = [_bash(line, env, tmp_path) for line in operator[:2]]
        batch_id = outputs[1].split()[0]
        assert batch_id.startswith("msgbatch_"), outputs[1]
        _bash(operator[2].replace("msgbatch_...", batch_id), env, tmp_path)
        results = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
        assert [(r["custom_id"], r["result"]["type"]) for r in results] == [("q-1", "succeeded")]
        assert "budgets of acme" in _bash(operator[3], env, tmp_path)

        answers = [
            json.loads(_bash(c.replace("localhost:8080", base), env, tmp_path)) for c in curls
        ]
        policy = answers[0]["policy"]
        assert answers[0]["tenant"] == "acme" and policy["budgets"]["day"] == 3_000_000
        assert policy["rate"] == {**policy["rate"], "rpm": 900, "otpm": 80_000}  # merged
        assert policy["max_concurrency"] == 32  # kept from `tenants set`
        key = answers[1]["key"]
        script = sdk_example.replace("http://localhost:8080", f"http://{base}")
        script = script.replace('"sk-bgt-..."', json.dumps(key))
        (tmp_path / "sdk_example.py").write_text(script)
        printed = _bash(f"{sys.executable} sdk_example.py", env, tmp_path)
        assert printed.split() == ["q-1", "succeeded"]

        up.send_signal(signal.SIGTERM)
        assert up.wait(timeout=120) == 0
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
        SharedRedis(data_dir).stop()
    assert "Traceback" not in (tmp_path / "up.err").read_text()
    assert not (tmp_path / ".budgeter").exists()  # nothing written to the current directory


def test_the_tour_needs_only_what_ci_installs() -> None:
    assert shutil.which("bash") and shutil.which("curl"), "the tour uses bash and curl"

"""The audit log keeps cell sources, commands and error details: secrets are scrubbed before a row is stored
(rows are append-only, so a key that lands there can never be removed)."""

from __future__ import annotations

import json

import pytest

SECRETS = [
    "sk-live-abc123def456ghi789jkl",
    "hf_AbCdEfGhIjKlMnOpQrStUv",
    "hunter2-db-pass",
    "eyJhbGciOiJIUzI1.eyJzdWIiOiIxMjM0.c2lnbmF0dXJlLXZhbHVl",
    "s3cr3t-p4ssw0rd",
    "ghp_0123456789abcdefghijABCDEFGHIJ",
]

CELL = f'''\
import dataclasses
OPENAI_API_KEY = "{SECRETS[0]}"
client_kwargs = dict(api_key='{SECRETS[0]}')
DB_URL = "postgresql://admin:{SECRETS[2]}@db.internal:5432/app"
headers = {{"Authorization": "Bearer {SECRETS[3]}"}}
password = "{SECRETS[4]}"
# export GITHUB_TOKEN={SECRETS[5]}

from llmops_jupyter.core.config import StageConfig, option
from llmops_jupyter.core.runner import Runner
from llmops_jupyter.core.stage import Stage
from llmops_jupyter.registry import Registry


@dataclasses.dataclass
class PushConfig(StageConfig):
    hf_token: str = option("", "token for the hub")
    steps: int = option(1, "steps", min=1)


class Push(Stage):
    name = "secret-push"
    config_cls = PushConfig

    def run(self, ctx):
        if ctx.config.steps > 1:
            raise RuntimeError(f"cannot connect to {{DB_URL}} with token {{ctx.config.hf_token}}")
        return {{}}


runner = Runner(Registry.open())
ok = runner.run(Push, hf_token="{SECRETS[1]}")
try:
    runner.run(Push, hf_token="{SECRETS[1]}", steps=2)
except RuntimeError:
    pass
'''


def test_audit_rows_hold_no_secrets(shell, registry):
    result = shell.run_cell(CELL, store_history=True)  # as a kernel runs a cell
    result.raise_error()
    runs = registry.list_runs(stage="secret-push", limit=None)
    assert sorted(r["status"] for r in runs) == ["failed", "finished"]
    rows = [r for run in runs for r in registry.audit_rows(run_id=run["id"], limit=None)]
    assert {r["event"] for r in rows} >= {"started", "finished", "failed"}
    blob = json.dumps(rows, default=str)
    for secret in SECRETS:
        assert secret not in blob, f"{secret!r} stored in the audit log"
    # still useful: the row says *what* was set and which command ran, only not the values
    source = rows[0]["source"]
    assert rows[0]["front_end"] == "python"
    assert 'OPENAI_API_KEY = "[SECRET]"' in source and "api_key='[SECRET]'" in source
    assert "postgresql://admin:[SECRET]@db.internal" in source and "Bearer [SECRET]" in source
    assert 'password = "[SECRET]"' in source and "GITHUB_TOKEN=[SECRET]" in source
    assert "class Push(Stage):" in source
    assert {r["command"] for r in rows} == {"llmops secret-push --hf-token [SECRET] --steps 1",
                                        "llmops secret-push --hf-token [SECRET] --steps 2"}
    failed = next(r for r in rows if r["event"] == "failed")
    assert "postgresql://admin:[SECRET]@db.internal" in failed["detail"]["error"]


@pytest.mark.parametrize(("text", "scrubbed"), [
    ('OPENAI_API_KEY = "sk-live-abc123def456"', 'OPENAI_API_KEY = "[SECRET]"'),
    ("os.environ['DB_PASSWORD'] = 'abc def'", "os.environ['DB_PASSWORD'] = '[SECRET]'"),
    ('{"api_key": "abc"}', '{"api_key": "[SECRET]"}'),
    ("curl -H 'Authorization: token 0123456789abcdef0123'", "curl -H 'Authorization: token [SECRET]'"),
    ("login(hf_AbCdEfGhIjKlMnOp)", "login([SECRET])"),
    ("!llmops data --password=pw1 --source s3://bucket/x", "!llmops data --password=[SECRET] --source s3://bucket/x"),
    ("redis://:pa55@cache:6379/0", "redis://:[SECRET]@cache:6379/0"),
    ("AKIAABCDEFGHIJKLMNOP", "[SECRET]"),
    # not secrets: names of environment variables, token counts, reading a key from the environment
    ("%llmops serve --model m --api-key-env MY_KEY --max-tokens 64", None),
    ('token = os.environ["HF_TOKEN"]', None),
    ('max_tokens = "64"', None),
    ("r = %llmops audit-copy 0123abcd --note ' world'", None),
])
def test_scrub_secrets(text, scrubbed):
    from llmops_jupyter.governance.audit import scrub_secrets

    assert scrub_secrets(text) == (text if scrubbed is None else scrubbed)


def test_run_record_and_audit_log_name_the_same_user_when_getpass_fails(registry, monkeypatch):
    """One 'who is the user' rule for the run record and the audit log: JupyterHub user, else LLMOPS_USER, else the
    OS account, whose fallback (no passwd entry: getpass raises) is the same for both."""
    import getpass
    import os

    from llmops_jupyter.core.runner import Runner
    from llmops_jupyter.testing import tiny_records

    def no_passwd_entry():
        raise OSError("No username set in the environment")

    for var in ("JUPYTERHUB_USER", "LLMOPS_USER"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(getpass, "getuser", no_passwd_entry)
    res = Runner(registry).run("data", {"source": tiny_records(8), "eval_size": 2, "name": "who"})
    run_user = registry.get_run(res.run_id)["user"]
    audit_users = {r["user"] for r in registry.audit_rows(run_id=res.run_id)}
    assert audit_users == {run_user} and run_user == str(os.getuid())
    monkeypatch.setenv("JUPYTERHUB_USER", "ada")
    res = Runner(registry).run("data", {"source": tiny_records(8), "eval_size": 2, "name": "who2"})
    assert registry.get_run(res.run_id)["user"] == "ada"
    assert {r["user"] for r in registry.audit_rows(run_id=res.run_id)} == {"ada"}

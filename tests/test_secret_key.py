"""The secret key file: never silently regenerated, a clear error when missing or corrupt, and
the secrets come back when it is restored. Real server on a socket, real `sqlinfer doctor`."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.fake_providers import ScriptedOpenAIServer
from tests.registry_helpers import SQLINFER, SECRET_VALUE, wait_until_settled


@pytest.fixture
def provider():
    server = ScriptedOpenAIServer()
    yield server
    server.stop()


def doctor(home) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "SQLINFER_SECRET_KEY"} | {"SQLINFER_HOME": str(home)}
    return subprocess.run([SQLINFER, "doctor"], capture_output=True, text=True, timeout=120, env=env)


@pytest.mark.parametrize("damage", ["delete", "corrupt"])
def test_a_missing_or_corrupt_key_stops_secret_use_clearly_and_restoring_it_brings_them_back(
        server, admin, provider, damage, monkeypatch):
    monkeypatch.delenv("SQLINFER_SECRET_KEY", raising=False)
    admin.post("/api/2.0/serving-endpoints", json={"name": "ext", "config": {"served_entities": [{"external_model": {
        "name": "m", "provider": "openai", "task": "llm/v1/chat",
        "openai_config": {"openai_api_key": "{{secrets/my_scope/my_openai_api_key}}", "openai_api_base": provider.url}}}]}}
    ).raise_for_status()
    wait_until_settled(admin, "ext")
    key_file = server.service.home / "secret.key"
    original = key_file.read_bytes()
    query = {"messages": [{"role": "user", "content": "hi"}]}

    server.service.secrets.key._fernet = None  # as after a restart: the key is read again on first use
    if damage == "delete":
        key_file.unlink()
        expected = (f"the secret key file {str(key_file)!r} is missing, but 1 encrypted value(s) in the store need it; "
                    f"restore the file from a backup (or set SQLINFER_SECRET_KEY to the key) and restart. A new key "
                    f"would decrypt none of them, so none is generated")
    else:
        key_file.write_bytes(b"garbage")
        expected = (f"the secret key file {str(key_file)!r} does not hold a valid key (32 url-safe base64-encoded "
                    f"bytes); restore the original key from a backup and restart. Secrets cannot be used until then")
    for response in (admin.post("/serving-endpoints/ext/invocations", json=query),
                     admin.post("/api/2.0/secrets/put", json={"scope": "my_scope", "key": "new", "string_value": "x"})):
        assert response.status_code == 503, response.text
        assert response.json() == {"error_code": "SECRET_KEY_UNAVAILABLE", "message": expected}
    assert admin.get("/api/2.0/serving-endpoints/ext").status_code == 200  # everything else keeps working
    assert key_file.exists() == (damage == "corrupt")  # no new key was written in its place
    checked = doctor(server.service.home)
    assert checked.returncode == 1 and f"secret key: PROBLEM: {expected}" in checked.stdout
    assert provider.calls == []

    key_file.write_bytes(original)  # restored from the backup
    answer = admin.post("/serving-endpoints/ext/invocations", json=query)
    assert answer.status_code == 200, answer.text
    assert provider.calls[-1][2] == f"Bearer {SECRET_VALUE}"
    checked = doctor(server.service.home)
    assert checked.returncode == 0 and "secret key: ok (" in checked.stdout


def test_a_key_that_is_not_the_original_is_refused_by_name(server, admin, monkeypatch):
    from cryptography.fernet import Fernet

    monkeypatch.setenv("SQLINFER_SECRET_KEY", Fernet.generate_key().decode())
    server.service.secrets.key._fernet = None
    response = admin.post("/serving-endpoints/system-echo/invocations", json={"messages": [{"role": "user", "content": "x"}]})
    assert response.status_code == 200  # no secret involved
    with pytest.raises(Exception) as caught:
        server.service.secrets.resolve("{{secrets/my_scope/my_openai_api_key}}")
    assert caught.value.error_code == "SECRET_KEY_UNAVAILABLE"
    assert "cannot be decrypted with the key in SQLINFER_SECRET_KEY: the key is not the one it was encrypted with" \
        in caught.value.message

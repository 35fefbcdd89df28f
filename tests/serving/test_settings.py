"""ServeSettings: every serve flag checked once, on construction, each refusal naming its flag; a value at each
bound accepted; the address probe; the CLI's serve flags are the settings' fields."""

from __future__ import annotations

import dataclasses
import re
import socket

import pytest

from loramix.serving.settings import LOG_LEVELS, ServeSettings


@pytest.mark.parametrize("field, value, flag", [
    ("port", 0, "--port"),
    ("port", 65536, "--port"),
    ("port", True, "--port"),
    ("port", "8000", "--port"),
    ("max_batch", 0, "--max-batch"),
    ("max_batch", 2.0, "--max-batch"),
    ("max_queue", -1, "--max-queue"),
    ("max_tokens_cap", 0, "--max-tokens-cap"),
    ("max_request_bytes", 0, "--max-request-bytes"),
    ("chat_template", "/no/such/template.jinja", "--chat-template"),
    ("host", "", "--host"),
    ("log_level", "loud", "--log-level"),
    ("model", "", "--model"),
    ("max_logprob_entries", 0, "--max-logprob-entries"),
    # issue 21: an empty or blank key (an unset environment variable) opened the server to `Bearer` with no key
    ("api_key", "", "--api-key"),
    ("api_key", "   ", "--api-key"),
    ("api_key", "\t\n", "--api-key"),
    ("api_key", " key", "--api-key"),
    ("api_key", "key\n", "--api-key"),
    ("api_key", "k\x00ey", "--api-key"),
    ("api_key", 5, "--api-key"),
])
def test_each_bad_value_is_refused_naming_its_flag(field, value, flag):
    with pytest.raises(ValueError, match="^" + re.escape(flag)):
        ServeSettings(**{"model": "ckpt", field: value})


@pytest.mark.parametrize("field, value", [
    ("port", 1), ("port", 65535), ("max_batch", 1), ("max_queue", 0), ("max_tokens_cap", 1),
    ("max_request_bytes", 1), ("max_logprob_entries", 1), ("api_key", "k"), ("api_key", "a key with spaces"),
    ("api_key", None), *(("log_level", level) for level in LOG_LEVELS),
])
def test_a_value_at_each_bound_is_accepted(field, value):
    assert getattr(ServeSettings(**{"model": "ckpt", field: value}), field) == value


def test_the_chat_template_is_read_as_utf8_text(tmp_path):
    template = tmp_path / "t.jinja"
    template.write_text("{{ 'caf\u00e9' }}", encoding="utf-8")
    assert ServeSettings(model="ckpt", chat_template=str(template)).read_chat_template() == "{{ 'caf\u00e9' }}"
    template.write_bytes("{{ 'caf\u00e9' }}".encode("latin-1"))
    with pytest.raises(ValueError, match="^--chat-template: .* is not UTF-8"):
        ServeSettings(model="ckpt", chat_template=str(template))


def test_the_model_name_is_the_served_name_or_the_folder(tmp_path):
    assert ServeSettings(model=str(tmp_path / "my-xlora") + "/").model_name == "my-xlora"
    assert ServeSettings(model="org/xlora", served_model_name="mine").model_name == "mine"
    assert ServeSettings(model="ckpt", max_batch=3, max_queue=5).max_rows == 8


def test_the_address_probe_names_the_flag():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(ValueError, match="^--host/--port: cannot listen on 127.0.0.1"):
            ServeSettings(model="ckpt", port=busy.getsockname()[1]).probe_address()
    with pytest.raises(ValueError, match="^--host 'no such host!'"):
        ServeSettings(model="ckpt", host="no such host!").probe_address()
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    ServeSettings(model="ckpt", port=port).probe_address()  # a free port: no error


def test_every_field_is_a_serve_flag(capsys):
    from loramix.cli import main

    assert main(["serve", "--help"]) == 0
    help_text = capsys.readouterr().out
    for field in dataclasses.fields(ServeSettings):
        assert "--" + field.name.replace("_", "-") in help_text, field.name


def test_the_key_middleware_refuses_an_empty_key_and_compares_in_constant_time(monkeypatch):
    """A library user building the app around a blank key gets the same refusal as the flag; keys are compared
    with hmac.compare_digest."""
    import hmac

    from loramix.serving import app

    for key in ("", "  "):
        with pytest.raises(ValueError, match="^--api-key"):
            app.RequireKey(None, key)
    compared, original = [], hmac.compare_digest
    monkeypatch.setattr(app.hmac, "compare_digest", lambda a, b: compared.append((a, b)) or original(a, b))
    guard = app.RequireKey(None, "s3cret")
    assert guard.authorized([(b"authorization", b"Bearer s3cret")])
    assert not guard.authorized([(b"authorization", b"Bearer")])
    assert not guard.authorized([(b"authorization", b"Bearer ")])
    assert compared == [(b"s3cret", b"s3cret"), (b"", b"s3cret"), (b"", b"s3cret")]

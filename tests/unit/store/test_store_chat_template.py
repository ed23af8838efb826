"""Adapters' own chat templates: stored with the version (both registry backends), refused when bad."""

from __future__ import annotations

import json

import pytest

from loraplex.adapters_store.errors import AdapterValidationError
from loraplex.adapters_store.paths import CONFIG_NAME, WEIGHTS_NAME
from loraplex.adapters_store.upload import UploadMeta
from loraplex.server.engine.chat_template import ChatRenderer
from store_adapters import adapter_bytes, make_store, sha256, upload, write_adapter

TEMPLATE = "{% for m in messages %}<<{{ m['role'] }}>>{{ m['content'] }}\n{% endfor %}<<assistant>>"


@pytest.fixture
def store(tmp_path):
    store = make_store(tmp_path / "store", max_chat_template_bytes=4096)
    store.set_template_check(ChatRenderer(None).check_adapter_template)   # the engine's sandboxed check
    yield store
    store.close()


def upload_with_template(store, name: str, template: bytes, seed: int = 0):
    config, weights = adapter_bytes(seed=seed)
    meta = UploadMeta(name=name, config_size=len(config), config_sha256=sha256(config), weights_size=len(weights),
                      weights_sha256=sha256(weights), chat_template_size=len(template),
                      chat_template_sha256=sha256(template))
    with store.begin_upload(meta) as session:
        session.write(CONFIG_NAME, config)
        session.write(WEIGHTS_NAME, weights)
        session.write("chat_template.jinja", template)
        return session.commit()


def test_template_round_trips_with_its_version(store):
    first = upload_with_template(store, "tpl", TEMPLATE.encode())
    assert first.chat_template == TEMPLATE
    plain = upload(store, "tpl", *adapter_bytes(seed=1))
    assert plain.chat_template is None
    assert store.resolve("tpl@1", None).chat_template == TEMPLATE
    assert store.resolve("tpl", None).chat_template is None
    assert [r.chat_template for r in store.list_versions(None)] == [TEMPLATE, None]


def test_register_path_reads_jinja_file_or_tokenizer_config(store, tmp_path):
    jinja = write_adapter(tmp_path / "adapters" / "jinja")
    (jinja / "chat_template.jinja").write_text(TEMPLATE)
    assert store.register_path("jinja", "jinja").chat_template == TEMPLATE
    tok = write_adapter(tmp_path / "adapters" / "tok", seed=1)
    (tok / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE, "model_max_length": 8}))
    assert store.register_path("tok", "tok").chat_template == TEMPLATE
    bare = write_adapter(tmp_path / "adapters" / "bare", seed=2)
    (bare / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 8}))
    assert store.register_path("bare", "bare").chat_template is None


@pytest.mark.parametrize("template, problem", [
    ("{% for m in messages %}{{ m['content'] }", "does not render"),                    # syntax error
    ("{{ raise_exception('no system role') }}", "no system role"),
    ("{% for i in range(10**9) %}{% for j in range(10**9) %}x{% endfor %}{% endfor %}", "does not render"),
    ("{{ 'x' * 3000 }}" + "y" * 5000, "above the limit of 4096"),
])
def test_bad_templates_are_refused_naming_the_file(store, tmp_path, template, problem):
    with pytest.raises(AdapterValidationError, match=f"chat_template.jinja: .*{problem}"):
        upload_with_template(store, "bad", template.encode())
    directory = write_adapter(tmp_path / "adapters" / "badtok")
    (directory / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    with pytest.raises(AdapterValidationError, match=f"tokenizer_config.json: .*{problem}"):
        store.register_path("badtok", "badtok")
    assert store.list(None) == []


def test_undeclared_template_chunk_is_refused(store):
    config, weights = adapter_bytes()
    meta = UploadMeta(name="u", config_size=len(config), config_sha256=sha256(config), weights_size=len(weights),
                      weights_sha256=sha256(weights))
    with store.begin_upload(meta) as session:
        with pytest.raises(AdapterValidationError, match="declare chat_template.jinja's size"):
            session.write("chat_template.jinja", b"{{ messages }}")

"""Local adapter validation, chunking with sha256, progress, and upload over a real gRPC server."""

from __future__ import annotations

import asyncio
import hashlib
import json
import struct

import numpy as np
import pytest
from safetensors.numpy import save_file

from client_harness import ScriptedServer
from loraplex.client import AsyncClient, Client, ValidationError
from loraplex.client.upload import CHUNK_BYTES, upload_requests, validate_adapter_dir
from loraplex.v1 import adapters_pb2


def write_adapter(directory, rank=4, hidden=64, num_layers=2, config=None):
    """A PEFT-layout LoRA directory with random weights (no model needed)."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    tensors = {}
    for layer in range(num_layers):
        prefix = f"base_model.model.model.layers.{layer}.self_attn.q_proj"
        tensors[f"{prefix}.lora_A.weight"] = rng.standard_normal((rank, hidden), dtype=np.float32)
        tensors[f"{prefix}.lora_B.weight"] = rng.standard_normal((hidden, rank), dtype=np.float32)
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    config = config if config is not None else {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank,
                                                "target_modules": ["q_proj"]}
    (directory / "adapter_config.json").write_text(json.dumps(config))
    return directory


def test_valid_directory_is_hashed(tmp_path):
    directory = write_adapter(tmp_path / "a")
    adapter = validate_adapter_dir(directory)
    weights = (directory / "adapter_model.safetensors").read_bytes()
    assert adapter.rank == 4 and adapter.weights.size == len(weights)
    assert adapter.weights.sha256 == hashlib.sha256(weights).hexdigest()


@pytest.mark.parametrize("breakage, field", [
    (lambda d: (d / "adapter_model.safetensors").unlink(), "adapter_model.safetensors"),
    (lambda d: (d / "adapter_config.json").unlink(), "adapter_config.json"),
    (lambda d: (d / "adapter_config.json").write_text("{not json"), "adapter_config.json"),
    (lambda d: (d / "adapter_config.json").write_text('{"peft_type": "PREFIX_TUNING", "r": 4}'),
     "adapter_config.json:peft_type"),
    (lambda d: (d / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 0}'), "adapter_config.json:r"),
    (lambda d: (d / "adapter_config.json").write_text('{"peft_type": "LORA"}'), "adapter_config.json:r"),
    (lambda d: (d / "adapter_model.safetensors").write_bytes(b"\x01\x02"), "adapter_model.safetensors"),
    (lambda d: (d / "adapter_model.safetensors").write_bytes(struct.pack("<Q", 10**6) + b"{}"),
     "adapter_model.safetensors"),
    (lambda d: (d / "adapter_model.safetensors").write_bytes(struct.pack("<Q", 9) + b"not json!"),
     "adapter_model.safetensors"),
])
def test_broken_directories_fail_fast(tmp_path, breakage, field):
    directory = write_adapter(tmp_path / "a")
    breakage(directory)
    with pytest.raises(ValidationError) as raised:
        validate_adapter_dir(directory)
    assert field in raised.value.violations and str(directory) in raised.value.message


def test_tensor_outside_the_file_is_rejected(tmp_path):
    directory = write_adapter(tmp_path / "a")
    path = directory / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-16])                  # truncated data section
    with pytest.raises(ValidationError, match="outside the file"):
        validate_adapter_dir(directory)


def test_not_a_directory(tmp_path):
    with pytest.raises(ValidationError, match="not a directory"):
        validate_adapter_dir(tmp_path / "missing")


def test_chunks_are_at_most_one_mib_and_progress_reaches_total(tmp_path):
    directory = write_adapter(tmp_path / "big", rank=16, hidden=12_000)    # ~1.5 MiB of weights
    adapter = validate_adapter_dir(directory)
    seen: list[tuple[int, int]] = []
    messages = list(upload_requests(adapter, "big", progress=lambda sent, total: seen.append((sent, total))))
    assert messages[0].WhichOneof("payload") == "metadata"
    chunks = [m.chunk for m in messages[1:]]
    assert all(len(c.data) <= CHUNK_BYTES for c in chunks) and len(chunks) >= 3
    weights = b"".join(c.data for c in chunks if c.file == adapters_pb2.ADAPTER_FILE_WEIGHTS)
    assert hashlib.sha256(weights).hexdigest() == messages[0].metadata.weights_sha256
    assert [s for s, _ in seen] == sorted(s for s, _ in seen) and seen[-1] == (adapter.total_bytes,) * 2


def test_upload_over_grpc_sync_and_async(tmp_path):
    directory = write_adapter(tmp_path / "big", rank=16, hidden=12_000)
    server = ScriptedServer()
    try:
        progress: list[int] = []
        with Client(server.address) as client:
            info = client.upload_adapter(directory, "big", progress=lambda sent, total: progress.append(sent))
        assert info.adapter_id == "big" and info.sha256 == validate_adapter_dir(directory).weights.sha256
        assert progress[-1] == validate_adapter_dir(directory).total_bytes

        async def upload():
            async with AsyncClient(server.address) as client:
                return await client.upload_adapter(directory, "big2", private=True)
        assert asyncio.run(upload()).adapter_id == "big2"
        assert server.script.calls_to("UploadAdapter")[1].request[0].metadata.private
        stored = server.script.uploads[0]
        assert stored["weights"] == (directory / "adapter_model.safetensors").read_bytes()
    finally:
        server.stop()


def test_invalid_directory_sends_nothing(tmp_path):
    directory = write_adapter(tmp_path / "a", config={"peft_type": "IA3", "r": 4})
    server = ScriptedServer()
    try:
        with Client(server.address) as client, pytest.raises(ValidationError, match="only LORA"):
            client.upload_adapter(directory, "a")
        assert server.script.calls == []
    finally:
        server.stop()


def _header_with(directory, mutate) -> None:
    """Rewrite the weights file's header JSON text through `mutate(text) -> text` (same data)."""
    path = directory / "adapter_model.safetensors"
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = mutate(data[8:8 + length].decode()).encode("utf-8", "surrogatepass")
    path.write_bytes(struct.pack("<Q", len(header)) + header + data[8 + length:])


# Issue 16 item 10: hostile local files raise ValidationError, never TypeError/RecursionError/ValueError.
HOSTILE = {
    "offsets_are_strings": lambda d: _header_with(d, lambda h: h.replace('"data_offsets":[0,', '"data_offsets":["0",', 1)),
    "shape_is_a_string": lambda d: _header_with(d, lambda h: h.replace('"shape":[', '"shape":"x","s":[', 1)),
    "entry_not_an_object": lambda d: _header_with(d, lambda h: '{"t": 5, ' + h[1:]),
    "header_deep_nesting": lambda d: _header_with(d, lambda h: '{"__metadata__": ' + "[" * 50000 + "]" * 50000 + ", " + h[1:]),
    "header_huge_int": lambda d: _header_with(d, lambda h: h.replace('"data_offsets":[0,', '"data_offsets":[' + "9" * 5000 + ",", 1)),
    "header_nan": lambda d: _header_with(d, lambda h: '{"x": NaN, ' + h[1:]),
    "header_lone_surrogate": lambda d: _header_with(d, lambda h: '{"__metadata__": {"a": "\\ud800"}, ' + h[1:]),
    "config_deep_nesting": lambda d: (d / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4, "x": '
                                                                             + "[" * 50000 + "]" * 50000 + "}"),
    "config_r_5000_digits": lambda d: (d / "adapter_config.json").write_text('{"peft_type": "LORA", "r": '
                                                                              + "7" * 5000 + "}"),
    "config_duplicate_r": lambda d: (d / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4, "r": 8}'),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_local_files_raise_validation_error(tmp_path, case):
    directory = write_adapter(tmp_path / "a")
    HOSTILE[case](directory)
    with pytest.raises(ValidationError):
        validate_adapter_dir(directory)


def test_tokenizer_files_are_sent_only_with_saved_vocabulary_tables(tmp_path):
    """The adapter's tokenizer files travel (declared in the metadata, then chunked) when
    modules_to_save saves embed_tokens or lm_head (a resized vocabulary needs them), never otherwise."""
    files = {"tokenizer.json": b'{"model": {}}', "tokenizer_config.json": b"{}", "special_tokens_map.json": b"{}"}
    plain = write_adapter(tmp_path / "plain")
    saved = write_adapter(tmp_path / "saved", config={"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                        "target_modules": ["q_proj"], "modules_to_save": ["lm_head"]})
    for directory in (plain, saved):
        for name, data in files.items():
            (directory / name).write_bytes(data)
    assert validate_adapter_dir(plain).tokenizer == ()
    adapter = validate_adapter_dir(saved)
    messages = list(upload_requests(adapter, "saved"))
    declared = {f.file: (f.size, f.sha256) for f in messages[0].metadata.tokenizer_files}
    assert declared == {adapters_pb2.ADAPTER_FILE_TOKENIZER: (13, hashlib.sha256(files["tokenizer.json"]).hexdigest()),
                        adapters_pb2.ADAPTER_FILE_TOKENIZER_CONFIG: (2, hashlib.sha256(b"{}").hexdigest()),
                        adapters_pb2.ADAPTER_FILE_SPECIAL_TOKENS_MAP: (2, hashlib.sha256(b"{}").hexdigest())}
    sent = {m.chunk.file: m.chunk.data for m in messages[1:] if m.chunk.file in declared}
    assert sent[adapters_pb2.ADAPTER_FILE_TOKENIZER] == files["tokenizer.json"]
    assert adapter.total_bytes == adapter.config.size + adapter.weights.size + 17

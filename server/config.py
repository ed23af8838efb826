"""ServerConfig: every `loraplex serve` setting, from flags > LORAPLEX_* env vars > config file > defaults.

The engine's settings keep their defaults in engine/config.py (each Flag names the
EngineConfig setting it sets); `engine_config()` builds the composed EngineConfig from them.

`load_server_config(argv_values, environ)` merges the sources and validates everything at once;
a `ConfigError` carries one line per problem (the CLI prints them and exits with code 2).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from .config_checks import MiB, validate
from .engine.config import CacheConfig, EngineConfig, LoraConfig, RequestLimits, SchedulerConfig, StructuredConfig
from .layers.options import QuantConfig

_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*", re.IGNORECASE | re.ASCII)   # fullmatch
_TENANT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", re.ASCII)                       # fullmatch
_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 2**10, "ki": 2**10, "m": 1e6, "mb": 1e6,
          "mib": 2**20, "mi": 2**20, "g": 1e9, "gb": 1e9, "gib": 2**30, "gi": 2**30,
          "t": 1e12, "tb": 1e12, "tib": 2**40, "ti": 2**40}


class ConfigError(ValueError):
    """Invalid server configuration; `problems` holds one human-readable line per problem."""

    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class ApiKey:
    """One configured key. `repr` never shows the secret."""

    secret: str = field(repr=False)
    tenant: str | None = None

    def __repr__(self) -> str:
        return f"ApiKey(tenant={self.tenant!r}, secret='***')"


def parse_size(text: str | int) -> int:
    """'512MiB', '2GB', '1048576' -> bytes."""
    if isinstance(text, int):
        return text
    match = _SIZE_RE.fullmatch(str(text))
    if not match:
        raise ValueError(f"{text!r} is not a size (examples: 1048576, 512MiB, 2GiB)")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "").lower()])


def _one_of(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in choices:
            raise ValueError(f"{text!r} is not one of {', '.join(repr(c) for c in choices)}")
        return text
    return parse


def parse_key(text: str) -> ApiKey:
    """'secret' or 'tenant:secret'."""
    tenant, sep, secret = text.strip().partition(":")
    if not sep:
        return ApiKey(secret=tenant)
    if not _TENANT_RE.fullmatch(tenant):
        raise ValueError("the tenant in 'tenant:key' must match [A-Za-z0-9][A-Za-z0-9._-]{0,63}")
    return ApiKey(secret=secret, tenant=tenant)


def _bool(text: str | bool) -> bool:
    if isinstance(text, bool):
        return text
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"{text!r} is not a boolean (use true/false)")


@dataclass(frozen=True)
class Flag:
    """One setting: its flag, env var, parser and help. `many` settings are lists."""

    name: str                                  # ServerConfig field
    flag: str
    parse: Callable[[Any], Any]
    help: str
    many: bool = False
    env: str | None = None                     # default LORAPLEX_<FLAG>
    engine: str | None = None                  # the EngineConfig setting it sets (engine/config.py)
    switch: bool = False                       # a flag without a value (`--no-x` sets True)
    to_engine: Callable[[Any], Any] | None = None   # the engine setting's value from this one's

    def engine_value(self, value: Any) -> Any:
        return value if self.to_engine is None else self.to_engine(value)

    @property
    def env_name(self) -> str:
        return self.env or "LORAPLEX_" + self.flag.removeprefix("--").replace("-", "_").upper()


FLAGS: tuple[Flag, ...] = (
    Flag("model", "--model", str, "local Hugging Face model directory, a Hub id (org/name, downloaded once "
         "into the Hugging Face cache), or 'default' (SmolLM2-135M-Instruct)"),
    Flag("revision", "--revision", str, "branch, tag or commit of a Hub --model (default main)"),
    Flag("quantize", "--quantize", str, "none, bnb-nf4, bnb-fp4, bnb-int8, hqq-{2,3,4,8}bit, eetq",
         engine="method"),
    Flag("dtype", "--dtype", str, "compute dtype: auto, float32, bfloat16, float16", engine="dtype"),
    Flag("device", "--device", str, "auto, cpu, cuda, cuda:N", engine="device"),
    Flag("linear_kernel", "--linear-kernel", str,
         "dense GEMMs: auto (prepacked oneDNN on CPU), onednn, or aten (F.linear)", engine="linear_kernel"),
    Flag("cpu_kernels", "--cpu-kernels", str,
         "per-layer ops: auto (fused C++ on CPU float32, built at first use), native, or torch",
         engine="cpu_kernels"),
    Flag("host", "--host", str, "gRPC listen address"),
    Flag("port", "--port", int, "gRPC port (0 picks a free port)"),
    Flag("metrics_port", "--metrics-port", int, "Prometheus /metrics port (0 disables)"),
    Flag("store", "--store", str, "adapter store directory"),
    Flag("max_loras", "--max-loras", int, "distinct adapters in one batch (device slots)",
         engine="max_loras"),
    Flag("max_lora_rank", "--max-lora-rank", int, "largest adapter rank accepted", engine="max_lora_rank"),
    Flag("adapter_dtype", "--adapter-dtype", str, "adapter weights in the slots: float32 (PEFT-exact), bfloat16, float16, or compute (the base dtype)",
         engine="adapter_dtype"),
    Flag("api_keys", "--api-key", parse_key, "inference key, 'key' or 'tenant:key' (repeatable)",
         many=True, env="LORAPLEX_API_KEYS"),
    Flag("admin_keys", "--admin-key", parse_key, "admin key (adapter writes), 'key' or 'tenant:key' (repeatable)",
         many=True, env="LORAPLEX_ADMIN_KEYS"),
    Flag("tls_cert", "--tls-cert", str, "PEM certificate chain; enables TLS with --tls-key"),
    Flag("tls_key", "--tls-key", str, "PEM private key"),
    Flag("max_input_tokens", "--max-input-tokens", int, "longest prompt in tokens",
         engine="max_input_tokens"),
    Flag("max_total_tokens", "--max-total-tokens", int, "prompt + generated tokens per request",
         engine="max_model_len"),
    Flag("max_new_tokens", "--max-new-tokens", int, "cap on a request's max_new_tokens",
         engine="max_new_tokens"),
    Flag("max_stop_sequences", "--max-stop-sequences", int, "stop sequences per request",
         engine="max_stop_sequences"),
    Flag("max_message_bytes", "--max-message-bytes", parse_size, "largest gRPC message or HTTP body"),
    Flag("max_request_choices", "--max-request-choices", int,
         "completions one request may ask for (HTTP: prompts x n), checked before any work"),
    Flag("max_queued_requests", "--max-queued-requests", int, "waiting requests before RESOURCE_EXHAUSTED",
         engine="max_queued_requests"),
    Flag("max_num_seqs", "--max-num-seqs", int, "running requests per step", engine="max_num_seqs"),
    Flag("max_batch_tokens", "--max-batch-tokens", int, "tokens per step", engine="max_batch_tokens"),
    Flag("kv_cache_memory", "--kv-cache-memory", str,
         "KV cache size: auto (max-num-seqs x max-total-tokens + prefix share, within --kv-cache-max-memory), "
         "bytes ('2GiB') or a fraction of free memory ('0.3')", engine="kv_cache_memory"),
    Flag("kv_cache_max_memory", "--kv-cache-max-memory", str,
         "cap on an auto-sized KV cache: bytes ('4GiB') or a fraction of free memory", engine="kv_cache_max_memory"),
    Flag("prefix_cache_share", "--prefix-cache-share", float,
         "auto KV sizing: extra blocks for cached prompt prefixes, as a share of the running demand",
         engine="prefix_cache_share"),
    Flag("no_prefix_caching", "--no-prefix-caching", _bool,
         "turn off automatic prefix caching (reuse of cached KV blocks of shared prompt prefixes)",
         switch=True, engine="prefix_caching", to_engine=lambda off: not off),
    Flag("allowed_register_roots", "--allowed-register-root", str,
         "directory RegisterAdapter may read from (repeatable)", many=True),
    Flag("host_cache_bytes", "--host-cache-bytes", parse_size, "host-memory adapter cache budget"),
    # Shared adapter store (docs/adapter-store.md)
    Flag("store_registry", "--store-registry", str,
         "adapter registry: postgresql://user:pass@host:port/db (default: SQLite file under --store)"),
    Flag("store_blobs", "--store-blobs", str,
         "adapter blobs: s3://bucket/prefix (AWS_* env/profiles; default: directory under --store)"),
    Flag("blob_cache_bytes", "--blob-cache-bytes", parse_size, "local disk cache of remote adapter blobs"),
    Flag("adapter_sources", "--adapter-source", str,
         "s3://bucket/prefix RegisterAdapter may import adapters from (repeatable)", many=True),
    Flag("adapter_quota_bytes", "--adapter-quota-bytes", parse_size, "store-wide adapter disk quota"),
    Flag("max_adapter_bytes", "--max-adapter-bytes", parse_size, "largest single adapter"),
    Flag("grace_period_s", "--grace-period", float, "seconds in-flight requests get after SIGTERM"),
    Flag("metrics_adapter_labels", "--metrics-adapter-labels", int,
         "adapters with their own metrics label (top-N by traffic; the rest are 'other')"),
    Flag("seed", "--seed", int, "engine sampling seed", engine="seed"),
    Flag("tokenizer_nice", "--tokenizer-nice", int,
         "the tokenizer thread's nice value above the engine's: 10, or 0 (same priority) to 19", engine="tokenizer_nice"),
    Flag("log_level", "--log-level", str, "debug, info, warning, error"),
    # OpenAI-compatible HTTP API (server/http/)
    Flag("http_port", "--http-port", int, "OpenAI-compatible HTTP port on --host (0 turns it off)"),
    Flag("http_max_connections", "--http-max-connections", int,
         "open HTTP connections before new ones get 503 (0: half the file-descriptor limit, at most 4096)"),
    Flag("http_header_timeout_s", "--http-header-timeout", float, "seconds an HTTP request may take to send its headers"),
    Flag("http_body_timeout_s", "--http-body-timeout", float, "seconds an HTTP request may take to send its body"),
    Flag("served_model_name", "--served-model-name", str,
         "the base model's name in the HTTP API's `model` (default: the model directory's name, or 'default')"),
    # Hardening (issue 16): /metrics is unauthenticated; bind it where only scrapers reach it.
    Flag("metrics_host", "--metrics-host", str, "Prometheus /metrics listen address (default: --host)"),
    # structured output (docs/structured-output.md)
    Flag("constraint_timeout_s", "--constraint-timeout", float, "seconds a request waits for its grammar compile",
         engine="constraint_timeout_s"),
    Flag("constraint_mask_budget_ms", "--constraint-mask-budget", float,
         "milliseconds a constraint's token mask may cost per token; costlier grammars are refused",
         engine="constraint_mask_budget_ms"),
    Flag("constraint_cache_size", "--constraint-cache-size", int, "compiled grammars kept (LRU)",
         engine="constraint_cache_size"),
    Flag("max_constraint_bytes", "--max-constraint-bytes", parse_size, "largest schema / regex / grammar text",
         engine="max_constraint_bytes"),
    # chat and agent clients (docs/openai.md)
    Flag("tool_call_parser", "--tool-call-parser", _one_of("auto", "hermes", "llama3_json", "mistral"),
         "how the model writes tool calls: auto (from the chat template), hermes, llama3_json, mistral"),
    Flag("reasoning_parser", "--reasoning-parser", _one_of("", "think", "deepseek_r1"),
         "move <think>...</think> into reasoning_content: think, deepseek_r1 ('' = off)"),
    # issue 36: the engine core in its own process, stepped on that process's main thread
    Flag("engine_process", "--engine-process", _bool,
         "on (default): the engine core runs in its own process, stepped on its main thread (restarted if "
         "it dies); off: on a thread of this one"),
)


@dataclass(frozen=True)
class ServerConfig:
    """Validated settings of one `loraplex serve` process."""

    model: str = "default"
    revision: str = ""                           # "" = main (Hub ids only)
    quantize: str = QuantConfig.method
    dtype: str = EngineConfig.dtype
    device: str = EngineConfig.device
    linear_kernel: str = QuantConfig.linear_kernel
    cpu_kernels: str = EngineConfig.cpu_kernels
    host: str = "127.0.0.1"
    port: int = 50051
    metrics_port: int = 9090
    store: str = ""                              # "" = <cache root>/store
    max_loras: int = SchedulerConfig.max_loras
    max_lora_rank: int = LoraConfig.max_lora_rank
    adapter_dtype: str = LoraConfig.adapter_dtype
    api_keys: tuple[ApiKey, ...] = field(default=(), repr=False)
    admin_keys: tuple[ApiKey, ...] = field(default=(), repr=False)
    tls_cert: str | None = None
    tls_key: str | None = None
    max_input_tokens: int = RequestLimits.max_input_tokens
    max_total_tokens: int = SchedulerConfig.max_model_len
    max_new_tokens: int = RequestLimits.max_new_tokens
    max_stop_sequences: int = RequestLimits.max_stop_sequences
    max_message_bytes: int = 4 * MiB
    max_request_choices: int = 64
    max_queued_requests: int = SchedulerConfig.max_queued_requests
    max_num_seqs: int = SchedulerConfig.max_num_seqs
    max_batch_tokens: int = SchedulerConfig.max_batch_tokens
    kv_cache_memory: str = CacheConfig.kv_cache_memory
    kv_cache_max_memory: str = CacheConfig.kv_cache_max_memory
    prefix_cache_share: float = CacheConfig.prefix_cache_share
    no_prefix_caching: bool = not CacheConfig.prefix_caching
    allowed_register_roots: tuple[str, ...] = ()
    host_cache_bytes: int = 2**30
    store_registry: str = field(default="", repr=False)      # may hold a password
    store_blobs: str = ""
    blob_cache_bytes: int = 4 * 2**30
    adapter_sources: tuple[str, ...] = ()
    adapter_quota_bytes: int = 20 * 2**30
    max_adapter_bytes: int = 2**30
    grace_period_s: float = 30.0
    metrics_adapter_labels: int = 20
    metrics_host: str = ""               # empty: the gRPC --host
    seed: int = EngineConfig.seed
    tokenizer_nice: int = EngineConfig.tokenizer_nice
    log_level: str = "info"
    http_port: int = 8000
    served_model_name: str = ""                  # "" = the model directory's name, or "default"
    http_max_connections: int = 0                # 0 = half the file-descriptor limit (at most 4096)
    http_header_timeout_s: float = 10.0
    http_body_timeout_s: float = 60.0
    constraint_timeout_s: float = StructuredConfig.constraint_timeout_s      # structured output
    constraint_cache_size: int = StructuredConfig.constraint_cache_size
    constraint_mask_budget_ms: float = StructuredConfig.constraint_mask_budget_ms
    max_constraint_bytes: int = RequestLimits.max_constraint_bytes
    tool_call_parser: str = "auto"
    reasoning_parser: str = ""
    engine_process: bool = True                  # issue 36: the engine core in its own process (docs/server.md)

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_keys or self.admin_keys)

    @property
    def tls_enabled(self) -> bool:
        return bool(self.tls_cert and self.tls_key)

    @property
    def base_model_name(self) -> str:
        """The base model's id in the HTTP API (`--served-model-name`)."""
        if self.served_model_name:
            return self.served_model_name
        from .model.hub import is_hub_id

        if self.model == "default":
            return "default"
        return self.model if is_hub_id(self.model) else (Path(self.model).expanduser().name or "default")

    def store_path(self) -> Path:
        from .model.default_model import cache_root

        return Path(self.store).expanduser() if self.store else cache_root() / "store"

    def request_limits(self) -> RequestLimits:
        """What one request may ask for (the engine's RequestLimits from these settings)."""
        return self.engine_config(Path(".")).limits

    def engine_config(self, model_dir: Path) -> EngineConfig:
        """The EngineConfig for this server (raises InvalidConfig on engine-level problems)."""
        return EngineConfig.from_settings(model_dir, **{flag.engine: flag.engine_value(getattr(self, flag.name))
                                                        for flag in FLAGS if flag.engine})


# ---- sources -------------------------------------------------------------------------------
def read_config_file(path: str) -> dict[str, Any]:
    """A YAML or JSON mapping; keys may use the field name or the flag name (max-loras)."""
    text = Path(path).expanduser().read_text()
    if path.endswith(".json"):
        data = json.loads(text)
    else:
        import yaml

        data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise ValueError("the config file must hold a mapping of setting names to values")
    return {str(key).replace("-", "_"): value for key, value in data.items()}


def _file_names() -> dict[str, Flag]:
    names = {flag.name: flag for flag in FLAGS}
    names.update({flag.flag.removeprefix("--").replace("-", "_"): flag for flag in FLAGS})
    return names


def _convert(flag: Flag, raw: Any) -> Any:
    if flag.many:
        items = raw.split(",") if isinstance(raw, str) else list(raw)
        return tuple(flag.parse(item) for item in items if str(item).strip())
    if flag.parse is int and isinstance(raw, str):
        return int(raw.strip())
    return flag.parse(raw)


def _describe(flag: Flag, source: str) -> str:
    return {"flag": flag.flag, "env": flag.env_name, "file": f"config file key {flag.name!r}"}[source]


def load_server_config(cli_values: Mapping[str, Any], environ: Mapping[str, str]) -> ServerConfig:
    """Merge flag values (only those given), env vars and the config file; validate all of it."""
    problems: list[str] = []
    file_values: dict[str, Any] = {}
    config_path = cli_values.get("config") or environ.get("LORAPLEX_CONFIG")
    if config_path:
        try:
            file_values = read_config_file(config_path)
        except (OSError, ValueError) as error:
            problems.append(f"--config {config_path}: {error}")
    known = _file_names()
    for key in file_values:
        if key not in known:
            problems.append(f"config file: unknown setting {key!r}")
    values: dict[str, Any] = {}
    for flag in FLAGS:
        for source, raw in (("flag", cli_values.get(flag.name)), ("env", environ.get(flag.env_name)),
                            ("file", _from_file(file_values, known, flag))):
            if raw is None or (source == "flag" and flag.many and not raw):
                continue
            try:
                values[flag.name] = _convert(flag, raw)
            except (TypeError, ValueError) as error:
                problems.append(f"{_describe(flag, source)}: {error}")
            break
    if problems:
        raise ConfigError(problems)
    config = ServerConfig(**values)
    problems = list(validate(config, FLAGS))
    if problems:
        raise ConfigError(problems)
    return config


def _from_file(file_values: dict[str, Any], known: dict[str, Flag], flag: Flag) -> Any:
    for key, value in file_values.items():
        if known.get(key) is flag:
            return value
    return None


def add_arguments(parser) -> None:
    """Add every serve flag to an argparse parser; unset flags stay None (env/file/default apply)."""
    parser.add_argument("--config", default=None, help="YAML or JSON file of settings (env LORAPLEX_CONFIG)")
    for flag in FLAGS:
        if flag.switch:
            parser.add_argument(flag.flag, dest=flag.name, default=None, action="store_const", const=True,
                                help=f"{flag.help} (env {flag.env_name}=1)")
            continue
        parser.add_argument(flag.flag, dest=flag.name, default=None, metavar=flag.name.upper(),
                            action="append" if flag.many else "store",
                            help=f"{flag.help} (env {flag.env_name})")

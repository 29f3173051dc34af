"""Gateway settings, read from `AGENTLOOP_*` environment variables and CLI flags.

Invariant: a Settings object is built in the app factory / CLI, never at import
time, so tests and several apps in one process can each have their own.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def default_home() -> Path:
    return Path(os.environ.get("AGENTLOOP_HOME", Path.home() / ".cache" / "agentloop"))


def check_registry_url(url: str) -> None:
    """ValueError unless fsspec knows the URL's filesystem (and its package is installed)."""
    import fsspec

    protocol, _ = fsspec.core.split_protocol(url)
    try:
        fsspec.get_filesystem_class(protocol or "file")
    except (ValueError, ImportError) as e:
        raise ValueError(f"registry_url {url!r}: {e}") from None


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="AGENTLOOP_", extra="ignore")

    home: Path = Field(default_factory=default_home, description="Cache and data directory.")
    host: str = Field("127.0.0.1", description="Address the gateway binds to.")
    port: int = Field(8000, description="Port the gateway listens on.")
    model: str | None = Field(
        None, description="HF model folder or hub id to serve; None serves the embedded default model."
    )
    alias: str = Field("agentloop", description="Model name clients use; versions are '<alias>@vNNNN'.")
    template: str = Field("chatml-tools", description="Chat template name from templates/ (with its parsers).")
    engine_urls: list[str] = Field(
        default_factory=list,
        description="Already running vLLM servers to attach to; empty starts and supervises a local one.",
    )
    engine_port: int = Field(8100, description="Port of the supervised local vLLM server (loopback only).")
    engine_extra_args: list[str] = Field(default_factory=list, description="Extra vLLM CLI arguments.")
    engine_startup_timeout: float = Field(600.0, description="Seconds to wait for a vLLM server to be healthy.")
    engine_dtype: str = Field("auto", description=(
        "Weights and activations dtype of a supervised engine: auto, bfloat16 (bf16) or float32 (fp32). auto "
        "takes bf16 on a GPU and on CPUs with native bf16 (avx512_bf16 or amx_bf16) and fp32 elsewhere, where "
        "bf16 would be emulated (~3x slower under load); training decides by the same rule (rl/precision.py). "
        "/health says which was chosen and why."))
    kvcache_space_gib: float = Field(1.0, gt=0, description=(
        "KV cache of a supervised CPU engine, in GiB (fractions allowed; passed as vLLM's "
        "--kv-cache-memory-bytes, which VLLM_CPU_KVCACHE_SPACE would override, so the engine's "
        "environment drops that). A GPU engine sizes its cache by itself (--engine-arg "
        "--gpu-memory-utilization)."))
    max_model_len: int | None = Field(None, ge=16, description=(
        "Context length of a supervised engine; None takes the model's own (its config, as vLLM derives it). "
        "The gateway reads the context each engine really has from its /v1/models, so attached engines need "
        "nothing here. A context whose KV cache does not fit in kvcache_space_gib fails the start with "
        "vLLM's reason (in /health and the log)."))
    thinking_budget: int | None = Field(1024, ge=0, description=(
        "Tokens a thinking request may think when it names no budget (extra_body thinking_budget) and no "
        "reasoning_effort; then the engine writes the end of thinking and the answer follows. Capped at half "
        "of the request's max_tokens, so a default never leaves no room for the answer. None: unbounded."))
    thinking_effort_budgets: dict[str, int] = Field(
        default_factory=lambda: {"minimal": 64, "low": 256, "medium": 1024, "high": 4096},
        description="Thinking budget in tokens for each OpenAI reasoning_effort (capped as thinking_budget is).")
    thinking_close: bool = Field(True, description=(
        "Close a thinking block the model tries to end its turn in, so that the answer follows "
        "(serve/inside_vllm/think_end.py, a logits processor in the supervised engine). False leaves "
        "thinking as the model writes it: a small model then often answers inside its thinking, with no content."))
    base_on_weights: bool = Field(True, description=(
        "Serve the base version (v0000) on the engines' bare base weights, with no LoRA cost (an adapter, even "
        "the zero one, costs decode speed: docs/benchmarks.md, 'Engine speed'). False routes it through its "
        "zero adapter instead, as every "
        "version was before. Safe beside adapter requests in one batch: agentloop's CPU LoRA kernels (its vLLM "
        "plugin, which attached engines need anyway for the parsers) give no-adapter tokens exactly zero."))
    registry_url: str | None = Field(None, description=(
        "Where the deployment's adapter versions live, shared by its gateways and trainers: any fsspec URL "
        "(file:///dir or a folder, s3://bucket/prefix with s3fs installed, ...). Each gateway keeps its own "
        "copy under <home>/adapters, next to its engines: a version is published there before it is served "
        "and fetched from there (its hashes checked) by every gateway that lacks it. None: this gateway's "
        "home only (one gateway)."))
    graders: list[dict] | None = Field(None, description=(
        "The deployment's graders (rl/graders), in order: a JSON list of specs {\"type\", \"name\"?, options}, "
        "types tool_schema, reference_call, string_check (operation eq|ne|like|ilike, value?), regex "
        "(pattern, flags?, invert?), python (function 'module:function', timeout?) and judge (model?, "
        "base_url?, api_key_env?, prompt?, timeout?, max_tokens?; without base_url the deployment's engine "
        "and live version). None: tool_schema, reference_call and reference_text (string_check eq against a "
        "reference's text). POST /admin/grade tries them; reference feedback is graded by them."))
    graders_file: Path | None = Field(None, description=(
        "A JSON file with the deployment's graders instead of AGENTLOOP_GRADERS: the same list, or "
        "{\"graders\": [...]}. Read and checked when the gateway is configured."))
    served_poll_seconds: float = Field(0.1, gt=0, le=10, description=(
        "On SQLite, how often a gateway reads the served state (live version, canary) that any gateway on the "
        "database may change; PostgreSQL wakes it by LISTEN/NOTIFY instead. A change reaches every gateway "
        "within this plus the time to load the version."))
    served_heartbeat_seconds: float = Field(5.0, gt=0, description=(
        "How often a gateway renews its holds: the versions it routes to, which no other gateway unloads "
        "from a shared engine."))
    served_hold_ttl_seconds: float = Field(30.0, gt=0, description=(
        "A gateway not heard from for this long (it died) no longer keeps a version loaded for anyone."))
    max_lora_rank: int = Field(16, description="Largest LoRA rank the engine accepts.")
    max_loras: int = Field(4, description="LoRA adapters resident at once in the engine.")
    database_url: str | None = Field(
        None, description="SQLAlchemy URL of the store; None uses SQLite at <home>/agentloop.db. PostgreSQL: "
        "postgresql+psycopg://user:password@host:5432/dbname (docs/deploy.md)."
    )
    db_connect_timeout: int = Field(5, ge=1, description=(
        "Seconds to wait for a PostgreSQL connection before a request that needs the database is "
        "answered 503 with Retry-After (a connect_timeout in the URL wins)."))
    db_pool_size: int = Field(5, ge=1, description=(
        "PostgreSQL connections kept open by this gateway; as many again may open under load. "
        "Size the server's max_connections for every gateway and trainer: 2 x this each."))
    log_queue_size: int = Field(10000, description="Bound of the request-log write queue.")
    request_timeout: float = Field(600.0, description="Seconds before an engine request is abandoned.")
    health_interval: float = Field(2.0, description="Seconds between engine health checks.")
    admin_key: str | None = Field(None, description="Bearer key for /admin endpoints (AGENTLOOP_ADMIN_KEY).")
    # Access (serve/services/access.py). With at least one API key in the store every /v1
    # request needs one; with none, /v1 is open only on a loopback address or
    # when `open` is set, and the gateway refuses to start otherwise.
    open: bool = Field(False, description=(
        "Open mode on any address (AGENTLOOP_OPEN, `serve --open`): while no API key exists, /v1 takes any "
        "bearer or none. Meant for local use; on a loopback address it is the default anyway."))
    keys_refresh_seconds: float = Field(1.0, gt=0, le=60, description=(
        "How often the gateway re-reads the API keys: created and revoked keys take effect within this."))
    limit_rpm: int = Field(6000, ge=1, description=(
        "Default requests per minute per key (per caller in open mode) on /v1: a token bucket whose burst is "
        "the same number. `agentloop keys create --rpm` overrides it per key."))
    limit_streams: int = Field(64, ge=1, description=(
        "Default chat completions in flight at once per key (streamed or not; a stream counts until its end)."))
    limit_body_bytes: int = Field(8 * 1024 * 1024, ge=1024, description=(
        "Default largest /v1 request body per key, in bytes; larger gets 413 (checked from Content-Length "
        "and while reading)."))
    limit_max_tokens: int | None = Field(None, ge=1, description=(
        "Default ceiling on max_tokens / max_completion_tokens per key: a larger value is a 400; a request "
        "with neither is capped at the ceiling when it is below the context length. None: the context is "
        "the ceiling (the engine refuses a prompt plus max_tokens over it, in vLLM's words)."))
    loop_enabled: bool = Field(False, description="Run the learning loop's scheduler inside the gateway.")
    loop_check_seconds: float = Field(60.0, description="How often the scheduler looks for new feedback.")
    loop_min_new_feedback: int = Field(32, description="New feedback items that trigger a training run.")
    loop_period_seconds: float = Field(86400.0, description="Also train after this long if any feedback is new.")
    loop_method: str = Field("dpo", description="Training method of scheduled runs: dpo or kto.")
    loop_params: dict = Field(default_factory=dict, description="LoopConfig overrides (JSON), e.g. gate settings.")

    @field_validator("alias")
    @classmethod
    def _alias_ok(cls, v: str) -> str:
        if not v or "@" in v or "/" in v:
            raise ValueError("alias must be non-empty and contain neither '@' nor '/'")
        return v

    @field_validator("engine_dtype")
    @classmethod
    def _dtype_ok(cls, v: str) -> str:
        from agentloop.rl.precision import normalize

        return normalize(v)

    @field_validator("registry_url")
    @classmethod
    def _registry_ok(cls, v: str | None) -> str | None:
        if v is not None:
            check_registry_url(v)
        return v

    @field_validator("graders")
    @classmethod
    def _graders_ok(cls, v: list[dict] | None) -> list[dict] | None:
        from agentloop.rl.graders import build_graders

        build_graders(v)  # GraderConfigError (a ValueError): the setting is refused, saying which spec
        return v

    @model_validator(mode="after")
    def _graders_from_file(self) -> "Settings":
        if self.graders_file is None:
            return self
        from agentloop.rl.graders import build_graders

        if self.graders is not None:
            raise ValueError("set graders or graders_file, not both")
        try:
            data = json.loads(Path(self.graders_file).read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"graders_file {self.graders_file}: {e}") from None
        specs = data.get("graders") if isinstance(data, dict) else data
        build_graders(specs)  # refused saying which spec, as for AGENTLOOP_GRADERS
        self.graders = specs
        return self

    @field_validator("engine_urls")
    @classmethod
    def _urls_ok(cls, v: list[str]) -> list[str]:
        out = []
        for url in v:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"engine url must start with http:// or https://: {url!r}")
            out.append(url.rstrip("/"))
        return out

    def loop_defaults(self):
        from agentloop.rl.loop import LoopConfig

        return LoopConfig.from_params({"method": self.loop_method, "min_new_feedback": self.loop_min_new_feedback,
                                       "period_seconds": self.loop_period_seconds, **self.loop_params})

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home / 'agentloop.db'}"

    @property
    def adapters_dir(self) -> Path:
        return self.home / "adapters"

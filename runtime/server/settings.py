"""What the server needs beyond the engine's own configuration (``EngineConfig``)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ServerSettings:
    """Server-only settings: names, keys, admission limits, the drain."""

    served_model_name: str
    api_keys: list[str] = field(default_factory=list)
    max_queue_len: int = 1024
    rate_limit_rpm: int | None = None
    rate_limit_tpm: int | None = None
    max_body_bytes: int = 2 * 1024 * 1024
    drain_timeout: float = 30.0
    # tool_choice "auto": how tool calls are read from the output ("auto": the format the chat template writes);
    # None: tool_choice auto answers text only
    tool_call_parser: str | None = "auto"
    reasoning_parser: str | None = None  # qwen3 | deepseek_r1: <think> text goes to reasoning_content

    def __post_init__(self) -> None:
        from ..reasoning import REASONING_PARSERS
        from ..tool_parsers import TOOL_PARSER_NAMES

        if self.tool_call_parser is not None and self.tool_call_parser not in TOOL_PARSER_NAMES:
            raise ValueError(
                f"tool_call_parser must be one of {', '.join(TOOL_PARSER_NAMES)}, got {self.tool_call_parser!r}"
            )
        if self.reasoning_parser is not None and self.reasoning_parser not in REASONING_PARSERS:
            raise ValueError(
                f"reasoning_parser must be one of {', '.join(REASONING_PARSERS)}, got {self.reasoning_parser!r}"
            )
        if not self.served_model_name:
            raise ValueError("served_model_name must not be empty")
        if self.max_queue_len < 1:
            raise ValueError(f"max_queue_len must be at least 1, got {self.max_queue_len}")
        if self.max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes must be at least 1024, got {self.max_body_bytes}")
        if self.drain_timeout < 0:
            raise ValueError(f"drain_timeout must be non-negative, got {self.drain_timeout}")
        for name in ("rate_limit_rpm", "rate_limit_tpm"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be non-negative, got {value}")

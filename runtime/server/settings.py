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

    def __post_init__(self) -> None:
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

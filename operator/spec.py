"""The LLMDeployment spec (and status) as typed pydantic models: the one source of truth for the CRD schema.

`crd.py` turns these models into the CRD's structural OpenAPI schema, so the API server applies the same
defaults, ranges and enums, and runs the cross-field rules given here as CEL (`x-kubernetes-validations`).
Each CEL rule has a pydantic twin below (a `model_validator`) so that a spec is checked the same way in
tests and in code that never meets an API server.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, WithJsonSchema, model_validator
from pydantic.alias_generators import to_camel

from kubellm.operator import constants

# The model's source URI. One regex, used by pydantic and by the CEL rule in the CRD (RE2 and Rust regex
# agree on this syntax; no backslashes, so it can sit inside a CEL string literal). [!-~] is printable ASCII
# without the space.
SOURCE_PATTERN = (
    r"^(builtin:[a-z0-9][a-z0-9._-]*"
    r"|hf://[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*"
    r"|pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?/[!-~]+"
    r"|oci://[a-z0-9][-a-z0-9.:]*(/[a-z0-9][-a-z0-9._]*)+(:[A-Za-z0-9_][-A-Za-z0-9_.]*)?(@sha256:[a-f0-9]{64})?"
    r"|file:///[!-~]*)$"
)
SOURCE_HELP = (
    "builtin:NAME, hf://ORG/NAME, pvc://CLAIM/PATH, oci://REGISTRY/REPOSITORY[:TAG][@DIGEST] (an image holding the "
    "model's files, mounted as an image volume) or file:///PATH"
)
# A Kubernetes resource quantity (the pattern the apimachinery Quantity type publishes).
QUANTITY_PATTERN = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
PERCENT_PATTERN = r"^[0-9]+%$"
# RFC 1035 label: Service names, hence LLMDeployment names (the Service carries the LLMDeployment's name).
DNS1035_LABEL = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
MAX_NAME_LENGTH = 63
LABEL_KEY_PATTERN = r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
ENV_NAME_PATTERN = r"^[-._a-zA-Z][-._a-zA-Z0-9]*$"
# The model name clients send (an LLMDeployment's servedModelName, an LLMRoute's model).
SERVED_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._/:-]*$"
MAX_SERVED_NAME_LENGTH = 253


def _check_quantity(value: int | str) -> int | str:
    if isinstance(value, str) and not re.match(QUANTITY_PATTERN, value):
        raise ValueError(f"{value!r} is not a Kubernetes quantity (e.g. 500m, 2, 8Gi)")
    if isinstance(value, int) and value < 0:
        raise ValueError(f"{value} must not be negative")
    return value


def _check_int_or_percent(value: int | str) -> int | str:
    if isinstance(value, str) and not re.match(PERCENT_PATTERN, value):
        raise ValueError(f"{value!r} must be an integer or a percentage such as '25%'")
    if isinstance(value, int) and value < 0:
        raise ValueError(f"{value} must not be negative")
    return value


Quantity = Annotated[
    int | str,
    AfterValidator(_check_quantity),
    WithJsonSchema(
        {
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "pattern": QUANTITY_PATTERN,
            "x-kubernetes-int-or-string": True,
        }
    ),
]
IntOrPercent = Annotated[
    int | str,
    AfterValidator(_check_int_or_percent),
    WithJsonSchema(
        {
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "pattern": PERCENT_PATTERN,
            "x-kubernetes-int-or-string": True,
        }
    ),
]
# Free-form Kubernetes objects (tolerations, affinity, env valueFrom) are passed through as they are: the
# API server validates them again when the Deployment is applied.
FreeForm = Annotated[dict[str, Any], WithJsonSchema({"type": "object", "x-kubernetes-preserve-unknown-fields": True})]
LabelMap = Annotated[
    dict[Annotated[str, Field(max_length=317, pattern=LABEL_KEY_PATTERN)], Annotated[str, Field(max_length=63)]],
    Field(max_length=64),
]
AnnotationMap = Annotated[dict[str, str], Field(max_length=64)]


def cel_when(fields: tuple[str, ...], rule: str, message: str, field_path: str | None = None) -> dict[str, Any]:
    """A rule that applies once `fields` are present. The API server also checks rules against the `default: {}`
    of a parent, before nested defaults fill it in, so a rule must not assume defaulted fields are there."""
    guard = " || ".join(f"!has(self.{f})" for f in fields)
    return cel(f"{guard} || ({rule})", message, field_path)


def cel(rule: str, message: str, field_path: str | None = None) -> dict[str, Any]:
    """One CEL validation rule for `x-kubernetes-validations`; field_path names the offending field."""
    out: dict[str, Any] = {"rule": rule, "message": message}
    if field_path:
        out["fieldPath"] = field_path
    return out


class _Spec(BaseModel):
    """Base: camelCase on the wire (as Kubernetes objects are), snake_case in Python, unknown fields refused."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)


class HFTokenSecretRef(_Spec):
    """A Secret key holding a Hugging Face token (for gated or private models)."""

    name: str = Field(min_length=1, max_length=253, description="Secret name, in the LLMDeployment's namespace.")
    key: str = Field(default="token", min_length=1, max_length=253, description="Key in the Secret.")


class ApiKeySecretRef(_Spec):
    """A Secret key holding the API key clients must send as `Authorization: Bearer <key>`."""

    name: str = Field(min_length=1, max_length=253, description="Secret name, in the LLMDeployment's namespace.")
    key: str = Field(default="api-key", min_length=1, max_length=253, description="Key in the Secret.")


class ModelSpec(_Spec):
    """Which model to serve, and how to read it."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "!has(self.revision) || self.source.startsWith('hf://')",
                    "revision is only meaningful for hf:// sources",
                    ".revision",
                ),
                cel(
                    "!has(self.tokenSecretRef) || self.source.startsWith('hf://')",
                    "tokenSecretRef is only meaningful for hf:// sources",
                    ".tokenSecretRef",
                ),
            ]
        }
    )

    source: str = Field(
        min_length=1,
        max_length=1024,
        description=f"Model source URI: {SOURCE_HELP}.",
        json_schema_extra={
            "x-kubernetes-validations": [cel(f"self.matches('{SOURCE_PATTERN}')", f"source must be {SOURCE_HELP}")]
        },
    )
    revision: str | None = Field(
        default=None, min_length=1, max_length=255, description="hf:// only: branch, tag or commit."
    )
    token_secret_ref: HFTokenSecretRef | None = Field(default=None, description="hf:// only: a token Secret.")
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = Field(
        default="auto", description="Weight and activation dtype."
    )
    max_model_len: int | None = Field(
        default=None, ge=16, le=10_000_000, description="Context length cap (default: the model's own)."
    )
    chat_template: str | None = Field(
        default=None, min_length=1, max_length=262_144, description="A Jinja chat template overriding the model's."
    )
    served_model_name: str | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_SERVED_NAME_LENGTH,
        pattern=SERVED_NAME_PATTERN,
        description="The model name clients use (default: the LLMDeployment's name).",
    )

    @model_validator(mode="after")
    def _check(self) -> ModelSpec:
        if not re.match(SOURCE_PATTERN, self.source):
            raise ValueError(f"source must be {SOURCE_HELP}, got {self.source!r}")
        if self.revision is not None and not self.source.startswith("hf://"):
            raise ValueError("revision is only meaningful for hf:// sources")
        if self.token_secret_ref is not None and not self.source.startswith("hf://"):
            raise ValueError("tokenSecretRef is only meaningful for hf:// sources")
        return self


class EngineSpec(_Spec):
    """Engine knobs, passed to `kubellm serve` as flags (names as vLLM names them)."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel_when(
                    ("maxNumBatchedTokens", "maxNumSeqs"),
                    "self.maxNumBatchedTokens >= self.maxNumSeqs",
                    "maxNumBatchedTokens must be >= maxNumSeqs (each running sequence needs a token per step)",
                    ".maxNumBatchedTokens",
                )
            ]
        }
    )

    max_num_seqs: int = Field(default=256, ge=1, le=4096, description="Most sequences in one batch.")
    max_num_batched_tokens: int = Field(default=2048, ge=1, le=1_048_576, description="Token budget of one step.")
    block_size: Literal[8, 16, 32, 64, 128] = Field(default=16, description="Tokens per KV-cache block.")
    gpu_memory_utilization: float = Field(
        default=0.9, gt=0.0, le=1.0, description="Fraction of GPU memory the engine may use (0, 1]."
    )
    enable_prefix_caching: bool = Field(default=True, description="Reuse KV blocks of shared prompt prefixes.")
    enforce_eager: bool = Field(default=False, description="Disable CUDA graphs.")
    extra_args: list[Annotated[str, Field(max_length=1024)]] = Field(
        default_factory=list, max_length=64, description="Extra `kubellm serve` arguments, appended as they are."
    )

    @model_validator(mode="after")
    def _check(self) -> EngineSpec:
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"maxNumBatchedTokens ({self.max_num_batched_tokens}) must be >= maxNumSeqs ({self.max_num_seqs})"
            )
        return self


class ResourcesSpec(_Spec):
    """What one replica asks for, and where it may run."""

    gpus: int = Field(default=1, ge=0, le=16, description="GPUs per replica.")
    gpu_resource_name: str = Field(
        default=constants.DEFAULT_GPU_RESOURCE,
        min_length=1,
        max_length=253,
        pattern=LABEL_KEY_PATTERN,
        description="Extended resource name of the GPU.",
    )
    cpu: Quantity | None = Field(default=None, description="CPU request (and limit).")
    memory: Quantity | None = Field(default=None, description="Memory request (and limit).")
    node_selector: LabelMap = Field(default_factory=dict, description="Node labels the pods must match.")
    tolerations: list[FreeForm] = Field(default_factory=list, max_length=32, description="Pod tolerations.")
    affinity: FreeForm | None = Field(default=None, description="Pod affinity (a core/v1 Affinity).")
    priority_class_name: str | None = Field(default=None, min_length=1, max_length=253)


class ImageSpec(_Spec):
    """The runtime image."""

    name: str | None = Field(
        default=None, min_length=1, max_length=1024, description="Runtime image (default: the operator's setting)."
    )
    pull_policy: Literal["Always", "IfNotPresent", "Never"] = Field(default="IfNotPresent")
    pull_secrets: list[Annotated[str, Field(min_length=1, max_length=253)]] = Field(
        default_factory=list, max_length=16, description="Names of image pull Secrets."
    )


class AutoscalingSpec(_Spec):
    """Scale on the runtime's queue depth and KV-cache utilization (builtin), or leave replicas to HPA/KEDA."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel_when(
                    ("minReplicas", "maxReplicas"),
                    "self.minReplicas <= self.maxReplicas",
                    "minReplicas must be <= maxReplicas",
                    ".minReplicas",
                ),
                cel_when(
                    ("minReplicas",),
                    "self.minReplicas > 0 || has(self.scaleToZeroAfterSeconds)",
                    "minReplicas 0 needs scaleToZeroAfterSeconds (how long idle before scaling to zero)",
                    ".scaleToZeroAfterSeconds",
                ),
            ]
        }
    )

    enabled: bool = Field(default=False)
    mode: Literal["builtin", "external"] = Field(
        default="builtin", description="builtin: this operator scales; external: HPA/KEDA own spec.replicas."
    )
    min_replicas: int = Field(
        default=1, ge=0, le=1000, description="0 allows scaling to zero once idle for scaleToZeroAfterSeconds."
    )
    max_replicas: int = Field(default=4, ge=1, le=1000)
    target_queue_depth: float = Field(default=4.0, gt=0.0, le=100_000.0, description="Waiting requests per replica.")
    target_kv_cache_utilization: float = Field(
        default=0.8, gt=0.0, le=1.0, alias="targetKVCacheUtilization", description="KV-cache usage per replica (0, 1]."
    )
    evaluation_period_seconds: int = Field(default=15, ge=1, le=3600)
    tolerance: float = Field(default=0.1, ge=0.0, lt=1.0, description="No change while |ratio - 1| <= tolerance.")
    scale_up_stabilization_seconds: int = Field(default=0, ge=0, le=3600)
    scale_down_stabilization_seconds: int = Field(default=300, ge=0, le=3600)
    max_scale_up_step: int = Field(default=4, ge=1, le=1000, description="Most replicas added per evaluation.")
    max_scale_down_step: int = Field(default=1, ge=1, le=1000, description="Most replicas removed per evaluation.")
    scale_to_zero_after_seconds: int | None = Field(
        default=None,
        ge=1,
        le=86_400,
        description=(
            "With minReplicas 0: scale to 0 after this long without a waiting or running request. From 0, the "
            f"annotation {constants.ANNOTATION_WAKE} (any value) or the scale subresource brings back 1 replica."
        ),
    )

    @model_validator(mode="after")
    def _check(self) -> AutoscalingSpec:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"minReplicas ({self.min_replicas}) must be <= maxReplicas ({self.max_replicas})")
        if self.min_replicas == 0 and self.scale_to_zero_after_seconds is None:
            raise ValueError("minReplicas 0 needs scaleToZeroAfterSeconds (how long idle before scaling to zero)")
        return self


class ServiceSpec(_Spec):
    type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = Field(default="ClusterIP")
    port: int = Field(default=8000, ge=1, le=65535)
    annotations: AnnotationMap = Field(default_factory=dict)


class AuthSpec(_Spec):
    api_key_secret_ref: ApiKeySecretRef


class EmptyDirCache(_Spec):
    size_limit: Quantity | None = Field(default=None)


class PVCCache(_Spec):
    claim_name: str = Field(min_length=1, max_length=253)


AccessMode = Literal["ReadWriteMany", "ReadWriteOnce", "ReadWriteOncePod", "ReadOnlyMany"]


def _read_write_many() -> list[AccessMode]:
    return ["ReadWriteMany"]


class ModelCacheSpec(_Spec):
    """A PersistentVolumeClaim the operator creates for this LLMDeployment and fills once with a loader Job
    (`kubellm download`): every replica mounts it read-only and downloads nothing."""

    size: Quantity = Field(description="The claim's storage request: the model's files, with room to spare.")
    storage_class_name: str | None = Field(
        default=None, min_length=1, max_length=253, description="The claim's StorageClass (default: the cluster's)."
    )
    access_modes: list[AccessMode] = Field(
        default_factory=_read_write_many,
        min_length=1,
        max_length=4,
        description="ReadWriteMany (the default) lets replicas on any node mount it; ReadWriteOnce keeps them on "
        "the node the loader ran on.",
    )


class StorageSpec(_Spec):
    """The model cache volume: an emptyDir per pod (the default), a PersistentVolumeClaim of the user's, or a
    model cache the operator creates and fills once (modelCache)."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "[has(self.emptyDir), has(self.persistentVolumeClaim), has(self.modelCache)]"
                    ".filter(x, x).size() <= 1",
                    "set at most one of emptyDir, persistentVolumeClaim and modelCache",
                    ".persistentVolumeClaim",
                )
            ]
        }
    )

    empty_dir: EmptyDirCache | None = Field(default=None)
    persistent_volume_claim: PVCCache | None = Field(default=None)
    model_cache: ModelCacheSpec | None = Field(default=None)

    @model_validator(mode="after")
    def _check(self) -> StorageSpec:
        chosen = [x for x in (self.empty_dir, self.persistent_volume_claim, self.model_cache) if x is not None]
        if len(chosen) > 1:
            raise ValueError("set at most one of emptyDir, persistentVolumeClaim and modelCache")
        return self


class EnvVar(_Spec):
    name: str = Field(min_length=1, max_length=253, pattern=ENV_NAME_PATTERN)
    value: str | None = Field(default=None)
    value_from: FreeForm | None = Field(default=None)


_RESERVED_LABELS_CEL = "[" + ", ".join(f"'{k}'" for k in constants.RESERVED_LABELS) + "]"


class PodOverrides(_Spec):
    """Extra labels, annotations and environment for the runtime pods."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel_when(
                    ("labels",),
                    f"{_RESERVED_LABELS_CEL}.all(k, !(k in self.labels))",
                    "labels must not set the app.kubernetes.io labels the operator selects pods by",
                    ".labels",
                )
            ]
        }
    )

    labels: LabelMap = Field(default_factory=dict)
    annotations: AnnotationMap = Field(default_factory=dict)
    env: list[EnvVar] = Field(default_factory=list, max_length=128)
    security_context: FreeForm = Field(
        default_factory=dict,
        description=(
            "A core/v1 PodSecurityContext merged over the operator's (runAsNonRoot, RuntimeDefault seccomp; no "
            "fixed UID), e.g. runAsUser or fsGroup where the cluster does not assign them."
        ),
    )

    @model_validator(mode="after")
    def _check(self) -> PodOverrides:
        reserved = sorted(set(self.labels) & set(constants.RESERVED_LABELS))
        if reserved:
            raise ValueError(f"labels must not set the labels the operator selects pods by: {reserved}")
        return self


class RolloutSpec(_Spec):
    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel_when(
                    ("maxSurge", "maxUnavailable"),
                    "!(self.maxSurge == 0 && self.maxUnavailable == 0)",
                    "maxSurge and maxUnavailable must not both be 0",
                    ".maxSurge",
                )
            ]
        }
    )

    max_surge: IntOrPercent = Field(default=1, description="Extra pods during a rollout (GPUs permitting).")
    max_unavailable: IntOrPercent = Field(default=0, description="Pods that may be missing during a rollout.")

    @model_validator(mode="after")
    def _check(self) -> RolloutSpec:
        if self.max_surge == 0 and self.max_unavailable == 0:
            raise ValueError("maxSurge and maxUnavailable must not both be 0")
        return self


class ResponseCacheSpec(_Spec):
    """The gateway's answer cache for this model (exact matches of deterministic requests only)."""

    enabled: bool = Field(
        default=False,
        description=(
            "Answer a request again from the gateway's cache when the same one came before: only requests with "
            "temperature 0 or a fixed seed, only complete answers; streams are replayed event by event."
        ),
    )
    ttl_seconds: int = Field(
        default=300, ge=1, le=86400, alias="ttlSeconds", description="How long a cached answer is served."
    )


class RoutingSpec(_Spec):
    """How the kubellm gateway picks a replica for a request (read by the gateway; the operator ignores it)."""

    strategy: Literal["PrefixHash", "LeastLoad"] = Field(
        default="PrefixHash",
        description=(
            "PrefixHash: consistent hashing with bounded loads over the request's prefix (the replica that has it "
            "cached, unless over its load bound); LeastLoad: the replica with the fewest in-flight and waiting "
            "requests."
        ),
    )
    response_cache: ResponseCacheSpec = Field(default_factory=ResponseCacheSpec, alias="responseCache")


class ParallelismSpec(_Spec):
    """How one replica splits the model: tensor-parallel ranks per stage, pipeline stages, and the nodes they span
    (one rank per GPU). Without this section a replica of N GPUs runs tensor parallelism over its N GPUs."""

    tensor: int = Field(default=1, ge=1, le=64, description="Tensor-parallel ranks (each layer split this many ways).")
    pipeline: int = Field(default=1, ge=1, le=64, description="Pipeline stages (contiguous layer ranges).")
    nodes: int = Field(
        default=1,
        ge=1,
        le=64,
        description="Nodes (pods) one replica spans. Above 1 a replica is a group of pods, a StatefulSet with a "
        "headless Service per group: pod k runs the ranks [k*L, (k+1)*L) of the tensor x pipeline ranks, pod 0 is "
        "the rendezvous and alone serves the API; replicas count groups, and a group that loses a pod restarts "
        "whole.",
    )


# (tensor, pipeline, nodes, gpus) as CEL expressions on the spec, for the cross-section rules
_P, _GPUS = "self.parallelism", "self.resources.gpus"
_PARALLELISM_FIELDS = ("parallelism", "parallelism.tensor", "parallelism.pipeline", "parallelism.nodes", "resources",
                       "resources.gpus")  # fmt: skip
# A group's StatefulSet `{name}-g{i}` (i < 1000) gets pods labelled `controller-revision-hash: {sts}-{10 chars}`,
# a label value of at most 63 characters.
MAX_GROUPED_NAME_LENGTH = MAX_NAME_LENGTH - len("-g999") - len("-0123456789")


class LLMDeploymentSpec(_Spec):
    """spec of an LLMDeployment. Only `model.source` is required."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel_when(
                    _PARALLELISM_FIELDS,
                    f"{_GPUS} == 0 || {_P}.tensor * {_P}.pipeline == {_GPUS} * {_P}.nodes",
                    "parallelism.tensor x parallelism.pipeline must equal resources.gpus x parallelism.nodes "
                    "(one rank per GPU)",
                    ".parallelism",
                ),
                cel_when(
                    ("storage", "storage.modelCache"),
                    "self.model.source.startsWith('hf://')",
                    "storage.modelCache is filled from an hf:// model.source (other sources are on a volume already)",
                    ".storage.modelCache",
                ),
                cel_when(
                    ("parallelism", "parallelism.tensor", "parallelism.pipeline", "parallelism.nodes"),
                    f"({_P}.tensor * {_P}.pipeline) % {_P}.nodes == 0",
                    "parallelism.nodes must divide parallelism.tensor x parallelism.pipeline (each node holds "
                    "as many ranks)",
                    ".parallelism.nodes",
                ),
                cel_when(
                    _PARALLELISM_FIELDS,
                    f"{_GPUS} >= 1 || {_P}.tensor == 1",
                    "parallelism.tensor > 1 needs resources.gpus >= 1",
                    ".parallelism.tensor",
                ),
            ]
        }
    )

    model: ModelSpec
    replicas: int = Field(default=1, ge=0, le=1000, description="Replicas (the scale subresource's target).")
    engine: EngineSpec = Field(default_factory=EngineSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    image: ImageSpec = Field(default_factory=ImageSpec)
    autoscaling: AutoscalingSpec = Field(default_factory=AutoscalingSpec)
    service: ServiceSpec = Field(default_factory=ServiceSpec)
    auth: AuthSpec | None = Field(default=None)
    storage: StorageSpec = Field(default_factory=StorageSpec)
    pod: PodOverrides = Field(default_factory=PodOverrides)
    rollout: RolloutSpec = Field(default_factory=RolloutSpec)
    routing: RoutingSpec = Field(default_factory=RoutingSpec)
    parallelism: ParallelismSpec | None = Field(default=None)

    @model_validator(mode="after")
    def _check(self) -> LLMDeploymentSpec:
        if self.storage.model_cache is not None and not self.model.source.startswith("hf://"):
            raise ValueError(f"storage.modelCache is filled from an hf:// model.source, not {self.model.source!r}")
        par, gpus = self.parallelism, self.resources.gpus
        if par is None:
            return self
        if gpus >= 1 and par.tensor * par.pipeline != gpus * par.nodes:
            raise ValueError(
                f"parallelism.tensor x parallelism.pipeline ({par.tensor} x {par.pipeline}) must equal "
                f"resources.gpus x parallelism.nodes ({gpus} x {par.nodes}): one rank per GPU"
            )
        if gpus == 0 and par.tensor > 1:
            raise ValueError(f"parallelism.tensor {par.tensor} needs resources.gpus >= 1")
        if (par.tensor * par.pipeline) % par.nodes:
            raise ValueError(
                f"parallelism.nodes ({par.nodes}) must divide parallelism.tensor x parallelism.pipeline "
                f"({par.tensor} x {par.pipeline}): each node holds as many ranks"
            )
        return self

    def tensor_parallel_size(self) -> int:
        """The replica's tensor-parallel ranks: the parallelism section's, else one per GPU."""
        return self.parallelism.tensor if self.parallelism is not None else max(1, self.resources.gpus)

    def pipeline_parallel_size(self) -> int:
        return self.parallelism.pipeline if self.parallelism is not None else 1

    def nodes(self) -> int:
        """Pods (nodes) one replica spans: above 1, a replica is a group of pods (groups.py)."""
        return self.parallelism.nodes if self.parallelism is not None else 1


# ---- status (written only by the operator; modelled so that the CRD's status schema is structural too) ----


class Condition(_Spec):
    type: str = Field(max_length=64)
    status: Literal["True", "False", "Unknown"]
    reason: str = Field(max_length=128)
    message: str = Field(default="", max_length=4096)
    last_transition_time: str | None = Field(default=None, json_schema_extra={"format": "date-time"})
    observed_generation: int | None = Field(default=None, ge=0)


class MetricsSnapshot(_Spec):
    """The last aggregate of the Ready pods' /metrics."""

    time: str = Field(json_schema_extra={"format": "date-time"})
    queue_depth: float = Field(description="Waiting requests, summed over the scraped pods.")
    running_requests: float = Field(description="Running requests, summed over the scraped pods.")
    kv_cache_utilization: float = Field(alias="kvCacheUtilization", description="Mean KV-cache usage (0..1).")
    kv_cache_percent: int = Field(alias="kvCachePercent", description="The same, in percent (for printing).")
    pods_scraped: int
    pods_failed: int


class ScalingDecisionRecord(_Spec):
    time: str = Field(json_schema_extra={"format": "date-time"})
    from_replicas: int
    to_replicas: int
    reason: str = Field(max_length=1024)


class RecommendationSegment(_Spec):
    """The autoscaler recommended `replicas` from `since` until the next segment (the last one: until now)."""

    since: str = Field(json_schema_extra={"format": "date-time"})
    replicas: int = Field(ge=0)


class ModelStatus(_Spec):
    """The model cache (storage.modelCache): the loader Job's progress, from its pod's last progress line."""

    phase: Literal["Pending", "Downloading", "Ready", "Failed"]
    message: str = Field(default="", max_length=4096)
    source: str | None = None
    bytes_done: int | None = Field(default=None, ge=0)
    bytes_total: int | None = Field(default=None, ge=0)
    files_done: int | None = Field(default=None, ge=0)
    files_total: int | None = Field(default=None, ge=0)


class LLMDeploymentStatus(_Spec):
    observed_generation: int | None = None
    conditions: list[Condition] = Field(
        default_factory=list,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    replicas: int | None = Field(default=None, description="Pods that exist (the scale subresource reads it).")
    ready_replicas: int | None = None
    updated_replicas: int | None = None
    desired_replicas: int | None = None
    pending_replicas: int | None = Field(default=None, description="Pods Pending, unschedulable.")
    ready: str | None = Field(default=None, description="readyReplicas/desiredReplicas, for printing.")
    selector: str | None = Field(default=None, description="Label selector of the pods (for the scale subresource).")
    endpoint: str | None = Field(default=None, description="The in-cluster URL of the Service.")
    metrics: MetricsSnapshot | None = None
    model: ModelStatus | None = Field(default=None, description="The model cache's download (storage.modelCache).")
    last_scale_time: str | None = Field(default=None, json_schema_extra={"format": "date-time"})
    scaling_decisions: list[ScalingDecisionRecord] = Field(default_factory=list, max_length=10)
    recommendations: list[RecommendationSegment] = Field(
        default_factory=list,
        max_length=32,
        description="The autoscaler's recent recommendations (its stabilization windows survive a restart).",
    )


def parse_spec(spec: dict[str, Any]) -> LLMDeploymentSpec:
    """Validate a spec dict (as stored by the API server, or as a user wrote it) into the typed model."""
    return LLMDeploymentSpec.model_validate(spec)


def check_name(name: str, spec: LLMDeploymentSpec | None = None) -> None:
    """The LLMDeployment name becomes a Service name: an RFC 1035 label (the CRD checks it too); shorter when the
    replicas are groups of pods (their StatefulSets' names add a suffix)."""
    if len(name) > MAX_NAME_LENGTH or not re.match(DNS1035_LABEL, name):
        raise ValueError(f"metadata.name {name!r} must be an RFC 1035 label of at most {MAX_NAME_LENGTH} characters")
    if spec is not None and spec.nodes() > 1 and len(name) > MAX_GROUPED_NAME_LENGTH:
        raise ValueError(
            f"metadata.name {name!r} must be at most {MAX_GROUPED_NAME_LENGTH} characters when parallelism.nodes > 1"
        )

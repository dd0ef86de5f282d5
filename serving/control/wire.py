"""The Databricks Model Serving request shapes, as strict pydantic v2 models.

Field names, nesting and enum values are Databricks' (``../shared/api-reference.md``), so the
MLflow deployments client and plain JSON from their docs work unchanged. Every model forbids
unknown fields; :func:`parse` turns a validation failure into one
``INVALID_PARAMETER_VALUE`` that names the field path and the offending value.

What is checked here is what can be checked without looking anything up (shapes, enums, the
documented rules between fields). Checks that need the registry (secret references exist, a
local model exists, provisioned throughput against the model's chunk size) live in
``serving.control.service``.
"""

from __future__ import annotations

import re
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from engine.types import LLM_TASKS
from serving.errors import InvalidParameterValue, MalformedRequest

NAME_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,63}$")
SECRET_REFERENCE = re.compile(r"^\{\{secrets/([A-Za-z0-9_.-]+)/([A-Za-z0-9_.-]+)\}\}$")

# Providers this server can call, and the tasks each serves. Databricks knows more providers
# (cohere, google-cloud-vertex-ai, amazon-bedrock, ai21labs, databricks-model-serving); they need
# services this project cannot reach, so they are refused with this list.
PROVIDER_TASKS: dict[str, tuple[str, ...]] = {
    "openai": ("llm/v1/chat", "llm/v1/completions", "llm/v1/embeddings"),
    "anthropic": ("llm/v1/chat",),
    "custom": ("llm/v1/chat", "llm/v1/completions", "llm/v1/embeddings"),
}
PROVIDER_CONFIG_FIELD = {"openai": "openai_config", "anthropic": "anthropic_config", "custom": "custom_provider_config"}
WORKLOAD_SIZES = ("Small", "Medium", "Large")
MAX_SERVED_ENTITIES = 10


# No text field of the management API needs more; a longer one is refused by name instead of being
# stored and then sent back in every list (a 5 MB tag value once made every list 5 MB).
MAX_TEXT = 4096


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", str_max_length=MAX_TEXT)


def _secret_reference(value: str | None, field: str) -> str | None:
    if value is not None and not SECRET_REFERENCE.match(value):
        raise ValueError(
            f"{field} must be a secret reference like '{{{{secrets/<scope>/<key>}}}}' (put the value with "
            f"the secrets API first, or use {field}_plaintext)"
        )
    return value


def _one_of(values: dict[str, Any], first: str, second: str, required: bool = True) -> None:
    given = [name for name in (first, second) if values.get(name) is not None]
    if len(given) > 1:
        raise ValueError(f"give only one of {first} and {second}")
    if required and not given:
        raise ValueError(f"one of {first} or {second} is required")


class OpenAIConfig(Strict):
    openai_api_key: str | None = None
    openai_api_key_plaintext: SecretStr | None = None
    openai_api_base: str | None = None
    openai_api_type: Literal["openai", "azure", "azuread"] | None = None
    openai_api_version: str | None = None
    openai_deployment_name: str | None = None
    openai_organization: str | None = None
    microsoft_entra_client_id: str | None = None
    microsoft_entra_client_secret: str | None = None
    microsoft_entra_client_secret_plaintext: SecretStr | None = None
    microsoft_entra_tenant_id: str | None = None

    _check_key = field_validator("openai_api_key")(lambda cls, v: _secret_reference(v, "openai_api_key"))
    _check_entra = field_validator("microsoft_entra_client_secret")(
        lambda cls, v: _secret_reference(v, "microsoft_entra_client_secret")
    )

    @model_validator(mode="after")
    def _rules(self) -> "OpenAIConfig":
        values = self.__dict__
        if self.openai_api_type == "azuread":
            _one_of(values, "microsoft_entra_client_secret", "microsoft_entra_client_secret_plaintext")
            for name in ("microsoft_entra_client_id", "microsoft_entra_tenant_id"):
                if not values.get(name):
                    raise ValueError(f"{name} is required when openai_api_type is 'azuread'")
        else:
            _one_of(values, "openai_api_key", "openai_api_key_plaintext")
        if self.openai_api_type in ("azure", "azuread"):
            for name in ("openai_api_base", "openai_api_version", "openai_deployment_name"):
                if not values.get(name):
                    raise ValueError(f"{name} is required when openai_api_type is {self.openai_api_type!r}")
        return self


class AnthropicConfig(Strict):
    anthropic_api_key: str | None = None
    anthropic_api_key_plaintext: SecretStr | None = None

    _check_key = field_validator("anthropic_api_key")(lambda cls, v: _secret_reference(v, "anthropic_api_key"))

    @model_validator(mode="after")
    def _rules(self) -> "AnthropicConfig":
        _one_of(self.__dict__, "anthropic_api_key", "anthropic_api_key_plaintext")
        return self


class BearerTokenAuth(Strict):
    token: str | None = None
    token_plaintext: SecretStr | None = None

    _check_token = field_validator("token")(lambda cls, v: _secret_reference(v, "token"))

    @model_validator(mode="after")
    def _rules(self) -> "BearerTokenAuth":
        _one_of(self.__dict__, "token", "token_plaintext")
        return self


class CustomProviderConfig(Strict):
    custom_provider_url: str
    bearer_token_auth: BearerTokenAuth | None = None

    @field_validator("custom_provider_url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"custom_provider_url must start with http:// or https://, got {value!r}")
        return value


class ExternalModel(Strict):
    name: str = Field(min_length=1)
    provider: str
    task: str
    openai_config: OpenAIConfig | None = None
    anthropic_config: AnthropicConfig | None = None
    custom_provider_config: CustomProviderConfig | None = None
    # Databricks' other providers' configs: declared so that their users hear "provider not
    # supported" (the real problem) rather than "unknown field".
    cohere_config: dict[str, Any] | None = None
    google_cloud_vertex_ai_config: dict[str, Any] | None = None
    amazon_bedrock_config: dict[str, Any] | None = None
    ai21labs_config: dict[str, Any] | None = None
    databricks_model_serving_config: dict[str, Any] | None = None
    palm_config: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _rules(self) -> "ExternalModel":
        if self.provider not in PROVIDER_TASKS:
            raise ValueError(
                f"provider {self.provider!r} is not supported; valid providers: {', '.join(PROVIDER_TASKS)}"
            )
        if self.task not in LLM_TASKS:
            raise ValueError(f"task {self.task!r} is not one of {', '.join(LLM_TASKS)}")
        if self.task not in PROVIDER_TASKS[self.provider]:
            raise ValueError(
                f"provider {self.provider!r} does not serve task {self.task!r}; it serves "
                f"{', '.join(PROVIDER_TASKS[self.provider])}"
            )
        wanted = PROVIDER_CONFIG_FIELD[self.provider]
        for field in [name for name in type(self).model_fields if name.endswith("_config")]:
            given = getattr(self, field) is not None
            if field == wanted and not given:
                raise ValueError(f"{wanted} is required for provider {self.provider!r}")
            if field != wanted and given:
                raise ValueError(f"{field} does not belong to provider {self.provider!r}; use {wanted}")
        return self


WORKLOAD_TYPES = ("CPU", "CPU_MEDIUM", "CPU_LARGE", "GPU_SMALL", "GPU_MEDIUM", "GPU_LARGE", "GPU_XLARGE", "GPU_XLARGE_8",
                  "MULTIGPU_MEDIUM")


class ServedEntity(Strict):
    name: str | None = None
    external_model: ExternalModel | None = None
    entity_name: str | None = None
    entity_version: str | None = None
    workload_size: str | None = None
    workload_type: Literal[WORKLOAD_TYPES] | None = None  # type: ignore[valid-type]
    scale_to_zero_enabled: bool = False
    min_provisioned_throughput: int | None = Field(default=None, ge=0, le=10**9)
    max_provisioned_throughput: int | None = Field(default=None, ge=0, le=10**9)
    provisioned_model_units: int | None = Field(default=None, ge=0, le=10**6)
    burst_scaling_enabled: bool | None = None
    # Declared so that they are refused by name (NOT_IMPLEMENTED), never ignored: see validation.
    min_provisioned_concurrency: int | None = Field(default=None, ge=0, le=10**6)
    max_provisioned_concurrency: int | None = Field(default=None, ge=0, le=10**6)
    environment_vars: dict[str, str] | None = Field(default=None, max_length=100)
    instance_profile_arn: str | None = None

    @field_validator("entity_version", mode="before")
    @classmethod
    def _version_as_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int) else value

    @model_validator(mode="after")
    def _rules(self) -> "ServedEntity":
        if (self.external_model is None) == (self.entity_name is None):
            raise ValueError("a served entity needs exactly one of external_model or entity_name")
        if self.name is not None and not NAME_PATTERN.match(self.name):
            raise ValueError(f"served entity name {self.name!r} may use only letters, digits, '-' and '_' (1-63)")
        if self.workload_size is not None and self.workload_size not in WORKLOAD_SIZES:
            raise ValueError(f"workload_size {self.workload_size!r} is not one of {', '.join(WORKLOAD_SIZES)}")
        provisioned = self.min_provisioned_throughput is not None or self.max_provisioned_throughput is not None
        if self.external_model is not None:
            extras = [f for f in ("entity_version", "workload_size", "min_provisioned_throughput",
                                  "max_provisioned_throughput", "environment_vars") if getattr(self, f) is not None]
            if extras:
                raise ValueError(f"an external_model entity does not take {', '.join(extras)}")
        if self.provisioned_model_units:
            if provisioned or self.workload_size is not None or self.external_model is not None:
                raise ValueError("provisioned_model_units is for a local entity and replaces workload_size and "
                                 "min/max_provisioned_throughput: give one way of sizing it")
        if provisioned:
            if self.workload_size is not None:
                raise ValueError("give either workload_size or min/max_provisioned_throughput, not both")
            low, high = self.min_provisioned_throughput or 0, self.max_provisioned_throughput
            if high is None or high < low:
                raise ValueError(
                    f"max_provisioned_throughput ({high}) must be given and >= min_provisioned_throughput ({low})"
                )
        for key, value in (self.environment_vars or {}).items():
            if value.startswith("{{") and not SECRET_REFERENCE.match(value):
                raise ValueError(f"environment_vars.{key} looks like a secret reference but is not '{{{{secrets/<scope>/<key>}}}}'")
        return self

    def default_name(self) -> str:
        """Databricks' default: the external model name with '.'/':' -> '-', else <model>-<version>."""
        if self.external_model is not None:
            return re.sub(r"[.:]", "-", self.external_model.name)
        base = (self.entity_name or "").split(".")[-1]
        return f"{base}-{self.entity_version}" if self.entity_version else base


class Route(Strict):
    served_model_name: str | None = None
    served_entity_name: str | None = None
    traffic_percentage: int = Field(ge=0, le=100)

    @model_validator(mode="after")
    def _rules(self) -> "Route":
        _one_of(self.__dict__, "served_model_name", "served_entity_name")
        return self

    @property
    def target(self) -> str:
        return self.served_entity_name or self.served_model_name or ""


class TrafficConfig(Strict):
    routes: list[Route]


class EndpointConfig(Strict):
    # Databricks' EndpointCoreConfigInput.name: the endpoint's own name (the SDK sends it); when
    # given it must be that name.
    name: str | None = None
    served_entities: list[ServedEntity] | None = Field(default=None, min_length=1)
    traffic_config: TrafficConfig | None = None
    # Declared so that they are refused by name (NOT_IMPLEMENTED): see serving.control.validation.
    served_models: list[dict[str, Any]] | None = None
    auto_capture_config: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _rules(self) -> "EndpointConfig":
        if self.served_entities is None:
            if self.served_models is not None:
                return self  # refused as not implemented, by name, after parsing
            raise ValueError("served_entities: is required (a list of the models this endpoint serves)")
        entities = self.served_entities
        if len(entities) > MAX_SERVED_ENTITIES:
            raise ValueError(f"an endpoint has at most {MAX_SERVED_ENTITIES} served entities, got {len(entities)}")
        externals = [e.external_model for e in entities if e.external_model is not None]
        if externals and len(externals) != len(entities):  # Databricks: one kind of model per endpoint
            raise ValueError("external models cannot share an endpoint with local or MLflow models; "
                             "serve only external_model entities here, or put them on their own endpoint")
        tasks = sorted({external.task for external in externals})
        if len(tasks) > 1:
            raise ValueError(f"the external models of one endpoint must serve one task, got {', '.join(tasks)}")
        names = [e.name or e.default_name() for e in entities]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"served entity names must be unique within the endpoint; repeated: {', '.join(duplicates)}")
        for entity, name in zip(entities, names):
            entity.name = name
        if self.traffic_config is None:
            if len(entities) > 1:
                raise ValueError("traffic_config is required when an endpoint has more than one served entity")
            self.traffic_config = TrafficConfig(routes=[Route(served_model_name=names[0], traffic_percentage=100)])
        routes = self.traffic_config.routes
        unknown = [r.target for r in routes if r.target not in names]
        if unknown:
            raise ValueError(f"traffic_config routes name unknown served entities: {', '.join(unknown)}; known: {', '.join(names)}")
        total = sum(r.traffic_percentage for r in routes)
        if total != 100:
            raise ValueError(f"traffic_config percentages must sum to 100, got {total}")
        return self

    @property
    def is_external(self) -> bool:
        return any(e.external_model is not None for e in self.served_entities)


class Tag(Strict):
    key: str = Field(min_length=1, max_length=255)
    value: str | None = Field(default=None, max_length=255)


class RateLimit(Strict):
    """A limit of the legacy ``rate-limits`` API and of ``ai-gateway`` (which adds ``tokens``)."""

    calls: int | None = Field(default=None, ge=0, le=10**12)
    tokens: int | None = Field(default=None, ge=0, le=10**12)
    key: Literal["user", "endpoint", "user_group", "service_principal"] = "user"
    renewal_period: Literal["minute"] = "minute"
    principal: str | None = None

    @model_validator(mode="after")
    def _rules(self) -> "RateLimit":
        if self.calls is None and self.tokens is None:
            raise ValueError("a rate limit needs calls, tokens, or both")
        if self.key == "endpoint" and self.principal is not None:
            raise ValueError(f"principal {self.principal!r}: an 'endpoint' limit holds for everyone; remove principal")
        if self.key in ("user_group", "service_principal") and not self.principal:
            raise ValueError(f"key {self.key!r} needs principal: the group's name or the service principal's application_id")
        return self


class UsageTrackingConfig(Strict):
    enabled: bool = False


class InferenceTableConfig(Strict):
    catalog_name: str | None = None
    schema_name: str | None = None
    table_name_prefix: str | None = None
    enabled: bool = False


class FallbackConfig(Strict):
    enabled: bool = False


class PiiBehavior(Strict):
    behavior: Literal["BLOCK", "MASK", "NONE"] | None = None


class GuardrailParameters(Strict):
    invalid_keywords: list[str] | None = Field(default=None, max_length=1000)
    pii: PiiBehavior | None = None
    safety: bool | None = None
    valid_topics: list[str] | None = Field(default=None, max_length=1000)


class Guardrails(Strict):
    input: GuardrailParameters | None = None
    output: GuardrailParameters | None = None


class AiGatewayConfig(Strict):
    rate_limits: list[RateLimit] | None = Field(default=None, max_length=20)

    @field_validator("rate_limits")
    @classmethod
    def _group_limits(cls, value: Any) -> Any:
        groups = [limit.principal for limit in value or [] if limit.key == "user_group"]
        if len(set(groups)) > 5:  # Databricks' limit
            raise ValueError(f"at most 5 groups may have their own rate limits, got {len(set(groups))}")
        return value
    usage_tracking_config: UsageTrackingConfig | None = None
    inference_table_config: InferenceTableConfig | None = None
    fallback_config: FallbackConfig | None = None
    guardrails: Guardrails | None = None


class EmailNotifications(Strict):
    on_update_failure: list[str] | None = Field(default=None, max_length=100)
    on_update_success: list[str] | None = Field(default=None, max_length=100)


class CreateEndpoint(Strict):
    name: str
    config: EndpointConfig
    rate_limits: list[RateLimit] | None = Field(default=None, max_length=20)
    tags: list[Tag] | None = Field(default=None, max_length=100)
    route_optimized: bool | None = False
    ai_gateway: AiGatewayConfig | None = None
    description: str | None = None
    budget_policy_id: str | None = Field(default=None, max_length=255)
    email_notifications: EmailNotifications | None = None
    telemetry_config: dict[str, Any] | None = None  # refused by name (NOT_IMPLEMENTED)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not NAME_PATTERN.match(value):
            raise ValueError(
                f"endpoint name {value!r} may use only letters, digits, '-' and '_', 1 to 63 characters"
            )
        return value


class PatchTags(Strict):
    add_tags: list[Tag] | None = Field(default=None, max_length=100)
    delete_tags: list[str] | None = Field(default=None, max_length=100)


class PutRateLimits(Strict):
    rate_limits: list[RateLimit] = Field(max_length=20)


class AccessControlEntry(Strict):
    user_name: str | None = None
    group_name: str | None = None
    service_principal_name: str | None = None
    permission_level: Literal["CAN_VIEW", "CAN_QUERY", "CAN_MANAGE"]

    @model_validator(mode="after")
    def _rules(self) -> "AccessControlEntry":
        if self.user_name is not None and self.user_name.startswith("group:"):
            raise ValueError(f"user_name {self.user_name!r}: name a group with group_name")
        given = [f for f in ("user_name", "group_name", "service_principal_name") if getattr(self, f) is not None]
        if len(given) != 1:
            raise ValueError(f"an entry names exactly one of user_name, group_name or service_principal_name "
                             f"(got {', '.join(given) or 'none'})")
        return self


class AccessControlList(Strict):
    access_control_list: list[AccessControlEntry] = Field(max_length=1000)


class CreateScope(Strict):
    scope: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,128}$")
    initial_manage_principal: str | None = None
    scope_backend_type: str | None = None


class DeleteScope(Strict):
    scope: str


class PutSecret(Strict):
    scope: str
    key: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,128}$")
    string_value: SecretStr | None = None
    bytes_value: SecretStr | None = None

    @model_validator(mode="after")
    def _rules(self) -> "PutSecret":
        _one_of(self.__dict__, "string_value", "bytes_value")
        return self


class DeleteSecret(Strict):
    scope: str
    key: str


M = TypeVar("M", bound=BaseModel)


def _holds_secret(field: str) -> bool:
    return any(marker in field for marker in ("plaintext", "string_value", "bytes_value", "secret", "token", "api_key"))


def describe_validation_error(exc: ValidationError) -> str:
    return describe_errors(exc.errors())


def describe_errors(errors: Any, skip: int = 0) -> str:
    """pydantic's errors as one message naming each field path, its problem and (unless the field
    may hold a secret) the value; ``skip`` drops leading location parts (FastAPI's ``body``)."""
    parts = []
    for error in errors:
        error = dict(error, loc=tuple(error["loc"])[skip:])
        location = ""
        for part in error["loc"]:
            location += f"[{part}]" if isinstance(part, int) else (f".{part}" if location else str(part))
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = f"unknown field {str(error['loc'][-1])!r}; remove it (see the API reference for valid fields)"
        elif error["type"] == "missing":
            message = "is required"
        elif (
            "input" in error
            and error["type"] not in ("value_error", "model_type")
            and not isinstance(error["input"], dict)
            and not any(_holds_secret(str(part)) for part in error["loc"])  # never echo a secret
        ):
            shown = repr(error["input"])
            message = f"{message} (got {shown if len(shown) <= 100 else shown[:97] + '...'})"
        parts.append(f"{location}: {message}" if location else ("the request body is required" if message == "is required" else message))
    return "; ".join(parts)


def parse(model: type[M], payload: Any) -> M:
    """Validate a decoded JSON body; raise INVALID_PARAMETER_VALUE naming every bad field."""
    if not isinstance(payload, dict):
        raise MalformedRequest(f"the request body must be a JSON object, got {type(payload).__name__}")
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        raise InvalidParameterValue(describe_validation_error(exc)) from None


class PutSecretAcl(Strict):
    scope: str
    principal: str = Field(min_length=1, max_length=255)
    permission: Literal["READ", "WRITE", "MANAGE"]


class DeleteSecretAcl(Strict):
    scope: str
    principal: str = Field(min_length=1, max_length=255)


class CreateToken(Strict):
    """``POST /api/2.0/token/create``: a token for the caller (Databricks' personal access tokens)."""

    comment: str | None = Field(default=None, max_length=255)
    lifetime_seconds: int | None = Field(default=None, gt=0, le=10 * 365 * 86400)  # None: never expires


class RevokeToken(Strict):
    token_id: str = Field(min_length=1, max_length=64)


class BatchRequest(Strict):
    """``POST /api/2.0/sqlinfer/batch``: one whole batch of one kind from a remote SQL engine."""

    endpoint: str = Field(min_length=1, max_length=255)
    kind: Literal["chat", "complete", "embed", "predict"]
    requests: list[Any] = Field(max_length=100_000)
    options: dict[str, Any] | None = None
    params: dict[str, Any] | None = None
    stream: bool = False  # NDJSON, one line per answer as it completes (serving.data.batch_wire)
    # The SQL function these rows are for (ai_query, ai_classify, ...): recorded in the usage rows.
    function: str | None = Field(default=None, pattern=r"^ai_[a-z_]{1,40}$")

"""databricks-sdk's serving_endpoints API end to end, unchanged, against DATABRICKS_HOST (sqlinfer serve).

Run by tests/test_databricks_clients.py with the clients' virtualenv (.venv-clients); prints one
JSON object of what each call returned, which the test checks.
"""

import json

from databricks.sdk import WorkspaceClient
from databricks.sdk.errors import NotFound
from databricks.sdk.service.serving import (
    AiGatewayRateLimit,
    AiGatewayRateLimitKey,
    AiGatewayRateLimitRenewalPeriod,
    AiGatewayUsageTrackingConfig,
    ChatMessage,
    ChatMessageRole,
    EndpointCoreConfigInput,
    EndpointTag,
    RateLimit,
    RateLimitKey,
    RateLimitRenewalPeriod,
    ServedEntityInput,
    ServingEndpointAccessControlRequest,
    ServingEndpointPermissionLevel,
    ServingModelWorkloadType,
)

w = WorkspaceClient()
se = w.serving_endpoints
name = "sdk-chat"
out = {}
created = se.create_and_wait(
    name=name, description="made by databricks-sdk", budget_policy_id="bp-42",
    tags=[EndpointTag(key="team", value="ml")],
    config=EndpointCoreConfigInput(name=name, served_entities=[ServedEntityInput(
        entity_name="smollm2-135m-instruct", scale_to_zero_enabled=True, workload_size="Small",
        workload_type=ServingModelWorkloadType.CPU, burst_scaling_enabled=False)]))
out["created"] = created.as_dict()
out["listed"] = [e.name for e in se.list()]
updated = se.update_config_and_wait(name=name, served_entities=[ServedEntityInput(
    name="v2", entity_name="system.ai.smollm2-135m-instruct", scale_to_zero_enabled=True, provisioned_model_units=0)])
out["updated"] = updated.as_dict()
out["gateway"] = se.put_ai_gateway(name, usage_tracking_config=AiGatewayUsageTrackingConfig(enabled=True), rate_limits=[
    AiGatewayRateLimit(calls=100, key=AiGatewayRateLimitKey.USER, renewal_period=AiGatewayRateLimitRenewalPeriod.MINUTE)]).as_dict()
out["rate_limits"] = se.put(name, rate_limits=[
    RateLimit(calls=50, key=RateLimitKey.USER, renewal_period=RateLimitRenewalPeriod.MINUTE)]).as_dict()
out["tags"] = se.patch(name, add_tags=[EndpointTag(key="env", value="test")], delete_tags=["team"]).as_dict()
endpoint_id = se.get(name).id
out["permissions"] = se.get_permissions(endpoint_id).as_dict()
out["set_permissions"] = se.set_permissions(endpoint_id, access_control_list=[ServingEndpointAccessControlRequest(
    user_name="bob", permission_level=ServingEndpointPermissionLevel.CAN_QUERY)]).as_dict()
out["update_permissions"] = se.update_permissions(endpoint_id, access_control_list=[ServingEndpointAccessControlRequest(
    user_name="carol", permission_level=ServingEndpointPermissionLevel.CAN_VIEW)]).as_dict()
out["permission_levels"] = se.get_permission_levels(endpoint_id).as_dict()
answer = se.query(name, messages=[ChatMessage(role=ChatMessageRole.USER, content="What is the capital of France?")],
                  max_tokens=8, temperature=0)
out["answer"] = answer.choices[0].message.content
out["served_model_name"] = answer.served_model_name
out["logs"] = se.logs(name, "v2").logs
out["build_logs"] = se.build_logs(name, "v2").logs
out["metrics"] = se.export_metrics(name).contents.read().decode()
out["openapi"] = json.loads(se.get_open_api(name).contents.read())
out["final"] = se.get(name).as_dict()
se.delete(name)
try:
    se.get(name)
    out["deleted"] = False
except NotFound as exc:
    out["deleted"] = True
    out["not_found_message"] = str(exc)
print(json.dumps(out))

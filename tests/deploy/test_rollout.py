"""Blue/green updates with traffic shifting and alarm rollback; the in-place update stays the default.

moto is taught what SageMaker does with UpdateEndpoint's DeploymentConfig (tests/deploy/moto_sagemaker.py):
it keeps it as LastDeploymentConfig, and rolls the update back when a rollback alarm is in ALARM.
"""

from __future__ import annotations

import boto3
import pytest

from deploy import cli, rollout
from deploy.errors import DeployError
from tests.deploy.conftest import REGION

IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/sagemaker-llm-serve:0.1.0-abc123def456"


def deploy(capsys, role_arn: str, *extra: str) -> tuple[int, str]:
    code = cli.main(["deploy", "--name", "smollm2", "--image-uri", IMAGE, "--role", role_arn, "--instance-type",
                     "ml.g4dn.xlarge", "--no-smoke-test", "--poll", "0.2", *extra])
    return code, capsys.readouterr().err


def alarm(name: str, state: str = "OK") -> None:
    cw = boto3.client("cloudwatch", region_name=REGION)
    cw.put_metric_alarm(AlarmName=name, Namespace="AWS/SageMaker", MetricName="ModelLatency", Statistic="Average",
                        Period=60, EvaluationPeriods=1, Threshold=5e6, ComparisonOperator="GreaterThanThreshold",
                        Dimensions=[{"Name": "EndpointName", "Value": "smollm2"},
                                    {"Name": "VariantName", "Value": "AllTraffic"}])
    cw.set_alarm_state(AlarmName=name, StateValue=state, StateReason="test")


def endpoint() -> dict:
    return boto3.client("sagemaker", region_name=REGION).describe_endpoint(EndpointName="smollm2")


def test_canary_update_sends_the_blue_green_policy_and_the_alarms(aws_env: dict[str, str], role_arn: str,
                                                                  capsys) -> None:
    assert deploy(capsys, role_arn)[0] == 0
    assert "LastDeploymentConfig" not in endpoint()  # a create has nothing to shift from
    alarm("smollm2-p99-latency")
    alarm("smollm2-5xx")
    code, err = deploy(capsys, role_arn, "--instance-count", "2", "--rollout", "canary:10%:5m",
                       "--rollback-alarms", "smollm2-p99-latency,smollm2-5xx")
    assert code == 0, err
    assert "(blue/green, canary)" in err
    desc = endpoint()
    assert desc["LastDeploymentConfig"] == {
        "BlueGreenUpdatePolicy": {"TrafficRoutingConfiguration": {
            "Type": "CANARY", "WaitIntervalInSeconds": 300, "CanarySize": {"Type": "CAPACITY_PERCENT", "Value": 10}}},
        "AutoRollbackConfiguration": {"Alarms": [{"AlarmName": "smollm2-p99-latency"}, {"AlarmName": "smollm2-5xx"}]}}
    assert desc["ProductionVariants"][0]["CurrentInstanceCount"] == 2


def test_an_alarm_rolls_the_update_back_and_the_new_pair_is_removed(aws_env: dict[str, str], role_arn: str,
                                                                    capsys) -> None:
    assert deploy(capsys, role_arn)[0] == 0
    first = endpoint()["EndpointConfigName"]
    alarm("smollm2-5xx", state="ALARM")
    code, err = deploy(capsys, role_arn, "--env", "DTYPE=float16", "--rollout", "linear:25%:2m",
                       "--rollback-alarms", "smollm2-5xx")
    assert code == 2
    assert f"endpoint smollm2 rolled back to {first}: Rolled back: alarm smollm2-5xx" in err
    desc = endpoint()
    assert (desc["EndpointStatus"], desc["EndpointConfigName"]) == ("InService", first)
    sm = boto3.client("sagemaker", region_name=REGION)
    assert [c["EndpointConfigName"] for c in sm.list_endpoint_configs()["EndpointConfigs"]] == [first]
    [model] = sm.list_models()["Models"]
    assert "DTYPE" not in sm.describe_model(ModelName=model["ModelName"])["PrimaryContainer"].get("Environment", {})


def test_the_default_update_stays_in_place(aws_env: dict[str, str], role_arn: str, capsys) -> None:
    assert deploy(capsys, role_arn)[0] == 0
    code, err = deploy(capsys, role_arn, "--instance-count", "2")
    assert code == 0 and "(in place)" in err
    assert "LastDeploymentConfig" not in endpoint()


@pytest.mark.parametrize(("extra", "message"), [
    (["--rollback-alarms", "smollm2-5xx"], "--rollback-alarms needs --rollout"),
    (["--rollout", "canary:10%:5m", "--rollback-alarms", "nope"], "no CloudWatch alarm named nope"),
    (["--rollout", "blue-green"], "use canary:SIZE:WAIT"),
])
def test_rollout_mistakes_are_refused_up_front(aws_env: dict[str, str], role_arn: str, capsys, extra, message) -> None:
    code, err = deploy(capsys, role_arn, *extra)
    assert code == 2 and message in err, err
    assert boto3.client("sagemaker", region_name=REGION).list_models()["Models"] == []


def test_rollout_plans() -> None:
    assert rollout.parse_rollout(None) is None
    assert rollout.parse_rollout("canary:1:90s").policy() == {"TrafficRoutingConfiguration": {
        "Type": "CANARY", "WaitIntervalInSeconds": 90, "CanarySize": {"Type": "INSTANCE_COUNT", "Value": 1}}}
    assert rollout.parse_rollout("linear:25%:2m").policy() == {"TrafficRoutingConfiguration": {
        "Type": "LINEAR", "WaitIntervalInSeconds": 120, "LinearStepSize": {"Type": "CAPACITY_PERCENT", "Value": 25}}}
    assert rollout.parse_rollout("all-at-once:1h").policy() == {"TrafficRoutingConfiguration": {
        "Type": "ALL_AT_ONCE", "WaitIntervalInSeconds": 3600}}
    assert rollout.parse_rollout("ALL-AT-ONCE").wait_seconds == 0
    for bad, message in [("linear:5%:1m", "10-50%"), ("canary:60%:1m", "1-50%"), ("canary:10%:2h", "at most 3600"),
                         ("canary:0:1m", "not a step size"), ("canary:10%:soon", "not a wait"), ("linear:10%", "use")]:
        with pytest.raises(DeployError, match=message):
            rollout.parse_rollout(bad)

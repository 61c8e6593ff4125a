"""The sans-I/O parts of the gRPC proxy: config validation, the policy, strict decoding, masking of
protobuf messages by field path, stream digests, and `pgproxy check`."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from grpc_helpers import CREDENTIAL_ENV, DESCRIPTOR_SET, config_data, order, shop_pb2, stream_digest, token
from harness import config_edit as edit

from pgproxy.cli import main
from pgproxy.config import ConfigError, parse_config
from pgproxy.grpcproxy.audit import StreamTap
from pgproxy.grpcproxy.descriptors import decode, load_descriptor_set, mask_message, to_json
from pgproxy.http.jsonmask import parse_path
from pgproxy.identity import DevKeys, TokenVerifier


@pytest.fixture
def data(dev_keys: DevKeys, tmp_path: Path) -> dict[str, Any]:
    return config_data(dev_keys, "127.0.0.1:1", tmp_path)


@pytest.mark.parametrize(("mutate", "error"), [
    (edit("grpc.listen.port", None), r"grpc\.listen\.port: required"),
    (edit("grpc.listen.insecure_plaintext", False), r"grpc\.listen: a listener needs tls"),
    (edit("grpc.targets", []), r"grpc\.targets: at least one target"),
    (edit("grpc.targets.1.name", "shop"), r"grpc\.targets\[1\]\.name: duplicate target name"),
    (edit("grpc.targets.0.upstream", "http://shop:50051"), r"grpc\.targets\[0\]\.upstream: expected host:port"),
    (edit("grpc.targets.0.upstream", "shop.internal:50051"), r"grpc\.targets\[0\]\.tls: required when a credential"),
    (edit("grpc.targets.0.services", []), r"grpc\.targets\[0\]\.services: required"),
    (edit("grpc.targets.0.credential.kind", "cookie"), r"grpc\.targets\[0\]\.credential\.kind: must be one of"),
    (edit("grpc.targets.0.credential.key", "grpc-secret"), r"grpc\.targets\[0\]\.credential\.key: a lower-case"),
    (edit("grpc.targets.0.credential.key", KeyError), r"grpc\.targets\[0\]\.credential\.key: required with kind"),
    (edit("grpc.targets.0.credential.value_file", "/etc/hostname"),
     r"grpc\.targets\[0\]\.credential: set exactly one of value_env or value_file"),
    (edit("grpc.targets.0.descriptors", None), r"grpc\.targets\[0\]\.descriptors: masks need descriptors"),
    (edit("grpc.targets.0.descriptors.reflection", True), r"grpc\.targets\[0\]\.descriptors: set file or"),
    (edit("grpc.targets.0.undecodable", "pass"), r"grpc\.targets\[0\]\.undecodable: must be one of refuse, digest"),
    (edit("grpc.targets.0.tls", {"cert_file": str(DESCRIPTOR_SET)}),
     r"grpc\.targets\[0\]\.tls: cert_file and key_file go together"),
    (edit("grpc.targets.0.masks.1.in", ["request"]), r"grpc\.targets\[0\]\.masks\[1\]\.caller: only applies"),
    (edit("grpc.targets.0.masks.0.paths", ["a..b"]), r"grpc\.targets\[0\]\.masks\[0\]\.paths\[0\]: invalid"),
    (edit("grpc.targets.0.deadline", 3), r"grpc\.targets\[0\]\.deadline: unknown setting"),
    (edit("grpc.rules.0.match.methods", ["shop.v1.Orders/Get"]), r"grpc\.rules\[0\]\.match\.methods: .*names only"),
    (edit("grpc.rules.1.match.targets", ["nope"]), r"grpc\.rules\[1\]\.match\.targets: unknown target 'nope'"),
    (edit("grpc.rules.1.approvers", KeyError), r"grpc\.rules\[1\]\.approvers: required for action approve"),
    (edit("grpc.default", "maybe"), r"grpc\.default: must be one of allow, deny"),
])
def test_config_errors_name_the_field(data: dict[str, Any], tmp_path: Path, mutate: Any, error: str) -> None:
    broken = copy.deepcopy(data)
    mutate(broken)
    with pytest.raises(ConfigError, match=error):
        parse_config(broken, tmp_path)


def test_config_routes_and_masks(data: dict[str, Any], tmp_path: Path) -> None:
    grpc = parse_config(data, tmp_path).grpc
    assert grpc is not None
    shop = grpc.route("shop.v1.Orders")
    assert shop is not None and shop.name == "shop" and grpc.route("other.Things") is None
    assert [str(p) for p in shop.mask_paths("shop.v1.Order", "response", caller=True)] == ["customer.card"]
    assert [str(p) for p in shop.mask_paths("shop.v1.Summary", "response")] == ["customer.email", "items[*].ssn"]
    assert shop.mask_paths("shop.v1.Summary", "response", caller=True) == ()


async def test_policy_decisions(data: dict[str, Any], tmp_path: Path, dev_keys: DevKeys) -> None:
    config = parse_config(data, tmp_path)
    assert config.grpc is not None
    identity = await TokenVerifier(config.identity).verify(token(dev_keys))
    decide = config.grpc.policy.decide
    assert decide(identity, "shop", "shop.v1.Orders", "DeleteOrder").action == "deny"
    refund = decide(identity, "shop", "shop.v1.Orders", "Refund")
    assert (refund.action, refund.rule) == ("approve", "refunds")
    assert decide(identity, "shop", "shop.v2.Orders", "Refund").action == "allow"  # the rule names shop.v1.Orders
    assert decide(identity, "shop", "shop.v1.Orders", "GetOrder").action == "allow"
    data["grpc"]["default"] = None
    data["grpc"]["rules"] = [{"name": "finance-only", "match": {"groups": ["finance"], "services": ["shop.*"]},
                              "action": "allow"}]
    decide = parse_config(data, tmp_path).grpc.policy.decide  # type: ignore[union-attr]
    assert decide(identity, "shop", "shop.v1.Orders", "GetOrder").action == "deny"  # agents are not in finance


def test_decode_is_strict() -> None:
    methods = load_descriptor_set(DESCRIPTOR_SET.read_bytes())
    get = methods["/shop.v1.Orders/GetOrder"]
    assert not get.client_streaming and methods["/shop.v1.Orders/Chat"].server_streaming
    good = shop_pb2.GetOrderRequest(id=5, note="n").SerializeToString()
    decoded = decode(get.input, good)
    assert decoded is not None and to_json(decoded) == {"id": "5", "note": "n"}
    assert decode(get.input, good + b"\xa0\x06\x01") is None  # field 100 is not in the descriptor
    assert decode(get.input, good + shop_pb2.GetOrderRequest(note="m").SerializeToString()) is None  # note twice
    assert decode(get.input, b"\x0a\xff") is None  # truncated


@pytest.mark.parametrize(("paths", "hits", "check"), [
    (["customer.email"], ["customer.email"], lambda o: o.customer.email == "[masked]" and o.customer.name == "Ann"),
    (["items[*].ssn"], ["items[*].ssn"], lambda o: [i.ssn for i in o.items] == ["[masked]", "[masked]"]),
    (["items[-1].ssn"], ["items[-1].ssn"], lambda o: [i.ssn for i in o.items] == ["111-22-3333", "[masked]"]),
    (["items[*].qty"], ["items[*].qty"], lambda o: [i.qty for i in o.items] == [0, 0]),  # numbers: cleared
    (["total_cents", "created"], ["total_cents"], lambda o: o.total_cents == 0),  # unset created: no hit
    (["labels.tier"], ["labels.tier"], lambda o: dict(o.labels) == {"tier": "[masked]"}),
    (["labels"], ["labels"], lambda o: dict(o.labels) == {}),
    (["customer.*"], ["customer.*"], lambda o: o.customer.name == o.customer.card == "[masked]"),
    (["customer"], ["customer"], lambda o: not o.HasField("customer")),
    (["nothing.here", "items[5].ssn"], [], lambda o: o == order(1)),
])
def test_mask_message(paths: list[str], hits: list[str], check: Any) -> None:
    message = order(1)
    assert mask_message(message, [parse_path(p) for p in paths]) == hits
    assert check(message)
    assert decode(type(message), message.SerializeToString()) is not None  # still a valid message


def test_stream_tap() -> None:
    tap = StreamTap(2)
    messages = [b"a", b"", b"ccc"]
    for m in messages:
        if tap.wants_record:
            tap.messages.append({"bytes": len(m)})
        tap.feed(m)
    assert tap.record() == {"count": 3, "bytes": 4, "sha256": stream_digest(messages),
                            "messages": [{"bytes": 1}, {"bytes": 0}], "messages_omitted": 1}


def test_check_reports_missing_grpc_secrets(data: dict[str, Any], tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CREDENTIAL_ENV, raising=False)
    path = tmp_path / "pgproxy.yaml"
    path.write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(main, ["check", "-c", str(path), "--offline"])
    assert result.exit_code != 0
    assert f"grpc.targets[0].credential: environment variable {CREDENTIAL_ENV} is not set" in result.output


def test_check_reports_an_unreadable_descriptor_set(data: dict[str, Any], tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CREDENTIAL_ENV, "a-credential-value")
    data["grpc"]["targets"][0]["descriptors"] = {"file": str(Path(__file__).parent / "protos" / "shop.proto")}
    path = tmp_path / "pgproxy.yaml"
    path.write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(main, ["check", "-c", str(path), "--offline"])
    assert result.exit_code != 0
    assert "grpc target shop: descriptors" in result.output and "not a FileDescriptorSet" in result.output

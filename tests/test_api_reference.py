"""docs/api.md is what proto/reference.py makes of the .proto files now (run `make api-docs`
if this fails), and it documents every RPC, message and enum."""

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _reference():
    spec = importlib.util.spec_from_file_location("reference", REPO / "proto" / "reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_reference_is_up_to_date_with_the_protos():
    fresh = _reference().reference()
    committed = REPO / "docs" / "api.md"
    assert committed.is_file(), "docs/api.md is missing: run `make api-docs`"
    assert committed.read_text() == fresh, "docs/api.md is stale (a .proto changed): run `make api-docs`"


def test_reference_has_every_rpc_message_and_enum_with_comments():
    reference = _reference()
    files = reference.descriptor_set()
    text = reference.render(files, {})
    for proto in files.file:
        for service in proto.service:
            for rpc in service.method:
                assert f"#### {rpc.name}\n" in text
        for message in proto.message_type:
            assert f"### {message.name}\n" in text
        for enum in proto.enum_type:
            assert f"### {enum.name}\n" in text
    assert "| `ipv4_cidr` | 1 | string | Address with prefix length, e.g. \"10.0.0.5/24\". |" in text
    assert "| `CONTAINER_STATE_UNKNOWN` | 8 | The controller cannot currently learn the state (node unreachable). |" in text
    assert "`rpc WatchEvents(WatchEventsRequest) returns (stream Event)`" in text


def test_client_deadlines_name_real_rpcs():
    from corral.client import CALLS
    from corral.v1 import controller_pb2

    rpcs = set(controller_pb2.DESCRIPTOR.services_by_name["ControllerService"].methods_by_name)
    assert set(CALLS) <= rpcs

"""How the CLI prints: aligned tables for people; for programs, the API objects as JSON or YAML.

Machine output has one path: `api_dict` of the API message (`MessageToDict` with the
proto's own field names), so every field the API carries appears, including fields added
later. On top of the protobuf JSON mapping, in this one place:
- times (the double epoch-second fields: created_at, updated_at, last_heartbeat,
  started_at, finished_at) are RFC 3339 strings in UTC, null when unset;
- enum values are their short lowercase names (`running`, `ready`), as the tables show;
- 64-bit integers are JSON numbers, not strings;
- an operation's `params` and `result` values, JSON-encoded in the API, are decoded;
- a node also carries `name` (its `facts.name`): every listed object has a `name`.
"""

from __future__ import annotations

import sys
import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import click

if TYPE_CHECKING:
    from corral.model import Container, Node

TIME_FIELDS = frozenset({"created_at", "updated_at", "last_heartbeat", "started_at", "finished_at"})
# Map fields whose values are JSON documents in the API.
_JSON_VALUED = frozenset({"corral.v1.Operation.params", "corral.v1.Operation.result"})


def rfc3339(epoch: float) -> str | None:
    if not epoch:
        return None
    moment = datetime.fromtimestamp(epoch, timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def to_message(value: Any):
    """The API message for a domain object (messages pass through)."""
    from corral.model import Container, Node, Snapshot

    if isinstance(value, Snapshot):
        from corral.api.convert import snapshot_to_pb

        return snapshot_to_pb(value)
    if isinstance(value, Container):
        from corral.api.convert import container_to_pb

        return container_to_pb(value)
    if isinstance(value, Node):
        from corral.api.convert import node_to_pb

        return node_to_pb(value)
    return value


def api_dict(value: Any) -> Any:
    """The API object of `value` (a message, a Container or Node, or a list of them) as
    plain data; dicts and other plain values pass through unchanged."""
    if isinstance(value, (list, tuple)):
        return [api_dict(v) for v in value]
    msg = to_message(value)
    if not hasattr(msg, "DESCRIPTOR"):
        return value
    from google.protobuf.json_format import MessageToDict

    data = MessageToDict(msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    data = _message(msg.DESCRIPTOR, data)
    if msg.DESCRIPTOR.full_name == "corral.v1.Node":
        data = {"name": msg.facts.name, **data}
    return data


def _message(descriptor, data: dict) -> dict:
    out = {}
    for key, value in data.items():
        field = descriptor.fields_by_name.get(key)
        out[key] = value if field is None else _field(field, value)
    return out


def _field(field, value: Any) -> Any:
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        value_field = field.message_type.fields_by_name["value"]
        if field.full_name in _JSON_VALUED:
            return {k: _json_value(v) for k, v in value.items()}
        return {k: _scalar(value_field, v) for k, v in value.items()}
    if field.is_repeated:
        return [_scalar(field, v) for v in value]
    return _scalar(field, value)


def _scalar(field, value: Any) -> Any:
    if field.type == field.TYPE_MESSAGE:
        return _message(field.message_type, value)
    if field.type == field.TYPE_ENUM:
        return _enum_name(field.enum_type, value)
    if field.cpp_type in (field.CPPTYPE_INT64, field.CPPTYPE_UINT64) and isinstance(value, str):
        return int(value)
    if field.type == field.TYPE_DOUBLE and field.name in TIME_FIELDS:
        return rfc3339(float(value))
    return value


def _enum_name(enum_type, value: Any) -> Any:
    if not isinstance(value, str):
        return value
    names = [v.name for v in enum_type.values]
    prefix = next((n[: -len("UNSPECIFIED")] for n in names if n.endswith("_UNSPECIFIED")), "")
    return value.removeprefix(prefix).lower()


def _json_value(text: str) -> Any:
    import json

    try:
        return json.loads(text)
    except ValueError:
        return text


def emit(obj, value: Any) -> None:
    """Print `value` as the API object in the invocation's machine format (json or yaml)."""
    data = api_dict(value)
    if obj.format == "yaml":
        import yaml

        click.echo(yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True), nl=False)
    else:
        import json

        click.echo(json.dumps(data, indent=2, ensure_ascii=False))


def emit_line(obj, value: Any) -> None:
    """One API object of a stream: a compact JSON line (NDJSON), or a YAML document."""
    data = api_dict(value)
    if obj.format == "yaml":
        import yaml

        click.echo("---\n" + yaml.safe_dump(data, sort_keys=False, allow_unicode=True), nl=False)
    else:
        import json

        click.echo(json.dumps(data, ensure_ascii=False, separators=(",", ":")))


def event_line(event) -> str:
    """`12:00:01.234  #17  node-state  node n2 is suspect: ...`"""
    import time

    stamp = time.strftime("%H:%M:%S", time.localtime(event.at)) + f".{int(event.at * 1000) % 1000:03d}"
    return f"{stamp}  #{event.seq:<5} {event.kind:<16} {event.message}"


def print_json(data: Any) -> None:
    import json

    click.echo(json.dumps(data, indent=2))


def print_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], *, no_headers: bool = False) -> None:
    """Aligned columns; with `no_headers` neither the header nor its rule (for awk and cut)."""
    from rich.console import Console
    from rich.table import Table, box
    from rich.text import Text

    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, show_header=not no_headers)
    for h in headers:
        table.add_column(h, no_wrap=True)
    for row in rows:
        table.add_row(*[Text(str(c)) for c in row])
    Console(width=200, file=sys.stdout).print(table)


def print_fields(fields: Sequence[tuple[str, Any]]) -> None:
    width = max(len(k) for k, _ in fields)
    for key, value in fields:
        click.echo(f"{key + ':' if key else '':<{width + 1}} {value}")  # no key: the line before goes on


def nodes_table(nodes: Sequence[Node], *, no_headers: bool = False) -> None:
    from corral.units import format_size

    now = time.time()
    print_table(
        ["NAME", "STATE", "ADDRESS", "CPUS", "MEMORY", "ALLOCATED", "CONTAINERS", "CRIU", "LAST SEEN"],
        [
            [
                n.name,
                n.state.value + (",cordoned" if getattr(n, "cordoned", False) else ""),  # one token
                n.facts.address,
                n.facts.cpus,
                format_size(n.facts.memory_bytes),
                format_size(n.allocated.memory_bytes),
                n.container_count,
                n.facts.criu_version if n.facts.criu_ok else "no",
                f"{now - n.last_heartbeat:.0f}s ago" if n.last_heartbeat else "never",
            ]
            for n in nodes
        ],
        no_headers=no_headers,
    )


def state_label(c: Container) -> str:
    """The observed state, flagged where it is not what was asked for or cannot be trusted."""
    if c.in_doubt:
        return "in-doubt"
    if c.ha_failed:
        return "failed"  # HA: kept stopping after its restarts and relocations (ct show says why)
    label = c.state.value
    wanted = c.desired_state.value
    if label in ("running", "stopped") and label != wanted:
        label += f"(want:{wanted})"  # one token: scripts split the table on blanks
    elif c.stateful_stopped:
        label += "(stateful)"  # its processes are saved: `ct start` resumes them
    return label


def containers_table(containers: Sequence[Container], *, no_headers: bool = False) -> None:
    from corral.units import format_cpus, format_size

    print_table(
        ["NAME", "STATE", "NODE", "TEMPLATE", "IPV4", "MEMORY", "CPUS"],
        [
            [
                c.name,
                state_label(c),
                c.node,
                c.template,
                c.network.ipv4 or "-",
                format_size(c.limits.memory_bytes),
                format_cpus(c.limits.cpu_millis),
            ]
            for c in containers
        ],
        no_headers=no_headers,
    )

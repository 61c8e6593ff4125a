"""Message descriptors of a target: which methods exist, their message types and streaming kinds.

They come from a ``FileDescriptorSet`` file (``protoc --descriptor_set_out=F --include_imports``) or
from the upstream's server reflection service, fetched once (in a thread: grpcio's reflection client
is synchronous) and turned into a plain ``method path -> Method`` table, so that a call never waits
on a descriptor lookup. The proxy relays raw bytes; messages are decoded only for the audit record,
masking and replay.

``decode`` is strict: a message that does not parse, or that holds fields the descriptor does not
know (it does not re-encode to the same size: unknown fields, or a field sent twice), is undecodable,
because its content could not be masked reliably.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, json_format, message_factory
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.descriptor_pool import DescriptorPool
from google.protobuf.message import DecodeError, Message

from ..http.jsonmask import MASK, WILDCARD, JsonPath, Segment

REFLECTION_SERVICES = frozenset({"grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection"})


class DescriptorError(Exception):
    pass


@dataclass(frozen=True)
class Method:
    path: str  # /pkg.Service/Method
    input: type[Message]
    output: type[Message]
    client_streaming: bool
    server_streaming: bool


def method_table(files: Iterable[descriptor_pb2.FileDescriptorProto]) -> dict[str, Method]:
    """Every method of every service in ``files`` (which must include their imports)."""
    pending = {f.name: f for f in files}
    pool = DescriptorPool()
    added: set[str] = set()

    def add(name: str, chain: tuple[str, ...] = ()) -> None:
        if name in added:
            return
        proto = pending.get(name)
        if proto is None:
            raise DescriptorError(f"{chain[-1] if chain else name} imports {name}, which the descriptors lack")
        if name in chain:
            raise DescriptorError(f"import cycle through {name}")
        for dep in proto.dependency:
            add(dep, (*chain, name))
        pool.Add(proto)
        added.add(name)

    try:
        for name in pending:
            add(name)
        table: dict[str, Method] = {}
        for proto in pending.values():
            for service in proto.service:
                full = f"{proto.package}.{service.name}" if proto.package else service.name
                for m in pool.FindServiceByName(full).methods:
                    table[f"/{full}/{m.name}"] = Method(
                        f"/{full}/{m.name}", message_factory.GetMessageClass(m.input_type),
                        message_factory.GetMessageClass(m.output_type), m.client_streaming, m.server_streaming)
    except (TypeError, KeyError, ValueError) as exc:
        raise DescriptorError(f"invalid descriptors: {exc}") from None
    return table


def load_descriptor_set(data: bytes) -> dict[str, Method]:
    fds = descriptor_pb2.FileDescriptorSet()
    try:
        fds.ParseFromString(data)
    except DecodeError as exc:
        raise DescriptorError(f"not a FileDescriptorSet: {exc}") from None
    return method_table(fds.file)


def fetch_by_reflection(address: str, credentials: grpc.ChannelCredentials | None, options: list[tuple[str, Any]],
                        metadata: tuple[tuple[str, str], ...], timeout: float) -> dict[str, Method]:
    """The method table from the upstream's reflection service (blocking: run it in a thread)."""
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    channel = (grpc.secure_channel(address, credentials, options) if credentials is not None
               else grpc.insecure_channel(address, options))
    files: dict[str, descriptor_pb2.FileDescriptorProto] = {}

    def ask(**query: Any) -> list[bytes]:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(**query)
        answers = list(stub.ServerReflectionInfo(iter([request]), timeout=timeout, metadata=metadata))
        if not answers or answers[0].HasField("error_response"):
            why = answers[0].error_response.error_message if answers else "no answer"
            raise DescriptorError(f"reflection: {why}")
        if answers[0].HasField("list_services_response"):
            return [s.name.encode() for s in answers[0].list_services_response.service]
        return list(answers[0].file_descriptor_response.file_descriptor_proto)

    def collect(blobs: list[bytes]) -> None:
        for blob in blobs:
            proto = descriptor_pb2.FileDescriptorProto.FromString(blob)
            if proto.name in files:
                continue
            files[proto.name] = proto
            for dep in proto.dependency:
                if dep not in files:
                    collect(ask(file_by_filename=dep))

    try:
        for name in ask(list_services=""):
            service = name.decode()
            if service not in REFLECTION_SERVICES:
                collect(ask(file_containing_symbol=service))
    except grpc.RpcError as exc:
        raise DescriptorError(f"reflection failed: {exc.code().name}: {exc.details()}") from None
    except DecodeError as exc:
        raise DescriptorError(f"reflection sent an invalid file descriptor: {exc}") from None
    finally:
        channel.close()
    return method_table(files.values())


def decode(cls: type[Message], data: bytes) -> Message | None:
    """The parsed message, or None when it does not parse or carries fields the descriptor lacks."""
    message = cls()
    try:
        message.ParseFromString(data)
    except DecodeError:
        return None
    message.DiscardUnknownFields()
    if message.ByteSize() != len(data):
        return None
    return message


def to_json(message: Message) -> dict[str, Any]:
    """The message as JSON with proto field names (what mask paths name)."""
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def from_json(cls: type[Message], value: Any) -> Message:
    return json_format.ParseDict(value, cls())


# ------------------------------------------------------------------------------------------------ masking


def mask_message(message: Message, paths: Iterable[JsonPath]) -> list[str]:
    """Blank the fields named by ``paths`` in place (strings become ``[masked]``, other values their
    default); the paths that matched something. Same path syntax as the JSON masks."""
    hits = []
    for path in paths:
        if _mask_fields(message, path.segments):
            hits.append(path.text)
    return hits


def _mask_fields(message: Message, segments: tuple[Segment, ...]) -> bool:
    head, rest = segments[0], segments[1:]
    descriptor = message.DESCRIPTOR
    fields: list[FieldDescriptor]
    if head is WILDCARD:
        fields = [fd for fd, _ in message.ListFields()]
    elif isinstance(head, str) and head in descriptor.fields_by_name:
        fields = [descriptor.fields_by_name[head]]  # type: ignore[list-item]  # upb's twin of the class
    else:
        return False
    changed = False
    for fd in fields:
        if _is_map(fd):
            changed |= _mask_map(getattr(message, fd.name), fd, rest)
        elif _is_repeated(fd):
            changed |= _mask_list(getattr(message, fd.name), fd, rest)
        elif not rest:
            changed |= _blank_field(message, fd)
        elif fd.type == FieldDescriptor.TYPE_MESSAGE and message.HasField(fd.name):
            changed |= _mask_fields(getattr(message, fd.name), rest)
    return changed


def _is_map(fd: FieldDescriptor) -> bool:
    return fd.message_type is not None and bool(fd.message_type.GetOptions().map_entry)


def _is_repeated(fd: FieldDescriptor) -> bool:
    return bool(fd.is_repeated)


def _blank_field(message: Message, fd: FieldDescriptor) -> bool:
    if fd.type == FieldDescriptor.TYPE_STRING:
        if getattr(message, fd.name) == MASK:
            return False
        setattr(message, fd.name, MASK)
        return True
    present = message.HasField(fd.name) if fd.has_presence else getattr(message, fd.name) != fd.default_value
    message.ClearField(fd.name)
    return bool(present)


def _blank_item(container: Any, key: Any, fd: FieldDescriptor) -> bool:
    """Blank one element of a list or one value of a map (``fd`` describes the element)."""
    current = container[key]
    if fd.type == FieldDescriptor.TYPE_STRING:
        container[key] = MASK
        return bool(current != MASK)
    if fd.type == FieldDescriptor.TYPE_MESSAGE:
        changed = current.ByteSize() > 0
        current.Clear()
        return bool(changed)
    container[key] = type(current)()  # 0, 0.0, False, b""
    return bool(current != container[key])


def _mask_list(values: Any, fd: FieldDescriptor, rest: tuple[Segment, ...]) -> bool:
    if not rest:  # the whole list
        if not len(values):
            return False
        if fd.type == FieldDescriptor.TYPE_STRING:
            values[:] = [MASK] * len(values)
        else:
            del values[:]
        return True
    head, tail = rest[0], rest[1:]
    if head is WILDCARD:
        indices = list(range(len(values)))
    elif isinstance(head, int) and -len(values) <= head < len(values):
        indices = [head % len(values)]
    else:
        return False
    changed = False
    for i in indices:
        if not tail:
            changed |= _blank_item(values, i, fd)
        elif fd.type == FieldDescriptor.TYPE_MESSAGE:
            changed |= _mask_fields(values[i], tail)
    return changed


def _mask_map(entries: Any, fd: FieldDescriptor, rest: tuple[Segment, ...]) -> bool:
    assert fd.message_type is not None
    value_fd = fd.message_type.fields_by_name["value"]
    if not rest:
        changed = len(entries) > 0
        entries.clear()
        return changed
    head, tail = rest[0], rest[1:]
    keys = list(entries) if head is WILDCARD else [k for k in entries if str(k) == str(head)]
    changed = False
    for key in keys:
        if not tail:
            changed |= _blank_item(entries, key, value_fd)
        elif value_fd.type == FieldDescriptor.TYPE_MESSAGE:
            changed |= _mask_fields(entries[key], tail)
    return changed

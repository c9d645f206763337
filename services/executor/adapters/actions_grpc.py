"""`grpc_call`: one unary gRPC call with JSON in and out (docs/flows.md#grpc_call). The message types come from the
server's reflection or from the step's compiled descriptor set; the target is guarded before it is dialled
(docs/network-guard.md); status codes are classified into the run's error categories."""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import DecodeError, Message
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from schemas.events import ErrorCategory
from schemas.flows import GrpcCallInput, mask_secrets, mask_text
from services.common.netguard import BlockedAddress, UnresolvableHost, checked_addresses
from services.executor.adapters.actions_base import StepCall, StepError, parse_input
from services.executor.adapters.connectors import ConnectorRegistry, as_registry

SCHEMES = ("grpc", "grpcs")
MAX_MESSAGE_BYTES = 16 * 1024 * 1024

_TRANSIENT = {"UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "CANCELLED", "INTERNAL", "UNKNOWN",
              "DATA_LOSS"}  # fmt: skip
_AUTH = {"UNAUTHENTICATED", "PERMISSION_DENIED"}
_CONFLICT = {"ABORTED", "ALREADY_EXISTS"}


def classify_grpc(code: grpc.StatusCode) -> ErrorCategory:
    """UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED and server faults are TRANSIENT (retried); UNAUTHENTICATED
    and PERMISSION_DENIED AUTH; ABORTED and ALREADY_EXISTS CONFLICT; the rest (INVALID_ARGUMENT, NOT_FOUND,
    FAILED_PRECONDITION, OUT_OF_RANGE, UNIMPLEMENTED) VALIDATION, as an HTTP 4xx is."""
    name = code.name
    if name in _TRANSIENT:
        return ErrorCategory.TRANSIENT
    if name in _AUTH:
        return ErrorCategory.AUTH
    if name in _CONFLICT:
        return ErrorCategory.CONFLICT
    return ErrorCategory.VALIDATION


class GrpcActions:
    def __init__(self, *, connectors: ConnectorRegistry | Mapping[str, str], allow_private: bool,
                 max_output_bytes: int) -> None:  # fmt: skip
        self.connectors = as_registry(connectors)
        self.allow_private = allow_private
        self.max_bytes = max_output_bytes
        self._sets: OrderedDict[str, descriptor_pool.DescriptorPool] = OrderedDict()  # by the set's hash

    async def close(self) -> None:
        self._sets.clear()

    async def call(self, call: StepCall) -> dict[str, Any]:
        spec = parse_input(GrpcCallInput, call.input, "grpc_call")
        metadata: dict[str, str] = {}
        if spec.connector is not None:
            connector = await self.connectors.resolve(call.tenant_id, call.environment, spec.connector, SCHEMES,
                                                      "grpc")  # fmt: skip
            url, trusted = connector.url, connector.trusted
            metadata.update({k.lower(): v for k, v in connector.headers.items()})
        else:
            assert spec.target is not None
            url, trusted = spec.target, False
        metadata.update(spec.metadata)
        metadata.setdefault("idempotency-key", call.idempotency_key)
        shown: dict[str, Any] = {"target": mask_text(url), "connector": spec.connector, "service": spec.service,
                                 "method": spec.method, "request": spec.request,
                                 "metadata": mask_secrets(metadata)}  # fmt: skip
        deadline = min(spec.deadline_s or call.timeout_s, call.timeout_s * 0.9)
        try:
            channel = await self._channel(url, guarded=not (trusted or self.allow_private))
        except BlockedAddress as exc:
            raise StepError(ErrorCategory.VALIDATION, str(exc), code="blocked_address", output=shown) from exc
        except UnresolvableHost as exc:
            raise StepError(ErrorCategory.TRANSIENT, str(exc), code="unresolvable_host", output=shown) from exc
        async with channel:
            try:
                pool = self._descriptor_set(spec.descriptor_set, shown) if spec.descriptor_set else None
                if pool is None:
                    pool = await _reflected_pool(channel, spec.service, deadline)
                method = _method(pool, spec.service, spec.method)
                request_class = message_factory.GetMessageClass(method.input_type)
                response_class = message_factory.GetMessageClass(method.output_type)
                try:
                    request = json_format.ParseDict(spec.request, request_class())
                except json_format.ParseError as exc:
                    raise StepError(ErrorCategory.VALIDATION, f"request: {exc}", code="invalid_request") from exc
                stub = channel.unary_unary(f"/{spec.service}/{spec.method}",
                                           request_serializer=lambda m: m.SerializeToString(),
                                           response_deserializer=response_class.FromString)  # fmt: skip
                rpc = stub(request, timeout=deadline, metadata=tuple(metadata.items()))
                response: Message = await rpc
                headers = await rpc.initial_metadata()
            except grpc.aio.AioRpcError as exc:
                status = exc.code()
                raise StepError(classify_grpc(status), f"{spec.service}/{spec.method} answered {status.name}: "
                                f"{exc.details() or ''}".rstrip(": "), code=status.name,
                                output={**shown, "status": status.name, "details": exc.details()}) from exc  # fmt: skip
            except StepError as exc:
                exc.output = exc.output or shown
                raise
        body = json_format.MessageToDict(response, preserving_proto_field_name=True,
                                         always_print_fields_with_no_presence=True)  # fmt: skip
        return {**shown, "status": "OK", "response": body, "response_metadata": _text_metadata(headers)}

    async def _channel(self, url: str, *, guarded: bool) -> grpc.aio.Channel:
        """A channel to `grpc://host:port` (plain) or `grpcs://host:port` (TLS, the system's roots). Guarded: the host
        is resolved once, every address checked, and the channel dials the first checked address, keeping the name
        as the authority and the TLS server name; no proxy from the environment."""
        parts = urlsplit(url)
        if parts.scheme not in SCHEMES or not parts.hostname:
            raise StepError(ErrorCategory.VALIDATION, f"target {mask_text(url)!r} is not grpc://host:port or "
                            "grpcs://host:port", code="invalid_target")  # fmt: skip
        try:
            port = parts.port or (443 if parts.scheme == "grpcs" else 80)
        except ValueError as exc:
            raise StepError(ErrorCategory.VALIDATION, f"target: {exc}", code="invalid_target") from exc
        host = parts.hostname
        authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        options: list[tuple[str, Any]] = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
        target = authority
        if guarded:
            address = (await checked_addresses(host, port))[0]
            target = f"ipv6:[{address}]:{port}" if ":" in address else f"ipv4:{address}:{port}"
            options += [("grpc.default_authority", authority), ("grpc.enable_http_proxy", 0)]
            if parts.scheme == "grpcs":
                options.append(("grpc.ssl_target_name_override", host))
        if parts.scheme == "grpcs":
            return grpc.aio.secure_channel(target, grpc.ssl_channel_credentials(), options=options)
        return grpc.aio.insecure_channel(target, options=options)

    def _descriptor_set(self, encoded: str, shown: dict[str, Any]) -> descriptor_pool.DescriptorPool:
        digest = hashlib.sha256(encoded.encode()).hexdigest()
        pool = self._sets.get(digest)
        if pool is None:
            pool = descriptor_set_pool(encoded)
            self._sets[digest] = pool
            while len(self._sets) > 64:
                self._sets.popitem(last=False)
        self._sets.move_to_end(digest)
        return pool


def descriptor_set_pool(encoded: str) -> descriptor_pool.DescriptorPool:
    """A descriptor pool of a base64 FileDescriptorSet; one that cannot be read is a VALIDATION error."""
    try:
        files = descriptor_pb2.FileDescriptorSet.FromString(base64.b64decode(encoded, validate=True)).file
        return _pool(list(files))
    except (binascii.Error, DecodeError, TypeError, ValueError) as exc:
        raise StepError(ErrorCategory.VALIDATION, f"descriptor_set is not a base64 FileDescriptorSet that "
                        f"protobuf accepts: {exc}", code="invalid_descriptor_set") from exc  # fmt: skip


def _pool(files: list[descriptor_pb2.FileDescriptorProto]) -> descriptor_pool.DescriptorPool:
    """The files in a pool, each after the files it imports (a file missing from the set is refused by protobuf)."""
    by_name = {f.name: f for f in files}
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(name: str, seen: tuple[str, ...]) -> None:
        if name in added or name in seen:
            return
        proto = by_name.get(name)
        if proto is None:
            return  # a well-known type the pool may know, or missing: pool.Add says which
        for dependency in proto.dependency:
            add(dependency, (*seen, name))
        pool.Add(proto)
        added.add(name)

    for name in by_name:
        add(name, ())
    return pool


async def _reflected_pool(channel: grpc.aio.Channel, service: str, deadline_s: float) -> descriptor_pool.DescriptorPool:
    """The service's file and every file it imports, from the server's reflection service (v1alpha)."""
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)

    async def ask(request: reflection_pb2.ServerReflectionRequest) -> list[descriptor_pb2.FileDescriptorProto]:
        answer = None
        async for reply in stub.ServerReflectionInfo(iter([request]), timeout=deadline_s):
            answer = reply
            break
        if answer is None or answer.HasField("error_response"):
            code = answer.error_response.error_code if answer is not None else grpc.StatusCode.UNKNOWN.value[0]
            if code == grpc.StatusCode.NOT_FOUND.value[0]:
                raise StepError(ErrorCategory.VALIDATION, f"the server's reflection knows no service {service!r}",
                                code="unknown_service")  # fmt: skip
            message = answer.error_response.error_message if answer is not None else "no answer"
            raise StepError(ErrorCategory.TRANSIENT, f"server reflection failed: {message}", code="reflection")
        return [descriptor_pb2.FileDescriptorProto.FromString(raw)
                for raw in answer.file_descriptor_response.file_descriptor_proto]  # fmt: skip

    try:
        files = {f.name: f for f in await ask(reflection_pb2.ServerReflectionRequest(file_containing_symbol=service))}
        missing = [d for f in files.values() for d in f.dependency if d not in files]
        while missing:
            name = missing.pop()
            if name in files:
                continue
            for f in await ask(reflection_pb2.ServerReflectionRequest(file_by_filename=name)):
                files.setdefault(f.name, f)
                missing.extend(d for d in f.dependency if d not in files)
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
            raise StepError(ErrorCategory.VALIDATION, "the server offers no reflection service: give the message "
                            "types as `descriptor_set` (a base64 FileDescriptorSet)",
                            code="no_reflection") from exc  # fmt: skip
        raise  # classified as the call's own failure would be
    return _pool(list(files.values()))


def _method(pool: descriptor_pool.DescriptorPool, service: str, method: str) -> MethodDescriptor:
    try:
        found = pool.FindServiceByName(service)
    except KeyError:
        raise StepError(ErrorCategory.VALIDATION, f"no service {service!r} in the message types",
                        code="unknown_service") from None  # fmt: skip
    descriptor = found.methods_by_name.get(method)
    if descriptor is None:
        known = ", ".join(sorted(found.methods_by_name)) or "none"
        raise StepError(ErrorCategory.VALIDATION, f"service {service!r} has no method {method!r} (it has: {known})",
                        code="unknown_method")  # fmt: skip
    if descriptor.client_streaming or descriptor.server_streaming:
        raise StepError(ErrorCategory.VALIDATION, f"{service}/{method} streams; grpc_call makes unary calls only",
                        code="streaming_method")  # fmt: skip
    return descriptor


def _text_metadata(metadata: Any) -> dict[str, str]:
    return {str(k): str(v) for k, v in (metadata or ()) if not str(k).endswith("-bin")}

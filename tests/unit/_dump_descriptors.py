"""Prints the field table of a descriptor set as JSON: `ours` (server._proto) or `triton`
(tritonclient's copy). Run in a subprocess: both register the same names in protobuf's default
pool, so they cannot be imported into one process."""

from __future__ import annotations

import json
import sys
from typing import Any


def _type_name(f: Any) -> str:
    t = f.message_type or f.enum_type
    return t.full_name if t is not None else ""


def fields(fd: Any) -> dict[str, Any]:
    """{message full name: {field: [number, type, repeated, message/enum type name]}}"""
    out: dict[str, Any] = {}

    def rec(m: Any) -> None:
        out[m.full_name] = {
            f.name: [f.number, f.type, f.is_repeated, _type_name(f)] for f in m.fields
        }
        for n in m.nested_types:
            rec(n)

    for m in fd.message_types_by_name.values():
        rec(m)
    return out


def enums(fd: Any) -> dict[str, dict[str, int]]:
    """{enum full name: {value name: number}}, top-level and nested."""
    out: dict[str, dict[str, int]] = {}

    def add(e: Any) -> None:
        out[e.full_name] = {v.name: v.number for v in e.values}

    def rec(m: Any) -> None:
        for e in m.enum_types:
            add(e)
        for n in m.nested_types:
            rec(n)

    for e in fd.enum_types_by_name.values():
        add(e)
    for m in fd.message_types_by_name.values():
        rec(m)
    return out


def main(which: str) -> None:
    if which == "ours":
        from server._proto.inference import grpc_service_pb2 as p

        table = fields(p.DESCRIPTOR)
        table["__enums__"] = enums(p.DESCRIPTOR)
    else:
        from tritonclient.grpc import model_config_pb2 as c
        from tritonclient.grpc import service_pb2 as p

        table = {**fields(p.DESCRIPTOR), **fields(c.DESCRIPTOR)}
        table["__enums__"] = {**enums(p.DESCRIPTOR), **enums(c.DESCRIPTOR)}
    svc = p.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    table["__service__"] = {
        m.name: [
            m.input_type.full_name,
            m.output_type.full_name,
            m.client_streaming,
            m.server_streaming,
        ]
        for m in svc.methods
    }
    print(json.dumps(table))


if __name__ == "__main__":
    main(sys.argv[1])

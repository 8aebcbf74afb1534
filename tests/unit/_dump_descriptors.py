import json, sys
def msgs(fd):
    out={}
    def rec(m):
        out[m.full_name]={f.name:[f.number,f.type,f.label] for f in m.fields}
        for n in m.nested_types: rec(n)
    for m in fd.message_types_by_name.values(): rec(m)
    return out
if sys.argv[1]=="ours":
    from server._proto.inference import grpc_service_pb2 as p; d=msgs(p.DESCRIPTOR); s=p.DESCRIPTOR.services_by_name['GRPCInferenceService']
else:
    from tritonclient.grpc import service_pb2 as p, model_config_pb2 as c; d={**msgs(p.DESCRIPTOR),**msgs(c.DESCRIPTOR)}; s=p.DESCRIPTOR.services_by_name['GRPCInferenceService']
d["__service__"]={m.name:[m.input_type.full_name,m.output_type.full_name,m.client_streaming,m.server_streaming] for m in s.methods}
print(json.dumps(d))

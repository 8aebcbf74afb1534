"""microtune runtime: the worker process that owns onnxruntime sessions (and, on a GPU, the CUDA
context), plus the small IPC layer (`runtime.ipc`, `runtime.client`) the front process uses to
talk to it. The front may import `runtime.ipc.*`, `runtime.client` and `runtime.process` only."""

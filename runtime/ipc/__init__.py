"""Front <-> worker IPC: typed messages (protocol), shared-memory arena (shm), datatypes.
Importable by both processes; never imports onnxruntime or CUDA."""

"""The worker's engine: onnxruntime sessions (`session`, `model`), the dynamic batcher, CUDA
graphs per batch bucket (`buckets`, `graphs`, `graph_model`, `graph_registry`) and client CUDA
regions. Imported by the worker process only (the front never imports onnxruntime or CUDA)."""

"""Wait until a server writes its port file and reports a model ready (run_gpu_checks.sh).

    python scripts/gpu/wait_model_ready.py PORT_FILE MODEL TIMEOUT_S

Exit status 0 once ready, 1 on timeout. Uses tritonclient, as the examples that follow do.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path


def main(port_file: Path, model: str, timeout_s: float) -> int:
    import tritonclient.grpc as tg

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        port = port_file.read_text().strip() if port_file.exists() else ""
        if port:
            try:
                if tg.InferenceServerClient(f"127.0.0.1:{port}").is_model_ready(model):
                    print(f"server ready on port {port}: '{model}' is ready")
                    return 0
            except Exception:  # not listening yet
                pass
        time.sleep(0.5)
    print(f"'{model}' was not ready within {timeout_s:.0f} s", file=sys.stderr)
    return 1


if __name__ == "__main__":
    raise SystemExit(main(Path(sys.argv[1]), sys.argv[2], float(sys.argv[3])))

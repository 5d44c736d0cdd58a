"""One rank of a multi-process DeepSpeedBackend run, started by test_deepspeed.py.

Every rank: ``setup``; rank 0 then drives the run and the others ``serve_worker()``:
``python deepspeed_rank.py MODEL_DIR BATCH_PT CONFIG_JSON OUT_DIR STEPS`` with RANK,
LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set. Rank 0 writes ``OUT_DIR/result.pt``:
the metrics of each step, the log-probs after training, the exported weights, and whether
a save/load round trip restored them.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
import warnings
from pathlib import Path

import torch

# torch.distributed's own deprecation notices, raised from inside DeepSpeed's ZeRO-3 comm
warnings.filterwarnings("ignore", r"`torch\.distributed\.\w+` is deprecated", FutureWarning)

if importlib.util.find_spec("lightning_backends") is None:  # not pip-installed
    _src = Path(__file__).resolve().parents[2] / "backends"
    _spec = importlib.util.spec_from_file_location(
        "lightning_backends", _src / "__init__.py", submodule_search_locations=[str(_src)]
    )
    assert _spec is not None and _spec.loader is not None
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["lightning_backends"] = _module
    _spec.loader.exec_module(_module)

from lightning_backends._deepspeed import DeepSpeedBackend


def main() -> None:
    model_dir, batch_file, config_file, out_dir, steps = sys.argv[1:6]
    torch.set_num_threads(1)
    cfg = json.loads(Path(config_file).read_text())
    backend = DeepSpeedBackend()
    backend.setup(model_dir, cfg)
    if not backend.is_primary:
        backend.serve_worker()
        return
    time.sleep(2 * cfg.get("worker_poll_s", 0.0))  # workers poll a few idle rounds first
    batch = torch.load(batch_file, weights_only=False)
    metrics = [backend.train_step(batch) for _ in range(int(steps))]
    logprobs = backend.compute_logprobs(batch)  # [T]
    weights = {k: v.cpu() for k, v in backend.export_weights().items()}
    ckpt = str(Path(out_dir) / "ckpt")
    backend.save(ckpt)
    backend.train_step(batch)  # move away from the checkpoint...
    backend.load(ckpt)  # ...and back
    reloaded = {k: v.cpu() for k, v in backend.export_weights().items()}
    same = all(torch.equal(weights[k], reloaded[k]) for k in weights)
    torch.save(
        {
            "metrics": metrics,
            "logprobs": logprobs,
            "weights": weights,
            "reload_same": same,
            "step_after_load": backend.step,
            "world_size": backend.world_size,
        },
        Path(out_dir) / "result.pt",
    )
    backend.close()


if __name__ == "__main__":
    main()

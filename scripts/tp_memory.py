"""Peak resident memory of loading the model's weights, one rank of a world of N vs one shard.

    .venv/bin/python scripts/tp_memory.py [--world-size 3] [--model-id DIR]

Each measurement runs in a fresh process: peak RSS (ru_maxrss) after loading, minus the RSS
after importing torch. Ranks load straight from the safetensors files (no collective runs
while loading, so a group is not needed for this measurement).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = """
import json, resource, sys
sys.path.insert(0, {root!r})
import torch
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
from shard.distributed import Dist
from shard.models import load_model
model = load_model({model_dir!r}, torch.float32, "cpu", Dist({rank}, {world}))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
params = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps({{"peak_mib": (peak - base) / 1024, "weights_mib": params / 2**20}}))
"""


def measure(model_dir: str, rank: int, world: int) -> dict:
    code = CHILD.format(root=str(ROOT), model_dir=model_dir, rank=rank, world=world)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--world-size", type=int, default=3)
    parser.add_argument("--model-id", default=None)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from shard.checkpoint.model_files import resolve_model_dir

    model_dir = str(resolve_model_dir(args.model_id))
    single = measure(model_dir, 0, 1)
    print(f"world 1: peak +{single['peak_mib']:.0f} MiB, weights {single['weights_mib']:.0f} MiB")
    for rank in range(args.world_size):
        r = measure(model_dir, rank, args.world_size)
        print(
            f"world {args.world_size} rank {rank}: peak +{r['peak_mib']:.0f} MiB "
            f"({r['peak_mib'] / single['peak_mib']:.2f} of one shard), "
            f"weights {r['weights_mib']:.0f} MiB"
        )


if __name__ == "__main__":
    main()

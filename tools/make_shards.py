"""Write WebDataset tar shards + index.json (the same as ``dtrain shards``).

    python tools/make_shards.py digits --out data/digits --shard-size 200
    python tools/make_shards.py patches --count 8192 --out data/patches32
    python tools/make_shards.py folder path/to/images --size 64 --out data/mine
    python tools/make_shards.py cifar10 path/to/cifar-10-batches-py --out data/cifar10
    python tools/make_shards.py verify data/cifar10/index.json
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's dtrain, not another installed one

from dtrain.data.shards import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

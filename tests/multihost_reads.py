"""One process of a 2-process job (tests/prune/test_importance.py::test_two_processes_score_and_fingerprint_as_one):
joins jax.distributed on 127.0.0.1, loads the model sharded over every device of both processes (fsdp), computes
its weight fingerprint and importance scores from the same rows, reads a row-split array with
`sharding.to_host`, and (process 0) writes the results as JSON.

    python tests/multihost_reads.py PROCESS_ID PORT MODEL_DIR OUT.json
"""

import json
import sys

import jax
import numpy as np

import minitron_jax as mj
from minitron_jax.model.sharding import make_mesh, to_host
from minitron_jax.prune.importance import compute_scores, model_fingerprint


def main():
    pid, port, model_dir, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
    mesh = make_mesh(1, -1, 1)  # every device of both processes on fsdp: each process owns half of each weight
    model = mj.from_pretrained(model_dir, mesh=mesh)
    rows = np.random.default_rng(0).integers(0, model.config.vocab_size, (8, 32)).astype(np.int32)
    result = {"devices": jax.device_count(), "local": jax.local_device_count(),
              "fingerprint": model_fingerprint(model.config, model.params()),
              "scores": {k: v.tolist() for k, v in compute_scores(model.params(), model.config, rows, batch_size=4,
                                                                   mesh=mesh).items()}}
    split = jax.make_array_from_callback((8, 3), jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp")),
                                         lambda idx: np.arange(24, dtype=np.float32).reshape(8, 3)[idx])
    try:  # a plain read of an array whose rows the other process holds fails
        np.asarray(split)
        result["plain_read"] = "ok"
    except Exception as e:  # noqa: BLE001  (whatever jax raises for non-addressable shards)
        result["plain_read"] = type(e).__name__
    result["to_host"] = to_host(split).tolist()
    if pid == 0:
        with open(out, "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    main()

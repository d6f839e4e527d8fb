"""One process of a 2-process job (tests/io/test_hf.py::test_two_hosts_each_read_their_half_of_a_checkpoint_in_
cloud_storage): joins through MINITRON_COORDINATOR / _NUM_PROCESSES / _PROCESS_ID, loads a gs:// checkpoint
sharded over every device of both processes (fsdp) and writes the bytes it read and the weight fingerprint to
OUT/pN.json (each process its own file).

    python tests/gcs_load.py URL OUT
"""

import json
import sys
from pathlib import Path

import jax

import minitron_jax as mj
from minitron_jax.core import multihost, storage
from minitron_jax.model.sharding import make_mesh
from minitron_jax.prune.importance import model_fingerprint

if __name__ == "__main__":
    multihost.join()
    model = mj.from_pretrained(sys.argv[1], mesh=make_mesh(1, -1, 1))
    result = {"bytes_read": storage.bytes_read(), "fingerprint": model_fingerprint(model.config, model.params())}
    (Path(sys.argv[2]) / f"p{jax.process_index()}.json").write_text(json.dumps(result))

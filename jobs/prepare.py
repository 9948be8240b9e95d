"""Build a nodule store on the cluster (phantom, or LIDC-IDRI from a path the cluster can read).

    ray job submit --address http://127.0.0.1:8265 --working-dir . \
        --runtime-env jobs/runtime_env.yaml -- \
        python jobs/prepare.py --source phantom --out s3://bucket/stores/phantom --resume

Takes the same flags as ``cliplung prepare``. ``ray job submit`` gives the entry point
``RAY_ADDRESS``, so the scans run as Ray tasks (one CPU each, spread over the cluster's nodes):
the CPU worker group does the work and an autoscaler sees the queued tasks. ``--resume`` makes a
retried job continue from the scans an earlier attempt finished (kept under the store's
``_builds/`` prefix) instead of refusing to start.
"""

import sys

from cliplung.cli import main

if __name__ == "__main__":
    sys.exit(main(["prepare", *sys.argv[1:]]))

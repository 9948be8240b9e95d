"""Build a nodule store on the cluster (phantom, or LIDC-IDRI from a path the cluster can read).

    ray job submit --address http://127.0.0.1:8265 --working-dir . \
        --runtime-env jobs/runtime_env.yaml -- \
        python jobs/prepare.py --source phantom --out s3://bucket/stores/phantom --workers 8

Takes the same flags as ``cliplung prepare``.
"""

import sys

from cliplung.cli import main

if __name__ == "__main__":
    sys.exit(main(["prepare", *sys.argv[1:]]))

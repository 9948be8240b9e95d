"""Train CLIP-Lung on the Ray cluster this job was submitted to.

    ray job submit --address http://127.0.0.1:8265 --working-dir . \
        --runtime-env jobs/runtime_env.yaml -- \
        python jobs/train.py --config debug --data stores/phantom --storage /tmp/cliplung-runs --name demo

Takes the same flags as ``cliplung train``; resubmitting with the same --name and --storage
resumes from the newest complete checkpoint.
"""

import sys

from cliplung.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))

"""Run a hyperparameter search on the Ray cluster this job was submitted to.

    ray job submit --address http://127.0.0.1:8265 --working-dir . \
        --runtime-env jobs/runtime_env.yaml -- \
        python jobs/tune.py --config debug --data stores/phantom --storage /tmp/cliplung-runs \
            --name search1 --trials 16 --max-concurrent 2 --resources-per-trial workers=2

Takes the same flags as ``cliplung tune``; resubmitting with the same --name and --storage plus
--resume continues an interrupted search without re-running its finished trials.
"""

import sys

from cliplung.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))

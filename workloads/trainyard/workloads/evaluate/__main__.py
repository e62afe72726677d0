import sys

from trainyard.workloads.evaluate.runner import main

sys.exit(main())

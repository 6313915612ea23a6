import os
import sys

# Shared helpers (tests/_compare.py) import as top-level modules from any test folder.
sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402

# pytest-xdist runs one worker per core; torch's own thread pool per worker would oversubscribe
# the cores (a 4x slowdown measured on the 2-core CI machine).
torch.set_num_threads(1)

import os
import sys

# Shared helpers (tests/_compare.py) import as top-level modules from any test folder.
sys.path.insert(0, os.path.dirname(__file__))

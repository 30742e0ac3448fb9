import sys
from pathlib import Path

# tests/helpers.py and examples/ are importable from every test.
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "examples"))

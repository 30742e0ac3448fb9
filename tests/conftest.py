import sys
from pathlib import Path

# tests/helpers.py and examples/ are importable from every test.
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "examples"))



def pytest_collection_modifyitems(session, config, items):
    """The Ray tests last: once this process has connected to Ray, gRPC's threads stay, and
    each decomposition plans in a fresh interpreter (a fork beside them can crash,
    planning/plan.py), ~3.5 s a run here, which every later test in this process would pay."""
    items.sort(key=lambda item: item.path.name == "test_ray.py")  # stable: the rest keep their order

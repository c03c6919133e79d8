"""Shared test fixtures.

tests/fixtures/ travels with the project (README there: what each file is, where it came from, its
licence), so a bare clone passes its tests. ../shared beside the checkout, when it is there (CI has
it), adds larger optional files: the 22 MB VideoCrafter reference vectors of the tiny sizes,
raft_large, more real clips; the tests that need it are skipped, with the reason, without it.
"""
import os
import socket
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))
# pytest.ini runs the suite in one worker process per core (pytest-xdist); each worker gets its share of the
# threads, and so do the commands it starts (they inherit OMP_NUM_THREADS): more threads than cores spin.
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
THREADS = max(1, int(os.environ.get("OMP_NUM_THREADS", "2")) // WORKERS)
os.environ["OMP_NUM_THREADS"] = str(THREADS)
torch.set_num_threads(THREADS)


def user_error(main, argv):
    """Run a command's main(argv) in this process (no interpreter to start: the suite stays fast) and return the
    message of the user error it exits with, checked to be one line `error: ...`. A traceback would be an exception
    other than SystemExit here, and fail the test."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    message = str(exit_.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


def free_port():
    """A TCP port nothing listens on now (the OS picks it), for a torchrun rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def fixtures() -> Path:
    return FIXTURES


@pytest.fixture(scope="session")
def shared() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"needs the optional larger files of {SHARED}, which is not beside this checkout")
    return SHARED


def regenerate_weights(keys):
    """The weights of a compact reference file (tests/fixtures/*_small.pt), which stores no weights: each
    parameter is N(mean, std) from one generator seeded 0, drawn in the stored order (fixtures/README.md)."""
    g = torch.Generator().manual_seed(0)
    return {e["key"]: torch.randn(e["shape"], generator=g, dtype=torch.float32) * e["std"] + e["mean"] for e in keys}


# The files that take longest (pytest --durations, alone on 2 cores), longest first: given the longest files first
# the two workers end together; the rest follow in their order. pytest.ini's --no-loadscope-reorder keeps this order
# (xdist would otherwise start the files with the most tests first, and the GPU script's one long test last).
LONGEST_FIRST = ("test_gpu_script.py", "test_shard.py", "test_commands.py", "test_ablation.py", "test_robust.py",
                 "test_monitor.py", "test_train.py", "test_bench.py", "test_sequences.py")


def pytest_collection_modifyitems(items):
    """The longest files first (--dist loadfile: a file's tests on one worker, its module fixtures built once)."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))

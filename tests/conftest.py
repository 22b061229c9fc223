"""Session-wide test setup and shared fixtures.

tblite's C extension (GFN2-xTB labels, reprolab.equivariant.md_data) needs GOMP_5.0, which the libgomp bundled with
torch 2.2.1 lacks: whichever loads first wins, so every test process loads tblite before anything imports torch
(RESOURCES.md 4b). Without it, a test that imports the notebooks' modules after torch fails on import order alone.
"""
import tblite.interface  # noqa: F401  (must precede torch)

import pytest
import torch


@pytest.fixture
def float64():
    """Exact comparisons in double precision; restored afterwards so that other test modules are unaffected. A module
    opts in with ``pytestmark = pytest.mark.usefixtures("float64")``."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.fixture
def one_thread():
    """One torch intra-op thread for tiny tensors (several threads spin and crawl on a loaded 2-core machine); restored
    afterwards. A module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)

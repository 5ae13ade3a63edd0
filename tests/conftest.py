"""Test set-up: without a GPU, Triton runs through its interpreter, chosen before kernels import."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_collection_modifyitems(config, items):
    """GPU tests run only where CUDA is present."""
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture()
def embedded_model(tmp_path_factory, monkeypatch):
    """The shipped embedded model if it is built, else the same architecture with random weights."""
    from safetensors.torch import save_file

    from sla2cli.embedded.config import ASSETS_DIR, CONFIG_FILENAME, WEIGHTS_FILENAME, default_config, save_config
    from sla2cli.embedded.loading import build_embedded_model

    if (ASSETS_DIR / CONFIG_FILENAME).is_file() and (ASSETS_DIR / WEIGHTS_FILENAME).is_file():
        return
    folder = tmp_path_factory.mktemp("embedded-assets")
    torch.manual_seed(0)
    weights = {key: value.contiguous() for key, value in build_embedded_model().state_dict().items()}
    save_file(weights, str(folder / WEIGHTS_FILENAME))
    save_config(default_config(), folder / CONFIG_FILENAME)
    monkeypatch.setattr("sla2cli.embedded.loading.ASSETS_DIR", folder)


@pytest.fixture(autouse=True)
def without_shipped_sla2(monkeypatch, tmp_path_factory):
    """Every test sees a package without shipped SLA2 weights unless it installs its own (tests of the
    shipped path do, with a fake asset), so `sla2 convert` gives the untrained conversion the tests were
    written for whether or not the real assets are in place."""
    monkeypatch.setattr("sla2cli.embedded.shipped_sla2.ASSETS_DIR",
                        tmp_path_factory.getbasetemp() / "no-shipped-sla2")


@pytest.fixture()
def wide_console(monkeypatch):
    """rich wraps at the console width (80 without a terminal); messages are checked as single lines."""
    monkeypatch.setenv("COLUMNS", "300")


@pytest.fixture()
def one_thread():
    """Many tiny ops: one intra-op thread keeps them fast on a busy machine (restored afterwards)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)

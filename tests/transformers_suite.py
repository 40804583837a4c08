"""transformers' own common test mixins, loaded from the source distribution of the installed version.

Every transformers release ships its shared model/processor test suites (`ModelTesterMixin`, `ConfigTester`,
`VideoProcessingTestMixin`, `ProcessorTesterMixin`) in the `tests/` folder of its source distribution, not in the
wheel. We run them against our classes the way transformers' in-tree model tests do, without copying them:

- `.ci/run` downloads the sdist of the installed version and points `TRANSFORMERS_TESTS_DIR` at its `tests/`;
- elsewhere the first use downloads it once into `~/.cache/stan/` (pip reaches PyPI);
- where neither works the calling test module is skipped, except under CI (`CI=true`), where that is an error.

The sdist holds only the top-level `tests/*.py`. The few modules they import from sub-folders of the transformers
repository are not in it; `_install_absent_modules` stands in for them (see each stand-in's docstring).
"""

import importlib
import importlib.machinery
import os
import subprocess
import sys
import tarfile
import tempfile
import types
from pathlib import Path
from unittest import mock

import pytest
import transformers


PACKAGE = "transformers_common_tests"
VERSION = transformers.__version__
CACHE_DIR = Path(os.environ.get("STAN_CACHE_DIR", Path.home() / ".cache" / "stan")) / f"transformers-{VERSION}-tests"


def _download_tests(destination: Path) -> None:
    """Fetch the sdist of the installed transformers version and keep only its top-level `tests/*.py`."""
    with tempfile.TemporaryDirectory() as download_dir:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--no-deps",
                "--no-binary",
                ":all:",
                "--dest",
                download_dir,
                f"transformers=={VERSION}",
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        (archive,) = Path(download_dir).glob("transformers-*.tar.gz")
        partial = destination.with_name(destination.name + ".partial")
        partial.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archive) as tar:
            for member in tar.getmembers():
                parts = Path(member.name).parts
                if len(parts) == 3 and parts[1] == "tests" and parts[2].endswith(".py") and member.isfile():
                    (partial / parts[2]).write_bytes(tar.extractfile(member).read())
        partial.rename(destination)  # atomic: a half-written cache is never taken for a whole one


def transformers_tests_dir() -> Path:
    """The folder holding transformers' `test_*_common.py` for the installed version."""
    explicit = os.environ.get("TRANSFORMERS_TESTS_DIR")
    if explicit:
        path = Path(explicit)
        if not (path / "test_modeling_common.py").is_file():
            raise FileNotFoundError(f"TRANSFORMERS_TESTS_DIR={explicit} has no test_modeling_common.py")
        return path
    if not (CACHE_DIR / "test_modeling_common.py").is_file():
        try:
            _download_tests(CACHE_DIR)
        except (subprocess.CalledProcessError, OSError, ValueError) as error:
            detail = getattr(error, "stderr", "") or error
            message = f"transformers {VERSION} source distribution could not be fetched: {detail}"
            if os.environ.get("CI", "").lower() == "true":
                raise RuntimeError(message) from error
            pytest.skip(message, allow_module_level=True)
    return CACHE_DIR


def _module(name: str, **attributes) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    sys.modules[name] = module
    return module


class ExportTesterMixin:
    """Stand-in for `tests/exporters/test_export.py`, which the sdist lacks: its export tests cannot run from the
    sdist. Our own export tests (tests/test_export.py) cover `torch.export` and ONNX instead."""


class GenerationTesterMixin:
    """Stand-in for `tests/generation/test_utils.py`: STAN does not generate, so no tester inherits it."""


# Stand-in for `tests/utils/test_configuration_utils.py`: non-default values for PretrainedConfig's common
# arguments. `ConfigTester.check_config_arguments_init` only reads it for configs without sub-configs.
CONFIG_COMMON_KWARGS = {
    "return_dict": False,
    "output_hidden_states": True,
    "output_attentions": True,
    "dtype": "float16",
    "chunk_size_feed_forward": 5,
    "architectures": ["StanModel"],
    "id2label": {0: "first", 1: "second"},
    "label2id": {"first": 0, "second": 1},
    "problem_type": "single_label_classification",
}


def url_to_local_path(url, **kwargs):
    """Stand-in for transformers' `utils/fetch_hub_objects_for_ci.py`: without a pre-fetched hub cache the
    original returns the URL unchanged, and so does this."""
    return url


def _install_absent_modules() -> None:
    _module(f"{PACKAGE}.exporters", __path__=[])
    _module(f"{PACKAGE}.exporters.test_export", ExportTesterMixin=ExportTesterMixin)
    _module(f"{PACKAGE}.generation", __path__=[])
    _module(f"{PACKAGE}.generation.test_utils", GenerationTesterMixin=GenerationTesterMixin)
    _module(f"{PACKAGE}.utils", __path__=[])
    _module(f"{PACKAGE}.utils.test_configuration_utils", config_common_kwargs=CONFIG_COMMON_KWARGS)
    _module("fetch_hub_objects_for_ci", url_to_local_path=url_to_local_path)


def load(module_name: str) -> types.ModuleType:
    """Import `tests/<module_name>.py` of the installed transformers version, e.g. `load("test_modeling_common")`."""
    if PACKAGE not in sys.modules:
        tests_dir = transformers_tests_dir()
        package = _module(PACKAGE, __path__=[str(tests_dir)])
        package.__spec__ = importlib.machinery.ModuleSpec(PACKAGE, None, is_package=True)
        package.__spec__.submodule_search_locations = [str(tests_dir)]
        _install_absent_modules()
    # The suites call `direct_transformers_import(<tests dir>)` to import the transformers source tree that sits
    # beside them in the repository; here that tree is the installed package.
    with mock.patch("transformers.utils.direct_transformers_import", lambda *args, **kwargs: transformers):
        return importlib.import_module(f"{PACKAGE}.{module_name}")

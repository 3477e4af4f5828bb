"""What differs between edgeai-benchmark releases, as far as a generated config entry is concerned.

edgeai-benchmark 9.2 is TexasInstruments/edgeai-benchmark branch ``r9.2``; 10.0 onwards live in
TexasInstruments/edgeai-tensorlab under ``edgeai-benchmark/`` (branches ``r10.0`` ... ``r11.2``). Each fact below was
read at those branches and checked by running them (``bench/conformance_snippets.py``):

- 9.2 and 10.0 (``edgeai_benchmark/config_settings.py``, the "legacy" family): a YAML config must carry
  ``session.runtime_options.info.prequantized_model_type`` (r9.2 ``interfaces/get_configs_from_file.py`` L63,
  tensorlab r10.0 the same line); a Python config is loaded with ``--configs_path`` (``utils.import_folder``: a folder
  or a module path without ``.py``); ``model_shortlist`` defaults to ``null`` (``settings_base.yaml`` L64).
- 10.1 onwards (``edgeai_benchmark/core/runtime_options.py``): no ``info``; 11.0 adds ``settings.external_models_path``
  (r11.0/r11.2 ``configs/__init__.py`` L95-96: one extra ``get_configs`` file merged into TI's own configs) and the
  default ``model_shortlist: 100`` (r11.0 ``settings_base.yaml`` L67, r11.2 L69), under which the pipeline runner drops
  any entry whose ``model_info`` has no ``model_shortlist`` (r11.2 ``pipelines/pipeline_runner.py`` L374-377).
- Every release: the YAML loader applies the device preset (``settings.runtime_options``) after the config's own
  runtime options and turns scale type 4 into 1 on TDA4VM (r9.2 ``get_configs_from_file.py`` L76-82; r10.1/r11.2
  L103-108), so a YAML config cannot choose the scale type. The Python entry's ``ext_options`` are applied last in
  every release (r9.2 ``config_settings.py`` L90-94; r11.2 ``core/runtime_options.py`` L180-184).
"""

from __future__ import annotations

from dataclasses import dataclass

from tiexport.errors import UsageError

__all__ = ["BENCHMARK_VERSIONS", "BenchmarkVersion", "get_benchmark_version"]


@dataclass(frozen=True)
class BenchmarkVersion:
    """One edgeai-benchmark release line, reduced to what a config entry must differ by."""

    name: str
    repo: str
    branch: str
    legacy: bool
    """9.2 / 10.0: ``config_settings.py``, YAML runtime options carry ``info.prequantized_model_type``."""
    external_models_path: bool
    """``settings.external_models_path`` exists (11.0 onwards)."""
    default_model_shortlist: int | None
    """``model_shortlist`` in TI's ``settings_base.yaml`` (entries without one are dropped when it is set)."""

    @property
    def dataset_init(self) -> str:
        """The ``datasets`` function TI's ``configs/__init__.py`` fills ``settings.dataset_cache`` with (r9.2 L50-51:
        ``get_datasets``; tensorlab r10.0 .. r11.2: ``initialize_datasets``)."""
        return "get_datasets" if self.name == "9.2" else "initialize_datasets"

    @property
    def root(self) -> str:
        """Where edgeai-benchmark sits in its repository."""
        return "" if self.repo.endswith("edgeai-benchmark") else "edgeai-benchmark/"


_EB = "TexasInstruments/edgeai-benchmark"
_TL = "TexasInstruments/edgeai-tensorlab"
_VERSIONS: dict[str, BenchmarkVersion] = {
    "9.2": BenchmarkVersion("9.2", _EB, "r9.2", True, False, None),
    "10.0": BenchmarkVersion("10.0", _TL, "r10.0", True, False, None),
    "10.1": BenchmarkVersion("10.1", _TL, "r10.1", False, False, None),
    "11.0": BenchmarkVersion("11.0", _TL, "r11.0", False, True, 100),
    "11.1": BenchmarkVersion("11.1", _TL, "r11.1", False, True, 100),
    "11.2": BenchmarkVersion("11.2", _TL, "r11.2", False, True, 100),
}
BENCHMARK_VERSIONS: tuple[str, ...] = tuple(_VERSIONS)


def get_benchmark_version(version: str | None, sdk: str) -> BenchmarkVersion:
    """The release named by ``version`` ("9.2" ... "11.2", also "r11.0" or "11.x" for the newest 11 release), or the
    one released with TIDL SDK ``sdk`` when None (edgeai-benchmark branches follow the SDK: r9.2 with 9.2, r11.0 with
    11.0)."""
    if version is None:
        name = sdk if sdk in _VERSIONS else BENCHMARK_VERSIONS[-1]
        return _VERSIONS[name]
    if not isinstance(version, str):
        raise UsageError(f"benchmark_version must be a string such as '11.0', got {type(version).__name__}")
    key = version.strip().lower().removeprefix("r")
    if key.endswith(".x"):
        line = [v for v in BENCHMARK_VERSIONS if v.startswith(key[:-1])]
        if line:
            return _VERSIONS[line[-1]]
    if key in _VERSIONS:
        return _VERSIONS[key]
    raise UsageError(f"unknown edgeai-benchmark version {version!r}; known: {', '.join(BENCHMARK_VERSIONS)} "
                     "(or 10.x / 11.x)")

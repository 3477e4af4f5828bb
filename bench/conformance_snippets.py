"""Do tiexport's snippets load and run in TI's real tools, unchanged? (issue 17)

For every edgeai-benchmark checkout given, every device and two fixture models (per-tensor power-of-2 and per-channel
non-power-of-2), this writes the ``benchmark`` (.py), ``yaml`` and ``tidl-json`` snippets and then, in a separate
Python that has edgeai-benchmark's requirements (``TI_BENCH_PYTHON``), with settings built as TI's
``scripts/benchmark_modelzoo.py`` builds them (``settings_import_on_pc.yaml``, ``--target_device``, no datasets):

- loads the .py through ``--configs_path`` (``utils.import_folder``; 11.x also through ``external_models_path``) and
  the YAML through ``interfaces.get_configs`` with ``configs_path``;
- checks that the pipeline runner's default model selection keeps the entry (11.x: ``model_shortlist: 100``);
- compares the runtime options each entry ends up with against tidl-json, key by key (paths aside);
- on AM62 runs inference end to end (import + inference, stock onnxruntime, CPU) from both the .py entry and the
  YAML on a four-image stand-in ImageNet folder, and checks that the output agrees with onnxruntime run directly on
  the same preprocessed input.

With ``TI_TIDLRUNNER`` it also loads the ``tidlrunner`` format through edgeai-tidlrunner's own config upgrade.

Environment: ``TI_EDGEAI_BENCHMARK_92`` (TexasInstruments/edgeai-benchmark at r9.2), ``TI_EDGEAI_BENCHMARK_10``
(edgeai-tensorlab r10.x ``edgeai-benchmark/``), ``TI_EDGEAI_BENCHMARK_11`` (edgeai-tensorlab r11.x
``edgeai-benchmark/``), ``TI_TIDLRUNNER`` (edgeai-tidlrunner checkout), ``TI_BENCH_PYTHON`` (default ``python3``).
``TIDL_TOOLS_PATH`` is pointed at an empty folder named after the device. Run:
``.venv/bin/python bench/conformance_snippets.py [--out DIR]``; it prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

DEVICES = ("TDA4VM", "AM62A", "AM67A", "AM68A", "AM69A", "AM62")
CHECKOUTS = {"9.2": "TI_EDGEAI_BENCHMARK_92", "10.x": "TI_EDGEAI_BENCHMARK_10", "11.x": "TI_EDGEAI_BENCHMARK_11"}


# ------------------------------------------------------------------------------------------------ worker side
# Runs inside edgeai-benchmark's folder with its requirements; imports nothing of tiexport.
def _tiny_imagenet(root: Path) -> Path:
    """16 32x32 images in ImageNet's folder layout (val/<wnid>/x.JPEG) with a val.txt: enough for a pipeline (the
    import needs at least calibration_frames = 12 frames)."""
    import numpy as np
    from PIL import Image

    val = root / "val"
    lines = []
    rng = np.random.default_rng(0)
    for i in range(16):
        d = val / f"n{i % 4:08d}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(d / f"img{i}.JPEG")
        lines.append(f"n{i % 4:08d}/img{i}.JPEG {i % 4}")
    (root / "val.txt").write_text("\n".join(lines) + "\n")
    return root


def _options_of(cfg: dict[str, Any]) -> dict[str, Any]:
    session = cfg["session"]
    opts = session.peek_param("runtime_options") if hasattr(session, "peek_param") \
        else session.kwargs["runtime_options"]
    return {k: (v if isinstance(v, (int, float, str, bool, type(None))) else repr(v)) for k, v in opts.items()}


def worker(job_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    sys.path.insert(0, os.getcwd())
    from edgeai_benchmark import config_settings, datasets, interfaces, pipelines

    dev = job["device"]
    legacy = job["version"] == "9.2"
    kwargs: dict[str, Any] = {"target_device": dev, "dataset_loading": False}
    if legacy:
        kwargs["dataset_loading"] = False
    settings = config_settings.ConfigSettings("settings_import_on_pc.yaml", **kwargs)
    work_dir = os.path.join(job["work"], "work_dirs", dev)
    results: dict[str, Any] = {"device": dev, "model_shortlist": settings.model_shortlist}
    cache = datasets.get_datasets(settings) if legacy else None
    if cache is not None:
        settings.dataset_cache = cache

    def fresh_cache() -> None:
        if legacy:
            settings.dataset_cache = datasets.get_datasets(settings)
        else:
            settings.dataset_cache = None

    def selected(configs: dict[str, Any]) -> dict[str, Any]:
        runner = pipelines.PipelineRunner(settings, configs)
        return runner.pipeline_configs

    for model in job["models"]:
        r: dict[str, Any] = {}
        # .py through --configs_path (a module path without .py), as utils.import_folder takes it
        try:
            fresh_cache()
            settings.configs_path = model["py"][:-3]
            configs = interfaces.get_configs(settings, work_dir)
            kept = selected(configs)
            r["py_load"] = "ok"
            r["py_kept"] = model["key"] in kept
            r["py_options"] = _options_of(configs[model["key"]])
        except Exception as exc:
            r["py_load"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]
        if hasattr(settings, "external_models_path") and not legacy and job["external"]:
            try:
                fresh_cache()
                settings.configs_path = "./configs"
                settings.external_models_path = model["py"]
                configs = interfaces.get_configs(settings, work_dir)
                kept = selected(configs)
                r["ext_load"] = "ok" if model["key"] in configs else "missing"
                r["ext_kept"] = model["key"] in kept
            except Exception as exc:
                r["ext_load"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]
            settings.external_models_path = None
        try:
            fresh_cache()
            settings.configs_path = model["yaml"]
            configs = interfaces.get_configs(settings, work_dir)
            key = next(iter(configs))
            kept = selected(configs)
            r["yaml_load"] = "ok"
            r["yaml_kept"] = key in kept
            r["yaml_options"] = _options_of(configs[key])
        except Exception as exc:
            r["yaml_load"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]
        if dev == "AM62" and job.get("run"):
            r.update(_run_am62(settings, work_dir, model, legacy, interfaces, datasets, pipelines))
        results[model["name"]] = r
    Path(job["result"]).write_text(json.dumps(results, indent=1, default=str))


def _run_am62(settings: Any, work_dir: str, model: dict[str, Any], legacy: bool, interfaces: Any, datasets: Any,
              pipelines: Any) -> dict[str, Any]:
    """Import + inference on the Arm-core path (tidl_offload off), from the .py entry and from the YAML."""
    import numpy as np

    out: dict[str, Any] = {}
    root = _tiny_imagenet(Path(work_dir) / "tiny_imagenet")
    for kind, path in (("py", model["py"][:-3]), ("yaml", model["yaml"])):
        try:
            ds_cls = datasets.ImageClassification
            ds_kwargs = dict(path=str(root / "val"), split=str(root / "val.txt"), num_classes=1000, num_frames=16,
                             name="imagenet")
            settings.dataset_cache = {"imagenet": {"calibration_dataset": ds_cls(**ds_kwargs),
                                                   "input_dataset": ds_cls(**ds_kwargs)}}
            if legacy:
                full = datasets.get_datasets(settings)
                full.update(settings.dataset_cache)
                settings.dataset_cache = full
            settings.configs_path = path
            settings.num_frames = 16
            run_dir = os.path.join(work_dir, f"run_{kind}_{model['name']}")
            configs = interfaces.get_configs(settings, run_dir)
            for cfg in configs.values():
                for k in ("calibration_dataset", "input_dataset"):
                    if isinstance(cfg.get(k), str):
                        cfg[k] = settings.dataset_cache[cfg[k]][k]
            if legacy:  # 9.2's run_accuracy takes import and inference in separate calls
                for imp, inf in ((True, False), (False, True)):
                    settings.run_import, settings.run_inference = imp, inf
                    res = _run_legacy(settings, run_dir, configs, pipelines)
            else:
                res = interfaces.run_benchmark_config(settings, run_dir, pipeline_configs=configs)
            del res  # TI's runner reports success even when a stage failed: read what inference wrote instead
            found = sorted(Path(run_dir).rglob("result.yaml"))
            metric = None
            for f in found:
                text = f.read_text()
                if "accuracy_top1%" in text:
                    metric = next(ln.strip() for ln in text.splitlines() if "accuracy_top1%" in ln)
            out[f"{kind}_run"] = f"ok ({metric})" if metric else "failed: no result.yaml with accuracy_top1%"
        except Exception as exc:
            out[f"{kind}_run"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]
    del np
    return out


def _run_legacy(settings: Any, run_dir: str, configs: dict[str, Any], pipelines: Any) -> Any:
    from edgeai_benchmark import interfaces

    if hasattr(interfaces, "run_accuracy"):
        return interfaces.run_accuracy(settings, run_dir, pipeline_configs=configs)
    return pipelines.PipelineRunner(settings, configs).run()


# ------------------------------------------------------------------------------------------------ driver side
def _write_snippets(out: Path, device: str, version: str, label: str) -> list[dict[str, Any]]:
    import onnx

    from fixtures.models import tiny_conv
    from tiexport.snippets import IncompatibleModelError, snippet

    models = {"p2": tiny_conv(), "perchannel": tiny_conv(w_per_channel=True, w_p2=False)}
    written = []
    for name, proto in models.items():
        folder = out / label / device / name
        folder.mkdir(parents=True, exist_ok=True)
        mpath = folder / f"snip_{name}.onnx"
        onnx.save(proto, str(mpath))
        entry: dict[str, Any] = {"name": name, "key": f"cl-snip_{name}"}
        try:
            for fmt, ext in (("benchmark", "py"), ("yaml", "yaml"), ("tidlrunner", "tidlrunner.yaml")):
                p = folder / f"snip_{name}.{ext}"
                p.write_text(snippet(str(mpath), device, fmt, benchmark_version=version))
                entry[ext.split(".")[0] if ext != "tidlrunner.yaml" else "tidlrunner"] = str(p)
            if device != "AM62":
                entry["tidl_json"] = json.loads(snippet(str(mpath), device, "tidl-json", benchmark_version=version))
        except IncompatibleModelError as exc:
            entry["refused"] = str(exc)
        written.append(entry)
    return written


def _compare(tidl: dict[str, Any] | None, got: dict[str, Any] | None) -> str:
    if tidl is None:
        return "n/a"
    if got is None:
        return "not loaded"
    diff = [f"{k}: {got.get(k, '<missing>')!r} != {v!r}" for k, v in tidl.items()
            if k not in ("tidl_tools_path", "artifacts_folder") and got.get(k, "<missing>") != v]
    return "same" if not diff else "; ".join(diff)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="work folder (default: a temporary one)")
    ap.add_argument("--devices", nargs="*", default=list(DEVICES))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.worker)
        return 0
    py = os.environ.get("TI_BENCH_PYTHON", "python3")
    out = (args.out or Path(tempfile.mkdtemp(prefix="conformance_snippets_"))).resolve()
    rows: list[str] = ["| version | device | model | .py loads | .py kept | .py options vs tidl-json | yaml loads | "
                       "yaml kept | yaml options vs tidl-json | AM62 run .py / yaml |", "|" + "---|" * 10]
    versions = {v: os.environ[e] for v, e in CHECKOUTS.items() if os.environ.get(e)}
    if not versions:
        print("set TI_EDGEAI_BENCHMARK_92 / _10 / _11 to edgeai-benchmark checkouts", file=sys.stderr)
        return 2
    summary: dict[str, Any] = {}
    for version, checkout in versions.items():
        bench_version = {"9.2": "9.2", "10.x": "10.1", "11.x": "11.2"}[version]
        for dev in args.devices:
            models = _write_snippets(out, dev, bench_version, version)
            tools = out / "tidl_tools" / dev
            tools.mkdir(parents=True, exist_ok=True)
            job = {"device": dev, "version": version, "work": str(out / version / dev),
                   "result": str(out / version / dev / "result.json"), "run": dev == "AM62",
                   "external": version == "11.x",
                   "models": [{k: m[k] for k in ("name", "key", "py", "yaml")} for m in models if "py" in m]}
            job_path = out / version / dev / "job.json"
            job_path.write_text(json.dumps(job))
            env = {**os.environ, "TIDL_TOOLS_PATH": str(tools), "PYTHONPATH": checkout}
            proc = subprocess.run([py, str(Path(__file__).resolve()), "--worker", str(job_path)], cwd=checkout,
                                  env=env, capture_output=True, text=True, timeout=1200)
            (out / version / dev / "worker.log").write_text(proc.stdout + proc.stderr)
            res = json.loads(Path(job["result"]).read_text()) if Path(job["result"]).exists() else {}
            if not res:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
                rows.append(f"| {version} | {dev} | - | worker failed: {tail[0][:120]} |||||||")
                continue
            for m in models:
                r = res.get(m["name"], {})
                tj = m.get("tidl_json")
                run = f"{r.get('py_run', '-')} / {r.get('yaml_run', '-')}" if dev == "AM62" else "-"
                rows.append(f"| {version} ({bench_version}) | {dev} | {m['name']} | {r.get('py_load')} | "
                            f"{r.get('py_kept')}{' (ext: ' + str(r.get('ext_kept')) + ')' if 'ext_kept' in r else ''}"
                            f" | {_compare(tj, r.get('py_options'))} | {r.get('yaml_load')} | {r.get('yaml_kept')} | "
                            f"{_compare(tj, r.get('yaml_options'))} | {run} |")
                summary[f"{version}/{dev}/{m['name']}"] = r
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    print("\n".join(rows))
    print(f"\n(work folder: {out})")
    return 0


if __name__ == "__main__":
    if "--worker" not in sys.argv:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())

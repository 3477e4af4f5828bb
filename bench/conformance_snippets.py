"""Do tiexport's snippets load and run in TI's real tools, unchanged? (issue 17)

For every edgeai-benchmark checkout given, every device and two fixture models (per-tensor power-of-2 and per-channel
non-power-of-2), this writes the ``benchmark`` (.py), ``yaml`` and ``tidl-json`` snippets and then, in a separate
Python that has edgeai-benchmark's requirements (``TI_BENCH_PYTHON``), with settings built as TI's
``scripts/benchmark_modelzoo.py`` builds them (``settings_import_on_pc.yaml``, ``--target_device``, no datasets):

- loads the .py through ``--configs_path`` (``utils.import_folder``; 11.x also through ``external_models_path``) and
  the YAML through ``interfaces.get_configs`` with ``configs_path``;
- checks that the pipeline runner's default model selection keeps the entry (11.x: ``model_shortlist: 100``);
- compares the runtime options each entry ends up with against tidl-json, key by key (paths aside);
- on AM62 runs import and inference end to end (stock onnxruntime, CPU) from both the .py entry and the YAML on a
  32-image stand-in ImageNet folder, and checks that inference wrote its ``accuracy_top1%`` result (10.1 onwards also
  with a shim for TI's statistics step, which fails with stock onnxruntime for every model: see ``_run_am62``).

With ``TI_TIDLRUNNER`` it also loads the ``tidlrunner`` format through edgeai-tidlrunner's own config upgrade.

Environment: ``TI_EDGEAI_BENCHMARK_92`` (TexasInstruments/edgeai-benchmark at r9.2), ``TI_EDGEAI_BENCHMARK_10``
(edgeai-tensorlab r10.x ``edgeai-benchmark/``), ``TI_EDGEAI_BENCHMARK_11`` (edgeai-tensorlab r11.x
``edgeai-benchmark/``), ``TI_EDGEAI_BENCHMARKS`` (more checkouts, separated by ``os.pathsep``), ``TI_TIDLRUNNER``
(edgeai-tidlrunner checkout), ``TI_BENCH_PYTHON`` (default ``python3``). Each checkout's release is read from its
``version.py`` and the snippets are written for that release (``--benchmark-version``).
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
EXTRAS: dict[str, Any] = {"deny_layer_types": ["Softmax"], "deny_layer_names": ["flatten"]}
"""Compile options of the ``*_deny`` model: they must reach TIDL through every loader too."""
CHECKOUTS = ("TI_EDGEAI_BENCHMARK_92", "TI_EDGEAI_BENCHMARK_10", "TI_EDGEAI_BENCHMARK_11")


def checkout_release(checkout: str) -> str:
    """``major.minor`` of an edgeai-benchmark checkout, from its version.py (9.2: at the root; tensorlab:
    ``edgeai_benchmark/version.py``)."""
    import re

    for rel in ("version.py", "edgeai_benchmark/version.py"):
        f = Path(checkout) / rel
        if f.exists():
            m = re.search(r"__version__\s*=\s*['\"](\d+)\.(\d+)", f.read_text())
            if m:
                return f"{int(m.group(1))}.{int(m.group(2))}"
    raise SystemExit(f"{checkout}: no version.py with __version__ (not an edgeai-benchmark checkout?)")


# ------------------------------------------------------------------------------------------------ worker side
# Runs inside edgeai-benchmark's folder with its requirements; imports nothing of tiexport.
def _tiny_imagenet(root: Path) -> Path:
    """32 32x32 images in ImageNet's folder layout (val/<wnid>/x.JPEG) with a val.txt: enough for a pipeline (the
    import needs at least calibration_frames frames: 12 in 11.x, 25 in 9.2)."""
    import numpy as np
    from PIL import Image

    val = root / "val"
    lines = []
    rng = np.random.default_rng(0)
    for i in range(32):
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
    """Import + inference on the Arm-core path (tidl_offload off), from the .py entry and from the YAML.

    10.1 onwards, every model fails on a PC with stock onnxruntime in the statistics step after inference:
    ``infer_stats`` leaves ``perfsim_time`` None without TI's onnxruntime build (r11.2 ``sessions/basert_session.py``
    L215-241) and ``accuracy_pipeline.py`` multiplies it (r11.2 L261-262; r10.1 L249-250); 9.2 set 0.0. Such a run is
    repeated once, in-process, with ``infer_stats`` giving 0.0 for the missing perfsim values as 9.2 does, and both
    outcomes are reported."""
    out: dict[str, Any] = {}
    root = _tiny_imagenet(Path(work_dir) / "tiny_imagenet")
    for kind, path in (("py", model["py"][:-3]), ("yaml", model["yaml"])):
        first = _am62_once(settings, work_dir, model, kind, path, root, legacy, interfaces, datasets, pipelines,
                           shim=False)
        if first.startswith("ok"):
            out[f"{kind}_run"] = first
            continue
        second = _am62_once(settings, work_dir, model, kind, path, root, legacy, interfaces, datasets, pipelines,
                            shim=True)
        out[f"{kind}_run"] = f"as built: {first}; with the perfsim-stats shim: {second}"
    return out


def _am62_once(settings: Any, work_dir: str, model: dict[str, Any], kind: str, path: str, root: Path, legacy: bool,
               interfaces: Any, datasets: Any, pipelines: Any, shim: bool) -> str:
    from edgeai_benchmark.sessions import basert_session

    original = basert_session.BaseRTSession.infer_stats
    parallel = settings.parallel_processes
    try:
        if shim:
            def infer_stats(self: Any) -> dict[str, Any]:
                stats = original(self)
                for key in ("perfsim_macs", "perfsim_time", "perfsim_ddr_transfer"):
                    if stats.get(key, 0.0) is None:
                        stats[key] = 0.0
                return stats

            basert_session.BaseRTSession.infer_stats = infer_stats
            settings.parallel_processes = None  # spawned workers would not see the patch
        ds_cls = datasets.ImageClassification
        n = 32  # the import wants calibration_frames (9.2: 25) frames
        ds_kwargs = dict(path=str(root / "val"), split=str(root / "val.txt"), num_classes=1000, num_frames=n,
                         name="imagenet")
        cache = datasets.get_datasets(settings) if legacy else {}
        cache["imagenet"] = {"calibration_dataset": ds_cls(**ds_kwargs), "input_dataset": ds_cls(**ds_kwargs)}
        settings.dataset_cache = cache
        settings.configs_path = path
        settings.num_frames = n
        run_dir = os.path.join(work_dir, f"run_{kind}_{model['name']}{'_shim' if shim else ''}")
        configs = interfaces.get_configs(settings, run_dir)
        for cfg in configs.values():  # TI's YAML names the dataset; its pipeline runner looks it up the same way
            for k in ("calibration_dataset", "input_dataset"):
                if isinstance(cfg.get(k), str):
                    cfg[k] = settings.dataset_cache[cfg[k]][k]
        if hasattr(interfaces, "run_accuracy"):  # 9.2/10.0: import and inference in separate calls
            for imp, inf in ((True, False), (False, True)):
                settings.run_import, settings.run_inference = imp, inf
                _run_legacy(settings, run_dir, configs, pipelines)
        else:
            interfaces.run_benchmark_config(settings, run_dir, pipeline_configs=configs)
        # TI's runner reports success even when a stage failed: read what inference wrote instead
        for f in sorted(Path(run_dir).rglob("result.yaml")):
            text = f.read_text()
            if "accuracy_top1%" in text:
                return "ok (" + next(ln.strip() for ln in text.splitlines() if "accuracy_top1%" in ln) + ")"
        ran = any(f"{n}/{n}" in f.read_text(errors="replace") for f in Path(run_dir).rglob("run.log"))
        return ("failed after inference ran all frames (run.log), no result.yaml" if ran
                else "failed (no result.yaml with accuracy_top1%; see worker.log)")
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]
    finally:
        basert_session.BaseRTSession.infer_stats = original
        settings.parallel_processes = parallel


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

    # 1x1 classifiers (4 classes): TI's classification postprocess and top-1 evaluation need [1, N] logits
    models = {"p2": _classifier(tiny_conv(size=1, kernel=1)),
              "perchannel": _classifier(tiny_conv(size=1, kernel=1, w_per_channel=True, w_p2=False)),
              "p2_deny": _classifier(tiny_conv(size=1, kernel=1))}
    written = []
    for name, proto in models.items():
        extra = EXTRAS if name.endswith("_deny") else {}
        folder = out / label / device / name
        folder.mkdir(parents=True, exist_ok=True)
        mpath = folder / f"snip_{name}.onnx"
        onnx.save(proto, str(mpath))
        entry: dict[str, Any] = {"name": name, "key": f"cl-snip_{name}"}
        try:
            for fmt, ext in (("benchmark", "py"), ("yaml", "yaml"), ("tidlrunner", "tidlrunner.yaml")):
                p = folder / f"snip_{name}.{ext}"
                p.write_text(snippet(str(mpath), device, fmt, benchmark_version=version, **extra))
                entry[ext.split(".")[0] if ext != "tidlrunner.yaml" else "tidlrunner"] = str(p)
            if device != "AM62":
                entry["tidl_json"] = json.loads(snippet(str(mpath), device, "tidl-json", benchmark_version=version,
                                                        **extra))
        except IncompatibleModelError as exc:
            entry["refused"] = str(exc)
        written.append(entry)
    return written


def _classifier(model: Any) -> Any:
    """tiny_conv's [1, C, 1, 1] output flattened to [1, C] logits."""
    from onnx import TensorProto, helper

    g = model.graph
    out = g.output[0]
    c = out.type.tensor_type.shape.dim[1].dim_value
    g.node.append(helper.make_node("Flatten", [out.name], ["logits"], axis=1, name="flatten"))
    g.output.remove(out)
    g.output.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, c]))
    return model


def _compare(tidl: dict[str, Any] | None, got: dict[str, Any] | None) -> str:
    if tidl is None:
        return "n/a"
    if got is None:
        return "not loaded"
    diff = [f"{k}: {got.get(k, '<missing>')!r} != {v!r}" for k, v in tidl.items()
            if k not in ("tidl_tools_path", "artifacts_folder") and got.get(k, "<missing>") != v]
    return "same" if not diff else "; ".join(diff)


def _tidlrunner(out: Path, devices: list[str], py: str, summary: dict[str, Any]) -> list[str]:
    """edgeai-tidlrunner: ``tidlrunner-cli compile`` on every device (without TIDL's onnxruntime the TIDL devices
    stop at TIDLCompilationProvider, after param.yaml records the runtime options the run would use) and ``infer``
    on AM62. Needs TI's ``tidl_onnx_model_optimizer`` (edgeai-tidl-tools ``osrt-model-tools/osrt_model_tools/
    onnx_tools``, ``TI_OSRT_MODEL_TOOLS``) and onnx-graphsurgeon + onnxsim in ``TI_BENCH_PYTHON``."""
    import yaml

    root = Path(os.environ["TI_TIDLRUNNER"]).resolve()
    pkg = root / "tidlrunner"
    pypath = os.pathsep.join(p for p in (str(pkg), os.environ.get("TI_OSRT_MODEL_TOOLS", "")) if p)
    data = out / "tidlrunner" / "tiny_imagenet"
    subprocess.run([py, str(Path(__file__).resolve()), "--make-data", str(data)], check=True, timeout=120)
    rows = ["| edgeai-tidlrunner | device | model | config loads | options vs tidl-json | AM62 compile + infer |",
            "|---|---|---|---|---|---|"]
    for dev in devices:
        models = _write_snippets(out / "tidlrunner", dev, "11.2", "snippets")
        tools = out / "tidl_tools" / dev
        tools.mkdir(parents=True, exist_ok=True)
        for m in models:
            if "tidlrunner" not in m:
                continue
            work = out / "tidlrunner" / "work" / dev / m["name"]
            logs = []
            for cmd in ("compile", "infer") if dev == "AM62" else ("compile",):
                code = ("import sys\nfrom edgeai_tidlrunner import main\n"
                        f"sys.argv = ['tidlrunner-cli', {cmd!r}, '--config_path', {m['tidlrunner']!r}, "
                        f"'--target_device', {dev!r}, '--data_path', {str(data / 'val')!r}, "
                        f"'--work_path', {str(work)!r}]\nmain.main()\n")
                proc = subprocess.run([py, "-c", code], cwd=root, capture_output=True, text=True, timeout=600,
                                      env={**os.environ, "PYTHONPATH": pypath, "TIDL_TOOLS_PATH": str(tools)})
                logs.append(proc.stdout + proc.stderr)
            (work / "runner.log").parent.mkdir(parents=True, exist_ok=True)
            (work / "runner.log").write_text("\n".join(logs))
            params = sorted(work.rglob("param.yaml"))
            loaded = "ok" if params else "no param.yaml: " + (logs[0].strip().splitlines() or ["?"])[-1][:150]
            got = yaml.safe_load(params[0].read_text())["session"]["runtime_options"] if params else None
            run = "-"
            if dev == "AM62":
                results = [yaml.safe_load(f.read_text()) for f in work.rglob("result.yaml")]
                frames = [r.get("result", {}).get("num_frames") for r in results if r.get("command") == "infer"]
                run = f"ok (infer: {frames[0]} frames)" if frames and frames[0] else "failed (see runner.log)"
            rows.append(f"| 11.2 ({root.name}) | {dev} | {m['name']} | {loaded} | "
                        f"{_compare(m.get('tidl_json'), got)} | {run} |")
            summary[f"tidlrunner/{dev}/{m['name']}"] = {"loaded": loaded, "options": got, "run": run}
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="work folder (default: a temporary one)")
    ap.add_argument("--devices", nargs="*", default=list(DEVICES))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--make-data", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.worker)
        return 0
    if args.make_data:
        _tiny_imagenet(Path(args.make_data))
        return 0
    py = os.environ.get("TI_BENCH_PYTHON", "python3")
    out = (args.out or Path(tempfile.mkdtemp(prefix="conformance_snippets_"))).resolve()
    rows: list[str] = ["| version | device | model | .py loads | .py kept | .py options vs tidl-json | yaml loads | "
                       "yaml kept | yaml options vs tidl-json | AM62 run .py / yaml |", "|" + "---|" * 10]
    paths = [os.environ[e] for e in CHECKOUTS if os.environ.get(e)]
    paths += [p for p in os.environ.get("TI_EDGEAI_BENCHMARKS", "").split(os.pathsep) if p]
    versions = {checkout_release(p): p for p in paths}
    if not versions and not os.environ.get("TI_TIDLRUNNER"):
        print("set TI_EDGEAI_BENCHMARK_92 / _10 / _11 (or TI_TIDLRUNNER) to TI checkouts", file=sys.stderr)
        return 2
    summary: dict[str, Any] = {}
    for version, checkout in versions.items():
        bench_version = version
        for dev in args.devices:
            models = _write_snippets(out, dev, bench_version, version)
            tools = out / "tidl_tools" / dev
            tools.mkdir(parents=True, exist_ok=True)
            job = {"device": dev, "version": version, "work": str(out / version / dev),
                   "result": str(out / version / dev / "result.json"), "run": dev == "AM62",
                   "external": float(version) >= 11.0,
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
                rows.append(f"| {version} | {dev} | {m['name']} | {r.get('py_load')} | "
                            f"{r.get('py_kept')}{' (ext: ' + str(r.get('ext_kept')) + ')' if 'ext_kept' in r else ''}"
                            f" | {_compare(tj, r.get('py_options'))} | {r.get('yaml_load')} | {r.get('yaml_kept')} | "
                            f"{_compare(tj, r.get('yaml_options'))} | {run} |")
                summary[f"{version}/{dev}/{m['name']}"] = r
    if os.environ.get("TI_TIDLRUNNER"):
        rows += ["", *_tidlrunner(out, args.devices, py, summary)]
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    print("\n".join(rows))
    print(f"\n(work folder: {out})")
    return 0


if __name__ == "__main__":
    if "--worker" not in sys.argv and "--make-data" not in sys.argv:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())

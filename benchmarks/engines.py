"""Engines side by side in one run: the model alone, decode alone, and the pipeline end to end with each engine.

    .venv/bin/python benchmarks/engines.py [--model mobilenet_v2_130_224] [--images 1600]

For the model's stand-in (same architecture and compute as the hub model): TensorFlow and LiteRT alone
(1 process x 1 thread, and one process per core), each in fresh processes, with start-up and peak RSS;
decode + resize alone (one process, and one per core); then the pipeline on DirectRunner at its default
setting with `--engine tensorflow` and `--engine auto`, measured as the marginal rate between a 16-image
and the full run, so fixed start-up is reported apart. The pipelines run `--repeats` times in
alternating order and the medians count: one pair of runs swings by tens of percent on a machine that
drifts. Everything alone is measured before and after the pipelines and averaged.
The combined limit is cores / (model time + decode time per image) of the fastest engine, computed two
ways: from per-core rates measured with one core busy (the machine idle otherwise), and with every core
busy (as the pipeline keeps them; shared cache and memory make each core slower). The same formula with
each engine gives the best end-to-end ratio this machine allows.
Writes benchmarks/results/engines-MODEL.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
sys.path.insert(0, HERE)

from run_benchmark import SMALL_RUN, batch_for, build_corpus, decode_rate, marginal_rate, timed, write_manifest  # noqa: E402

from pipeline.engine import compile_litert, default_cache  # noqa: E402
from pipeline.fingerprint import model_fingerprint  # noqa: E402
from pipeline.models import MODELS  # noqa: E402
from pipeline.options import DEFAULT_BATCH  # noqa: E402
from pipeline.standin_models import cached_standin, load_calibration_images  # noqa: E402
from transforms.embed import EmbedConfig, HubEmbedder  # noqa: E402


def engine_alone(engine: str, handle: str, compiled: str, spec, processes: int, seconds: float) -> dict:
    """The engine at the batch size the pipeline gives it by default (TensorFlow: the model's best batch)."""
    batch = {"tensorflow": batch_for(spec.input_size), "litert": DEFAULT_BATCH["litert"]}
    start_at = time.time() + 15  # every copy has started and warmed up before any measures
    command = [sys.executable, os.path.join(HERE, "engine_alone.py"), "--engine", engine, "--handle", handle,
               "--size", str(spec.input_size), "--dim", str(spec.dim), "--batch", str(batch[engine]),
               "--threads", "1", "--seconds", str(seconds), "--start_at", str(start_at)]
    if compiled:
        command += ["--compiled", compiled]
    copies = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True) for _ in range(processes)]
    results = [json.loads(c.communicate()[0].strip().splitlines()[-1]) for c in copies]
    merged = {"engine": engine, "processes": processes, "threads_each": 1,
              "images_per_s": round(sum(r["images_per_s"] for r in results), 2),
              "startup_s": round(max(r["startup_s"] for r in results), 2),
              "peak_rss_mb_per_process": round(max(r["peak_rss_mb"] for r in results)),
              "tensorflow_imported": any(r["tensorflow_imported"] for r in results)}
    print(f"  {engine:10s} {processes} proc x 1 thread: {merged['images_per_s']:7.1f} img/s, start-up "
          f"{merged['startup_s']:.2f} s, peak RSS {merged['peak_rss_mb_per_process']} MB/process, "
          f"TensorFlow imported: {merged['tensorflow_imported']}", flush=True)
    return merged


def _decode_from(paths: list[str], size: int, start_at: float) -> float:
    time.sleep(max(0.0, start_at - time.time()))
    return decode_rate(paths, size)


def decode_alone(paths: list[str], size: int, processes: int) -> float:
    """images/s of read + decode + resize in `processes` processes at once (each over the whole corpus)."""
    start_at = time.time() + 8  # every copy has started before any measures
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        rates = pool.starmap(_decode_from, [(paths, size, start_at)] * processes)
    print(f"  decode + resize, {processes} proc: {sum(rates):7.1f} img/s", flush=True)
    return sum(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mobilenet_v2_130_224", choices=sorted(MODELS))
    parser.add_argument("--images", type=int)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--copies", type=int, default=2, help="times each corpus image is listed in the full run")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    spec = MODELS[args.model]
    cores = os.cpu_count()
    handle = cached_standin(spec, os.path.join(REPO, ".cache", "standins"),
                            load_calibration_images(os.path.join(REPO, "samples", "*"), spec))
    compiled = compile_litert(HubEmbedder(EmbedConfig(handle=handle, image_size=spec.input_size, dim=spec.dim)),
                              spec.input_size, model_fingerprint(handle), default_cache(None))
    count = args.images or (1600 if spec.input_size <= MODELS["mobilenet_v2_130_224"].input_size else 160)
    paths = build_corpus(os.path.join(HERE, "results", "corpus"), count)
    work = os.path.join(HERE, "results", "work-engines")
    os.makedirs(work, exist_ok=True)
    small = write_manifest(os.path.join(work, "small.csv"), paths[:SMALL_RUN])
    full = write_manifest(os.path.join(work, "full.csv"), paths, copies=args.copies)
    listed = count * args.copies

    settings = (1, cores)

    def alone():
        """Each engine and the decoder alone, on one core and on every core at once."""
        engines = [engine_alone(engine, handle, compiled if engine == "litert" else None, spec, processes,
                                args.seconds) for processes in settings for engine in ("tensorflow", "litert")]
        return {"engines": engines, "decode": {processes: decode_alone(paths, spec.input_size, processes)
                                               for processes in settings}}

    print(f"{spec.name}: engines and decode alone ...", flush=True)
    before = alone()

    def pipeline(engine):
        def run(manifest, out):
            return timed([sys.executable, "-m", "pipeline.run", "--input", manifest, "--output", out, "--model",
                          spec.name, "--model_handle", handle, "--engine", engine, "--overwrite",
                          "--progress_interval", "0"])
        return run

    runs = {"tensorflow": [], "auto": []}
    for repeat in range(args.repeats):
        for engine in ("tensorflow", "auto") if repeat % 2 == 0 else ("auto", "tensorflow"):
            print(f"pipeline end to end, --engine {engine}, run {repeat + 1} of {args.repeats} ...", flush=True)
            runs[engine].append(marginal_rate(pipeline(engine), small, full, listed, os.path.join(work, engine)))
            print(f"  {runs[engine][-1]}", flush=True)
    end_to_end = {engine: {key: statistics.median(run[key] for run in results) for key in results[0]}
                  for engine, results in runs.items()}
    print("engines and decode alone again ...", flush=True)
    after = alone()

    def engine_rate(engine, processes):  # averaged over before and after the pipelines
        return statistics.mean(a["images_per_s"] for a in before["engines"] + after["engines"]
                               if a["processes"] == processes and a["engine"] == engine)

    def decode(processes):
        return statistics.mean(m["decode"][processes] for m in (before, after))

    def limit(engine, processes):
        """cores / (model time + decode time per image), from per-core rates measured with `processes` busy."""
        per_core_model, per_core_decode = engine_rate(engine, processes) / processes, decode(processes) / processes
        return cores / (1 / per_core_model + 1 / per_core_decode)

    fastest = max(("tensorflow", "litert"), key=lambda engine: engine_rate(engine, 1))
    auto = end_to_end["auto"]["images_per_s"]
    summary = {
        "model": spec.name, "cores": cores, "images": listed, "alone_before": before, "alone_after": after,
        "engine_images_per_s": {f"{engine}, {processes} proc": round(engine_rate(engine, processes), 1)
                                for engine in ("tensorflow", "litert") for processes in settings},
        "decode_images_per_s": {f"{processes} proc": round(decode(processes), 1) for processes in settings},
        "fastest_engine_alone": fastest,
        "combined_limit_images_per_s": {f"{engine}, per-core rates with {processes} busy": round(limit(engine, processes), 1)
                                        for engine in ("tensorflow", "litert") for processes in settings},
        "end_to_end_runs": runs, "end_to_end_median": end_to_end,
        "auto_vs_tensorflow_each_run": [round(a["images_per_s"] / t["images_per_s"], 2)
                                        for a, t in zip(runs["auto"], runs["tensorflow"])],
        "auto_vs_tensorflow": round(auto / end_to_end["tensorflow"]["images_per_s"], 2),
        "auto_vs_limit_one_core_rates": round(auto / limit(fastest, 1), 2),
        "auto_vs_limit_all_core_rates": round(auto / limit(fastest, cores), 2),
        "tensorflow_vs_its_limit_all_core_rates": round(
            end_to_end["tensorflow"]["images_per_s"] / limit("tensorflow", cores), 2),
        "startup_ratio": round(end_to_end["auto"]["startup_s"] / max(end_to_end["tensorflow"]["startup_s"], 1e-9), 2),
    }
    print(json.dumps({k: v for k, v in summary.items()
                      if k not in ("alone_before", "alone_after", "end_to_end_runs")}, indent=2))
    with open(os.path.join(HERE, "results", f"engines-{spec.name}.json"), "w") as f:
        json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()

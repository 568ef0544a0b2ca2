"""Run the pruning study end to end and write ``results.md`` with its figures.

    python -m experiments.study --out docs                 # full run
    python -m experiments.study --smoke --out /tmp/smoke   # tiny subset, for CI
    python -m experiments.study --out docs --only report   # results.md from experiments/data

Stages, in order: ``train`` (three base models per architecture, one per seed), ``prune``
(pruning grid, as pruned and recovered), ``deploy`` (int8 QDQ, full-int8 TFLite), ``score``
(Sp2PS of every model against its base, with the random floor and the other seeds, through
:func:`sp2ps_onnx.scoring.score_models`), ``photos`` (EfficientNet-Lite0 on real photos),
``export`` (the committed raw data in ``experiments/data``) and ``report`` (``results.md``
and its figures, from that data alone). Everything a stage makes is kept in ``--cache``;
scores are reused for unchanged model files unless ``--rescore`` names them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

STAGES = ("train", "prune", "deploy", "score", "photos", "export", "report")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.study",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path,
                        help="folder for results.md and figures/ (e.g. docs)")
    parser.add_argument("--cache", type=Path, default=None,
                        help="folder for trained models and scores (default .study-cache, "
                             "or .study-cache/smoke with --smoke)")
    parser.add_argument("--smoke", action="store_true",
                        help="a tiny subset of every stage (CI): 1024 training images, "
                             "128 test images, one rate")
    parser.add_argument("--only", default=",".join(STAGES),
                        help=f"comma-separated stages to run (default all: {','.join(STAGES)})")
    parser.add_argument("--rescore", default="",
                        help="comma-separated name patterns (fnmatch) to score again even if "
                             "their files did not change, e.g. '*tflite*'")
    parser.add_argument("--archs", default="",
                        help="comma-separated subset of the base models "
                             "(torch-vgg, keras-vgg, torch-resnet; default all)")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="folder for the committed raw data that results.md is generated "
                             "from (default experiments/data; with --smoke, CACHE/data)")
    parser.add_argument("--seeds", default="",
                        help="comma-separated seed indices for train, prune and deploy "
                             "(default all), so one architecture's seeds can run in parallel")
    parser.add_argument("--no-photos", action="store_true", help="skip the EfficientNet-Lite0 part")
    args = parser.parse_args(argv)

    stages = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        parser.error(f"unknown stage(s) {', '.join(unknown)}; choose from {', '.join(STAGES)}")

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from .config import StudyConfig

    config = StudyConfig.smoke_test() if args.smoke else StudyConfig.full()
    if args.no_photos:
        config.photos = False
    if args.archs:
        chosen = tuple(a.strip() for a in args.archs.split(",") if a.strip())
        unknown = sorted(set(chosen) - set(config.architectures))
        if unknown:
            parser.error(f"unknown architecture(s) {', '.join(unknown)}")
        config.architectures = tuple(a for a in config.architectures if a in chosen)
    if args.seeds:
        config.extra["seed_indices"] = [int(k) for k in args.seeds.split(",")]
    cache = args.cache or Path(".study-cache") / ("smoke" if args.smoke else "round3")
    cache.mkdir(parents=True, exist_ok=True)
    if args.data_dir is None:
        args.data_dir = cache / "data" if args.smoke else Path(__file__).parent / "data"
    started = time.time()

    def log(message: str) -> None:
        print(f"[study {time.strftime('%H:%M:%S')} +{time.time() - started:5.0f}s] {message}",
              flush=True)

    from . import fmnist
    from .models import Manifest, deploy_stage, prune_stage, set_threads, train_stage

    set_threads(config.threads, config.torch_threads)
    data = fmnist.subset(fmnist.load(), config.train_images, config.test_images, config.seed)
    log(f"data: {len(data['y_train'])} training, {len(data['y_test'])} test images")
    manifest = Manifest(cache)
    runs = _load_runs(cache)
    for stage in STAGES:
        if stage not in stages:
            continue
        stage_started = time.time()
        log(f"== stage {stage}")
        if stage == "train":
            train_stage(data, config, cache, manifest, log)
        elif stage == "prune":
            prune_stage(data, config, cache, manifest, log)
        elif stage == "deploy":
            deploy_stage(data, config, cache, manifest, log)
        elif stage == "photos":
            if config.photos:
                from .photos import photos_stage

                photos_stage(config, cache, args.out, log)
        elif stage == "score":
            from .scoring import score_stage

            score_stage(data, config, cache, manifest, log,
                        rescore=[p for p in args.rescore.split(",") if p])
        elif stage == "export":
            from .export import export_stage

            export_stage(data, config, cache, manifest, args.data_dir, args.out, log)
        elif stage == "report":
            from .report import write_results

            path = write_results(args.data_dir, args.out)
            log(f"wrote {path}")
        key = stage + (f" ({args.archs})" if args.archs else "") + (
            f" (seeds {args.seeds})" if args.seeds else "")
        runs = _load_runs(cache)  # parallel processes (one per --archs) share the file
        runs[key] = {"seconds": round(time.time() - stage_started, 1),
                     "load_average": [round(v, 1) for v in os.getloadavg()],
                     "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                     "command": " ".join(["python -m experiments.study", *(argv or sys.argv[1:])])}
        (cache / "runs.json").write_text(json.dumps(runs, indent=1))
        log(f"== stage {stage} done in {time.time() - stage_started:.0f} s")
    return 0


def _load_runs(cache: Path) -> dict:
    path = cache / "runs.json"
    return json.loads(path.read_text()) if path.is_file() else {}


if __name__ == "__main__":
    sys.exit(main())

"""The ``sp2ps`` command line: ``inspect``, ``cam``, ``score`` and ``export``.

A thin layer over :mod:`sp2ps_onnx.scoring`, :mod:`sp2ps_onnx.data` and
:mod:`sp2ps_onnx.report`. Every :class:`~sp2ps_onnx.errors.Sp2PSError` ends the command
with one line ``sp2ps: error: <message>`` on stderr and exit status 2 (3 for an unexpected
error; ``score --fail-under`` exits with 4 when a pruned model is below it); outputs are written
to a temporary sibling directory and moved into place only when complete.
"""

from __future__ import annotations

import csv
import json
import os
import re
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import click
import numpy as np

from . import __version__
from .cam import AUG_SMOOTH_METHODS, EIGEN_SMOOTH_METHODS, METHODS
from .convert import check_converter, needs_conversion, to_onnx
from .data import PRESETS, open_data, parse_size
from .errors import InputDataError, LayerNotFoundError, ModelLoadError, Sp2PSError
from .explain import explain
from .graph import inspect_model
from .graph.model_io import save_model
from .metric import AGGREGATIONS, SPATIAL, SPECTRAL
from .progress import ProgressReporter
from .report import (
    CHECKPOINT_DIR,
    FORMATS,
    atomic_directory,
    check_report_packages,
    format_table,
    human_size,
    write_report,
)
from .scoring import (
    CamOptions,
    DataOptions,
    MetricOptions,
    RayOptions,
    ReferenceOptions,
    RunOptions,
    check_gate,
    model_info,
    open_model,
    score_models,
)


def _one_line(message: str) -> str:
    return " ".join(message.split()) or "unknown error"


_DEBUG = "sp2ps.debug"
#: Exit status of an error in the user's input (a Sp2PSError), and of an unexpected one.
EXIT_USER_ERROR = 2
EXIT_INTERNAL_ERROR = 3
#: Exit status of ``sp2ps score --fail-under`` when a pruned model is below the threshold
#: (the report is written all the same).
EXIT_GATE_FAILED = 4


def _fail(message: str, status: int) -> NoReturn:
    click.echo(f"sp2ps: error: {message}", err=True)
    raise click.exceptions.Exit(status)


class _Sp2PSGroup(click.Group):
    """Ends every command that fails with one line on stderr (``--debug``: the traceback)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except Sp2PSError as exc:
            if ctx.meta.get(_DEBUG):
                raise
            _fail(_one_line(str(exc)), EXIT_USER_ERROR)
        except (click.exceptions.Exit, click.ClickException, click.Abort, KeyboardInterrupt):
            raise
        except Exception as exc:
            if ctx.meta.get(_DEBUG):
                raise
            _fail(f"internal error ({type(exc).__name__}: {_one_line(str(exc))}); rerun with "
                  "--debug for the traceback and report it", EXIT_INTERNAL_ERROR)


def _set_debug(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value:
        ctx.meta[_DEBUG] = True  # meta is shared by the group and its subcommand


def _debug_option(function: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--debug", is_flag=True, expose_value=False, is_eager=True, callback=_set_debug,
        help="Show the full traceback of an error instead of one line.",
    )(function)


# --------------------------------------------------------------------------------------
# Progress, framework files


def _show_progress(quiet: bool) -> bool:
    # A bar only for a person watching a terminal; logs and pipes stay clean.
    return not quiet and sys.stderr.isatty()


def _onnx_models(
    paths: list[str], directory: Path, quiet: bool, final_directory: Path | None = None
) -> tuple[list[str], list[dict[str, Any]]]:
    """The ONNX paths for ``paths``: framework files are converted into ``directory``
    (recorded as ``final_directory``, where a temporary output will be moved)."""
    for path in paths:  # every missing converter is reported before any work
        check_converter(path)
    resolved, conversions = [], []
    used: set[str] = set()
    for path in paths:
        if not needs_conversion(path):
            resolved.append(path)
            continue
        stem = _safe_stem(Path(path).stem, used)
        _note(f"sp2ps: converting {path} to ONNX", quiet)
        output = directory / f"{stem}.onnx"
        final = None if final_directory is None else final_directory / output.name
        conversion = to_onnx(path, output, final_output=final)
        resolved.append(str(output))
        conversions.append(conversion.to_dict())
    return resolved, conversions


def _note(message: str, quiet: bool) -> None:
    if not quiet:
        click.echo(message, err=True)


# --------------------------------------------------------------------------------------
# Options shared by the commands


def _model_options(function: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--layer", default=None, help="Target tensor or node name (default: the "
                     "last spatial feature map before the classifier head)."),
        click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
                     show_default=True, help="Where ONNX Runtime runs the models."),
        click.option("--size", default=None, help="Input H[,W] for models with a dynamic "
                     "spatial input size (e.g. 224 or 224,192; default 224)."),
        click.option("--grid", default=None, metavar="HxW",
                     help="Patch grid of a token-sequence layer (N, T, C) when the graph does "
                     "not prove it, e.g. 14x14; the T - H*W leading (class) tokens are dropped."),
        click.option("--allow-domain", "allow_domains", multiple=True, metavar="DOMAIN",
                     help="Accept ops of this custom-op domain (refused by default: custom "
                     "ops run code from outside ONNX Runtime). Repeat for several."),
        _debug_option,
    ]
    for option in reversed(options):
        function = option(function)
    return function


def _data_options(function: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--method", type=click.Choice(list(METHODS)), default="gradcam",
                     show_default=True, help="CAM method."),
        click.option("--eigen-smooth", is_flag=True, help="pytorch-grad-cam's eigen_smooth: "
                     "the first principal component of the weighted activations instead of "
                     f"their channel sum ({', '.join(EIGEN_SMOOTH_METHODS)})."),
        click.option("--aug-smooth", is_flag=True, help="pytorch-grad-cam's aug_smooth: the "
                     "mean map of the image and its horizontal flip, times 0.9, 1 and 1.1 "
                     "(six times the cost; not "
                     f"{', '.join(m for m in METHODS if m not in AUG_SMOOTH_METHODS)})."),
        click.option("--target", type=click.Choice(["label", "original", "self"]), default=None,
                     help="Class each CAM explains: the true label, the original model's top-1 "
                     "(for every model), or each model's own top-1. Default: label when the "
                     "data has labels, else original."),
        click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True,
                     help="Samples per batch."),
        click.option("--preset", type=click.Choice(list(PRESETS)), default="imagenet",
                     show_default=True, help="Normalisation: imagenet mean/std, inception "
                     "[-1,1], unit [0,1], raw 0..255."),
        click.option("--mean", default=None, help="Per-channel mean on the [0,1] pixel scale, "
                     "e.g. 0.485,0.456,0.406 (overrides the preset)."),
        click.option("--std", default=None, help="Per-channel std on the [0,1] pixel scale "
                     "(overrides the preset)."),
        click.option("--limit", type=click.IntRange(min=1), default=None,
                     help="Use only the first N samples."),
        click.option("--classes", default=None, help="Class names in label order: a text "
                     "file (one per line), a comma-separated list, or imagenet (the 1000 "
                     "ImageNet-1k names). A value that looks like a path (a / or an extension "
                     "such as .txt) must be an existing file."),
        click.option("--quiet", "-q", is_flag=True, help="No progress bar or notes on stderr."),
        click.option("--strict", is_flag=True, help="Stop with an error at the first unreadable "
                     "image or empty folder instead of skipping and listing it."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


# The commands take their shared options as ``**given`` and build the typed options of
# sp2ps_onnx.scoring from them, so that the CLI and the Python API share one vocabulary.


def _cam_options(given: dict[str, Any]) -> CamOptions:
    return CamOptions(method=given["method"], layer=given["layer"],
                      pruned_layer=given.get("pruned_layer"), target=given["target"],
                      allow_domains=given["allow_domains"], grid=_parse_grid(given["grid"]),
                      eigen_smooth=given["eigen_smooth"], aug_smooth=given["aug_smooth"],
                      cam_layers=_names(given.get("cam_layers")), layers=given.get("layers"))


def _names(listed: str | None) -> tuple[str, ...]:
    return tuple(name.strip() for name in (listed or "").split(",") if name.strip())


def _cam_layers_option(function: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--cam-layers", default=None, metavar="A,B,...",
        help="Several target layers (tensor or node names, comma-separated, or stages): the "
        "CAM is the mean of each layer's min-max scaled map, all from one run, as "
        "pytorch-grad-cam averages a list of target layers (refinecam: their product).",
    )(function)


def _read_options(given: dict[str, Any]) -> DataOptions:
    return DataOptions(preset=given["preset"], mean=given["mean"], std=given["std"],
                       size=given["size"], limit=given["limit"], classes=given["classes"],
                       strict=given["strict"],
                       classes_partial=given.get("classes_partial", False))


def _metric_options(given: dict[str, Any]) -> MetricOptions:
    return MetricOptions(spatial=given["spatial"], spectral=given["spectral"],
                         aggregation=given["aggregation"], n_bootstrap=given["bootstrap"],
                         seed=given["seed"], examples=given["examples"],
                         faithfulness=given["faithfulness"])


def _run_options(given: dict[str, Any], checkpoint: Path | None = None) -> RunOptions:
    address = given.get("ray_address")
    ray = None if address is None else RayOptions(
        address=None if address == "local" else address, workers=given["workers"],
        gpus_per_worker=given["gpus_per_worker"], connect_timeout=given["ray_timeout"],
    )
    return RunOptions(batch_size=given["batch_size"], device=given["device"],
                      progress=_show_progress(given["quiet"]), quiet=given["quiet"],
                      checkpoint=checkpoint, resume=given.get("resume", False), ray=ray,
                      cache=given.get("cache"))


def _parse_grid(grid: str | None) -> tuple[int, int] | None:
    if grid is None:
        return None
    parts = [p for p in re.split(r"[x,\s]+", grid.strip().lower()) if p]
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise InputDataError(f"--grid {grid!r} is not valid; give rows x columns, e.g. 14x14")
    return int(parts[0]), int(parts[1])


def _check_model_path(path: str) -> str:
    if not Path(path).is_file():
        what = "is a directory" if Path(path).is_dir() else "does not exist"
        raise ModelLoadError(
            f"model file {path} {what}; give the path of an .onnx file (or a .tflite, "
            ".keras, .h5 or .pt2 file to convert)"
        )
    return path


def _cmap_option(function: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--cmap", default="jet", show_default=True,
                        help="Colour map of the CAMs: jet (as pytorch-grad-cam), turbo, "
                        "viridis or any matplotlib colour map.")(function)


# --------------------------------------------------------------------------------------
# Commands


@click.group(cls=_Sp2PSGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="sp2ps")
@_debug_option
def cli() -> None:
    """Grad-CAM family explanations inside ONNX classifiers, and the Sp2PS score of pruned
    models (do they still look where the original looked?)."""


@cli.command(short_help="Inputs, layout, classes, target layer, head ops, sparsity.")
@click.argument("model")
@_model_options
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table",
              show_default=True, help="Output format.")
def inspect(model: str, layer: str | None, device: str, size: str | None,
            allow_domains: tuple[str, ...], grid: str | None, fmt: str) -> None:
    """Show a model's inputs, outputs, layout, classes, target layer, the ops between layer
    and score with their gradient-rule coverage, parameters and sparsity."""
    _check_model_path(model)
    with tempfile.TemporaryDirectory(prefix="sp2ps-convert-") as converted:
        (onnx_path,), _ = _onnx_models([model], Path(converted), quiet=fmt == "json")
        found = inspect_model(onnx_path, layer=layer, input_size=parse_size(size),
                              allow_domains=allow_domains, grid=_parse_grid(grid))
        info = model_info(onnx_path, allow_domains=allow_domains)
    details: dict[str, Any] = {
        "model": model,
        "sha256": info.sha256,
        "file_size_bytes": info.file_size,
        "opset": found["opset"],
        "producer": found["producer"],
        "inputs": found["inputs"],
        "outputs": found["outputs"],
        "layout": found["input_layout"],
        "num_classes": found["num_classes"],
        "score_tensor": found["score_tensor"],
        "softmax_cut": found["softmax_cut"],
        "score_cut_ops": found["score_cut_ops"],
        "input_quantization": found["input_quantization"],
        "layer": found["layer"],
        "layer_shape": found["layer_shape"],
        "layer_layout": found["layer_layout"],
        "layer_stored_shape": found["layer_stored_shape"],
        "layer_rule": found["layer_rule"],
        "layer_reshape": found["layer_reshape"],
        "head_ops": found["head_ops"],
        "all_ops_have_rules": found["all_ops_have_rules"],
        "batch": found["batch"],
        "parameters": info.parameters,
        "weight_count": info.weight_count,
        "zero_weights": info.zero_weights,
        "sparsity_percent": info.sparsity,
    }
    if found["layer_error"]:
        details["layer_error"] = found["layer_error"]
    if fmt == "json":
        click.echo(json.dumps(details, indent=2, default=str))
    else:
        click.echo(_inspect_text(details))
    if found["layer_error"]:
        raise LayerNotFoundError(found["layer_error"])


def _inspect_text(details: dict[str, Any]) -> str:
    def shape(dims: list[Any]) -> str:
        return "(" + ", ".join("?" if not isinstance(d, int) else str(d) for d in dims) + ")"

    rows = [
        ("model", details["model"]),
        ("sha256", details["sha256"]),
        ("file size", human_size(details["file_size_bytes"])),
        ("opset", str(details["opset"])),
        ("producer", details["producer"] or "–"),
    ]
    rows += [("input", f"{v['name']}  {v['dtype']} {shape(v['shape'])}")
             for v in details["inputs"]]
    rows += [("output", f"{v['name']}  {v['dtype']} {shape(v['shape'])}")
             for v in details["outputs"]]
    if details.get("input_quantization"):
        scale, zero = details["input_quantization"]
        rows.append(("input codes", f"integer input: float images are quantized with the "
                     f"model's scale {scale:.6g} and zero point {zero}"))
    rows += [
        ("layout", str(details["layout"])),
        ("batch", str(details["batch"])),
        ("classes", str(details["num_classes"])),
        ("score", str(details["score_tensor"])
         + (f" (pre-softmax logits: {' → '.join(details['score_cut_ops'])} cut off at "
            f"{details['softmax_cut']})" if details["softmax_cut"] else "")),
        ("layer", f"{details['layer']}  (C, H, W) = {shape(details['layer_shape'] or [])}"
         + (f", stored {details['layer_layout']}" if details.get("layer_layout") == "NHWC" else "")
         if details["layer"] else "–"),
        *([("reshape", f"{shape(details['layer_stored_shape'])} {details['layer_layout']}: "
            f"{details['layer_reshape']}")] if details.get("layer_reshape") else []),
        *([("layer rule", details["layer_rule"])] if details.get("layer_rule") else []),
        ("parameters", f"{details['parameters']:,}"),
        ("zero weights", f"{details['sparsity_percent']:.1f}% ({details['zero_weights']:,} of "
         f"{details['weight_count']:,} Conv/Gemm/MatMul weights)"),
    ]
    lines = [f"{key:<13}{value}" for key, value in rows]
    head = details["head_ops"]
    missing = [op for op in head if not op["has_rule"]]
    if not details["layer"]:
        return "\n".join(lines)
    lines.append(
        f"{'head ops':<13}{len(head)} between layer and score"
        + (f", {len(missing)} WITHOUT a gradient rule (choose a later --layer)" if missing
           else ", all with gradient rules")
    )
    for op in head:
        mark = "ok" if op["has_rule"] else "NO RULE"
        lines.append(f"  {op['op']:<22} {op['node']}  [{mark}]")
    return "\n".join(lines)


@cli.command(short_help="CAM overlays (PNG) and maps (.npy) of one model.")
@click.argument("model")
@click.argument("inputs", nargs=-1, required=True)
@click.option("--out", "-o", required=True, help="Output directory (created; an earlier "
              "sp2ps cam output there is replaced only with --force).")
@click.option("--force", is_flag=True, help="Replace an earlier sp2ps cam output in --out.")
@_model_options
@_data_options
@_cam_layers_option
@_cmap_option
def cam(model: str, inputs: tuple[str, ...], out: str, force: bool, cmap: str,
        **given: Any) -> None:
    """Compute CAMs of MODEL for INPUT images (files, folders, .npz, .npy): writes a PNG
    overlay and a .npy map per sample, and cams.csv."""
    cam_options, data_options, run = _cam_options(given), _read_options(given), _run_options(given)
    quiet = run.quiet
    _check_model_path(model)
    if Path(out).resolve() in {Path(p).resolve() for p in (model, *inputs)}:
        raise ModelLoadError(f"--out {out} is one of the inputs; choose another directory")
    check_report_packages()
    from .figures import colormap, overlay, write_png  # matplotlib: the optional report extra

    colormap(cmap)
    source = open_data(list(inputs), classes=data_options.classes, limit=data_options.limit,
                       strict=data_options.strict)
    names = source.class_names
    done = 0
    used: set[str] = set()
    with atomic_directory(out, marker="cams.csv", force=force) as directory, ProgressReporter(
        _show_progress(quiet), len(source), "cam"
    ) as progress:
        (model,), conversions = _onnx_models([model], directory / "converted", quiet,
                                             Path(out) / "converted")
        if conversions:
            (directory / "conversions.json").write_text(json.dumps(conversions, indent=2) + "\n")
        with open(directory / "cams.csv", "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["id", "file", "target", "target_name", "target_logit", "top1",
                             "top1_name", "label"])
            for batch in explain(model, source, cam=cam_options, data_options=data_options,
                                 run=run):
                for i, sample_id in enumerate(batch.ids):
                    stem = _safe_stem(sample_id, used)
                    np.save(directory / f"{stem}.npy", batch.maps[i])
                    write_png(directory / f"{stem}.png", overlay(batch.images[i], batch.maps[i],
                                                                      cmap=cmap))
                    t = int(batch.targets[i])
                    top1 = int(batch.scores[i].argmax())
                    writer.writerow([
                        sample_id, f"{stem}.png", t, _name(t, names),
                        f"{float(batch.scores[i, t]):.6g}", top1, _name(top1, names),
                        "" if batch.labels is None else int(batch.labels[i]),
                    ])
                done += len(batch.ids)
                progress(done, len(source))
        if source.faults:
            with open(directory / "skipped.csv", "w", newline="", encoding="utf-8") as handle:
                writer = csv.writer(handle)
                writer.writerow(["id", "reason"])
                writer.writerows([fault.id, fault.reason] for fault in source.faults)
    if source.faults:
        _note(f"sp2ps: note: skipped {len(source.faults)} unreadable sample(s) or empty "
              f"folder(s) (listed in skipped.csv): "
              f"{', '.join(f.id for f in source.faults[:5])}", quiet)
    _note(f"sp2ps: wrote {done} CAM(s) ({cam_options.method}) to {out}", quiet)


def _name(index: int, names: list[str] | None) -> str:
    return names[index] if names and 0 <= index < len(names) else ""


def _safe_stem(sample_id: str, used: set[str]) -> str:
    stem = os.path.splitext(sample_id)[0] if not sample_id.endswith("]") else sample_id
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem.replace("/", "__")).strip("._") or "sample"
    candidate, n = stem, 2
    while candidate in used:
        candidate, n = f"{stem}-{n}", n + 1
    used.add(candidate)
    return candidate


@cli.command(short_help="Rank pruned models by Sp2PS; write the report.")
@click.argument("original")
@click.argument("pruned", nargs=-1, required=True)
@click.option("--data", required=True, multiple=True, help="Evaluation data: image folder "
              "(class subfolders), image files, .npz (x, y) or .npy. Repeat for several.")
@click.option("--out", "-o", default="sp2ps-report", show_default=True,
              help="Report directory (an earlier report there is replaced only with --force).")
@click.option("--force", is_flag=True, help="Replace an earlier sp2ps report in --out.")
@click.option("--no-report", is_flag=True, help="Only print the table; write no files.")
@click.option("--format", "fmt", type=click.Choice(list(FORMATS)), default="table",
              show_default=True, help="Format of the ranking printed on stdout.")
@_model_options
@click.option("--pruned-layer", default=None,
              help="Target layer of the pruned models when it differs from --layer.")
@_data_options
@click.option("--spatial", type=click.Choice(list(SPATIAL)), default="ssim", show_default=True,
              help="Spatial similarity of two CAMs.")
@click.option("--spectral", type=click.Choice(list(SPECTRAL)), default="tv", show_default=True,
              help="Spectral similarity of two CAMs.")
@click.option("--aggregation", type=click.Choice(list(AGGREGATIONS)), default="mean",
              show_default=True, help="How per-sample scores are aggregated.")
@click.option("--bootstrap", type=click.IntRange(min=0), default=1000, show_default=True,
              help="Bootstrap resamples for the 95% confidence interval (0: none).")
@click.option("--examples", type=click.IntRange(min=0), default=4, show_default=True,
              help="Worst and best samples per model shown in the report.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the bootstrap "
              "and of the random floor.")
@_cmap_option
@click.option("--figures", "figure_formats", type=click.Choice(["png", "svg", "pdf"]),
              multiple=True, help="Also write the figures in this format (PNG and SVG are "
              "always written; --figures pdf adds PDF for papers). Repeatable.")
@click.option("--ray", "ray_address", is_flag=False, flag_value="local", default=None,
              metavar="[ADDRESS]", help="Run on Ray: a cluster address (auto, host:port, "
              "ray://host:port) or, with no value, a Ray started on this machine. Needs the "
              "ray extra; the data must be readable at the same path on every node.")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Ray actors scoring in parallel (default: one per free CPU, or per GPU with "
              "--gpus-per-worker).")
@click.option("--ray-timeout", type=click.FloatRange(min=0, min_open=True), default=30.0,
              show_default=True, help="Seconds to wait for the Ray cluster to answer, at start "
              "and while batches stream (a lost head; at most 40 s then), before giving up "
              "with an error; the batches received by then are kept for --resume.")
@click.option("--gpus-per-worker", type=click.FloatRange(min=0), default=0.0,
              show_default=True, help="GPUs each Ray actor reserves (runs ONNX Runtime on CUDA).")
@click.option("--classes-partial", is_flag=True, help="Accept a class list (--classes or the "
              "class folders) with fewer or more names than the model has classes; its "
              "positions are taken as the model's class indices.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run with the same "
              "--out, models, data and options (rows are saved under --out as they come).")
@click.option("--cache", type=click.Path(file_okay=False), default=None, metavar="DIR",
              help="Keep the passes of the original, the random floor and the references in "
              "DIR, so that a later run with new pruned models runs only those (same numbers "
              "to the last bit; a changed model, option or batch, or a damaged file, is "
              "recomputed).")
@click.option("--fail-under", type=float, default=None, metavar="SP2PS",
              help="Gate for CI: exit with status 4 (after writing the report) when any "
              "pruned model's Sp2PS is below SP2PS; references and the random floor are not "
              "gated. results.json records the rule and the verdict.")
@click.option("--fail-under-ci", is_flag=True, help="Gate on the lower bound of the 95% "
              "confidence interval of Sp2PS instead of Sp2PS itself (needs --bootstrap > 0).")
@click.option("--no-floor", is_flag=True, help="Leave out the random floor: a copy of the "
              "original with its weights re-initialised layer by layer from the score "
              "(seeded by --seed), scored as a reference (one more model pass).")
@click.option("--reference", "references", multiple=True, metavar="MODEL",
              help="An independently trained model of the same task (another seed, another "
              "framework, a published checkpoint), scored as a reference and not ranked. "
              "Repeatable.")
@click.option("--faithfulness", is_flag=True, help="Also measure how faithfully each model's "
              "own CAM explains it: deletion/insertion AUC, CAM-multiplied confidence change "
              "and ROAD (costs about 40 extra passes per image).")
@_cam_layers_option
@click.option("--layers", type=click.Choice(["stages"]), default=None,
              help="stages: also score the last map of each resolution stage, matched "
              "between the models by resolution; the report gets a per-stage Sp2PS table "
              "(where pruning moved the attention).")
def score(original: str, pruned: tuple[str, ...], data: tuple[str, ...], out: str, force: bool,
          no_report: bool, fmt: str, cmap: str, figure_formats: tuple[str, ...],
          **given: Any) -> None:
    """Score PRUNED models against ORIGINAL with Sp2PS over --data; prints the ranking and
    writes results.json, per_sample.csv, report.html and figures/ to --out."""
    if given["resume"] and no_report:
        raise click.UsageError("--resume continues the rows saved under --out; drop --no-report")
    fail_under, on_ci = given["fail_under"], given["fail_under_ci"]
    if on_ci and fail_under is None:
        raise click.UsageError("--fail-under-ci says how --fail-under is read; give "
                               "--fail-under THRESHOLD too")
    if on_ci and given["bootstrap"] == 0:
        raise click.UsageError("--fail-under-ci gates on the bootstrap confidence interval; "
                               "give --bootstrap > 0 (default 1000)")
    references = given["references"]
    for path in (original, *pruned, *references):
        _check_model_path(path)
    inputs = {Path(p).resolve() for p in (original, *pruned, *references, *data)}
    if not no_report and Path(out).resolve() in inputs:
        raise ModelLoadError(f"--out {out} is one of the inputs; choose another directory")
    if not no_report:
        check_report_packages(" (or pass --no-report for the table only)")
        from .figures import colormap  # matplotlib: the optional report extra

        colormap(cmap)
    formats = ["png", "svg", *figure_formats]
    cam_options, data_options = _cam_options(given), _read_options(given)
    metric = _metric_options(given)
    quiet = given["quiet"]
    source = open_data(list(data), classes=data_options.classes, limit=data_options.limit,
                       strict=data_options.strict)

    def run(converted: Path, final: Path | None) -> Any:
        models, conversions = _onnx_models([original, *pruned, *references], converted, quiet,
                                           final)
        checkpoint = None if no_report else Path(out) / CHECKPOINT_DIR
        compared = ReferenceOptions(floor=not given["no_floor"],
                                    models=tuple(models[1 + len(pruned):]))
        report = score_models(models[0], models[1:1 + len(pruned)], source, cam=cam_options,
                              data_options=data_options, metric=metric,
                              run=_run_options(given, checkpoint), references=compared)
        if conversions:
            report.config["conversions"] = conversions
        report.config["cmap"] = cmap
        if fail_under is not None:
            report.gate = check_gate(report.models, fail_under, on_ci).to_dict()
        return report

    if no_report:
        with tempfile.TemporaryDirectory(prefix="sp2ps-convert-") as converted:
            report = run(Path(converted), None)
    else:
        with atomic_directory(out, force=force) as directory:
            report = run(directory / "converted", Path(out) / "converted")
            write_report(report, directory, formats=formats, cmap=cmap)
    for message in report.notes:
        _note(f"sp2ps: note: {message}", quiet)
    cached = report.config.get("cache")
    if cached and "hits" in cached:
        _note(f"sp2ps: cache {cached['directory']}: {cached['hits']} batch passes read, "
              f"{cached['misses']} computed, {cached['corrupt']} damaged and recomputed", quiet)
    click.echo(format_table(report, fmt))
    if not no_report:
        _note(f"sp2ps: report written to {Path(out) / 'report.html'}", quiet)
    if fail_under is not None:
        verdict = check_gate(report.models, fail_under, on_ci)
        if not verdict.passed:  # said even with --quiet: it is why the command fails
            click.echo(f"sp2ps: {verdict.message()}", err=True)
            raise click.exceptions.Exit(EXIT_GATE_FAILED)
        _note(f"sp2ps: {verdict.message()}", quiet)


@cli.command(short_help="Write the rewritten, CAM-ready ONNX model.")
@click.argument("model")
@click.option("--out", "-o", required=True, help="Path of the rewritten .onnx file.")
@click.option("--force", is_flag=True, help="Overwrite OUT if it exists (never MODEL itself).")
@_model_options
def export(model: str, out: str, force: bool, layer: str | None, device: str,
           size: str | None, allow_domains: tuple[str, ...], grid: str | None) -> None:
    """Write MODEL rewritten for CAMs: extra input 'target', extra outputs activations and
    gradients (runs in any ONNX runtime)."""
    _check_model_path(model)
    out_path = Path(out)
    if out_path.resolve() == Path(model).resolve() or (
        out_path.exists() and os.path.samefile(out_path, model)
    ):
        raise ModelLoadError(
            f"--out {out} is the input model; export never overwrites its input, "
            "choose another file name"
        )
    if out_path.is_dir():
        raise ModelLoadError(f"--out {out} is a directory; give a file name such as model_cam.onnx")
    if out_path.exists() and not force:
        raise ModelLoadError(f"{out} already exists; pass --force to overwrite it")
    with tempfile.TemporaryDirectory(prefix="sp2ps-convert-") as converted:
        (onnx_path,), _ = _onnx_models([model], Path(converted), quiet=False)
        cam_model = open_model(onnx_path, layer, ["CPUExecutionProvider"], size,
                               allow_domains=allow_domains, grid=_parse_grid(grid))
    save_model(cam_model.rewritten, out_path)
    click.echo(
        f"sp2ps: wrote {out} (layer {cam_model.layer}; input 'target' int64 (N,), -1 = top-1; "
        f"outputs: {', '.join(o.name for o in cam_model.rewritten.graph.output)})"
    )


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``sp2ps`` script."""
    cli.main(args=argv, prog_name="sp2ps")


if __name__ == "__main__":  # pragma: no cover
    main()

"""The `slimtune` command: argument parsing only; every command calls a plain library function.

A mistake a user can make ends in one line saying what to change (exit status 2), never a
traceback; `SLIMTUNE_DEBUG=1` shows the traceback anyway.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable, Optional, Sequence

from .config import EvalConfig, TrainConfig, add_dataclass_arguments, build_config
from .errors import SlimtuneError
from .malloc import reuse_freed_memory


def _cmd_train(args: argparse.Namespace) -> int:
    from .train.loop import train

    config = build_config(TrainConfig, _given(args))
    result = train(config)
    if not config.dry_run and os.environ.get("RANK", "0") == "0":  # under torchrun, one summary
        print(json.dumps({"train_dir": str(result.train_dir), "step": result.step,
                          "checkpoint": str(result.checkpoint), "loss": result.last_loss,
                          "skipped_images": result.skipped_images}))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from .evaluate.run import evaluate_checkpoint, headline, watch

    config = build_config(EvalConfig, _given(args))
    if config.watch:
        watch(config)
        return 0
    results = evaluate_checkpoint(config)
    print(headline(results), file=sys.stderr)
    if results.get("tuning"):
        print(results["tuning"]["summary"], file=sys.stderr)
    print(f"results: {results['results_file']}" + (f"\nreport: {results['report_file']}"
                                                   if results.get("report_file") else ""), file=sys.stderr)
    summary = {k: results[k] for k in ("Accuracy", "Recall_5", "mAP", "mAP_voc07", "num_samples", "num_skipped",
                                       "forward", "results_file") if k in results}
    print(json.dumps(summary))
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from .predict import format_table, predict

    predictions = predict(args.checkpoint_path, args.images, model_name=args.model_name, top_k=args.top_k,
                          batch_size=args.batch_size, image_size=args.image_size,
                          preprocessing_name=args.preprocessing_name, threshold=args.threshold,
                          device=args.device, on_bad_image=args.on_bad_image, model=args.model,
                          moving_average=not args.no_moving_average, compile=args.compile)
    if args.format == "json":
        print("\n".join(p.to_json() for p in predictions))
    else:
        print(format_table(predictions))
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from .nets.summary import format_model_table

    print(format_model_table(args.pattern, with_params=args.params, source=args.source))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.output_dir, max_steps=args.max_number_of_steps)
    return 0


def _cmd_ckpt_inspect(args: argparse.Namespace) -> int:
    from .checkpoint.inspect import inspect_checkpoint

    print(inspect_checkpoint(args.path, tensor=args.tensor))
    return 0


def _cmd_ckpt_convert(args: argparse.Namespace) -> int:
    from .checkpoint.inspect import convert_checkpoint
    from .checkpoint.mapping import NameMap
    from .errors import ConfigError

    name_map = NameMap.parse(args.name_map)
    if name_map.auto:
        raise ConfigError("--name_map auto needs a network to align with: use `train --checkpoint_name_map auto` "
                          "or slimtune.restore(model, path, name_map='auto')")
    out = convert_checkpoint(args.path, args.output, rename=name_map.apply if name_map else None)
    print(f"wrote {out}", file=sys.stderr)
    return 0


def _cmd_ckpt_to_npy(args: argparse.Namespace) -> int:
    from .checkpoint.inspect import checkpoint_to_npy

    out = checkpoint_to_npy(args.path, args.output)
    print(f"wrote {out}", file=sys.stderr)
    return 0


def _cmd_features(args: argparse.Namespace) -> int:
    from .features import features_command

    out = features_command(model_name=args.model_name, checkpoint_path=args.checkpoint_path,
                           endpoint=args.endpoint, images=args.images, output=args.output,
                           num_classes=args.num_classes, image_size=args.image_size,
                           preprocessing_name=args.preprocessing_name, batch_size=args.batch_size,
                           device=args.device, name_map=args.checkpoint_name_map)
    print(f"wrote {out}", file=sys.stderr)
    return 0


def _comma_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _cmd_probe(args: argparse.Namespace) -> int:
    from .errors import ConfigError
    from .probe import run_probe
    from .runtime import pick_device

    try:
        rates = [float(rate) for rate in _comma_list(args.learning_rates)]
    except ValueError as error:
        raise ConfigError(f"--learning_rates must be a comma list of numbers ({error})") from error
    results = run_probe(model_name=args.model_name, checkpoint_path=args.checkpoint_path,
                        dataset_name=args.dataset_name, dataset_dir=args.dataset_dir,
                        endpoints=_comma_list(args.endpoints), learning_rates=rates, output_dir=args.output_dir,
                        train_split=args.train_split, eval_split=args.eval_split, num_epochs=args.num_epochs,
                        batch_size=args.batch_size, image_size=args.image_size,
                        preprocessing_name=args.preprocessing_name, labels_offset=args.labels_offset,
                        num_workers=args.num_workers, seed=args.seed, weight_decay=args.weight_decay,
                        cache_dir=args.cache_dir, device=str(pick_device(args.device)))
    print(json.dumps(results["best"]))
    return 0


def _cmd_data_convert(args: argparse.Namespace) -> int:
    from .data.convert import convert_command

    out = convert_command(args.source, args.output, name=args.name, num_shards=args.num_shards,
                          splits=args.splits, validation_fraction=args.validation_fraction, seed=args.seed,
                          output_format=args.format)
    print(f"wrote {out}", file=sys.stderr)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from .export import export

    result = export(args.checkpoint_path, args.format, args.output, model_name=args.model_name,
                    num_classes=args.num_classes, image_size=args.image_size,
                    preprocessing_name=args.preprocessing_name, labels_file=args.labels_file,
                    multi_label={"true": True, "false": False}.get(str(args.multi_label).lower()),
                    verify_images=args.verify_images, with_preprocessing=args.with_preprocessing, opset=args.opset,
                    quantize=args.quantize, calibration_dataset_dir=args.calibration_dataset_dir,
                    calibration_images=args.calibration_images, min_agreement=args.min_agreement,
                    moving_average=not args.no_moving_average, weight_rounding=args.weight_rounding)
    print(json.dumps({"output": str(result.path), "format": result.format,
                      "max_abs_diff": result.comparison.max_abs_diff,
                      "largest_logit": result.comparison.largest_logit,
                      "top1_agreement": result.comparison.top1_agreement,
                      "extra_files": [str(p) for p in result.extra_files], **result.report}))
    return 0


def _given(args: argparse.Namespace) -> dict:
    """Settings explicitly given on the command line (defaults come from the config class)."""
    return {k: v for k, v in vars(args).items() if k not in ("func", "command", "subcommand")}


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (sub-commands and their flags)."""
    parser = argparse.ArgumentParser(prog="slimtune", description="Fine-tune TF-Slim image classifiers on PyTorch.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, func: Callable[[argparse.Namespace], int], help_text: str,
                parent: argparse._SubParsersAction = commands) -> argparse.ArgumentParser:
        sub = parent.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(func=func)
        return sub

    add_dataclass_arguments(command("train", _cmd_train, "train or fine-tune a network"), TrainConfig)
    add_dataclass_arguments(command("eval", _cmd_eval, "evaluate a checkpoint (or each new one with --watch)"),
                            EvalConfig)

    predict = command("predict", _cmd_predict, "top-k labels for images, folders or globs")
    predict.add_argument("images", nargs="+", help="image files, folders or glob patterns")
    predict.add_argument("--checkpoint_path", "--checkpoint-path", help="checkpoint file or train_dir")
    predict.add_argument("--model", help="an exported .onnx (slimtune export) to run with onnxruntime instead")
    predict.add_argument("--model_name", "--model-name", help="network (default: recorded in the checkpoint)")
    predict.add_argument("--top_k", "--top-k", type=int, default=5, help="labels per image (single-label)")
    predict.add_argument("--threshold", type=float, help="multi-label probability threshold (default: tuned or 0.5)")
    predict.add_argument("--batch_size", "--batch-size", type=int, default=32)
    predict.add_argument("--image_size", "--image-size", type=int, help="input size (default: as trained)")
    predict.add_argument("--preprocessing_name", "--preprocessing-name")
    predict.add_argument("--format", choices=("table", "json"), default="table", help="table or JSON lines")
    predict.add_argument("--device", default="auto")
    predict.add_argument("--on_bad_image", "--on-bad-image", choices=("skip", "fail"), default="skip")
    predict.add_argument("--compile", action="store_true",
                         help="torch.compile the forward with frozen weights (pays on many images: the compile "
                              "takes 30-80 s on CPU; checked against eager on the first batch)")
    predict.add_argument("--no_moving_average", "--no-moving-average", action="store_true",
                         help="use the raw weights even when the run saved moving averages (used by default)")

    models = command("models", _cmd_models, "list the registered networks")
    models.add_argument("pattern", nargs="?", help="glob filter, e.g. 'resnet*'")
    models.add_argument("--params", action="store_true", help="also count parameters (builds each net on the meta device)")
    models.add_argument("--source", choices=("slim", "timm", "torchvision"), default="slim",
                        help="slim's registry, or timm's / torchvision's architectures (--model_name timm:NAME; "
                             "weights from --checkpoint_path, never downloaded)")

    demo = command("demo", _cmd_demo, "train lenet on the bundled digits, evaluate, predict (about a minute)")
    demo.add_argument("--output_dir", "--output-dir", default="slimtune_demo")
    demo.add_argument("--max_number_of_steps", "--max-number-of-steps", type=int, default=None)

    ckpt = command("ckpt", lambda a: _missing_subcommand(ckpt), "inspect and convert checkpoints")
    ckpt_commands = ckpt.add_subparsers(dest="subcommand", metavar="SUBCOMMAND")
    inspect_cmd = command("inspect", _cmd_ckpt_inspect, "list tensors (or show one)", ckpt_commands)
    inspect_cmd.add_argument("path")
    inspect_cmd.add_argument("--tensor", help="show this tensor's values")
    convert = command("convert", _cmd_ckpt_convert, "convert a checkpoint to .safetensors", ckpt_commands)
    convert.add_argument("path")
    convert.add_argument("output")
    convert.add_argument("--name_map", "--name-map", action="append", default=[],
                         help="rename rule OLD_PREFIX=NEW_PREFIX or 're:REGEX=REPLACEMENT' (repeatable; "
                              "the first matching rule applies)")
    to_npy = command("to-npy", _cmd_ckpt_to_npy, "export weights as a name -> array .npy (or .npz)", ckpt_commands)
    to_npy.add_argument("path")
    to_npy.add_argument("output")

    features = command("features", _cmd_features, "write an end point's activations for each image")
    features.add_argument("images", nargs="+", help="image files, folders or glob patterns")
    features.add_argument("--model_name", "--model-name",
                          help="network (default: recorded in a slimtune checkpoint)")
    features.add_argument("--checkpoint_path", "--checkpoint-path")
    features.add_argument("--checkpoint_name_map", "--checkpoint-name-map", action="append", default=[])
    features.add_argument("--endpoint", required=True, help="end point name, e.g. resnet_v1_50/block4")
    features.add_argument("--output", required=True, help=".npy or .safetensors")
    features.add_argument("--num_classes", "--num-classes", type=int)
    features.add_argument("--image_size", "--image-size", type=int)
    features.add_argument("--preprocessing_name", "--preprocessing-name")
    features.add_argument("--batch_size", "--batch-size", type=int, default=32)
    features.add_argument("--device", default="auto")

    probe = command("probe", _cmd_probe, "linear probes on several end points x learning rates over one frozen pass")
    probe.add_argument("--model_name", "--model-name", required=True)
    probe.add_argument("--checkpoint_path", "--checkpoint-path", help="the backbone's weights (slim, TF or slimtune)")
    probe.add_argument("--dataset_name", "--dataset-name")
    probe.add_argument("--dataset_dir", "--dataset-dir")
    probe.add_argument("--endpoints", required=True, help="comma list, e.g. block2,block3,block4,global_pool")
    probe.add_argument("--learning_rates", "--learning-rates", default="1e-3,1e-2,1e-1", help="comma list")
    probe.add_argument("--output_dir", "--output-dir", required=True,
                       help="results table, plot, feature cache and the best head's checkpoint (best/)")
    probe.add_argument("--train_split", "--train-split", default="train")
    probe.add_argument("--eval_split", "--eval-split", default="auto")
    probe.add_argument("--num_epochs", "--num-epochs", type=int, default=10)
    probe.add_argument("--batch_size", "--batch-size", type=int, default=64)
    probe.add_argument("--image_size", "--image-size", type=int)
    probe.add_argument("--preprocessing_name", "--preprocessing-name")
    probe.add_argument("--labels_offset", "--labels-offset", type=int, default=0)
    probe.add_argument("--weight_decay", "--weight-decay", type=float, default=0.0)
    probe.add_argument("--num_workers", "--num-workers", type=int, default=0)
    probe.add_argument("--seed", type=int, default=0)
    probe.add_argument("--cache_dir", "--cache-dir", help="feature cache (default: OUTPUT_DIR/feature_cache)")
    probe.add_argument("--device", default="auto")

    data = command("data", lambda a: _missing_subcommand(data), "dataset tools")
    data_commands = data.add_subparsers(dest="subcommand", metavar="SUBCOMMAND")
    convert_data = command("convert", _cmd_data_convert,
                           "image folder / VOC / manifest -> TFRecord (slim's) or WebDataset shards + labels.txt",
                           data_commands)
    convert_data.add_argument("source")
    convert_data.add_argument("output")
    convert_data.add_argument("--name", default=None, help="dataset name used in shard file names")
    convert_data.add_argument("--num_shards", "--num-shards", type=int, default=5)
    convert_data.add_argument("--splits", default=None,
                              help="comma list of splits to convert (default: those the source has)")
    convert_data.add_argument("--validation_fraction", "--validation-fraction", type=float, default=0.0,
                              help="image folders without split folders: hold out this fraction as validation")
    convert_data.add_argument("--seed", type=int, default=0)
    convert_data.add_argument("--format", default="tfrecord", choices=("tfrecord", "webdataset"),
                              help="shards to write: slim's TFRecords or WebDataset tar files")

    exporter = command("export", _cmd_export,
                       "write a trained net as onnx / torchscript / exported-program / safetensors / tf-checkpoint / "
                       "tflite, verified against the trained model")
    exporter.add_argument("--checkpoint_path", "--checkpoint-path", required=True, help="train_dir or checkpoint file")
    exporter.add_argument("--format", required=True,
                          help="onnx, torchscript, exported-program, safetensors, tf-checkpoint or tflite")
    exporter.add_argument("--output", required=True, help="file to write (a checkpoint prefix for tf-checkpoint)")
    exporter.add_argument("--model_name", "--model-name", help="network (default: the run's saved config)")
    exporter.add_argument("--num_classes", "--num-classes", type=int, help="class count (default: saved config)")
    exporter.add_argument("--image_size", "--image-size", type=int, help="input size (default: as trained)")
    exporter.add_argument("--preprocessing_name", "--preprocessing-name")
    exporter.add_argument("--labels_file", "--labels-file", help="labels.txt to store (default: the run's labels)")
    exporter.add_argument("--multi_label", "--multi-label", default=None, help="true/false (default: as trained)")
    exporter.add_argument("--verify_images", "--verify-images", nargs="+",
                          help="images/folders to verify on (default: scikit-image photos or bundled scans)")
    exporter.add_argument("--with_preprocessing", "--with-preprocessing", action="store_true",
                          help="take uint8 NHWC images of any size; the net's eval preprocessing runs in the graph")
    exporter.add_argument("--opset", type=int, default=18, help="ONNX opset (>= 17)")
    exporter.add_argument("--quantize", choices=("int8",), help="post-training static int8 quantization")
    exporter.add_argument("--calibration_dataset_dir", "--calibration-dataset-dir",
                          help="image folder to calibrate int8 quantization on")
    exporter.add_argument("--calibration_images", "--calibration-images", type=int, default=256)
    exporter.add_argument("--min_agreement", "--min-agreement", type=float, default=0.99,
                          help="least int8 top-1 agreement with fp32 on the calibration images")
    exporter.add_argument("--weight_rounding", "--weight-rounding", choices=("gptq", "nearest"), default="gptq",
                          help="int8 ONNX weights: gptq picks each weight's grid point to cancel the layer's "
                               "error on the calibration images (default); nearest rounds each on its own")
    exporter.add_argument("--no_moving_average", "--no-moving-average", action="store_true",
                          help="export the raw weights even when the run saved moving averages (used by default)")
    return parser


def _missing_subcommand(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def _one_line(message: str) -> str:
    """An error raised in a DataLoader worker arrives wrapped in the worker's traceback text; its
    last line is the error itself ('pkg.ErrorClass: message')."""
    if "Original Traceback" in message:
        last = [line for line in message.splitlines() if line.strip()][-1]
        return last.split(": ", 1)[1] if ": " in last and last.split(": ", 1)[0].endswith("Error") else last
    return message


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    reuse_freed_memory()
    try:
        return int(args.func(args) or 0)
    except SlimtuneError as error:
        if os.environ.get("SLIMTUNE_DEBUG"):
            raise
        print(f"slimtune: error: {_one_line(str(error))}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader went away (`slimtune models | head -1`): not an error worth a traceback. Point
        # stdout at /dev/null so the interpreter's final flush does not fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, as a shell reports a writer whose pipe closed
    except KeyboardInterrupt as interrupted:
        # 128 + the signal number, as a shell reports a process ended by it (130 for Ctrl-C,
        # 143 for SIGTERM); training has already said where it saved.
        signum = getattr(interrupted, "signum", 2)
        if signum == 2 and not hasattr(interrupted, "signum"):
            print("slimtune: interrupted", file=sys.stderr)
        return 128 + signum


if __name__ == "__main__":
    sys.exit(main())

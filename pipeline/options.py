"""Command-line options: the project's own, parsed here; every other flag goes to Beam untouched."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
from typing import Optional, Sequence

from pipeline.models import CUSTOM_MODEL, MODELS, ModelSpec, resolve_model
from transforms.decode import RESIZE_MODES, PreprocessConfig
from transforms.embed import EmbedConfig
from transforms.tfrecord import TFRecordFeatures
from transforms.uri_reader import ReadConfig

ENGINES = ("auto", "tensorflow", "litert")
# Images per model call when --batch_size is not given, measured per engine on CPU (benchmarks/engine_alone.py):
# LiteRT/XNNPACK is fastest and smallest at 8 (MobileNet: 145 img/s and 328 MB against 128 img/s and 556 MB at 32),
# TensorFlow/oneDNN at 32.
DEFAULT_BATCH = {"tensorflow": 32, "litert": 8}
DEFAULT_MODEL = "mobilenet_v2_130_224"


@dataclasses.dataclass(frozen=True)
class JobConfig:
    """Everything one run needs, resolved and validated."""

    input: str
    output_dir: str
    model: ModelSpec
    preprocess: PreprocessConfig
    read: ReadConfig
    embed: EmbedConfig
    overwrite: bool
    tfrecord_features: TFRecordFeatures = TFRecordFeatures()
    decode_threads: int = 1
    progress_interval_s: float = 10.0
    skip_existing: tuple = ()  # earlier run folders whose ids are not embedded again
    force_full_run: bool = False
    max_error_rate: Optional[float] = None
    verbose: bool = False
    engine: str = "auto"  # as asked; the launcher resolves it into embed.engine
    batch_size: Optional[int] = None  # as asked; None: the resolved engine's DEFAULT_BATCH
    compiled_cache: Optional[str] = None


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def build_parser(
    prog: str = "python -m pipeline.run",
    description: str = "Embed images with a TF Hub feature-vector model on Apache Beam; write Parquet.",
    single_run: bool = True,
    with_input: bool = True,
) -> argparse.ArgumentParser:
    """The options of one embedding run; `single_run=False` leaves out where its output goes (the index decides),
    `with_input=False` what it reads (an index's `create` records only the model and preprocessing)."""
    models = ", ".join(f"{m.name} ({m.input_size}x{m.input_size}, {m.dim}-dim)" for m in MODELS.values())
    parser = ShortErrorParser(
        prog=prog,
        description=description,
        epilog="Every other flag is a Beam pipeline option and is passed through "
        "(--runner, --direct_num_workers, --temp_location, --project, ...).",
        allow_abbrev=False,  # never swallow a Beam flag by prefix
    )
    io = parser.add_argument_group("input and output")
    if with_input:
        io.add_argument(
            "--input",
            required=True,
            help="A folder (every image file under it, at any depth), a glob of image files ('/data/**/*.jpg': "
            "**/ matches zero or more folders; 'gs://bucket/imgs/*.jpg'), a manifest (.txt: one URI a line; "
            ".csv/.tsv/.jsonl/.parquet with a 'uri' and optional 'id' column), or TFRecord files of tf.train.Example "
            "(any name containing '.tfrecord', e.g. 'gs://b/train.tfrecord-*'). Without an id the id is the URI.",
        )
    io.add_argument("--tfrecord_image_feature", default=TFRecordFeatures.image,
                    help="TFRecord input: the feature holding the encoded image. Default: %(default)s.")
    io.add_argument("--tfrecord_id_feature", default=TFRecordFeatures.id,
                    help="TFRecord input: the feature holding the id. Default: %(default)s.")
    if single_run:
        io.add_argument("--output", required=True, help="Output directory (local, gs://, s3://).")
        io.add_argument(
            "--overwrite",
            action="store_true",
            help="Replace the outputs of an earlier run in --output (default: refuse to mix runs).",
        )
        io.add_argument(
            "--skip_existing",
            metavar="PREVIOUS_OUTPUT",
            action="append",
            default=[],
            help="An earlier run's output folder, or a glob of them ('out/night-*'); repeat for several. Ids they "
            "embedded are skipped. Each must be a finished run with the same model (by content) and preprocessing, "
            "unless --force_full_run. For an index kept up to date night after night, use python -m pipeline.index.",
        )
        io.add_argument("--force_full_run", action="store_true",
                        help="With --skip_existing: embed everything even when the earlier run's model differs.")
    io.add_argument("--allow_uri_prefix", action="append", default=[], metavar="PREFIX",
                    help="Read only URIs that start with PREFIX (repeat for several: 'gs://photos/', "
                    "'https://cdn.example.com/'); any other row, and any redirect out of them, is a failure row that "
                    "says so. For manifests others write: by default a row may name any local file, object or http "
                    "host the workers reach (cloud metadata servers and link-local addresses are always refused).")
    io.add_argument("--max_error_rate", type=_fraction, metavar="FRACTION",
                    help="Exit with code 3 when more than this share of the inputs failed (outputs are still "
                    "written). Default: never.")
    model = parser.add_argument_group("model")
    model.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"Registry model: {models}; or '{CUSTOM_MODEL}' with --model_handle, --image_size and --embedding_dim. "
        f"Default: {DEFAULT_MODEL}.",
    )
    model.add_argument(
        "--model_handle",
        help="Where the weights come from: a tfhub.dev / Kaggle URL, a gs:// path or a local SavedModel "
        "directory (default: the registry's). A handle is code: use trusted sources only.",
    )
    resizable = ", ".join(m.name for m in MODELS.values() if m.resizable) or "none"
    model.add_argument("--image_size", type=positive_int,
                       help="Side of the square the images are resized to. Default: the registry's for the model "
                       f"({', '.join(f'{m.name} {m.input_size}' for m in MODELS.values())}). Only resizable models "
                       f"({resizable}) and custom ones accept another size.")
    model.add_argument("--embedding_dim", type=positive_int, help="Output dim of a custom model.")
    prep = parser.add_argument_group("preprocessing")
    prep.add_argument(
        "--resize_mode",
        choices=RESIZE_MODES,
        default="stretch",
        help="stretch: resize the whole image to the square (default); center_crop: crop the central square first.",
    )
    prep.add_argument(
        "--max_image_pixels",
        type=positive_int,
        default=PreprocessConfig.max_pixels,
        help="Reject images whose header declares more pixels (decompression bombs). Default: %(default)s.",
    )
    prep.add_argument(
        "--max_image_bytes",
        type=positive_int,
        default=ReadConfig.max_bytes,
        help="Reject files larger than this. Default: %(default)s.",
    )
    prep.add_argument(
        "--allow_truncated_images",
        action="store_true",
        help="Embed truncated images with their missing part grey (default: report them as errors).",
    )
    prep.add_argument("--http_timeout", type=_positive_float, default=ReadConfig.http_timeout_s,
                      help="Total seconds allowed for one http(s) download attempt (connect, headers and body). "
                      "Default: %(default)s.")
    prep.add_argument("--read_retries", "--http_retries", dest="read_retries", type=_non_negative_int,
                      default=ReadConfig.retries,
                      help="Retries, with exponential backoff, of a read that failed transiently (reset, timeout, "
                      "5xx, 429/408 honouring Retry-After, object-store throttling) on any scheme; 4xx and missing "
                      "or forbidden objects are reported at once. An input still failing is reported, and the "
                      "next run tries it again. Default: %(default)s.")
    io.add_argument("--progress_interval", type=float, default=10.0, metavar="SECONDS",
                    help="On a terminal a progress bar (done / total, images/s, time left) is redrawn in place; in "
                    "logs, and on remote workers, a progress line is printed this often (0: no progress at all). "
                    "Default: %(default)s.")
    io.add_argument("--verbose", action="store_true",
                    help="Show every TensorFlow and Beam log message (default: only warnings that matter to the run).")
    perf = parser.add_argument_group("inference")
    perf.add_argument("--batch_size", type=positive_int,
                      help="Images per model call. Default: the engine's measured best, "
                      + ", ".join(f"{engine} {size}" for engine, size in DEFAULT_BATCH.items()) + ".")
    perf.add_argument("--decode_threads", type=positive_int, default=1,
                      help="Threads per DoFn that decode ahead while the model computes. Default: %(default)s "
                      "(raise it on GPU workers, where decoding sets the pace).")
    perf.add_argument("--tf_intra_op_threads", type=_non_negative_int, default=0,
                      help="TensorFlow intra-op threads per worker process. Default 0 = auto: the cores divided by "
                      "the DirectRunner worker processes (measured fastest), otherwise TensorFlow's default.")
    perf.add_argument("--tf_inter_op_threads", type=_non_negative_int, default=0,
                      help="TensorFlow inter-op threads per worker process (0: TensorFlow's default).")
    perf.add_argument("--engine", choices=ENGINES, default="auto",
                      help="Inference engine. auto: the one measured fastest for the model on CPU (LiteRT for "
                      "mobilenet_v2_130_224, TensorFlow for inception_resnet_v2 and custom models), falling back "
                      "to TensorFlow with a note when the model cannot be compiled; tensorflow; litert: the model "
                      "compiled once per job, run by LiteRT with XNNPACK. Default: %(default)s.")
    perf.add_argument("--compiled_cache", metavar="DIR",
                      help="Where compiled models are kept and reused, readable by every worker. Default: "
                      "TEMP_LOCATION/compiled-models with --temp_location, else ~/.cache/beam-image-embeddings/compiled.")
    perf.add_argument("--bfloat16", action="store_true",
                      help="Run the model in bfloat16 through oneDNN auto mixed precision (CPUs with AVX512-BF16 or "
                      "AMX): faster, vectors differ slightly from float32 and are recorded as such. Default: float32.")
    perf.add_argument("--large_model", action="store_true",
                      help="Load one model per machine, shared by its worker processes, instead of one per process.")
    return parser


def _beam_parser():
    """A parser that knows every Beam pipeline option, built the way Beam's own PipelineOptions parses them."""
    from apache_beam.options.pipeline_options import PipelineOptions, _BeamArgumentParser

    parser = _BeamArgumentParser(allow_abbrev=False)
    for cls in {str(cls): cls for cls in PipelineOptions.__subclasses__()}.values():
        cls._add_argparse_args(parser)  # what Beam itself does in PipelineOptions.get_all_options
    return parser


class ShortErrorParser(argparse.ArgumentParser):
    """A mistake gets its one-line error and a pointer to --help, not a screen of usage above it."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n(all options: {self.prog} --help)\n")


def parse_known(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]]) -> tuple:
    """(args, Beam args). A flag neither this project nor Beam knows is refused, with the nearest known one,
    before a missing required flag is: `--inptu x` is a typo of --input, not a missing --input."""
    refuse_repeated(parser, list(argv or ()))
    required = [action for action in parser._actions if action.required]
    for action in required:
        action.required = False
    try:
        args, beam_args = parser.parse_known_args(argv)
    finally:
        for action in required:
            action.required = True
    refuse_unknown_args(parser, beam_args)
    missing = [action.option_strings[0] for action in required if getattr(args, action.dest) is None]
    if missing:
        parser.error(f"the following arguments are required: {', '.join(missing)}")
    return args, beam_args


def refuse_repeated(parser: argparse.ArgumentParser, argv: Sequence[str]) -> None:
    """argparse keeps only the last of a repeated single-value option (`--input A --input B` reads only B): a
    repetition is refused instead (exit 2). Options that take several values (--skip_existing) are not counted."""
    subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if subparsers and argv and argv[0] in subparsers[0].choices:
        parser, argv = subparsers[0].choices[argv[0]], argv[1:]
    single = {option: action for action in parser._actions if type(action) is argparse._StoreAction
              and action.nargs is None for option in action.option_strings}
    seen: dict = {}
    for arg in argv:
        action = single.get(arg.split("=", 1)[0]) if arg.startswith("--") else None
        if action is not None:
            seen[action.dest] = seen.get(action.dest, 0) + 1
            if seen[action.dest] == 2:
                parser.error(f"{action.option_strings[0]} was given more than once; it takes one value (give it "
                             f"once)")


def refuse_unknown_args(parser: argparse.ArgumentParser, beam_args: Sequence[str]) -> None:
    """Beam only logs and drops flags it cannot parse; a typo here must stop the run (exit 2) instead."""
    beam_parser = _beam_parser()
    _, unknown = beam_parser.parse_known_args(list(beam_args))
    if not unknown:
        return
    flag = unknown[0].split("=", 1)[0]
    known = [option for p in (parser, beam_parser) for action in p._actions for option in action.option_strings]
    close = difflib.get_close_matches(flag, known, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]}?" if close else "; see --help for this project's options."
    what = f"unrecognized option {flag}" if flag.startswith("-") else f"unexpected argument {flag!r}"
    parser.error(f"{what}: neither this project nor Beam knows it{hint}")


def parse_args(argv: Optional[Sequence[str]] = None) -> tuple[JobConfig, list[str]]:
    """Returns the job's config and the remaining (Beam) arguments; bad options exit with a message."""
    parser = build_parser()
    args, beam_args = parse_known(parser, argv)
    return config_from_args(parser, args), beam_args


def config_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> JobConfig:
    """The validated JobConfig of parsed options (an index's runs get their output folder later)."""
    try:
        spec = resolve_model(args.model, args.model_handle, args.image_size, args.embedding_dim)
    except ValueError as exc:
        parser.error(str(exc))
    return JobConfig(
        input=getattr(args, "input", ""),
        output_dir=(getattr(args, "output", None) or "").rstrip("/") or "/",
        model=spec,
        preprocess=PreprocessConfig(
            image_size=spec.input_size,
            resize_mode=args.resize_mode,
            max_pixels=args.max_image_pixels,
            allow_truncated=args.allow_truncated_images,
        ),
        read=ReadConfig(max_bytes=args.max_image_bytes, http_timeout_s=args.http_timeout, retries=args.read_retries,
                        allowed_prefixes=tuple(args.allow_uri_prefix)),
        embed=EmbedConfig(
            handle=spec.handle,
            image_size=spec.input_size,
            dim=spec.dim,
            batch_size=args.batch_size or DEFAULT_BATCH["tensorflow"],
            intra_op_threads=args.tf_intra_op_threads,
            inter_op_threads=args.tf_inter_op_threads,
            large_model=args.large_model,
            bfloat16=args.bfloat16,
        ),
        overwrite=getattr(args, "overwrite", False),
        tfrecord_features=TFRecordFeatures(image=args.tfrecord_image_feature, id=args.tfrecord_id_feature),
        decode_threads=args.decode_threads,
        progress_interval_s=args.progress_interval,
        skip_existing=tuple(getattr(args, "skip_existing", ())),
        force_full_run=getattr(args, "force_full_run", False),
        max_error_rate=args.max_error_rate,
        verbose=args.verbose,
        engine=args.engine,
        batch_size=args.batch_size,
        compiled_cache=args.compiled_cache,
    )

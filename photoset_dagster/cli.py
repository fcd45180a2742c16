"""`photoset`: the seed's commands (sync, generate, shards, prune, verify, migrate) plus demo and dev.

Every command runs through the same Dagster definitions and the project's instance, so its runs
appear in the web UI. User mistakes end with one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import traceback
import warnings
from collections.abc import Callable, Sequence
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
PASS_CHOICES = ("captions", "dinov3", "vae", "t5", "facts", "all")


class CliError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line (not the whole usage block) and exit code 2."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _one_line(text: object, limit: int = 1000) -> str:
    """Any message as one line: its non-blank lines joined with '; ', at most ``limit`` characters."""
    line = "; ".join(part.strip() for part in str(text).splitlines() if part.strip())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _positive(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
    if number < 0:
        raise argparse.ArgumentTypeError(f"{value} must be >= 0")
    return number


def _fraction(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not 0.0 <= number <= 1.0:
        raise argparse.ArgumentTypeError(f"{value} must be between 0 and 1")
    return number


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="photoset", description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", help="data folder (default: ./data, or PHOTOSET_DATA_ROOT)")
    parser.add_argument("--photos-url", help="photos.json URL (default: PHOTOSET_PHOTOS_URL or the real API)")
    parser.add_argument("--allow-http", action="store_true", help="accept http:// download URLs (loopback/demo)")
    parser.add_argument("-v", "--verbose", action="store_true", help="also print Dagster's engine events")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = commands.add_parser("demo", help="offline demo: local photo server + tiny models, whole pipeline")
    demo.add_argument("--photos", type=_positive, default=None, help="use only the first N demo photos")

    dev = commands.add_parser("dev", help="start the Dagster web UI and daemon on the project's instance")
    dev.add_argument("--host", default="127.0.0.1")
    dev.add_argument("--port", type=_positive, default=3000)
    dev.add_argument("--demo", action="store_true", help="use the tiny models the last `photoset demo` built")

    sync = commands.add_parser("sync", help="fetch the photo list, download missing raws, link approved/")
    sync.add_argument("--dry-run", action="store_true", help="report what would change; change nothing")
    sync.add_argument("--limit", type=_positive, help="process at most N photos")
    sync.add_argument("--start-page", type=_positive, default=1)
    sync.add_argument("--end-page", type=_positive)
    sync.add_argument("--stop-after-links", type=_positive, help="stop after N links created or updated")
    sync.add_argument("--progress-every", type=_positive, default=1000, help="0 disables progress lines")
    sync.add_argument("--prune", action="store_true", help="then prune images gone from a complete list")

    generate = commands.add_parser("generate", help="compute captions, DINOv3, VAE latents and T5 states")
    generate.add_argument("--pass", dest="pass_name", choices=PASS_CHOICES, default="all")
    generate.add_argument("--limit", type=_positive, help="at most N images")
    generate.add_argument("--image-id", action="append", default=[], help="only this image (repeatable)")
    generate.add_argument("--force", "--no-resume", dest="force", action="store_true",
                          help="recompute even current artefacts (replaced atomically; nothing deleted first)")
    generate.add_argument("--progress-every", type=_positive, default=1000)

    shards = commands.add_parser("shards", help="write WebDataset shards per aspect bucket")
    shards.add_argument("--shard-size", type=_positive, default=1000)
    shards.add_argument("--bucket", action="append", default=[], help="only this bucket, e.g. 832x1216")
    shards.add_argument("--shuffle", action="store_true")
    shards.add_argument("--seed", type=int, default=1337)
    shards.add_argument("--limit", type=_positive)
    shards.add_argument("--dry-run", action="store_true")
    shards.add_argument("--overwrite", action="store_true", help="accepted for the seed's sake: shards are always replaced atomically")

    prune = commands.add_parser("prune", help="remove data of images no longer on the list")
    prune.add_argument("--dry-run", action="store_true", help="list everything that would be deleted")
    prune.add_argument("--force", action="store_true", help="allow deleting more than --max-fraction")
    prune.add_argument("--max-fraction", type=_fraction, help="largest share of the dataset one prune may delete")

    verify = commands.add_parser("verify", help="check every artefact (the seed's --verify); exit 1 if any is bad")
    verify.add_argument("--pass", dest="pass_name", choices=PASS_CHOICES, default="all")

    migrate = commands.add_parser("migrate", help="migrate a Stage-1 JSONL and rebuild the Stage-2 dataset")
    migrate.add_argument("--dry-run", action="store_true")
    return parser


def _apply_global_options(args: argparse.Namespace) -> None:
    # One planned event per run instead of one per partition (seconds saved per 1,000 images; the
    # trade-off, documented in the README: a crashed run does not mark its unfinished partitions failed).
    os.environ.setdefault("DAGSTER_EMIT_PARTITION_SUBSET_IN_PLANNED_EVENTS", "true")
    if args.data_root:
        os.environ["PHOTOSET_DATA_ROOT"] = args.data_root
    if args.photos_url:
        os.environ["PHOTOSET_PHOTOS_URL"] = args.photos_url
    if args.allow_http:
        os.environ["PHOTOSET_ALLOW_HTTP"] = "1"


def _definitions():
    from .defs.resources import ConfigError

    try:
        from .definitions import build_definitions

        return build_definitions()
    except ConfigError as error:
        raise CliError(_config_message(error)) from None


def _config_message(error: Exception) -> str:
    """A bad ``PHOTOSET_*`` value as one line naming the variable (pydantic's report spans several lines)."""
    from .defs.resources import ENV_SETTINGS, RESOURCE_CLASSES

    cause = error.__cause__
    details = getattr(cause, "errors", None)
    if not callable(details):
        return _one_line(error)
    resource = {cls.__name__: key for key, cls in RESOURCE_CLASSES.items()}.get(getattr(cause, "title", ""))
    parts = []
    for detail in details():
        field = ".".join(str(part) for part in detail.get("loc", ()))
        names = [env for env, (key, name) in ENV_SETTINGS.items() if name == field and key in (resource, "*")]
        if names:
            parts.append(f"{names[0]}={os.environ.get(names[0], detail.get('input'))!r}: {detail.get('msg')}")
        else:
            parts.append(f"{resource or 'resource'}.{field}: {detail.get('msg')}")
    return "invalid configuration: " + _one_line("; ".join(parts))


def _instance():
    import dagster as dg

    from .instance import InstanceConfigError, prepare_dagster_home

    try:
        prepare_dagster_home()
    except InstanceConfigError as error:
        raise CliError(str(error)) from None
    return dg.DagsterInstance.get()


def _user_error(error):
    """The error the pipeline raised, not Dagster's wrapper around it ("Error occurred while executing op")."""
    while error.cause is not None and error.cls_name and error.cls_name.startswith("Dagster"):
        error = error.cause
    return error


def _failure_lines(result) -> list[str]:
    lines = []
    for event in result.all_events:
        if not event.is_step_failure:
            continue
        data = event.step_failure_data
        user = getattr(data, "user_failure_data", None)
        if user is not None and user.description:
            lines.append(user.description)
        elif data.error is not None:
            lines.append(_user_error(data.error).message)
    return lines or ["the run failed (see the run in the web UI)"]


def _logger_config(verbose: bool) -> dict[str, Any]:
    # Dagster logs most engine events (step start, outputs, ...) at DEBUG: -v has to lower the level to show them.
    return {"loggers": {"plain": {"config": {"verbose": verbose, "log_level": "DEBUG" if verbose else "INFO"}}}}


def _report(result, problems: Callable[[Any], list[str]] | None = None) -> int:
    """Exit code of a finished run; a failed run (or a successful one with ``problems``) prints one line each."""
    if result.success:
        lines = problems(result) if problems else []
    else:
        lines = _failure_lines(result)
    for line in lines:
        print(f"error: {_one_line(line)}", file=sys.stderr)
    return EXIT_FAILED if lines else EXIT_OK


def run_job(
    job_name: str,
    op_name: str,
    config: dict[str, Any],
    verbose: bool,
    *,
    problems: Callable[[Any], list[str]] | None = None,
) -> int:
    defs = _definitions()
    instance = _instance()
    job = defs.resolve_job_def(job_name)
    run_config = {"ops": {op_name: {"config": config}}, **_logger_config(verbose)}
    result = job.execute_in_process(run_config=run_config, instance=instance, raise_on_error=False)
    return _report(result, problems)


def _listing_problems(result) -> list[str]:
    """A catch-up run that refreshed the list succeeds on a partial list; the command still has to say so
    (the catch-up output's ``photo_list_error`` / ``photo_list_photos`` metadata)."""
    lines = []
    for event in result.all_node_events:
        output = event.step_output_data if event.is_successful_output else None
        metadata = output.metadata if output is not None else {}
        if "photo_list_error" not in metadata:
            continue
        error, listed = metadata["photo_list_error"].value, metadata["photo_list_photos"].value
        if listed:
            lines.append(f"the photo list is incomplete: {error} (synced only the {listed} photos listed before it)")
        else:
            lines.append(f"could not fetch the photo list: {error}")
    return lines


def _failed_image_problems(result) -> list[str]:
    failed = result.output_for_node("catch_up")
    if not failed:
        return []
    return [f"{failed} image(s) failed (reasons above); the next run retries them"]


def materialize(asset_names: Sequence[str], verbose: bool, *, tags=None, asset_config=None) -> int:
    import dagster as dg

    defs = _definitions()
    instance = _instance()
    keys = [dg.AssetKey(name) for name in asset_names]
    job = defs.resolve_implicit_job_def_def_for_assets(keys)
    run_config: dict[str, Any] = dict(_logger_config(verbose))
    if asset_config:
        run_config["ops"] = asset_config
    result = job.execute_in_process(
        run_config=run_config, instance=instance, asset_selection=keys, tags=tags or {}, raise_on_error=False
    )
    return _report(result)


def cmd_sync(args) -> int:
    if args.prune and (args.limit or args.end_page or args.start_page != 1 or args.dry_run):
        raise CliError("--prune needs a full scan: drop --limit, --end-page, --start-page and --dry-run")
    config = {
        "refresh_list": True,
        "passes": ["sync"],
        "start_page": args.start_page,
        "end_page": args.end_page,
        "limit": args.limit,
        "dry_run": args.dry_run,
        "stop_after_links": args.stop_after_links,
        "progress_every": args.progress_every,
    }
    # Per-image download failures are reported in the summary and skipped (as the seed did); a photo list
    # that could not be fetched is a failed command.
    code = run_job("catch_up_job", "catch_up", config, args.verbose, problems=_listing_problems)
    if code == EXIT_OK and args.prune:
        code = run_job("prune_job", "prune", {"refresh_list": False}, args.verbose)
    return code


def cmd_generate(args) -> int:
    config = {
        "passes": [args.pass_name],
        "image_ids": args.image_id,
        "limit": args.limit,
        "force": args.force,
        "progress_every": args.progress_every,
    }
    # Images that fail are skipped so the rest get done, but the command then exits 1.
    return run_job("catch_up_job", "catch_up", config, args.verbose, problems=_failed_image_problems)


def cmd_shards(args) -> int:
    from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

    from .core.buckets import BUCKET_NAMES, parse_bucket
    from .core.layout import DataLayout

    for bucket in args.bucket:
        try:
            parse_bucket(bucket)
        except ValueError as error:
            raise CliError(str(error)) from None
    buckets = [b for b in BUCKET_NAMES if not args.bucket or b in {x.removeprefix("bucket_") for x in args.bucket}]
    if args.shard_size < 1:
        raise CliError("--shard-size must be at least 1")
    dataset = DataLayout(_data_root()).dataset_jsonl
    if not dataset.is_file():
        raise CliError(f"{dataset} not found: build the dataset first (`photoset generate`, then `photoset migrate`)")
    config = {
        "shard_size": args.shard_size,
        "shuffle": args.shuffle,
        "seed": args.seed,
        "limit": args.limit,
        "dry_run": args.dry_run,
    }
    code = EXIT_OK
    # One run per contiguous block of the selected buckets (all 7 by default -> one run).
    for block in _contiguous_blocks(buckets, list(BUCKET_NAMES)):
        tags = {ASSET_PARTITION_RANGE_START_TAG: block[0], ASSET_PARTITION_RANGE_END_TAG: block[-1]}
        code = max(code, materialize(["webdataset_shards"], args.verbose, tags=tags,
                                     asset_config={"webdataset_shards": {"config": config}}))
    if code == EXIT_OK and not args.dry_run:
        print(f"shards: {os.path.abspath(_data_root())}/shards/bucket_<WxH>/shard-*.tar")
    return code


def _contiguous_blocks(selected: list[str], order: list[str]) -> list[list[str]]:
    blocks: list[list[str]] = []
    for name in order:
        if name in selected:
            if blocks and order.index(blocks[-1][-1]) == order.index(name) - 1:
                blocks[-1].append(name)
            else:
                blocks.append([name])
    return blocks


def _data_root() -> str:
    return os.environ.get("PHOTOSET_DATA_ROOT", "data")


def cmd_prune(args) -> int:
    config = {"dry_run": args.dry_run, "force": args.force, "max_fraction": args.max_fraction}
    return run_job("prune_job", "prune", config, args.verbose)


def cmd_verify(args) -> int:
    kinds = {
        "all": ["facts", "captions", "dinov3", "vae_latents", "t5_hidden"],
        "facts": ["facts"],
        "captions": ["captions"],
        "dinov3": ["dinov3"],
        "vae": ["vae_latents"],
        "t5": ["t5_hidden"],
    }[args.pass_name]
    return run_job("verify_job", "verify", {"kinds": kinds}, args.verbose)


def cmd_migrate(args) -> int:
    if args.dry_run:
        from .core.layout import DataLayout
        from .core.records import migrate_stage1

        defs = _definitions()
        resources = defs.resources
        report = migrate_stage1(
            DataLayout(_data_root()),
            dinov3_recipe=resources["dinov3"].settings().recipe(),
            caption_recipe=resources["captioner"].settings().recipe(),
            dry_run=True,
        )
        print("\n".join(report.summary_lines()))
        return EXIT_OK
    return materialize(["dataset_jsonl"], args.verbose)


def cmd_dev(args) -> int:
    from .core.layout import DataLayout
    from .demo.run import demo_env_file
    from .instance import project_root

    _instance()
    env = dict(os.environ)
    if args.demo:
        env_file = demo_env_file(DataLayout(_data_root()))
        if not env_file.is_file():
            raise CliError(f"{env_file} not found: run `photoset demo` first")
        env.update(line.split("=", 1) for line in env_file.read_text().splitlines() if "=" in line)
    workspace = str(project_root() / "workspace.yaml")
    command = [sys.executable, "-m", "dagster", "dev", "-w", workspace, "-h", args.host, "-p", str(args.port)]
    # Replace this process: Ctrl-C and SIGTERM reach `dagster dev` itself, with default handlers even
    # when started from a shell's background job (which would otherwise ignore SIGINT).
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.chdir(project_root())
    os.execve(sys.executable, command, env)


def cmd_demo(args) -> int:
    from .demo.run import run_demo

    return run_demo(photos=args.photos, verbose=args.verbose, run=run_job)


COMMANDS = {
    "demo": cmd_demo,
    "dev": cmd_dev,
    "sync": cmd_sync,
    "generate": cmd_generate,
    "shards": cmd_shards,
    "prune": cmd_prune,
    "verify": cmd_verify,
    "migrate": cmd_migrate,
}


def main(argv: Sequence[str] | None = None) -> int:
    # Dagster flags beta/preview APIs on every definitions load; the terminal is for pipeline output.
    warnings.filterwarnings("ignore", message=r".*is currently in (beta|preview).*")
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # --help, or a usage error already printed as one line
        return exit_.code if isinstance(exit_.code, int) else EXIT_USAGE
    _apply_global_options(args)
    try:
        return COMMANDS[args.command](args)
    except CliError as error:
        print(f"photoset: error: {_one_line(error)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("photoset: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # a bug or an environment problem: still one line unless -v asks for more
        if args.verbose:
            traceback.print_exc()
        hint = "" if args.verbose else " (run `photoset -v ...` for the traceback)"
        print(f"photoset: error: {type(error).__name__}: {_one_line(error)}{hint}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())

"""`photoset`: the seed's commands (sync, generate, shards, prune, verify, migrate), plus report,
config, demo and dev.

Every command runs through the same Dagster definitions and the project's instance, so its runs
appear in the web UI, and reads the same settings as every other process (``photoset config``).
User mistakes end with one line on stderr. Exit codes, the same for every command:

    0  everything done            3  completed, but some images failed (each with its reason)
    1  the run failed             4  refused by a safety guard (prune fraction, a dataset or shards
    2  usage or configuration        that would shrink); nothing was deleted
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

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_PARTIAL, EXIT_REFUSED = 0, 1, 2, 3, 4
EXIT_INTERRUPTED = 130  # Ctrl-C or SIGTERM, as shells report it
PASS_CHOICES = ("captions", "dinov3", "vae", "t5", "facts", "all")
VERIFY_KINDS = {
    "all": ["facts", "captions", "dinov3", "vae_latents", "t5_hidden"],
    "facts": ["facts"],
    "captions": ["captions"],
    "dinov3": ["dinov3"],
    "vae": ["vae_latents"],
    "t5": ["t5_hidden"],
}


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


def _global_options(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """The options every command takes, before or after its name (``photoset sync --data-root x``)."""
    default = argparse.SUPPRESS if suppress else None
    parser.add_argument("--data-root", default=default, help="data folder (setting photoset.data_root)")
    parser.add_argument("--photos-url", default=default, help="photos.json URL (setting photoset.photos_url)")
    parser.add_argument("--allow-http", action="store_true", default=argparse.SUPPRESS if suppress else False,
                        help="accept http:// list and download URLs (loopback, the demo)")
    parser.add_argument("--profile", default=default, help="settings profile of photoset.toml to use")
    parser.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS if suppress else False,
                        help="also print Dagster's engine events and third-party warnings; tracebacks")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="photoset", description=__doc__.split("\n\n")[0].replace("\n", " "),
                     formatter_class=argparse.RawDescriptionHelpFormatter,
                     epilog="exit codes: 0 done, 1 run failed, 2 usage or configuration, 3 some images failed, "
                            "4 refused by a safety guard")
    _global_options(parser, suppress=False)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        _global_options(sub, suppress=True)
        return sub

    demo = command("demo", "offline demo: local photo server + tiny models, whole pipeline, then a report")
    demo.add_argument("action", nargs="?", choices=("run", "serve"), default="run",
                      help="run (default): the whole pipeline; serve: restart the demo's photo server only")
    demo.add_argument("--photos", type=_positive, default=None, help="use only the first N demo photos")

    dev = command("dev", "start the Dagster web UI and daemon on the project's instance")
    dev.add_argument("--host", default="127.0.0.1")
    dev.add_argument("--port", type=_positive, default=3000)
    dev.add_argument("--demo", action="store_true", help="same as --profile demo")

    sync = command("sync", "fetch the photo list, download missing raws, link approved/")
    sync.add_argument("--dry-run", action="store_true", help="report what would change; change nothing")
    sync.add_argument("--limit", type=_positive, help="process at most N photos")
    sync.add_argument("--start-page", type=_positive, default=1)
    sync.add_argument("--end-page", type=_positive)
    sync.add_argument("--stop-after-links", type=_positive, help="stop after N links created or updated")
    sync.add_argument("--progress-every", type=_positive, default=1000, help="0 disables progress lines")
    sync.add_argument("--prune", action="store_true", help="then prune images gone from a complete list")
    sync.add_argument("--force", action="store_true", help="with --prune: allow deleting more than --max-fraction")
    sync.add_argument("--max-fraction", type=_fraction, help="with --prune: largest share one prune may delete")

    generate = command("generate", "compute captions, DINOv3, VAE latents and T5 states")
    generate.add_argument("--pass", dest="pass_name", choices=PASS_CHOICES, default="all")
    generate.add_argument("--limit", type=_positive, help="at most N images")
    generate.add_argument("--image-id", action="append", default=[], help="only this image (repeatable)")
    generate.add_argument("--force", "--no-resume", dest="force", action="store_true",
                          help="recompute even current artefacts (replaced atomically; nothing deleted first)")
    generate.add_argument("--progress-every", type=_positive, default=1000)

    shards = command("shards", "write WebDataset shards per aspect bucket")
    shards.add_argument("--shard-size", type=_positive, default=1000)
    shards.add_argument("--bucket", action="append", default=[], help="only this bucket, e.g. 832x1216")
    shards.add_argument("--shuffle", action="store_true")
    shards.add_argument("--seed", type=int, default=1337)
    shards.add_argument("--limit", type=_positive)
    shards.add_argument("--dry-run", action="store_true")
    shards.add_argument("--force", action="store_true", help="allow shrinking a bucket's shards beyond the guard")
    shards.add_argument("--overwrite", action="store_true", help="accepted for the seed's sake: shards are always replaced atomically")

    prune = command("prune", "remove data of images no longer on the list")
    prune.add_argument("--dry-run", action="store_true", help="list everything that would be deleted")
    prune.add_argument("--force", action="store_true", help="allow deleting more than --max-fraction")
    prune.add_argument("--max-fraction", type=_fraction, help="largest share of the dataset one prune may delete")

    verify = command("verify", "judge every artefact (the seed's --verify); exit 1 if any is bad or not done")
    verify.add_argument("--pass", dest="pass_name", choices=PASS_CHOICES, default="all")
    verify.add_argument("--strict", action="store_true", help="also fail on images that cannot be processed")
    verify.add_argument("--deep", action="store_true", help="hash every array, not only those that moved")

    migrate = command("migrate", "migrate a Stage-1 JSONL and rebuild the Stage-2 dataset")
    migrate.add_argument("--dry-run", action="store_true")
    migrate.add_argument("--force", action="store_true", help="rebuild even if a recipe change would drop records")

    command("report", "write the visual dataset report (thumbnails, plots, failures, near-duplicates)")

    config = command("config", "print every effective setting and where it comes from")
    config.add_argument("--use", metavar="PROFILE", help="make PROFILE the active profile of photoset.toml")
    return parser


def _apply_global_options(args: argparse.Namespace) -> None:
    """Command-line options outrank the settings file and the environment (they become the environment)."""
    if getattr(args, "data_root", None):
        os.environ["PHOTOSET_DATA_ROOT"] = os.path.abspath(args.data_root)  # as the shell means it: from here
    if getattr(args, "photos_url", None):
        os.environ["PHOTOSET_PHOTOS_URL"] = args.photos_url
    if getattr(args, "allow_http", False):
        os.environ["PHOTOSET_ALLOW_HTTP"] = "1"
    if getattr(args, "profile", None) or getattr(args, "demo", False):
        os.environ["PHOTOSET_PROFILE"] = args.profile or "demo"


def _quiet_third_parties() -> None:
    """The terminal is for the pipeline's own lines: deprecations, beta notices and progress bars of
    the libraries underneath show with -v only."""
    warnings.simplefilter("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")


def _settings():
    from .defs.settings import ConfigError, load_settings

    try:
        return load_settings()
    except ConfigError as error:
        raise CliError(str(error)) from None


def _definitions():
    from .defs.settings import ConfigError

    try:
        from .definitions import build_definitions

        return build_definitions(settings=_settings())
    except ConfigError as error:
        raise CliError(str(error)) from None


def _instance():
    import dagster as dg

    from .instance import InstanceConfigError, prepare_dagster_home

    try:
        prepare_dagster_home()
    except InstanceConfigError as error:
        raise CliError(str(error)) from None
    return dg.DagsterInstance.get()


def _data_root() -> str:
    return str(_settings().values["photoset.data_root"])


def _require_data_root(what: str) -> None:
    """Commands that read a dataset (and at most write a report about it) refuse a data root that does
    not exist: a typo would look like an empty dataset."""
    root = _data_root()
    if not os.path.isdir(root):
        raise CliError(f"data root {os.path.abspath(root)} does not exist ({what} needs an existing dataset; "
                       "check --data-root or photoset.data_root)")


def _user_error(error):
    """The error the pipeline raised, not Dagster's wrapper around it ("Error occurred while executing op")."""
    while error.cause is not None and error.cls_name and error.cls_name.startswith("Dagster"):
        error = error.cause
    return error


def _failures(result) -> list[tuple[str, dict[str, Any]]]:
    """(message, metadata) of each failed step."""
    found = []
    for event in result.all_events:
        if not event.is_step_failure:
            continue
        data = event.step_failure_data
        user = getattr(data, "user_failure_data", None)
        if user is not None and user.description:
            found.append((user.description, {k: v.value for k, v in (user.metadata or {}).items()}))
        elif data.error is not None and data.error.cls_name == "DagsterExecutionInterruptedError":
            found.append(("interrupted", {"interrupted": True}))
        elif data.error is not None:
            found.append((_user_error(data.error).message, {}))
    return found or [("the run failed (see the run in the web UI)", {})]


def _logger_config(verbose: bool) -> dict[str, Any]:
    # Dagster logs most engine events (step start, outputs, ...) at DEBUG: -v has to lower the level to show them.
    return {"loggers": {"plain": {"config": {"verbose": verbose, "log_level": "DEBUG" if verbose else "INFO"}}}}


def _exit_code(result, problems: Callable[[Any], list[str]] | None = None, *, quiet_partial: bool = False) -> int:
    """Exit code of a finished run; prints one ``error:`` line per problem (not for failed images when
    ``quiet_partial``: the caller reports them)."""
    if result.success:
        lines, code = (problems(result) if problems else []), EXIT_FAILED
    else:
        failures = _failures(result)
        lines = [message for message, _ in failures]
        metadata = {key: value for _, meta in failures for key, value in meta.items()}
        if metadata.get("interrupted"):
            print("photoset: interrupted (the run is marked failed; everything finished before is kept, "
                  "the next run does the rest)", file=sys.stderr)
            return EXIT_INTERRUPTED
        code = EXIT_REFUSED if metadata.get("refused") else EXIT_PARTIAL if metadata.get("failed_images") else EXIT_FAILED
        if metadata.get("photo_list_error"):
            lines.insert(0, _listing_line(metadata))
            code = EXIT_FAILED
    if not (quiet_partial and code == EXIT_PARTIAL):
        for line in lines:
            print(f"error: {_one_line(line)}", file=sys.stderr)
    return code if lines else EXIT_OK


def run_job(job_name: str, op_name: str, config: dict[str, Any], verbose: bool, *,
            problems: Callable[[Any], list[str]] | None = None, quiet_partial: bool = False) -> int:
    defs = _definitions()
    instance = _instance()
    job = defs.resolve_job_def(job_name)
    run_config = {"ops": {op_name: {"config": config}}, **_logger_config(verbose)}
    result = job.execute_in_process(run_config=run_config, instance=instance, raise_on_error=False)
    return _exit_code(result, problems, quiet_partial=quiet_partial)


def _listing_line(metadata: dict[str, Any]) -> str:
    error, listed = metadata["photo_list_error"], metadata.get("photo_list_photos", 0)
    if listed:
        return f"the photo list is incomplete: {error} (synced only the {listed} photos listed before it)"
    return f"could not fetch the photo list: {error}"


def _listing_problems(result) -> list[str]:
    """A catch-up that refreshed the list succeeds on a partial list; the command still says so."""
    lines = []
    for event in result.all_node_events:
        output = event.step_output_data if event.is_successful_output else None
        metadata = {k: v.value for k, v in (output.metadata if output is not None else {}).items()}
        if "photo_list_error" in metadata:
            lines.append(_listing_line(metadata))
    return lines


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
    return _exit_code(result)


def cmd_sync(args) -> int:
    if args.prune and (args.limit or args.end_page or args.start_page != 1 or args.dry_run):
        raise CliError("--prune needs a full scan: drop --limit, --end-page, --start-page and --dry-run")
    if (args.force or args.max_fraction is not None) and not args.prune:
        raise CliError("--force and --max-fraction only apply with --prune")
    if args.dry_run:
        _require_data_root("sync --dry-run")
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
    code = run_job("catch_up_job", "catch_up", config, args.verbose, problems=_listing_problems)
    if code in (EXIT_OK, EXIT_PARTIAL) and args.prune:
        pruned = run_job("prune_job", "prune", {"refresh_list": False, "force": args.force,
                                                 "max_fraction": args.max_fraction}, args.verbose)
        if pruned == EXIT_REFUSED:
            print("error: the sync completed; the prune after it was refused (nothing deleted)", file=sys.stderr)
        code = max(code, pruned) if pruned != EXIT_OK else code
    return code


def cmd_generate(args) -> int:
    config = {
        "passes": [args.pass_name],
        "image_ids": args.image_id,
        "limit": args.limit,
        "force": args.force,
        "progress_every": args.progress_every,
    }
    return run_job("catch_up_job", "catch_up", config, args.verbose)


def cmd_shards(args) -> int:
    from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

    from .core.buckets import BUCKET_NAMES, parse_bucket
    from .core.layout import DataLayout

    for bucket in args.bucket:
        try:
            parse_bucket(bucket.removeprefix("bucket_"))
        except ValueError as error:
            raise CliError(str(error)) from None
    buckets = [b for b in BUCKET_NAMES if not args.bucket or b in {x.removeprefix("bucket_") for x in args.bucket}]
    if args.shard_size < 1:
        raise CliError("--shard-size must be at least 1")
    if args.dry_run:
        _require_data_root("shards --dry-run")
    dataset = DataLayout(_data_root()).dataset_jsonl
    if not dataset.is_file():
        raise CliError(f"{dataset} not found: build the dataset first (`photoset generate`, then `photoset migrate`)")
    config = {"shard_size": args.shard_size, "shuffle": args.shuffle, "seed": args.seed, "limit": args.limit,
              "dry_run": args.dry_run, "force": args.force}
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


def cmd_prune(args) -> int:
    if args.dry_run:
        _require_data_root("prune --dry-run")
    config = {"dry_run": args.dry_run, "force": args.force, "max_fraction": args.max_fraction}
    return run_job("prune_job", "prune", config, args.verbose)


def cmd_verify(args) -> int:
    _require_data_root("verify")
    config = {"kinds": VERIFY_KINDS[args.pass_name], "strict": args.strict, "deep": args.deep}
    return run_job("verify_job", "verify", config, args.verbose)


def cmd_migrate(args) -> int:
    if args.dry_run:
        from .core.layout import DataLayout
        from .core.records import migrate_stage1
        from .defs.execution import ModelResources

        _require_data_root("migrate --dry-run")
        resources = _definitions().resources
        recipes = ModelResources(resources["dinov3"], resources["captioner"], resources["flux_vae"],
                                 resources["t5"]).recipes()
        report = migrate_stage1(DataLayout(_data_root()), dinov3_recipe=recipes["dinov3"],
                                caption_recipe=recipes["captions"], dry_run=True)
        print("\n".join(report.summary_lines()))
        return EXIT_OK
    code = materialize(["dataset_jsonl"], args.verbose, asset_config={"dataset_jsonl": {"config": {"force": args.force}}})
    return code


def cmd_report(args) -> int:
    from .core.layout import DataLayout

    _require_data_root("report")
    code = materialize(["thumbnails", "near_duplicates", "dataset_report"], args.verbose)
    if code == EXIT_OK:
        print(f"report: {DataLayout(_data_root()).reports_dir / 'dataset_report.html'}")
    return code


def cmd_config(args) -> int:
    from .defs.settings import ConfigError, set_active_profile, settings_path

    if args.use:
        try:
            set_active_profile(settings_path(), args.use)
        except ConfigError as error:
            raise CliError(str(error)) from None
        print(f"{settings_path()}: active profile is now {args.use!r}")
        return EXIT_OK
    settings = _settings()
    found = "" if settings.file_found else " (not present: defaults and environment only)"
    print(f"settings file: {settings.path}{found}")
    print(f"profile: {settings.profile or '(none)'}")
    width = max(len(key) for key in settings.values)
    effective = _effective_dtypes(settings)
    for key in sorted(settings.values):
        value = repr(settings.values[key]) + (f" ({effective[key]})" if key in effective else "")
        print(f"{key:<{width}} = {value:<40} # {settings.sources[key]}")
    return EXIT_OK


def _effective_dtypes(settings) -> dict[str, str]:
    """``<model>.dtype`` key -> the dtype it computes in, for the models whose setting is "auto"."""
    from .defs.resources import MODEL_RESOURCE_KEYS, resources_from_settings

    resources = resources_from_settings(settings)
    return {f"{name}.dtype": resources[name].settings().compute_dtype for name in MODEL_RESOURCE_KEYS
            if settings.values[f"{name}.dtype"] == "auto"}


def cmd_dev(args) -> int:
    from .instance import project_root

    _settings()  # a broken settings file is one line here, not a web UI that cannot load its code
    _instance()
    workspace = str(project_root() / "workspace.yaml")
    command = [sys.executable, "-m", "dagster", "dev", "-w", workspace, "-h", args.host, "-p", str(args.port)]
    env = dict(os.environ)
    if env.get("PHOTOSET_SETTINGS"):
        env["PHOTOSET_SETTINGS"] = os.path.abspath(env["PHOTOSET_SETTINGS"])  # the folder changes below
    if not args.verbose:  # the webserver, daemon and code servers print no beta or deprecation notices
        env.setdefault("PYTHONWARNINGS", "ignore")
    # Replace this process: Ctrl-C and SIGTERM reach `dagster dev` itself, with default handlers even
    # when started from a shell's background job (which would otherwise ignore SIGINT).
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # In the instance's home: `dagster dev` warns about a dagster.yaml in its folder that is not
    # DAGSTER_HOME's (the project's template); paths in settings do not depend on the folder.
    os.chdir(env["DAGSTER_HOME"])
    os.execve(sys.executable, command, env)


def cmd_demo(args) -> int:
    from .demo.run import run_demo, serve_demo

    if args.action == "serve":
        return serve_demo()
    return run_demo(photos=args.photos, verbose=args.verbose, run=run_job, report=lambda: cmd_report(args))


COMMANDS = {
    "demo": cmd_demo,
    "dev": cmd_dev,
    "sync": cmd_sync,
    "generate": cmd_generate,
    "shards": cmd_shards,
    "prune": cmd_prune,
    "verify": cmd_verify,
    "migrate": cmd_migrate,
    "report": cmd_report,
    "config": cmd_config,
}


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # unwinds: leases, locks and slot claims are released on the way out


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # --help, or a usage error already printed as one line
        return exit_.code if isinstance(exit_.code, int) else EXIT_USAGE
    if not args.verbose:
        _quiet_third_parties()
    _apply_global_options(args)
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _terminate)
    try:
        return COMMANDS[args.command](args)
    except CliError as error:
        print(f"photoset: error: {_one_line(error)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("photoset: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:  # a bug or an environment problem: still one line unless -v asks for more
        if args.verbose:
            traceback.print_exc()
        hint = "" if args.verbose else " (run `photoset -v ...` for the traceback)"
        print(f"photoset: error: {type(error).__name__}: {_one_line(error)}{hint}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())

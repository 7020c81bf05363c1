"""The command line: ``quality-gate <stage> key=value ...`` (also ``python -m quality_gate``).

::

    quality-gate warmup   training.epochs=1                      # Stage 1
    quality-gate collect  model_checkpoint_path=<warmup run dir>  # Stage 2
    quality-gate select   root_dir=<collect run dir> selection_percentage=0.05
    quality-gate finetune dataset.data_path=<run dir>/selected_data.jsonl
    quality-gate evaluate adapter_path=<finetune run dir>/checkpoint-final
    quality-gate experiment                                      # the whole pipeline per selector (make demo)
    quality-gate convert --model <base> --save-path <dir>        # Stage 0
    quality-gate benchmark --data-dir <dir with the labelled files>   # real-label benchmark
    quality-gate <stage> --help                                  # every key with its default and meaning

Each stage word is a config of ``quality_gate/configs/`` composed by Hydra, so everything Hydra
accepts works (``--cfg job``, ``-m`` sweeps, ``hydra.run.dir=...``). ``python src/main.py
--config-name <config>`` runs the same configs (the seed's command). Errors in the input or the
config (:class:`~quality_gate.errors.UserError`) print one line and exit 1; anything else keeps its
traceback.

This is the edge where the seed's names (:mod:`quality_gate.compat`) become the current ones: its
config names pick a config, its ``stage: selection`` is read as ``collect`` and its keys
(``training.lora.lora_alpha``) as the current keys, before anything is validated or run.
"""

from __future__ import annotations

import atexit
import gc
import importlib
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from quality_gate.compat import CONFIG_STAGES, current_keys, current_stage_name

CONFIG_PATH = "pkg://quality_gate.configs"

#: stage -> (module whose ``run(cfg)`` runs it, one line for the help)
STAGES: dict[str, tuple[str, str]] = {
    "warmup": ("quality_gate.stages.warmup", "Stage 1: train the quality gates, backbone frozen"),
    "collect": ("quality_gate.stages.collect", "Stage 2: one forward pass, store gates and perplexities"),
    "select": ("quality_gate.stages.select", "score (method.md or a baseline) and keep the top k %"),
    "finetune": (
        "quality_gate.stages.finetune",
        "Stage 3: LoRA / full fine-tune of the target on a selection",
    ),
    "evaluate": ("quality_gate.stages.evaluate", "Stage 4: held-out loss, exact match, lm-eval tasks"),
    "experiment": ("quality_gate.experiment", "all stages per selector: does selection help?"),
}
OTHER_COMMANDS = {
    "convert": "Stage 0: write a gated selector dir from a base model",
    "benchmark": "every selector against real quality labels (CoachLM, AlpaGasus)",
}

log = logging.getLogger("quality_gate")


def run_stage(cfg: object) -> object:
    """Validate ``cfg`` against its stage's schema and call that stage's ``run(cfg)`` (the seed's
    ``stage: selection`` is read as ``collect`` first)."""
    from quality_gate.config import stage_of, validate

    current_stage_name(cfg)
    validate(cfg)  # type: ignore[arg-type]
    module = importlib.import_module(STAGES[stage_of(cfg)][0])  # type: ignore[arg-type]
    _freeze_imports()
    return module.run(cfg)


_imports_frozen = False


def _freeze_imports() -> None:
    """Once per process, before the first stage runs: move what is alive now (the imported torch and
    transformers, ~10^6 objects that live until exit) out of the collector's sight, so that full
    collections during the run, and the one at interpreter exit (~0.7 s with transformers loaded), do
    not walk them again; then turn the collector back on (hydra_app pauses it while importing).

    Only once: a stage that runs stages (the experiment) must not freeze what an earlier stage left
    behind, or a model caught in a reference cycle would never be freed.
    """
    global _imports_frozen
    if not _imports_frozen and not os.environ.get("QG_NO_FREEZE"):
        gc.freeze()
        # At exit, what the run left need not be walked either (atexit runs before the interpreter's
        # own final collections); until then a caller in the same process keeps a working collector.
        atexit.register(gc.freeze)
        _imports_frozen = True
    gc.enable()


def _task(cfg: object) -> None:
    """Hydra's task function: run the stage; user errors become one line and exit code 1."""
    from quality_gate.errors import exit_on_user_error

    with exit_on_user_error(str(getattr(cfg, "get", lambda *_: None)("stage"))):
        run_stage(cfg)


def hydra_app(config_name: str | None, argv: Sequence[str] | None = None) -> None:
    """Run Hydra on the packaged configs (``--config-name`` in ``argv`` picks another config)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if "--help" in args or "-h" in args:
        name = _config_name_in(args) or config_name
        print(stage_help(name or "warmup", f"{sys.argv[0]} --config-name {name}"))
        return
    args = current_keys(
        [("--help" if a == "--hydra-help" else a) for a in args], _config_name_in(args) or config_name
    )
    was_enabled = gc.isenabled()
    if not os.environ.get("QG_NO_FREEZE"):
        # Importing hydra, torch and transformers allocates ~10^6 objects that all live until exit;
        # each full collection on the way walks all of them again (six of them, ~0.5 s of a stage's
        # start-up). They make almost no garbage: collect nothing until run_stage freezes them.
        gc.disable()
    try:
        import hydra

        from quality_gate.config import register_configs

        _check_multi_node_run_dir(_config_name_in(args) or config_name, args)
        register_configs()
        _check_before_hydra(config_name, args)
        sys.argv = [sys.argv[0], *args]
        main: Callable[[], None] = hydra.main(
            config_path=CONFIG_PATH, config_name=config_name, version_base=None
        )(_task)
        main()
    finally:
        if was_enabled:
            gc.enable()  # also when the run never reached run_stage (a config error)


# Stages that make a run dir (selection writes into its input dir).
_RUN_DIR_STAGES = {"warmup", "collect", "finetune", "evaluate", "experiment"}


def _check_multi_node_run_dir(config_name: str | None, args: Sequence[str]) -> None:
    """Under a multi-node launch, exit before Hydra makes a run dir unless one is named on the command
    line: each node's default dir would carry its own start time (see runs.check_shared_run_dir)."""
    from quality_gate.runs import MULTI_NODE_RUN_DIR_HELP, is_multi_node, local_world_size, world_size

    if CONFIG_STAGES.get(config_name or "") not in _RUN_DIR_STAGES or not is_multi_node():
        return
    keys = {a.split("=", 1)[0].lstrip("+~") for a in args if "=" in a}
    if keys & {"output_dir", "hydra.run.dir"}:
        return
    message = MULTI_NODE_RUN_DIR_HELP.format(world=world_size(), local=local_world_size())
    log.error("%s", message)
    raise SystemExit(f"error: {message}")


def _check_before_hydra(config_name: str | None, args: Sequence[str]) -> None:
    """Compose the config as Hydra will and validate it before Hydra makes the run dir, writes
    ``.hydra/`` and opens its log file there: a bad value (a name that would escape, a key added with
    ``+`` by mistake, ``seed=-1``, ``output_dir`` on a file) is one line and exit 1, and leaves nothing
    behind. In an existing run dir, Hydra's own files (``<stage>.log``, ``.hydra/*.yaml``) that are
    symbolic links are removed first: Hydra would write through them to wherever they point.

    Hydra's flags that run no task (``--cfg``, ``--info``, ``-m`` sweeps, other config dirs, ...) skip
    this; so does a config Hydra itself cannot compose (a typo without ``+``, a wrong type), which Hydra
    reports in its own words.
    """
    from quality_gate.errors import exit_on_user_error

    with exit_on_user_error():
        _validate_before_hydra(config_name, args)


def _validate_before_hydra(config_name: str | None, args: Sequence[str]) -> None:
    from hydra import compose, initialize_config_module
    from hydra._internal.utils import get_args_parser
    from omegaconf import OmegaConf, open_dict

    from quality_gate.config import validate
    from quality_gate.runs import check_dir_target

    try:
        parsed = get_args_parser().parse_args(list(args))
    except SystemExit:
        return  # Hydra's own parser will say what is wrong
    runs_no_task = (
        parsed.help,
        parsed.hydra_help,
        parsed.cfg,
        parsed.info,
        parsed.multirun,
        parsed.shell_completion,
        parsed.experimental_rerun,
        parsed.config_dir,
        parsed.config_path,
    )
    name = parsed.config_name or config_name
    if any(runs_no_task) or name is None:
        return
    try:
        with initialize_config_module(CONFIG_PATH.removeprefix("pkg://"), version_base=None):
            cfg = compose(name, list(parsed.overrides), return_hydra_config=True)
    except Exception:
        return
    try:  # resolved while the hydra node is still in the config (its values refer to the others)
        hydra_cfg = cfg.hydra
        run_dir = Path(str(hydra_cfg.run.dir))
        log_file = (
            run_dir / f"{hydra_cfg.job.name}.log"
            if OmegaConf.select(hydra_cfg, "job_logging.handlers.file") is not None
            else None
        )
        subdir = run_dir / str(hydra_cfg.output_subdir) if hydra_cfg.output_subdir else None
    except Exception:
        run_dir = None
    with open_dict(cfg):
        del cfg["hydra"]
    current_stage_name(cfg)
    validate(cfg)
    if run_dir is None:
        return
    check_dir_target(run_dir, "output_dir" if cfg.get("output_dir") else "hydra.run.dir")
    if not run_dir.is_dir():
        return
    planted = [log_file] if log_file is not None else []
    if subdir is not None:
        planted += [subdir, *(subdir / f for f in ("config.yaml", "hydra.yaml", "overrides.yaml"))]
    for path in planted:
        if path.is_symlink():
            target = os.readlink(path)
            path.unlink()
            # Before Hydra configures logging: the logging module's last-resort handler writes this to
            # stderr.
            log.warning(
                "%s was a symbolic link (to %s); removed it, so that this run writes its own file there "
                "instead of writing through the link",
                path,
                target,
            )


def _config_name_in(args: Sequence[str]) -> str | None:
    for i, a in enumerate(args):
        if a in ("--config-name", "-cn") and i + 1 < len(args):
            return args[i + 1]
        if a.startswith("--config-name="):
            return a.split("=", 1)[1]
    return None


def stage_help(config_name: str, command: str) -> str:
    """Usage and the table of every key of a config: key, default, meaning (from the schema)."""
    from quality_gate.config import ASSETS_NOTE, SCHEMAS, help_rows

    stage = CONFIG_STAGES.get(config_name)
    if stage is None:
        return f"unknown config {config_name!r}; known: {', '.join(sorted(CONFIG_STAGES))}"
    schema = SCHEMAS[stage]
    rows = help_rows(schema)
    width = min(max(len(k) for k, _, _ in rows), 40)
    lines = [
        f"usage: {command} [key=value ...]",
        "",
        (schema.__doc__ or "").strip(),
        "",
        "keys (default) meaning:",
    ]
    for key, default, text in rows:
        if key == "stage":
            continue
        lines.append(f"  {key:<{width}}  ({default}) {text}")
    lines += [
        "",
        "Lists and dicts use Hydra's syntax, e.g.",
        "  'dataset.local.datasets=[{path: a.jsonl, dataset_name: a}]'",
        ASSETS_NOTE,
        "--cfg job prints the composed config; --hydra-help shows Hydra's own flags.",
    ]
    return "\n".join(lines)


def _usage() -> str:
    lines = [
        "usage: quality-gate <command> [key=value ...]   (quality-gate <command> --help for its keys)",
        "",
    ]
    lines += [f"  {name:<11} {text}" for name, (_, text) in STAGES.items()]
    lines += [f"  {name:<11} {text}" for name, text in OTHER_COMMANDS.items()]
    lines += ["  experiment_sweep  the experiment over noise rates x budgets (make sweep)"]
    aliases = sorted(
        name for name, stage in CONFIG_STAGES.items() if name not in STAGES and name != "experiment_sweep"
    )
    lines += ["", f"the seed's config names work as commands too: {', '.join(aliases)}"]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """``quality-gate <command> [key=value ...]``."""
    try:
        _main(argv)
    except BrokenPipeError:
        # `quality-gate select --help | head`: the reader left; say nothing more.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(1) from None


def _main(argv: Sequence[str] | None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(_usage())
        return
    if args[0] in ("-V", "--version"):
        from quality_gate import __version__

        print(f"quality-gate {__version__}")
        return
    command, rest = args[0], args[1:]
    if command == "convert":
        from quality_gate.convert import main as convert_main

        convert_main(rest, prog="quality-gate convert")
        return
    if command == "benchmark":
        from quality_gate.benchmarks.real import main as benchmark_main

        benchmark_main(rest, prog="quality-gate benchmark")
        return
    if command not in CONFIG_STAGES:
        raise SystemExit(f"error: unknown command {command!r}\n\n{_usage()}")
    if "--help" in rest or "-h" in rest:
        print(stage_help(command, f"quality-gate {command}"))
        return
    sys.argv[0] = "quality-gate"
    hydra_app(command, rest)

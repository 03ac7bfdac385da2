"""Pre-flight check of a command line, before Hydra runs: an unknown key or config group option
is one ``salt: error:`` line naming the override and the closest valid names.

Hydra's own messages for these mistakes span several lines, suggest nothing close and come with
a hint about HYDRA_FULL_ERROR. The check uses Hydra's machinery throughout: its argument parser,
its override parser, its config search path (``--config-dir`` included) and one compose of the
command line's config. A command line Hydra accepts passes unchanged: the check only explains
what a compose rejected (and, under ``-m``, sweep values Hydra's sweeper would reject before
the first job).
"""

from __future__ import annotations

import copy
import dataclasses
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import hydra
from hydra import compose, initialize_config_dir
from hydra.core.config_loader import ConfigLoader
from hydra.core.config_search_path import SearchPathQuery
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, OverrideType
from hydra.errors import HydraException
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

import salt.schema  # registers the config schemas with Hydra
from salt.errors import INTERRUPTED, RESUME_ADVICE, ConfigError, run_entry_point
from salt.utils.names import closest, did_you_mean
from salt.utils.typed_config import omegaconf_message

PACKAGE_DIR = Path(__file__).resolve().parent
# The commands' config directory (the repository's conf/), absolute: Hydra resolves a relative
# path against the task function's package when it is imported by name (the installed
# salt-train command), and conf/ is not inside the package.
CONFIG_PATH = str(PACKAGE_DIR.parents[1] / "conf")
# Hydra flags that do not run the app (help, printing the config, completion, rerun, version):
# Hydra handles them as it always did.
NO_RUN_FLAGS = ("help", "hydra_help", "cfg", "info", "shell_completion", "experimental_rerun")
# What a failed compose raises for a user's mistake (anything else: a bug, left to Hydra).
# (OmegaConf asserts when a key is set below a null node: e.g. data.sample.num_jets=10 under
# data=ftag, where data.sample is null.)
# AttributeError: OmegaConf's own failure when an override sets a null structured node whole
COMPOSE_ERRORS = (
    HydraException,
    OmegaConfBaseException,
    ValueError,
    KeyError,
    AssertionError,
    AttributeError,
)


def command(
    config_name: str,
    body: Callable[[DictConfig], Any],
    extra_errors: tuple[type[BaseException], ...] = (),
    disk_full_advice: str = RESUME_ADVICE,
) -> Callable[[], None]:
    """The ``main()`` of a command (``python -m salt.<x>`` and ``salt-<x>``): the command line
    is checked (one clear error for a wrong key or group option), Hydra composes
    ``config_name`` with it, and ``body(cfg)`` runs with user errors as one line
    (``disk_full_advice``: what to do after a full disk, see `run_entry_point`)."""

    @hydra.main(version_base=None, config_path=CONFIG_PATH, config_name=config_name)
    def hydra_main(cfg: DictConfig) -> None:
        run_entry_point(body, cfg, extra_errors, disk_full_advice)

    def main() -> None:
        try:
            check_command_line(config_name)
            hydra_main()
        except KeyboardInterrupt:  # while Hydra composes the config: nothing written yet
            if _debug_requested(sys.argv[1:]):
                raise
            print(INTERRUPTED, file=sys.stderr, flush=True)
            sys.exit(128 + signal.SIGINT)

    return main


def check_command_line(config_name: str, argv: Sequence[str] | None = None) -> None:
    """Check ``argv`` (default: this process's) of an entry point whose primary config is
    ``config_name``: a mistake is one ``salt: error:`` line on stderr and exit 1 (``debug=true``
    on the command line raises it with a traceback). Hydra flags that do not run the app, and
    command lines Hydra's argument parser rejects, are left to Hydra."""
    from hydra._internal.utils import get_args_parser  # the parser hydra.main uses

    args_list = list(sys.argv[1:] if argv is None else argv)
    if "--version" in args_list:  # argparse would print Hydra's version (and exit) here already
        return
    try:
        args = get_args_parser().parse_args(args_list)
    except SystemExit:  # a usage error: Hydra prints it, once, when it parses the same argv
        return
    if any(getattr(args, flag, None) for flag in NO_RUN_FLAGS):
        return
    config_path = args.config_path if args.config_path is not None else CONFIG_PATH
    if "://" in config_path:  # pkg:// or file:// search paths: not worth mirroring here
        return
    overrides = list(args.overrides)

    def check(_: Any) -> None:
        try:
            check_overrides(
                args.config_name or config_name,
                overrides,
                conf_dir=PACKAGE_DIR / config_path,  # as Hydra: relative to the @hydra.main file
                extra_dir=args.config_dir,
                multirun=bool(args.multirun),
            )
        except ConfigError:
            raise
        except Exception:  # a fault of the check itself must not stop a run: Hydra decides
            if _debug_requested(overrides):
                raise

    run_entry_point(check, {"debug": _debug_requested(overrides)})


def check_overrides(
    config_name: str,
    overrides: Sequence[str],
    *,
    conf_dir: str | Path | None = None,
    extra_dir: str | Path | None = None,
    multirun: bool = False,
) -> None:
    """Raise `ConfigError` (one line, naming the override) for the first override of
    ``overrides`` that Hydra would reject composing ``config_name``: an unknown group option,
    an unknown key, a sweep without ``-m``, a parse error, or another composition error.

    ``conf_dir`` is the entry points' config directory, ``extra_dir`` a ``--config-dir``
    (searched after it, as Hydra does); ``multirun`` is ``-m``.
    """
    conf = Path(conf_dir) if conf_dir is not None else PACKAGE_DIR / CONFIG_PATH
    with _hydra(conf.resolve(), extra_dir) as loader:
        parsed = _parse(overrides, loader)
        if any(o.get_key_element().lstrip("+~") == "hydra.searchpath" for o in parsed):
            return  # the search path itself changes: left to Hydra
        # hydra.mode=MULTIRUN on the command line is -m too
        multirun = multirun or any(
            o.key_or_group == "hydra.mode" and str(o.value()) == "MULTIRUN" for o in parsed
        )
        _check_config_name(loader, config_name)
        groups = [o for o in parsed if _is_group_override(loader, o)]
        for o in groups:
            _check_group_options(loader, o)
        app = [o for o in parsed if not o.is_hydra_override()]
        for o in (o for o in app if o.is_sweep_override()):
            if not multirun:
                raise ConfigError(
                    f"{o.input_line}: a sweep needs -m/--multirun; for a list write "
                    f"{o.get_key_element()}=[a,b], for a value with commas quote it "
                    f"(\"{o.get_key_element()}='a,b'\")."
                )
            if o.is_discrete_sweep() and next(iter(o.sweep_string_iterator()), None) is None:
                raise ConfigError(f"{o.input_line}: this sweep has no values.")
        # Hydra's own settings (hydra.*, hydra/...) are Hydra's to check: left out of the compose.
        composed, err = _compose(config_name, [_first_value(o) for o in app])
        if err is None:
            if config_name == "train":  # values too, before a sweep or a Slurm job starts
                assert composed is not None
                salt.schema.read_train_config(composed)
            return
        # Explain the failure: the config without the plain key overrides, then each key in it.
        keys = [o for o in app if o.type == OverrideType.CHANGE and o not in groups]
        others = [o for o in app if o not in keys]
        base, base_err = _compose(config_name, [_first_value(o) for o in others])
        if base_err is not None:
            _raise_for_first_failing(config_name, others, base_err)
        assert base is not None
        for o in keys:
            _check_key(loader, base, o)
        _raise_for_first_failing(config_name, app, err)


# ---- Hydra set-up and parsing ------------------------------------------------------------------
@contextmanager
def _hydra(conf_dir: Path, extra_dir: str | Path | None) -> Iterator[ConfigLoader]:
    """Hydra initialised with hydra.main's search path: ``conf_dir``, plus ``--config-dir``
    searched after it (before the structured configs), as hydra.main adds it. Hydra's global
    state is restored afterwards, so that hydra.main can initialise it again."""
    if not conf_dir.is_dir():
        raise ConfigError(f"--config-path: {conf_dir} is not a directory.")
    with initialize_config_dir(str(conf_dir), job_name="salt_check", version_base=None):
        if extra_dir is not None:
            from hydra._internal.hydra import Hydra  # what initialize_config_dir itself uses

            extra = Path(extra_dir).resolve()
            if not extra.is_dir():
                raise ConfigError(f"--config-dir {extra_dir}: {extra} is not a directory.")
            search_path = copy.deepcopy(GlobalHydra.instance().config_loader().get_search_path())
            search_path.prepend(
                provider="command-line",
                path=f"file://{extra}",
                anchor=SearchPathQuery(provider="schema"),
            )
            GlobalHydra.instance().clear()
            Hydra.create_main_hydra2(task_name="salt_check", config_search_path=search_path)
        yield GlobalHydra.instance().config_loader()


def _parse(overrides: Sequence[str], loader: ConfigLoader) -> list[Override]:
    """Hydra's parse of each override, so that a parse error names its override (the loader
    lets glob() sweeps list a group's options)."""
    parser = OverridesParser.create(config_loader=loader)
    parsed = []
    for line in overrides:
        try:
            parsed.extend(parser.parse_overrides([line]))
        except HydraException as err:
            # the override is named first; Hydra's "See <grammar page> for details" in brackets
            lines = [
                f"(s{s[1:]})" if s.startswith("See ") else s
                for s in str(err).splitlines()
                if not s.startswith("Error parsing")
            ]
            raise ConfigError(f"{line}: cannot parse this override: {' '.join(lines)}") from err
    return parsed


def _debug_requested(overrides: Sequence[str]) -> bool:
    """``debug=true`` among the overrides (then errors keep their traceback)."""
    parser = OverridesParser.create()
    for line in overrides:
        try:
            (o,) = parser.parse_overrides([line])
        except HydraException:
            continue
        if o.key_or_group == "debug" and o.value() is True:
            return True
    return False


def _compose(config_name: str, overrides: list[str]) -> tuple[DictConfig | None, Any]:
    """One compose (the app's config, as the job would get it), or the error it raised."""
    try:
        return compose(config_name, overrides=overrides), None
    except COMPOSE_ERRORS as err:
        return None, err


def _raise_for_first_failing(config_name: str, overrides: list[Override], err: Any) -> None:
    """Raise Hydra's error ``err`` on one line, naming the first override that a compose of
    the overrides before it and it fails with (a few more composes, on this failing path only)."""
    for i, o in enumerate(overrides):
        _, first_err = _compose(config_name, [_first_value(x) for x in overrides[: i + 1]])
        if first_err is not None:
            if isinstance(first_err, AttributeError):  # not a message for a user
                raise ConfigError(
                    f"{o.input_line}: {o.key_or_group} is null in this config and cannot be "
                    "set whole from the command line (an OmegaConf limitation); choose the "
                    "config option that defines it (e.g. data=sample), or set it in a config "
                    "file of your own"
                ) from first_err
            raise ConfigError(f"{o.input_line}: {_one_line(first_err)}") from first_err
    raise ConfigError(_one_line(err)) from err


def _first_value(o: Override) -> str:
    """The override as the first job of a sweep gets it (as Hydra's basic sweeper splits it)."""
    if o.is_sweep_override() and o.is_discrete_sweep():
        return f"{o.get_key_element()}={next(iter(o.sweep_string_iterator()))}"
    return o.input_line


def _one_line(err: BaseException) -> str:
    """A Hydra or OmegaConf message on one line, without OmegaConf's key/type detail lines;
    Hydra's "Error merging override" is replaced by what OmegaConf said (the schema's type
    or choices)."""
    cause = err.__cause__
    if str(err).startswith("Error merging override") and isinstance(cause, OmegaConfBaseException):
        return omegaconf_message(cause)
    detail = ("full_key:", "object_type=", "reference_type=", "explicit_type=")
    lines = [s.strip() for s in str(err).splitlines()]
    return " ".join(s for s in lines if s and not s.startswith(detail))


# ---- the checks ---------------------------------------------------------------------------------
def _check_config_name(loader: ConfigLoader, config_name: str) -> None:
    """``--config-name``: a primary config on the search path."""
    parent, _, name = config_name.removesuffix(".yaml").rpartition("/")
    options = [o for o in loader.get_group_options(parent) if not o.startswith("_")]
    if name not in options:
        raise ConfigError(
            f"--config-name {config_name}: no primary config '{config_name}' in the config "
            f"directories{did_you_mean(name, options)} Options: {', '.join(options)}."
        )


def _is_group(loader: ConfigLoader, path: str) -> bool:
    parent, _, name = path.rpartition("/")
    return name in loader.list_groups(parent)


def _is_group_override(loader: ConfigLoader, o: Override) -> bool:
    """A config group choice, by Hydra's rule: the key names a group and the value is no dict."""
    if o.is_hydra_override() or o.type == OverrideType.DEL:
        return False
    return not isinstance(o.value(), dict) and _is_group(loader, o.key_or_group)


def _check_group_options(loader: ConfigLoader, o: Override) -> None:
    """Every value of a group choice (each sweep value too) is an option of the group."""
    group = o.key_or_group
    options = loader.get_group_options(group)
    if o.is_sweep_override():
        if not o.is_discrete_sweep():
            return  # e.g. interval(): Hydra's sweeper reports it
        values: list[Any] = list(o.sweep_string_iterator())
        if not values:  # glob() matching nothing
            raise ConfigError(
                f"{o.input_line}: matches no option of config group '{group}'. "
                f"Options: {', '.join(options)}."
            )
    else:
        value = o.value()
        values = list(value) if isinstance(value, list) else [value]
    for value in values:
        if value is None:  # group=null: not an option name; the compose says what Hydra thinks
            continue
        if str(value) not in options:
            raise ConfigError(
                f"{o.input_line}: no option '{value}' in config group '{group}'"
                f"{did_you_mean(str(value), options)} Options: {', '.join(options)}."
            )


def _check_key(loader: ConfigLoader, cfg: DictConfig, o: Override) -> None:
    """The key of a plain ``key=value`` override exists in ``cfg`` (the config composed with the
    command line's group choices)."""
    key = o.key_or_group
    if "/" in key:  # not a group (else it would not be checked here): a misspelled group path
        parent, _, name = key.rpartition("/")
        siblings = loader.list_groups(parent)
        where = f" in '{parent}'" if parent else ""
        raise ConfigError(
            f"{o.input_line}: no config group '{key}'{did_you_mean(name, siblings)} "
            f"Config groups{where}: {', '.join(siblings) or 'none'}."
        )
    node: Any = cfg
    parts = key.split(".")
    for i, part in enumerate(parts):
        if isinstance(node, DictConfig | ListConfig) and node._is_none():
            parent = ".".join(parts[:i])  # e.g. data.sample under data=ftag
            raise ConfigError(
                f"{o.input_line}: '{parent}' is null in this config, so it has no key '{part}'; "
                f"set it whole ({parent}={{{part}: ...}}) or choose a config that fills it."
            )
        if isinstance(node, ListConfig):
            return  # list items: Hydra checks indices itself
        if not isinstance(node, DictConfig) or not OmegaConf.is_struct(node):
            return  # a value or an open dict: nothing to look up here
        # a schema's node takes no new keys; other nodes (e.g. from a --config-dir) may
        add = (
            ""
            if dataclasses.is_dataclass(OmegaConf.get_type(node))
            else f" (use +{o.input_line} to add a new key)"
        )
        keys = [str(k) for k in node]  # not `part in node`: that is False for ??? values
        if part in keys:
            node = node._get_node(part)
            if isinstance(node, DictConfig | ListConfig) or i == len(parts) - 1:
                continue
            return  # a leaf with a key below it: Hydra's message says what is wrong
        if i == 0:
            groups = [g for g in loader.list_groups("") if g != "hydra"]
            best = next(iter(closest(part, [*keys, *groups])), None)
            value = o.value()
            # `modle=GN2`: a misspelled group when the value is an option of the closest group
            if (
                len(parts) == 1
                and best in groups
                and isinstance(value, str)
                and value in loader.get_group_options(best)
            ):
                raise ConfigError(
                    f"{o.input_line}: no config group '{part}'; did you mean {best}? "
                    f"Config groups: {', '.join(groups)}."
                )
            where = "in the config"
            candidates = [*keys, *groups] if len(parts) == 1 else keys
        else:
            parent = ".".join(parts[:i])
            where, candidates = f"in '{parent}'", keys
        best = closest(part, candidates)
        hint = f"; did you mean {best[0]}?" if best else f"; its keys: {', '.join(keys)}"
        raise ConfigError(f"{o.input_line}: no key '{part}' {where}{hint}{add}")

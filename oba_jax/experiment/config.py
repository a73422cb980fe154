"""Experiment configs: load ``configs/*.py``, apply ``--config.key=value`` overrides, validate.

A config file is the whole experiment (big_vision style): its ``get_config()`` returns an
``ml_collections.ConfigDict`` with the sections ``model``, ``data``, ``optim``, ``train`` (and
optionally ``plot``). Overrides are parsed to the type of the value they replace, so
``--config.optim.lr=0.05`` stays a float and ``--config.train.max_steps=None`` clears an int.
Every error is a :class:`ConfigError` whose message names the offending key.
"""

from __future__ import annotations

import ast
import importlib.machinery
import importlib.util
import inspect
import math
import os
from typing import Any, Sequence

import ml_collections

SCHEDULES = ("multistep", "cosine", "constant")
SCORE_DTYPES = ("float32", "float64")

# Sections whose keys are free-form: model.spec are keyword arguments of models.make_spec (validated
# by building the spec), data.synthetic those of data.synthetic_dataset.
OPEN_SECTIONS = ("model.spec", "data.synthetic")


# `train.compute_dtype`: what layers compute in while training (parameters, optimizer state, scores: float32)
COMPUTE_DTYPES = ("float32", "bfloat16")


class ConfigError(ValueError):
    """A config file, override or value is invalid; the message names the key."""


def initialize_distributed(config: ml_collections.ConfigDict) -> None:
    """`jax.distributed.initialize` from `train.coordinator_address` / `num_processes` / `process_id` (None:
    the cluster's), with gloo collectives for CPU devices; a coordinator that cannot be reached is a
    ConfigError naming it."""
    import jax
    train = config.train
    kwargs = {k: train.get(k) for k in ("coordinator_address", "num_processes", "process_id")
              if train.get(k) is not None}
    timeout = train.get("initialization_timeout_s", 300)   # (checked here: this runs before validate_config)
    _check(_is_int(timeout) and timeout > 0, "train.initialization_timeout_s",
           f"must be a positive int (seconds), got {timeout!r}")
    where = kwargs.get("coordinator_address", "the cluster's coordinator")
    advice = ("start every process with the same coordinator_address and num_processes and its own process_id "
              "(process 0 runs the coordinator), or run on a cluster JAX detects")
    if kwargs.get("process_id", 0) != 0 and "coordinator_address" in kwargs:
        # XLA's client aborts the process when it cannot connect: find out first, and say so
        if not _reachable(kwargs["coordinator_address"], timeout):
            raise ConfigError(f"config.train.distributed: could not join the run at {where}: nothing accepted a "
                              f"connection there within {timeout} s (train.initialization_timeout_s); {advice}")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")   # CPU devices across processes
    try:
        jax.distributed.initialize(initialization_timeout=timeout, **kwargs)
    except (RuntimeError, ValueError) as err:
        raise ConfigError(f"config.train.distributed: could not join the run at {where} "
                          f"({type(err).__name__}: {str(err).splitlines()[0][:300]}); {advice}") from None


def _reachable(address: str, timeout: float) -> bool:
    """Whether `host:port` accepts a TCP connection within `timeout` seconds (retrying: process 0 may start
    later than the others)."""
    import socket
    import time
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host or "localhost", int(port)), timeout=1.0):
                return True
        except (OSError, ValueError):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.2)


def load_config_file(path: str) -> ml_collections.ConfigDict:
    """Imports the Python file at ``path`` and returns its ``get_config()``."""
    if not os.path.isfile(path):
        raise ConfigError(f"--config: no such config file {path!r}")
    # the loader named explicitly: a config file need not end in .py (spec_from_file_location gives None then)
    name = f"_oba_config_{abs(hash(path))}"
    spec = importlib.util.spec_from_loader(name, importlib.machinery.SourceFileLoader(name, path))
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)  # type: ignore[union-attr]
    except SystemExit as e:   # a config that exits at import would end the run with its status, doing nothing
        raise ConfigError(f"--config: {path!r} called sys.exit({e.code!r}) while being imported; a config file "
                          "must only define get_config()") from None
    except Exception as e:  # a syntax/import error in a user's config file
        raise ConfigError(f"--config: cannot import {path!r}: {type(e).__name__}: {e}") from None
    get_config = getattr(module, "get_config", None)
    if not callable(get_config):
        raise ConfigError(f"--config: {path!r} has no get_config() function")
    required = [p.name for p in inspect.signature(get_config).parameters.values()
                if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if required:
        raise ConfigError(f"--config: get_config() in {path!r} requires the arguments {required}; a config file's "
                          "get_config() is called without arguments (give them defaults)")
    try:
        config = get_config()
    except SystemExit as e:
        raise ConfigError(f"--config: get_config() in {path!r} called sys.exit({e.code!r})") from None
    except Exception as e:  # noqa: BLE001  (a user's code raises anything)
        raise ConfigError(f"--config: get_config() in {path!r} raised {type(e).__name__}: {e}") from None
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"--config: get_config() in {path!r} must return an ml_collections.ConfigDict")
    return config


def parse_value(key: str, text: str, current: Any) -> Any:
    """Parses ``text`` to the type of ``current`` (the value being overridden).

    bool accepts true/false/1/0/yes/no; int/float use Python syntax; tuples/lists/None/dicts use
    ``ast.literal_eval`` (``"(64,'M',128)"``, ``"None"``); a str stays the raw text. ``"None"``
    is accepted for every key so optional settings can be cleared.
    """
    stripped = text.strip()
    if stripped == "None":
        return None
    try:
        if isinstance(current, bool):
            lowered = stripped.lower()
            if lowered in ("true", "1", "yes"):
                return True
            if lowered in ("false", "0", "no"):
                return False
            raise ValueError(f"expected true/false, got {text!r}")
        if isinstance(current, int):
            try:
                return int(stripped)
            except ValueError:
                # an epoch count written as 6 takes 0.5 too; keys that must be ints say so in validation
                return float(stripped)
        if isinstance(current, float):
            return float(stripped)
        if isinstance(current, str):
            return text
        value = ast.literal_eval(stripped)
    except (ValueError, SyntaxError) as e:
        kind = type(current).__name__ if current is not None else "Python literal"
        raise ConfigError(f"--config.{key}: cannot parse {text!r} as {kind} ({e})") from None
    if isinstance(current, (tuple, list)):
        if not isinstance(value, (tuple, list)):
            value = (value,)  # "--config.model.spec.hidden=64" means a one-element tuple
        return tuple(value)
    return tuple(value) if isinstance(value, list) else value


def _literal_or_str(text: str) -> Any:
    """Value for a key that does not exist yet (open sections): a literal if it parses, else the text."""
    try:
        value = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError):
        return text
    return tuple(value) if isinstance(value, list) else value


def apply_override(config: ml_collections.ConfigDict, key: str, text: str) -> None:
    """Sets ``config.<key>`` (dotted path) from the command-line text ``text``, in place."""
    parts = key.split(".")
    node = config
    for i, part in enumerate(parts[:-1]):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            raise ConfigError(f"--config.{key}: unknown key {'.'.join(parts[:i + 1])!r}")
        node = node[part]
    leaf = parts[-1]
    parent = ".".join(parts[:-1])
    if not isinstance(node, ml_collections.ConfigDict):
        raise ConfigError(f"--config.{key}: {parent!r} is not a section")
    if leaf in node:
        current = node[leaf]
        if isinstance(current, ml_collections.ConfigDict):
            raise ConfigError(f"--config.{key}: is a section; set one of its keys {sorted(current.keys())}")
        if current is None:
            # A None default declared with a type (FieldReference(None, field_type=str)) parses as that type.
            field_type = node.get_type(leaf)
            current = {str: "", int: 0, float: 0.0, bool: False}.get(field_type)
        value = parse_value(key, text, current) if current is not None else _literal_or_str(text)
    elif parent in OPEN_SECTIONS:
        value = _literal_or_str(text)
    else:
        raise ConfigError(f"--config.{key}: unknown key {key!r}; known keys in "
                          f"{parent or 'config'}: {sorted(node.keys())}")
    with node.unlocked():
        try:
            node[leaf] = value
        except TypeError:
            # ConfigDict refuses a type change (e.g. int -> None); clearing an optional value is legitimate.
            del node[leaf]
            node[leaf] = value


def split_override_args(argv: Sequence[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Splits ``--config.a.b=v`` / ``--config.a.b v`` arguments from the others."""
    rest: list[str] = []
    overrides: list[tuple[str, str]] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--config."):
            body = arg[len("--config."):]
            if "=" in body:
                key, text = body.split("=", 1)
            elif i + 1 < len(argv):
                key, text = body, argv[i + 1]
                i += 1
            else:
                raise ConfigError(f"--config.{body}: missing value (use --config.{body}=VALUE)")
            overrides.append((key, text))
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


def config_from_cli(argv: Sequence[str], *, prog: str, description: str, workdir_help: str,
                    sections: Sequence[str] = ()) -> tuple[str, ml_collections.ConfigDict]:
    """`(workdir, config)` of a command line `--config C --workdir W [--config.KEY=VALUE ...]`: the config
    file with the overrides applied in order, validated and locked (a `ConfigError` names the key).
    `sections`: sections this command needs beyond the common ones (prune.py: prune, finetune). Every config
    gets `overwrite` (default false: see `manifest.claim_stage`) if its file does not set it.
    With `train.distributed`, `jax.distributed.initialize()` runs first: multi-host must initialise before
    anything (the validation's device count) asks JAX about devices."""
    import argparse
    rest, overrides = split_override_args(argv)
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Override any config value with --config.KEY=VALUE, "
                                            "e.g. --config.optim.lr=0.05 --config.train.epochs=1.")
    parser.add_argument("--config", required=True, help="path to a configs/*.py file with get_config()")
    parser.add_argument("--workdir", required=True, help=workdir_help)
    args = parser.parse_args(list(rest))
    if not args.workdir.strip():
        raise ConfigError("--workdir: empty; name the directory for this run's outputs")
    config = load_config_file(args.config)
    for section in sections:
        if not isinstance(config.get(section), ml_collections.ConfigDict):
            raise ConfigError(f"config.{section}: missing, and {prog} needs it; start the config from "
                              f"oba_jax.experiment.config.default_sections() or set config.{section} = "
                              f"{section}_section()")
    if "overwrite" not in config:
        with config.unlocked():
            config.overwrite = False
    for key, text in overrides:
        apply_override(config, key, text)
    if config.get("train", {}).get("distributed", False):
        initialize_distributed(config)
    validate_config(config)
    config.lock()
    return args.workdir, config


def load_config(path: str, overrides: Sequence[tuple[str, str]] = (), *,
                num_devices: int | None = None) -> ml_collections.ConfigDict:
    """Loads ``path``, applies ``(key, text)`` overrides in order, validates, and locks the result."""
    config = load_config_file(path)
    for key, text in overrides:
        apply_override(config, key, text)
    validate_config(config, num_devices=num_devices)
    config.lock()
    return config


def _get(config: ml_collections.ConfigDict, key: str) -> Any:
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            raise ConfigError(f"config.{key}: missing (every config needs it)")
        node = node[part]
    return node


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config.{key}: {message}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    """A finite int or float (inf and nan pass no range check that means anything)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def validate_config(config: ml_collections.ConfigDict, *, num_devices: int | None = None) -> None:
    """Raises :class:`ConfigError` naming the first invalid key.

    ``num_devices`` (default: ``jax.device_count()``) must divide both batch sizes, because the
    batch is sharded evenly along the 1-D data mesh.
    """
    from models import FAMILIES   # deferred, as for model_spec
    from oba_jax.experiment.data import DATASETS
    family = _get(config, "model.family")
    _check(family in FAMILIES, "model.family", f"unknown family {family!r}; expected one of {FAMILIES}")
    spec_kwargs = _get(config, "model.spec")
    _check(isinstance(spec_kwargs, ml_collections.ConfigDict), "model.spec", "must be a section")
    try:
        model_spec(config)
    except ValueError as e:
        raise ConfigError(f"config.model.spec: {e}") from None

    name = _get(config, "data.name")
    _check(name in DATASETS, "data.name", f"unknown dataset {name!r}; expected one of {DATASETS}")
    if name == "synthetic":
        _validate_synthetic(config)
    _check(isinstance(_get(config, "data.augment"), bool), "data.augment", "must be true/false")
    _check(isinstance(_get(config, "data.download"), bool), "data.download", "must be true/false")
    data_dir = _get(config, "data.data_dir")
    _check(data_dir is None or isinstance(data_dir, str), "data.data_dir", "must be a path or None")
    _validate_streaming(config, name)

    lr = _get(config, "optim.lr")
    _check(_is_number(lr) and lr > 0, "optim.lr", f"must be a positive number, got {lr!r}")
    momentum = _get(config, "optim.momentum")
    _check(_is_number(momentum) and 0 <= momentum < 1, "optim.momentum", f"must be in [0, 1), got {momentum!r}")
    wd = _get(config, "optim.weight_decay")
    _check(_is_number(wd) and wd >= 0, "optim.weight_decay", f"must be >= 0, got {wd!r}")
    schedule = _get(config, "optim.schedule")
    _check(schedule in SCHEDULES, "optim.schedule", f"unknown schedule {schedule!r}; expected one of {SCHEDULES}")
    milestones = _get(config, "optim.milestones")
    _check(isinstance(milestones, tuple) and all(_is_number(m) and m > 0 for m in milestones)
           and list(milestones) == sorted(milestones), "optim.milestones",
           f"must be an increasing tuple of positive epochs, got {milestones!r}")
    gamma = _get(config, "optim.gamma")
    _check(_is_number(gamma) and 0 < gamma <= 1, "optim.gamma", f"must be in (0, 1], got {gamma!r}")
    smoothing = _get(config, "optim.label_smoothing")
    _check(_is_number(smoothing) and 0 <= smoothing < 1, "optim.label_smoothing", f"must be in [0, 1), got {smoothing!r}")
    _check(isinstance(_get(config, "optim.nesterov"), bool), "optim.nesterov", "must be true/false")

    epochs = _get(config, "train.epochs")
    _check(_is_number(epochs) and epochs > 0, "train.epochs", f"must be > 0, got {epochs!r}")
    if num_devices is None:
        import jax  # deferred: loading and checking a config should not initialise a backend
        num_devices = jax.device_count()
    for key in ("train.batch_size", "train.eval_batch_size"):
        bs = _get(config, key)
        _check(_is_int(bs) and bs > 0, key, f"must be a positive int, got {bs!r}")
        _check(bs % num_devices == 0, key, f"{bs} is not divisible by the device count {num_devices}")
    for key in ("train.log_every_steps", "train.checkpoint_every_steps"):
        v = _get(config, key)
        _check(_is_int(v) and v > 0, key, f"must be a positive int, got {v!r}")
    max_steps = _get(config, "train.max_steps")
    _check(max_steps is None or (_is_int(max_steps) and max_steps > 0), "train.max_steps",
           f"must be None or a positive int, got {max_steps!r}")
    _check(_is_int(_get(config, "train.seed")), "train.seed", "must be an int")
    if "compute_dtype" in config.train:
        dtype = _get(config, "train.compute_dtype")
        _check(dtype in COMPUTE_DTYPES, "train.compute_dtype", f"must be one of {COMPUTE_DTYPES}, got {dtype!r}")
    if "overwrite" in config:
        _check(isinstance(config.overwrite, bool), "overwrite", "must be true/false")
    if "prune" in config:
        _validate_prune(config)
    if "finetune" in config:
        _validate_finetune(config)


def _validate_streaming(config: ml_collections.ConfigDict, name: str) -> None:
    """`data.stream` / `host_transform` / `num_workers`: how a prepared TFDS dataset is read from disk."""
    from oba_jax.experiment.streaming import HOST_TRANSFORMS
    stream, transform, workers = (_get(config, f"data.{k}") for k in ("stream", "host_transform", "num_workers"))
    _check(isinstance(stream, bool), "data.stream", "must be true/false")
    _check(transform in HOST_TRANSFORMS, "data.host_transform",
           f"unknown transform {transform!r}; expected one of {HOST_TRANSFORMS}")
    _check(_is_int(workers) and workers >= 0, "data.num_workers", f"must be an int >= 0, got {workers!r}")
    _check(not stream or name != "synthetic", "data.stream", "synthetic data is made in memory; set it false")
    _check(not stream or not _get(config, "data.download"), "data.download",
           "a streamed dataset is a prepared TFDS directory, which is never downloaded (see README 'ImageNet' for "
           "how to prepare one); set it false")
    _check(stream or name != "imagenet2012", "data.stream", "imagenet2012 does not fit in memory: it must be streamed "
           "(true, as configs/imagenet_*.py set it)")
    _check(stream or transform == "none", "data.host_transform",
           f"{transform!r} runs on the images a stream reads; set data.stream=true, or host_transform='none'")


def _validate_synthetic(config: ml_collections.ConfigDict) -> None:
    """`data.synthetic` holds keyword arguments of `data.synthetic_dataset`, with values it can make a
    dataset of that trains at least one batch."""
    from oba_jax.experiment.data import synthetic_dataset
    s = _get(config, "data.synthetic")
    _check(isinstance(s, ml_collections.ConfigDict), "data.synthetic", "must be a section")
    known = sorted(inspect.signature(synthetic_dataset).parameters)
    unknown = sorted(set(s.keys()) - set(known))
    _check(not unknown, f"data.synthetic.{unknown[0] if unknown else ''}", f"unknown key; known keys: {known}")
    batch = _get(config, "train.batch_size")
    n = s.get("num_train", 512)
    _check(_is_int(n) and n > 0 and (not _is_int(batch) or n >= batch), "data.synthetic.num_train",
           f"must be an int >= train.batch_size ({batch}), got {n!r}")
    _check(_is_int(s.get("num_test", 256)) and s.get("num_test", 256) > 0, "data.synthetic.num_test",
           f"must be a positive int, got {s.get('num_test')!r}")
    shape = s.get("image_shape", (32, 32, 3))
    _check(isinstance(shape, (tuple, list)) and len(shape) >= 1 and all(_is_int(d) and d > 0 for d in shape),
           "data.synthetic.image_shape", f"must be a tuple of positive ints, got {shape!r}")
    classes = s.get("num_classes", 10)
    _check(_is_int(classes) and classes >= 2, "data.synthetic.num_classes", f"must be an int >= 2, got {classes!r}")
    _check(_is_int(s.get("seed", 0)), "data.synthetic.seed", "must be an int")


def _validate_prune(config: ml_collections.ConfigDict) -> None:
    from oba_jax.graph import KINDS
    from oba_jax.scores import BN_MODES, METHODS
    from oba_jax.structured import NORMALIZERS
    p = lambda key: _get(config, f"prune.{key}")   # noqa: E731
    from oba_jax.experiment.pipelines import PIPELINES   # deferred: the registry imports this module
    _check(p("mode") in PIPELINES, "prune.mode", f"must be one of {tuple(PIPELINES)}, got {p('mode')!r}")
    _check(p("importance") in METHODS, "prune.importance", f"unknown method {p('importance')!r}; choose one of {METHODS}")
    _check(p("bn_mode") in BN_MODES, "prune.bn_mode", f"must be one of {BN_MODES}, got {p('bn_mode')!r}")
    _check(p("normalizer") in NORMALIZERS, "prune.normalizer",
           f"unknown normalizer {p('normalizer')!r}; choose one of {tuple(NORMALIZERS)}")
    ratios = p("ops_ratios")
    _check(isinstance(ratios, tuple) and ratios and all(_is_number(r) and 0 < r < 1 for r in ratios), "prune.ops_ratios",
           f"must be a non-empty tuple of target ops ratios in (0, 1) (kept MACs / dense MACs), got {ratios!r}")
    # each target has its own directory ops_<target:g>: targets that share one, or that the schedule's
    # 0.01 window cannot tell apart, would overwrite or reuse each other's work
    close = [(a, b) for i, a in enumerate(ratios) for b in ratios[i + 1:] if f"{a:g}" == f"{b:g}" or abs(a - b) < 1e-3]
    _check(not close, "prune.ops_ratios", f"targets {close[0] if close else ''} are the same or nearly (closer than "
                                          "1e-3); give each target once")
    if p("mode") == "iterative":
        _check(list(ratios) == sorted(ratios, reverse=True), "prune.ops_ratios",
               f"iterative pruning needs strictly decreasing targets, got {ratios!r}")
    final = p("final_ratio")
    _check(final is None or (_is_number(final) and 0 < final < 1), "prune.final_ratio", f"must be None or in (0, 1), got {final!r}")
    for key in ("steps", "score_batches", "score_batch_size", "round_to", "latency_repeats"):
        _check(_is_int(p(key)) and p(key) > 0, f"prune.{key}", f"must be a positive int, got {p(key)!r}")
    mpr = p("max_pruning_ratio")
    _check(_is_number(mpr) and 0 < mpr < 1, "prune.max_pruning_ratio", f"must be in (0, 1), got {mpr!r}")
    kinds = p("kinds")
    _check(isinstance(kinds, tuple) and kinds and set(kinds) <= set(KINDS), "prune.kinds",
           f"must be a non-empty tuple of {KINDS}, got {kinds!r}")
    for key in ("global_pruning", "count_attention"):
        _check(isinstance(p(key), bool), f"prune.{key}", "must be true/false")
    _check(isinstance(p("ignored_layers"), tuple) and all(isinstance(x, str) for x in p("ignored_layers")),
           "prune.ignored_layers", "must be a tuple of layer paths")
    pretrained = p("pretrained")
    _check(pretrained is None or isinstance(pretrained, str), "prune.pretrained", "must be None or a train.py workdir")
    _check(_is_int(p("seed")), "prune.seed", "must be an int")
    _check(p("score_dtype") in SCORE_DTYPES, "prune.score_dtype", f"must be one of {SCORE_DTYPES}, got {p('score_dtype')!r}")
    from oba_jax.scores import get_method
    method_options = get_method(p("importance")).options
    for key, option in (("score_parts", "parts"), ("first_order", "first_order")):   # key -> the method's option
        _check(isinstance(p(key), bool), f"prune.{key}", "must be true/false")
        _check(not p(key) or option in method_options, f"prune.{key}",
               f"is no option of importance {p('importance')!r} (its options: {sorted(method_options) or 'none'})")
    _validate_unstructured(config)


def _validate_unstructured(config: ml_collections.ConfigDict) -> None:
    from oba_jax.scores import METHODS
    p = lambda key: _get(config, f"prune.{key}")   # noqa: E731
    keep = p("keep_ratio")
    _check(_is_number(keep) and 0 < keep <= 1, "prune.keep_ratio", f"must be in (0, 1] (the kept fraction), got {keep!r}")
    reported = p("report_keep_ratios")
    _check(isinstance(reported, tuple) and all(_is_number(r) and 0 < r <= 1 for r in reported), "prune.report_keep_ratios",
           f"must be a tuple of keep ratios in (0, 1], got {reported!r}")
    steps = p("unstructured_steps")
    _check(_is_int(steps) and steps > 0, "prune.unstructured_steps", f"must be a positive int, got {steps!r}")
    n_m = p("n_m")
    _check(n_m is None or (isinstance(n_m, tuple) and len(n_m) == 2 and all(_is_int(v) for v in n_m)
                           and 0 < n_m[0] <= n_m[1]), "prune.n_m", f"must be None or (N, M) with 0 < N <= M, got {n_m!r}")
    for key in ("exclude", "n_m_exclude"):
        _check(isinstance(p(key), tuple) and all(isinstance(x, str) for x in p(key)), f"prune.{key}",
               "must be a tuple of parameter paths or prefixes")
    from oba_jax.unstructured import MASK_FORMS
    _check(p("mask_form") is None or p("mask_form") in MASK_FORMS, "prune.mask_form",
           f"must be None (each method's own) or one of {MASK_FORMS}, got {p('mask_form')!r}")
    compare = p("compare")
    # prune.importance in compare is not an error: it runs once (`unstructured_methods`), and structured modes
    # ignore compare (the shipped Fashion-MNIST config compares with magnitude, so importance=magnitude is common)
    _check(isinstance(compare, tuple) and all(m in METHODS for m in compare) and len(set(compare)) == len(compare),
           "prune.compare", f"must be a tuple of distinct methods of {METHODS}, got {compare!r}")


def _validate_finetune(config: ml_collections.ConfigDict) -> None:
    f = lambda key: _get(config, f"finetune.{key}")   # noqa: E731
    _check(_is_number(f("epochs")) and f("epochs") >= 0, "finetune.epochs", f"must be >= 0 (0: no fine-tuning), got {f('epochs')!r}")
    _check(_is_number(f("lr")) and f("lr") > 0, "finetune.lr", f"must be a positive number, got {f('lr')!r}")
    _check(f("schedule") in SCHEDULES, "finetune.schedule", f"unknown schedule {f('schedule')!r}; expected one of {SCHEDULES}")
    ms = f("milestones")
    _check(isinstance(ms, tuple) and all(_is_number(m) and m > 0 for m in ms) and list(ms) == sorted(ms),
           "finetune.milestones", f"must be an increasing tuple of positive epochs, got {ms!r}")
    _check(_is_number(f("weight_decay")) and f("weight_decay") >= 0, "finetune.weight_decay", "must be >= 0")
    steps = f("max_steps")
    _check(steps is None or (_is_int(steps) and steps >= 0), "finetune.max_steps", f"must be None or an int >= 0, got {steps!r}")


def unstructured_methods(prune: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The methods unstructured mode runs: `prune.importance`, then those of `prune.compare` (each once)."""
    return tuple(dict.fromkeys((prune.importance, *prune.compare)))


def model_spec(config: ml_collections.ConfigDict):
    """The ``models`` spec described by ``config.model`` (``make_spec(family, **spec)``)."""
    from models import make_spec  # deferred so this module imports without the model zoo
    kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in config.model.spec.items()}
    return make_spec(config.model.family, **kwargs)


def default_sections() -> ml_collections.ConfigDict:
    """A config with every required key at its default; ``configs/*.py`` start from this."""
    config = ml_collections.ConfigDict()
    config.model = ml_collections.ConfigDict({"family": "mlp", "spec": ml_collections.ConfigDict()})
    config.data = ml_collections.ConfigDict({
        "name": "synthetic", "data_dir": ml_collections.FieldReference(None, field_type=str),
        "download": False, "augment": False,
        # stream: read a prepared TFDS dataset (array_record) from disk batch by batch with Grain instead of
        # holding it in memory; host_transform: what the stream's worker processes do to each image ("none": decode
        # only; "imagenet": RandomResizedCrop + flip for training, resize + centre crop for evaluation, to the
        # model's input size); num_workers: Grain worker processes (0: read in the training process)
        "stream": False, "host_transform": "none", "num_workers": 0,
        "synthetic": ml_collections.ConfigDict({"num_train": 512, "num_test": 256,
                                                "image_shape": (32, 32, 3), "num_classes": 10, "seed": 0}),
    })
    config.optim = ml_collections.ConfigDict({
        "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4, "nesterov": False,
        "schedule": "multistep", "milestones": (), "gamma": 0.1, "label_smoothing": 0.0,
    })
    config.train = ml_collections.ConfigDict({
        "epochs": 1, "batch_size": 64, "eval_batch_size": 500, "seed": 0,
        "log_every_steps": 50, "checkpoint_every_steps": 500,
        "max_steps": ml_collections.FieldReference(None, field_type=int),
        "progress_bar": True, "distributed": False,
        # with distributed: the coordinator's host:port, the number of processes and this one's index (None:
        # read from the cluster, as jax.distributed.initialize() does on SLURM, Open MPI, Cloud TPU, …)
        "coordinator_address": ml_collections.FieldReference(None, field_type=str),
        "num_processes": ml_collections.FieldReference(None, field_type=int),
        "process_id": ml_collections.FieldReference(None, field_type=int),
        "initialization_timeout_s": 300,
        # the dtype layers compute in during training and its evaluations; parameters, optimizer state and
        # importance scores stay float32 (Flax's dtype / param_dtype split)
        "compute_dtype": "float32",
    })
    config.plot = ml_collections.ConfigDict({"enabled": True, "filename": "curves.png"})
    config.prune = prune_section()
    config.finetune = finetune_section()
    return config


def prune_section(**overrides: Any) -> ml_collections.ConfigDict:
    """`prune.py`'s section (OBA_SPEC.md §4–6). `mode`: "oneshot" (every target from the dense model),
    "iterative" (decreasing targets, fine-tuning at each and continuing from the fine-tuned model) or
    "unstructured" (masks); `final_ratio`: the schedule's R (None: 1 − 0.9·target for one-shot, 0.955 for
    iterative). Unstructured: `keep_ratio` (kept fraction of the layer weights and biases) reached in
    `unstructured_steps` steps, accuracy at each of `report_keep_ratios`, `n_m` an extra one-shot N:M point
    (`n_m_exclude`: layers it skips, e.g. a first conv of 1 or 3 channels), `exclude` layers never masked,
    `compare` other methods run through the same schedule."""
    section = ml_collections.ConfigDict({
        "mode": "oneshot", "importance": "oba", "bn_mode": "train", "normalizer": "max",
        "ops_ratios": (0.5,), "steps": 50, "final_ratio": ml_collections.FieldReference(None, field_type=float),
        "score_batches": 10, "score_batch_size": 64, "global_pruning": True, "max_pruning_ratio": 0.95,
        "round_to": 1, "kinds": ("channels", "hidden"), "ignored_layers": (), "count_attention": True,
        "pretrained": ml_collections.FieldReference(None, field_type=str), "latency_repeats": 20, "seed": 0,
        # mode="unstructured" (OBA_SPEC.md §6)
        "keep_ratio": 0.1, "report_keep_ratios": (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1),
        "unstructured_steps": 49, "n_m": ml_collections.FieldReference(None, field_type=tuple), "exclude": (),
        "n_m_exclude": (), "compare": (),
        # how scores become per-weight importance for masks: None, each method's standard form (OBA: the
        # authors' normalised u; baselines: their own global |score|), or "oba" / "global" for every method
        "mask_form": ml_collections.FieldReference(None, field_type=str),
        # mode="score": the scores of the dense model in WORKDIR/scores_<importance>; OBA's parts
        # (upward/downward/parallel) and first-order term on request
        "score_dtype": "float32", "score_parts": False, "first_order": False,
    })
    section.update(overrides)
    return section


def finetune_section(**overrides: Any) -> ml_collections.ConfigDict:
    """Fine-tuning of each pruned model: the `optim` / `train` recipe with these values in place."""
    section = ml_collections.ConfigDict({
        "epochs": 1.0, "lr": 0.01, "schedule": "cosine", "milestones": (), "weight_decay": 1e-4,
        "max_steps": ml_collections.FieldReference(None, field_type=int),
    })
    section.update(overrides)
    return section


def cifar_oneshot_finetune() -> ml_collections.ConfigDict:
    """The authors' one-shot fine-tuning (OBA_SPEC.md §8): 150 epochs, lr 0.001, ×0.1 at 80/120, wd 1e-4."""
    return finetune_section(epochs=150.0, lr=0.001, schedule="multistep", milestones=(80, 120), weight_decay=1e-4)


def cifar_iterative_finetune() -> ml_collections.ConfigDict:
    """Per iterative stage: 100 epochs, lr 0.001, ×0.1 at 50/75, wd 1e-4."""
    return finetune_section(epochs=100.0, lr=0.001, schedule="multistep", milestones=(50, 75), weight_decay=1e-4)


def imagenet_finetune() -> ml_collections.ConfigDict:
    """ImageNet: 100 epochs, lr 0.001, wd 1e-4, ×0.1 at 30/60/80."""
    return finetune_section(epochs=100.0, lr=0.001, schedule="multistep", milestones=(30, 60, 80), weight_decay=1e-4)


def finetune_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The training config a pruned model is fine-tuned with: `config` with `finetune` in `optim` / `train`."""
    ft = config.finetune
    out = ml_collections.ConfigDict(config.to_dict(), type_safe=False)
    out.optim.update(lr=float(ft.lr), schedule=ft.schedule, milestones=tuple(ft.milestones),
                     weight_decay=float(ft.weight_decay))
    out.train.update(epochs=float(ft.epochs), max_steps=ft.max_steps)
    return out


def cifar_pretraining_recipe(config: ml_collections.ConfigDict, dataset: str) -> ml_collections.ConfigDict:
    """The paper's CIFAR pretraining (OBA_SPEC.md §8): SGD m0.9, lr 0.1, wd 5e-4, batch 64,
    200 epochs, lr x0.1 at epochs 60/100/150, pad-4 crop + flip."""
    num_classes = {"cifar10": 10, "cifar100": 100}[dataset]
    config.model.spec.num_classes = num_classes
    config.data.name = dataset
    config.data.augment = True
    config.data.synthetic.image_shape = (32, 32, 3)
    config.data.synthetic.num_classes = num_classes
    config.optim.update(lr=0.1, momentum=0.9, weight_decay=5e-4, schedule="multistep",
                        milestones=(60, 100, 150), gamma=0.1)
    config.train.update(epochs=200, batch_size=64, eval_batch_size=500, log_every_steps=100,
                        checkpoint_every_steps=2000)
    return config


def cifar_wide_resnet32(dataset: str) -> ml_collections.ConfigDict:
    """The paper's wide ResNet-32 (stage widths 64/128/256) on a CIFAR dataset with its pretraining recipe."""
    config = default_sections()
    config.model.family = "resnet_cifar"
    config.model.spec.depth = 32
    config.model.spec.width_multiplier = 4
    config.model.spec.image_size = 32
    return cifar_pretraining_recipe(config, dataset)


def imagenet_finetune_recipe(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The paper's ImageNet fine-tuning (OBA_SPEC.md §8): 100 epochs, lr 0.001, wd 1e-4,
    lr x0.1 at epochs 30/60/80, computed in bfloat16. The dataset is streamed from its prepared TFDS directory by
    8 Grain workers, which do the augmentation (RandomResizedCrop + flip) on the host."""
    config.data.name = "imagenet2012"
    config.data.augment = False  # (the device's pad-4 crop) the stream's workers crop and flip instead
    config.data.update(stream=True, host_transform="imagenet", num_workers=8)
    config.data.synthetic.image_shape = (224, 224, 3)
    config.data.synthetic.num_classes = 1000
    config.optim.update(lr=0.001, momentum=0.9, weight_decay=1e-4, schedule="multistep",
                        milestones=(30, 60, 80), gamma=0.1)
    # bf16 compute on accelerators, float32 parameters / optimizer state / scores
    config.train.update(epochs=100, batch_size=256, eval_batch_size=256, log_every_steps=100,
                        checkpoint_every_steps=1000, compute_dtype="bfloat16")
    return config

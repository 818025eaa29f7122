"""Train any policy from a YAML config: dataset -> policy -> generic Trainer -> checkpoint folder.

A config names the policy ``kind``, the ``task`` (or a dataset name / path under ``dataset``),
the ``policy`` settings and the ``train`` settings::

    kind: diffuser
    task: pointmaze-umaze
    policy: {horizon: 128, dim: 32, dim_mults: [1, 2, 4]}
    train: {steps: 20000, batch_size: 32, lr: 2.0e-4}

The data can instead be given to ``train_policy(cfg, out, dataset=...)``: an ``OfflineDataset``,
or a name or path for ``diffplan.data.load`` (``diffplan train CONFIG --dataset ID_OR_PATH``).
"""
from __future__ import annotations

import inspect
import os

import torch
import yaml

from diffplan.config import ConfigError, from_dict, load_yaml

TOP_KEYS = {"kind", "task", "dataset", "policy", "train"}


def read_config(path) -> dict:
    """Load a training config YAML (a shipped ``configs/...`` path works from any folder) and
    check its top-level keys."""
    from diffplan.resources import find

    path = find(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        cfg = load_yaml(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    check_config(cfg, str(path))
    return cfg


def check_config(cfg: dict, where: str = "config") -> None:
    if not isinstance(cfg, dict):
        raise ConfigError(f"{where}: expected a mapping at the top level")
    unknown = sorted(set(cfg) - TOP_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown top-level key(s) {unknown}; valid keys: {sorted(TOP_KEYS)}")
    if "kind" not in cfg:
        raise ConfigError(f"{where}: missing 'kind' (the policy type, e.g. 'diffuser')")


def parse_config(cfg: dict, *, steps: int | None = None, device: str | None = None, progress: bool = True):
    """Check a training config all through: ``(policy class, policy config, TrainConfig)``, or a
    ``ConfigError`` naming the first bad key or value."""
    import diffplan.policies  # noqa: F401  (registers every kind)
    from diffplan.policies.base import POLICIES
    from diffplan.train import TrainConfig

    check_config(cfg)
    kind = cfg["kind"]
    if kind not in POLICIES:
        raise ConfigError(f"unknown policy kind {kind!r}; known kinds: {', '.join(sorted(POLICIES))}")
    cls = POLICIES[kind]
    train_cfg = dict(cfg.get("train") or {})
    if steps is not None:
        train_cfg["steps"] = steps
    if device is not None:
        train_cfg["device"] = device
    train_cfg.setdefault("progress", progress)
    return cls, from_dict(cls.Config, cfg.get("policy"), "policy"), from_dict(TrainConfig, train_cfg, "train")


def train_policy(cfg: dict, out_dir, *, steps: int | None = None, device: str | None = None,
                 resume: bool = False, progress: bool = True, dataset=None):
    """Build the policy from ``cfg`` and its dataset, train it, and return it (EMA weights).

    ``dataset``: an ``OfflineDataset``, or a task name / Minari id / path (default: the config's
    ``dataset``, else its ``task``). Checkpoints go to ``out_dir/checkpoints/step-*/``;
    ``load_policy(out_dir)`` loads the latest. The run is a function of ``train.seed``: it seeds the
    network initialization here and the data order and per-step randomness in the Trainer.
    """
    from diffplan.data import load
    from diffplan.train import Trainer

    cls, pcfg, tcfg = parse_config(cfg, steps=steps, device=device, progress=progress)
    if dataset is None or isinstance(dataset, (str, os.PathLike)):
        source = os.fspath(dataset or cfg.get("dataset") or cfg.get("task") or "")
        if not source:
            raise ConfigError("no data to train on: give 'task' or 'dataset' in the config, or a dataset")
        dataset = load(source)
    else:
        source = dataset.source or None
    with torch.random.fork_rng(devices=[]):  # network init, like the data order, is a function of train.seed
        torch.manual_seed(tcfg.seed)
        policy = cls.from_dataset(dataset, pcfg)
    policy.reranker()  # a critic in the config is checked now, not when the trained policy first acts
    run_config = policy.run_config(train=_plain(tcfg), data={"task": dataset.task, "dataset": source})
    if tcfg.data_on_device:
        from diffplan.policies.base import POLICIES

        if "device" not in inspect.signature(policy.batches).parameters:
            raise ConfigError(f"train.data_on_device: a {cfg['kind']} policy draws its batches on the host; "
                              "device-side batches exist for: " + ", ".join(
                                  k for k, c in sorted(POLICIES.items())
                                  if "device" in inspect.signature(c.batches).parameters))
        batches = policy.batches(dataset, tcfg.batch_size, device=tcfg.device)
    else:
        batches = policy.batches(dataset, tcfg.batch_size)
    trainer = Trainer(policy, batches, tcfg, out_dir, run_config=run_config)
    return trainer.fit(resume=resume)


def _plain(cfg) -> dict:
    from diffplan.config import to_dict

    return cfg.to_dict() if hasattr(cfg, "to_dict") else to_dict(cfg)

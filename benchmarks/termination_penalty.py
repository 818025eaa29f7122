"""Issue #18, deviation 2: Diffuser's value target with and without the reference's termination penalty.

    python benchmarks/termination_penalty.py [--task hopper-medium] [--steps 20000] [--episodes 10]

The Diffuser's U-Net and value net train side by side on the same windows, the U-Net never seeing
the value net, so the A/B needs only a new value net: this trains one on the shipped checkpoint's
dataset with ``termination_penalty: -100`` added to every terminal reward (the reference's value
target; the return scale is refit on the penalized returns), beside the shipped U-Net, through the
``Trainer`` with the checkpoint's train recipe (run folder ``runs/value-penalty-<task>``). Then one run
on tuning seeds (1000+) evaluates BC, the shipped Diffuser and the one with the penalized value net,
at the shipped setting and with one temperature-0 plan, and records the rows under
``reference_deviations`` in ``benchmarks/RESULTS.md``.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference_deviations import HEADER, table_row  # noqa: E402
from results import append_rows, stamp  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


class _ValueOnly(torch.nn.Module):
    """Trains only ``planner.value`` through the Trainer: the U-Net stays out of the module."""

    def __init__(self, planner):
        super().__init__()
        self.value = planner.value
        self.__dict__["planner"] = planner  # not a submodule: no gradients, no EMA, not saved

    def loss(self, batch):
        loss = self.planner.value_loss(self.planner.normalizer.normalize(batch["x"]), batch["value"])
        return loss, {"value": loss.detach()}


def penalized_value(policy, dataset, penalty: float, train: dict, out: Path):
    """A copy of ``policy`` whose value net is retrained, with the checkpoint's ``train`` recipe, on
    returns with ``penalty`` per termination."""
    from diffplan.policies.diffuser import DiffuserPlanner
    from diffplan.train import Trainer

    cfg = dataclasses.replace(policy.config, termination_penalty=penalty)
    torch.manual_seed(train.get("seed", 0))
    fresh = DiffuserPlanner.from_dataset(dataset, cfg)  # a new value net; value_scale refit on penalized returns
    state = {k: v for k, v in policy.state_dict().items() if not k.startswith("value.") and k != "value_scale"}
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith("value.") or k == "value_scale" for k in missing), missing
    Trainer(_ValueOnly(fresh), fresh.batches(dataset, train["batch_size"]), train, out).fit()  # EMA weights in place
    return fresh.eval()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="hopper-medium")
    p.add_argument("--penalty", type=float, default=-100.0)
    p.add_argument("--steps", type=int, default=20_000)
    p.add_argument("--episodes", type=int, default=10)
    p.add_argument("--seed", type=int, default=1000, help="first tuning seed")
    p.add_argument("--no-record", action="store_true")
    a = p.parse_args(argv)
    from diffplan.envs import get_task
    from diffplan.eval import evaluate
    from diffplan.policies import load_policy

    torch.set_num_threads(1)
    import yaml

    ckpt = ROOT / "checkpoints" / a.task / "diffuser"
    shipped = load_policy(ckpt)
    train = yaml.safe_load((ckpt / "config.yaml").read_text())["train"]  # our own shipped file
    dataset = get_task(a.task).load_dataset(progress=False)
    train = {**train, "steps": a.steps, "device": "cpu", "progress": True, "ckpt_every": a.steps}
    penal = penalized_value(shipped, dataset, a.penalty, train, ROOT / "runs" / f"value-penalty-{a.task}")
    bc = load_policy(ROOT / "checkpoints" / a.task / "bc")
    one_plan = {"temperature": 0.0, "critic": None}
    rows = []
    for policy, setting, ov in [(bc, "BC", {}), (shipped, "shipped value net (no penalty)", {}),
                                (penal, f"value net with termination penalty {a.penalty:g}", {}),
                                (shipped, "shipped value net, one temperature-0 plan", one_plan),
                                (penal, f"penalty {a.penalty:g}, one temperature-0 plan", one_plan)]:
        saved = {k: getattr(policy.config, k) for k in ov}
        for k, v in ov.items():
            setattr(policy.config, k, v)
        t0 = time.time()
        d = evaluate(policy, a.task, episodes=a.episodes, num_envs=min(10, a.episodes), seed=a.seed, record=0).to_dict()
        for k, v in saved.items():
            setattr(policy.config, k, v)
        rows.append({"task": a.task, "policy": policy.kind, "setting": setting, "episodes": a.episodes,
                     "seed": a.seed, "score_mean": d["normalized_mean"], "score_se": d["normalized_stderr"],
                     "mean_len": float(np.mean(d["lengths"])), "p50_ms": d["latency_p50_ms"],
                     "wall_s": round(time.time() - t0, 1)})
        print(rows[-1], flush=True)
    for r in rows:
        print("| " + " | ".join(table_row(r)) + " |")
    if not a.no_record:
        append_rows("reference_deviations", "", HEADER, [stamp() + table_row(r) for r in rows],
                    note=f"Diffuser value target with the reference's termination penalty ({a.penalty:g} per "
                     f"terminal step), `benchmarks/termination_penalty.py`: a value net retrained for "
                     f"{a.steps} steps beside the shipped U-Net, against the shipped one, same episodes.")
    return 0


if __name__ == "__main__":
    sys.exit(main())

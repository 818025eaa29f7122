"""Truncated anchored action diffusion: DiffusionDrive (Liao et al., CVPR 2025) for control.

What it trains
    Action chunks of length H_a (8) are the "trajectories". K (20) anchors are the k-means
    centroids of the dataset's normalized chunks, fitted once in ``from_dataset`` and kept as a
    buffer, so they travel in the checkpoint. Each training sample noises *all* K anchors to one
    level ``t ~ U(0, t_trunc)``: the chain is truncated, so every noisy anchor still looks like its
    anchor (DiffusionDrive: steps [0, 50) of 1000). A decoder treats the K noisy chunks as K
    queries; time enters by FiLM, the observation (and goal) tokens by cross-attention. A cascade
    of 2 stages refines the chunk (stage 2 starts from stage 1's x0), and every stage predicts an
    x0 chunk and a logit per query. The loss, summed over stages, is
        l1_weight * L1(x0 of the positive query, target) + cls_weight * CE(logits, positive),
    where the positive query is the anchor nearest the target chunk (DiffusionDrive uses
    ``10 * focal + 8 * L1``; ``classification: focal`` is offered too).

How it acts
    The anchors are noised to ``t_start * t_trunc`` (``t_start`` is a fraction of the trained
    range; default 1, its top; DiffusionDrive noises to step 8 of its [0, 50), about 0.16) and
    denoised in 2 DDIM steps
    (x0-parameterised, ``x_s = alpha_s x0 + sigma_s (x_t - alpha_t x0) / sigma_t``), each step one
    pass of the cascade. The chunk of the top logit (or one sampled by ``softmax(logits / T)``, or,
    with ``critic:`` set, the one of highest Q(s, first action) by an in-sample critic) is
    returned; the runtime executes ``n_action_steps`` of it and replans. Network evaluations per
    decision are ``steps / n_action_steps`` = 2/8 with the defaults.

    Warm start (``runtime.warm_start``): the previous chunk, shifted by the executed actions (its
    last action repeated), joins the K anchors as query K + 1; all are noised to
    ``t_warm * t_trunc`` (inside the trained range), denoised in ``runtime.warm_steps`` steps and
    classified as usual. The runtime's absolute ``t_warm`` is not used: only levels below
    ``t_trunc`` were trained. (Refining the previous chunk alone, never reclassifying, measured
    far worse: hopper-medium 51 vs 68 cold, halfcheetah-medium -1 vs 39.)

Truncation, tuned to the anchor spacing
    With ``truncation: null`` (the default) ``t_trunc`` is set so that the noise-to-signal ratio
    ``sigma/alpha`` at the truncation equals ``truncation_ratio`` (0.5) times the median RMS
    distance between an anchor and its nearest other anchor: the noise never carries an anchor
    half way to its neighbour, so the query still says which mode it stands for, and the decoder
    only has to regress within a mode. The chosen value is a buffer (``t_trunc``) in the checkpoint.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from diffplan.data.windows import discounted_returns
from diffplan.diffusion import randn
from diffplan.data.goal_hold import GoalHoldConfig
from diffplan.policies.base import PolicyBase, SpaceSpec, register_policy
from diffplan.runtime.planner import PlannerConfig


# ---------------------------------------------------------------------------------------------- anchors
def kmeans(x, k: int, iters: int = 100, seed: int = 0, tol: float = 1e-6) -> torch.Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007) then Lloyd iterations.

    x: (N, F) points -> (k, F) centroids. Deterministic for a given ``seed``. An empty cluster
    is restarted at the point farthest from its centroid.
    """
    x = torch.as_tensor(np.asarray(x), dtype=torch.float64)
    n = x.shape[0]
    if n < k:
        raise ValueError(f"k-means needs at least k={k} points, got {n}")
    g = torch.Generator().manual_seed(seed)
    centers = x[torch.randint(n, (1,), generator=g)]
    d2 = torch.cdist(x, centers).squeeze(1) ** 2
    for _ in range(1, k):
        probs = d2 / d2.sum() if d2.sum() > 0 else torch.full_like(d2, 1.0 / n)
        c = x[torch.multinomial(probs, 1, generator=g)]
        centers = torch.cat([centers, c])
        d2 = torch.minimum(d2, ((x - c) ** 2).sum(1))
    for _ in range(iters):
        dist = torch.cdist(x, centers)
        assign = dist.argmin(1)
        sums = torch.zeros_like(centers).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).to(x.dtype)
        new = sums / counts.clamp(min=1)[:, None]
        for j in torch.nonzero(counts == 0).flatten().tolist():  # empty cluster: reseed
            far = dist.gather(1, assign[:, None]).squeeze(1).argmax()
            new[j] = x[far]
        shift = (new - centers).abs().max()
        centers = new
        if shift <= tol:
            break
    # final assignment and means, so the centroids are exactly the means of their clusters
    assign = torch.cdist(x, centers).argmin(1)
    counts = torch.bincount(assign, minlength=k)
    sums = torch.zeros_like(centers).index_add_(0, assign, x)
    centers = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None].to(x.dtype), centers)
    return centers.float()


def nearest_anchor(chunks: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """The positive query: index (B,) of the anchor (K, H, D) nearest each chunk (B, H, D) in L2."""
    return torch.cdist(chunks.flatten(1), anchors.flatten(1)).argmin(1)


# ---------------------------------------------------------------------------------------------- config
@dataclass
class AnchoredConfig:
    chunk: int = 8  # H_a: actions per chunk
    num_anchors: int = 20  # K
    width: int = 64
    heads: int = 4
    stages: int = 2  # cascade depth
    activation: str = "silu"  # "silu" | "mish" (Mish costs ~10x SiLU on CPU at batch 64 x K queries)
    steps: int = 2  # DDIM steps at inference
    schedule: str = "scaled_linear"  # DiffusionDrive's DDPM betas
    truncation: float | None = None  # t_trunc in (0, 1]; None: from the anchor spacing
    truncation_ratio: float = 0.5
    # inference start as a fraction of the trained range: the anchors are noised to t_start * t_trunc
    # (None: 1, the top of the range; DiffusionDrive: 8 of its 50 trained steps, ~0.16)
    t_start: float | None = None
    t_warm: float = 0.5  # warm starts: the shifted previous chunk is noised to t_warm * t_trunc
    classification: str = "ce"  # "ce" | "focal"
    focal_gamma: float = 2.0
    l1_weight: float = 1.0
    cls_weight: float = 0.5
    temperature: float = 0.0  # 0: top logit; > 0: sample softmax(logits / temperature)
    # a `kind: critic` checkpoint: pick the chunk of highest Q(s, first action) instead of the
    # classifier's (None: the classifier, as trained; temperature is then not used)
    critic: str | None = None
    pad: bool = False  # also train on chunks running past an episode's end, zero-padded
    hold: GoalHoldConfig = field(default_factory=GoalHoldConfig)  # synthesized arrival + hold at the goal
    # Return conditioning (reward tasks): the discounted return-to-go of the chunk's first step is
    # one more context token, and acting asks for ``target_return`` (raw, None: 0.9 x the
    # dataset's largest), as Decision Transformer / Decision Diffuser condition on returns.
    return_conditioned: bool = False
    discount: float = 0.997
    target_return: float | None = None
    kmeans_samples: int = 200_000  # chunks used to fit the anchors
    kmeans_iters: int = 100
    seed: int = 0
    runtime: PlannerConfig = field(default_factory=lambda: PlannerConfig(n_action_steps=8))

    def __post_init__(self):
        if self.classification not in ("ce", "focal"):
            raise ValueError(f"classification must be 'ce' or 'focal', got {self.classification!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")
        if self.schedule not in ("scaled_linear", "vp_cosine", "vp_linear"):
            raise ValueError(f"schedule {self.schedule!r} unknown; choose scaled_linear, vp_cosine or vp_linear")
        if self.truncation is not None and not 0.0 < self.truncation <= 1.0:
            raise ValueError(f"truncation must be in (0, 1], got {self.truncation}")
        for name in ("t_start", "t_warm"):
            value = getattr(self, name)
            if value is not None and not 0.0 < value <= 1.0:
                raise ValueError(f"{name} is a fraction of the truncation level, in (0, 1]; got {value}")
        if self.steps < 1 or self.stages < 1 or self.num_anchors < 2 or self.chunk < 1:
            raise ValueError("need steps >= 1, stages >= 1, num_anchors >= 2, chunk >= 1")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        if not 0.0 < self.discount <= 1.0:
            raise ValueError(f"discount must be in (0, 1], got {self.discount}")
        if self.runtime.n_action_steps > self.chunk:
            raise ValueError(f"runtime.n_action_steps {self.runtime.n_action_steps} > chunk {self.chunk}")


def _schedule(name: str):
    from diffplan.diffusion import Schedule

    return getattr(Schedule, name)()


# ---------------------------------------------------------------------------------------------- networks
ACTIVATIONS = {"silu": nn.SiLU, "mish": nn.Mish}


class ObservationEncoder(nn.Module):
    """Context tokens (B, T, W): the observation, the goal and both together (goal tasks), and
    the scaled return-to-go (return-conditioned policies)."""

    def __init__(self, obs_dim: int, goal_dim: int, width: int, activation: str = "silu",
                 returns: bool = False):
        super().__init__()
        act = ACTIVATIONS[activation]
        mlp = lambda d: nn.Sequential(nn.Linear(d, width), act(), nn.Linear(width, width))
        self.obs = mlp(obs_dim)
        self.goal = mlp(goal_dim) if goal_dim else None
        self.joint = mlp(obs_dim + goal_dim) if goal_dim else None
        self.ret = mlp(1) if returns else None
        self.norm = nn.LayerNorm(width)

    def forward(self, obs: torch.Tensor, goal: torch.Tensor | None, ret: torch.Tensor | None = None) -> torch.Tensor:
        tokens = [self.obs(obs)]
        if self.goal is not None:
            tokens += [self.goal(goal), self.joint(torch.cat([obs, goal], -1))]
        if self.ret is not None:
            tokens.append(self.ret(ret))
        return self.norm(torch.stack(tokens, 1))


class CascadeStage(nn.Module):
    """One decoder stage: queries (B, K, W) from chunks (B, K, H, D) -> x0 chunks and logits.

    chunk embedding -> cross-attention to the observation tokens -> FiLM by time -> FFN -> heads.
    """

    def __init__(self, chunk_dim: int, width: int, heads: int, activation: str = "silu"):
        super().__init__()
        self.heads = heads
        act = ACTIVATIONS[activation]
        self.embed = nn.Sequential(nn.Linear(chunk_dim, width), act(), nn.Linear(width, width))
        self.norm_q = nn.LayerNorm(width)
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.out = nn.Linear(width, width)
        self.film = nn.Linear(width, 2 * width)
        self.norm_f = nn.LayerNorm(width)
        self.ffn = nn.Sequential(nn.Linear(width, 2 * width), act(), nn.Linear(2 * width, width))
        self.reg = nn.Linear(width, chunk_dim)
        self.cls = nn.Linear(width, 1)
        nn.init.zeros_(self.reg.weight)  # start as the identity on the input chunk
        nn.init.zeros_(self.reg.bias)

    def keys_values(self, ctx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head keys and values of the observation tokens; computed once per plan."""
        b, t, w = ctx.shape
        k, v = self.kv(ctx).view(b, t, 2, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        return k, v

    def forward(self, x: torch.Tensor, h: torch.Tensor | None, temb: torch.Tensor | None,
                kv: tuple[torch.Tensor, torch.Tensor], film: tuple[torch.Tensor, torch.Tensor] | None = None,
                logits: bool = True):
        """x: (B, K, H, D) input chunks, h: (B, K, W) previous stage's queries or None,
        temb: (B, W), kv from ``keys_values`` -> x0 (B, K, H, D), logits (B, K) (None if not
        ``logits``), queries (B, K, W). ``film``: ``film_of(temb)`` if already computed."""
        b, kq = x.shape[:2]
        q = self.embed(x.flatten(2))
        if h is not None:
            q = q + h
        k, v = kv
        w = q.shape[-1]
        qh = self.q(self.norm_q(q)).view(b, kq, self.heads, w // self.heads).transpose(1, 2)
        q = q + self.out(F.scaled_dot_product_attention(qh, k, v).transpose(1, 2).reshape(b, kq, w))
        scale, shift = self.film_of(temb) if film is None else film
        q = q + self.ffn(torch.addcmul(shift, self.norm_f(q), scale))
        x0 = x + self.reg(q).view_as(x)
        return x0, self.cls(q).squeeze(-1) if logits else None, q

    def film_of(self, temb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """FiLM (1 + scale, shift), each (B, 1, W), of time embeddings (B, W)."""
        scale, shift = self.film(temb)[:, None].chunk(2, -1)
        return 1 + scale, shift


class CascadeDecoder(nn.Module):
    """The denoiser: noisy chunks (B, K, H, D) at level t (B,) -> per-stage (x0, logits).

    One call is one network evaluation of every stage."""

    def __init__(self, chunk: int, act_dim: int, width: int, heads: int, stages: int, t_scale: float = 1000.0,
                 activation: str = "silu"):
        super().__init__()
        self.width, self.t_scale = width, t_scale
        self.time = nn.Sequential(nn.Linear(width, width), ACTIVATIONS[activation](), nn.Linear(width, width))
        self.stages = nn.ModuleList(CascadeStage(chunk * act_dim, width, heads, activation) for _ in range(stages))
        half = width // 2
        self.register_buffer("freqs", torch.exp(-math.log(10_000) * torch.arange(half) / half), persistent=False)

    def time_embedding(self, t: torch.Tensor) -> torch.Tensor:
        """Sinusoidal embedding of t * 1000 (DDPM step units), then an MLP: (B,) -> (B, W)."""
        arg = (t * self.t_scale)[:, None] * self.freqs
        return self.time(torch.cat([arg.sin(), arg.cos()], -1))

    def forward(self, x: torch.Tensor, t: torch.Tensor | None, kvs: list, temb: torch.Tensor | None = None,
                films: list | None = None, logits: str = "all") -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``temb``: ``time_embedding(t)`` if already computed; ``films``: each stage's
        ``film_of(temb)`` if already computed (inference caches them per solver step).
        ``logits``: which stages run their classification head, "all", "last" or "none" (the
        others give None; inference reads only the last stage's, at the last step)."""
        if logits not in ("all", "last", "none"):
            raise ValueError(f"logits must be 'all', 'last' or 'none', got {logits!r}")
        if films is None:
            temb = self.time_embedding(t) if temb is None else temb
            films = [None] * len(self.stages)
        out, h = [], None
        for s, (stage, kv, film) in enumerate(zip(self.stages, kvs, films)):
            want = logits == "all" or (logits == "last" and s == len(self.stages) - 1)
            x0, stage_logits, h = stage(x, h, temb, kv, film=film, logits=want)
            out.append((x0, stage_logits))
            x = x0.detach()  # stage s+1 refines stage s's x0 (DETR-style, no gradient through it)
        return out


# ---------------------------------------------------------------------------------------------- policy
@register_policy
class AnchoredDiffusionPolicy(PolicyBase):
    kind = "anchored"
    Config = AnchoredConfig

    def __init__(self, config: AnchoredConfig, spec: SpaceSpec):
        super().__init__(config, spec)

        c = config
        self.act_dim, self.obs_dim, self.goal_dim = spec.act_dim, spec.obs_dim, spec.goal_dim
        self.plan_shape = (c.chunk, spec.act_dim)
        self.schedule = _schedule(c.schedule)
        self.add_obs_action_normalizers()
        self.register_buffer("anchors", torch.zeros(c.num_anchors, c.chunk, spec.act_dim))
        self.register_buffer("t_trunc", torch.tensor(float(c.truncation or 0.05)))
        if c.return_conditioned:  # condition = rtg / return_scale; default ask: 0.9 x the data's max
            self.register_buffer("return_scale", torch.ones(()))
            self.register_buffer("default_return", torch.ones(()))
        self.encoder = ObservationEncoder(spec.obs_dim, spec.goal_dim, c.width, c.activation,
                                          returns=c.return_conditioned)
        self.net = CascadeDecoder(c.chunk, spec.act_dim, c.width, c.heads, c.stages, activation=c.activation)
        self._grid_cache: tuple | None = None

    # ------------------------------------------------------------------ training
    @classmethod
    def from_dataset(cls, dataset, config: AnchoredConfig) -> "AnchoredDiffusionPolicy":
        """Fit the normalizers, the K anchors and (if not given) the truncation level."""
        policy = cls(config, SpaceSpec.from_dataset(dataset))
        policy.fit_obs_action_normalizers(dataset)
        if config.return_conditioned:
            rtg = discounted_returns(dataset.rewards, dataset.episode_ends, config.discount)
            policy.return_scale.fill_(float(np.abs(rtg).max()) or 1.0)
            policy.default_return.fill_(0.9 * float(rtg.max()) / float(policy.return_scale))
        windows = policy._windows(dataset)
        rng = np.random.default_rng(config.seed)
        n = len(windows)
        pick = rng.choice(n, config.kmeans_samples, replace=False) if n > config.kmeans_samples else np.arange(n)
        chunks = windows.get_batch(pick)["actions"]
        policy.fit_anchors(policy.action_normalizer.normalize(torch.as_tensor(chunks)))
        return policy

    @torch.no_grad()
    def fit_anchors(self, chunks: torch.Tensor) -> None:
        """chunks: (N, H_a, act_dim) normalized -> ``anchors`` and, if not configured, ``t_trunc``."""
        c = self.config
        n, h, d = chunks.shape
        centers = kmeans(chunks.reshape(n, h * d), c.num_anchors, c.kmeans_iters, c.seed)
        self.anchors.copy_(centers.view(c.num_anchors, h, d))
        if c.truncation is None:
            self.t_trunc.fill_(self.truncation_for_spacing())
        self._grid_cache = None

    def anchor_spacing(self) -> float:
        """Median RMS (per element) distance from each anchor to its nearest other anchor."""
        a = self.anchors.flatten(1)
        dist = torch.cdist(a, a) / math.sqrt(a.shape[1])
        dist.fill_diagonal_(float("inf"))
        return float(dist.min(1).values.median())

    def truncation_for_spacing(self) -> float:
        """The t where sigma(t)/alpha(t) = truncation_ratio * anchor spacing (bisection)."""
        target = self.config.truncation_ratio * self.anchor_spacing()
        lo, hi = 1e-4, 1.0
        nsr = lambda t: float(self.schedule.sigma(torch.tensor(t)) / self.schedule.alpha(torch.tensor(t)))
        if nsr(hi) <= target:
            return hi
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if nsr(mid) < target else (lo, mid)
        return 0.5 * (lo + hi)

    def _windows(self, dataset):
        """Chunks of H_a actions that lie inside one episode (with its goal hold), with the
        observation before them: the training windows, also those the anchors are fitted on."""
        c = self.config
        return self.action_chunk_windows(dataset, c.chunk, pad=c.pad, hold=c.hold,
                                         discount=c.discount if c.return_conditioned else None)

    def batches(self, dataset, batch_size: int):
        c = self.config
        return self.action_chunk_batches(dataset, c.chunk, batch_size, pad=c.pad, hold=c.hold,
                                         discount=c.discount if c.return_conditioned else None)

    def return_condition(self, obs: torch.Tensor, rtg: torch.Tensor | None = None) -> torch.Tensor | None:
        """(B, 1) scaled return condition: ``rtg`` (B,)|(B, 1) raw if given (training), else the
        requested ``config.target_return`` (acting); None for policies without it."""
        if not self.config.return_conditioned:
            return None
        if rtg is None:
            target = self.config.target_return
            value = self.default_return if target is None else torch.full((), target / self._host_float("return_scale"), device=obs.device)
            return value.to(obs.device, obs.dtype).expand(obs.shape[0], 1)
        return (rtg.reshape(-1, 1) / self.return_scale).to(obs.dtype)

    def context(self, obs: torch.Tensor, goal: torch.Tensor | None, rtg: torch.Tensor | None = None) -> list:
        """Raw observations (B, obs_dim), goals (B, goal_dim)|None, raw returns-to-go (B,)|None
        (None: the target return) -> per-stage keys/values."""
        o = self.obs_normalizer.normalize(obs)
        g = None if goal is None or self.goal_normalizer is None else self.goal_normalizer.normalize(goal)
        ctx = self.encoder(o, g, self.return_condition(obs, rtg))
        return [stage.keys_values(ctx) for stage in self.net.stages]

    def loss(self, batch):
        c = self.config
        target = self.action_normalizer.normalize(batch["actions"])  # (B, H, D)
        b = target.shape[0]
        if self.config.return_conditioned and "rtg" not in batch:
            raise KeyError("a return-conditioned anchored policy trains on batches with 'rtg' (returns-to-go)")
        kvs = self.context(batch["obs"], batch.get("goal"), batch.get("rtg"))
        positive = nearest_anchor(target, self.anchors)  # (B,)
        t = torch.rand(b, device=target.device) * self.t_trunc  # truncated: t ~ U(0, t_trunc)
        alpha, sigma = self.schedule.alpha(t)[:, None, None, None], self.schedule.sigma(t)[:, None, None, None]
        anchors = self.anchors.expand(b, -1, -1, -1)
        x_t = alpha * anchors + sigma * torch.randn_like(anchors)
        rows = torch.arange(b, device=target.device)
        total, logs = 0.0, {}
        for s, (x0, logits) in enumerate(self.net(x_t, t, kvs)):
            l1 = (x0[rows, positive] - target).abs().mean()
            if c.classification == "ce":
                cls = F.cross_entropy(logits, positive)
            else:
                onehot = F.one_hot(positive, logits.shape[1]).to(logits.dtype)
                cls = _sigmoid_focal(logits, onehot, c.focal_gamma)
            total = total + c.l1_weight * l1 + c.cls_weight * cls
            logs[f"l1_stage{s + 1}"] = l1.detach()
            logs[f"cls_stage{s + 1}"] = cls.detach()
            logs[f"acc_stage{s + 1}"] = (logits.argmax(1) == positive).float().mean().detach()
        return total, logs

    # ------------------------------------------------------------------ acting
    def _host_float(self, name: str) -> float:
        """A scalar buffer as a Python float, read once per value (the buffer's version and
        address key it), so that a plan neither syncs with a CUDA device nor breaks a capture."""
        buf = getattr(self, name)
        key = (buf._version, buf.data_ptr(), str(buf.device))
        cache = self.__dict__.setdefault("_host_floats", {})  # kept out of nn.Module's registries
        if name not in cache or cache[name][0] != key:
            cache[name] = (key, float(buf))
        return cache[name][1]

    def capture_problem(self) -> str | None:
        """Why a plan cannot be captured in a CUDA graph (see ``diffplan.runtime.graphs``), or None."""
        if self.config.temperature > 0:
            return "query sampling (temperature > 0) draws from the per-env CPU generators inside the plan"
        return None

    def _grid(self, t_start: float, steps: int) -> list[tuple[float, float, float]]:
        """(t, alpha_t, sigma_t) for the DDIM grid from t_start down to 0, as Python floats."""
        key = (t_start, steps)
        if self._grid_cache is None or self._grid_cache[0] != key:
            ts = torch.linspace(t_start, 0.0, steps + 1, dtype=torch.float64)
            grid = [(float(t), float(self.schedule.alpha(t.float())), float(self.schedule.sigma(t.float())))
                    for t in ts]
            self._grid_cache = (key, grid)
        return self._grid_cache[1]

    def _films(self, grid, device) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
        """Per solver step, per stage: the FiLM (scale, shift) of that step's time embedding.

        They depend only on the grid and the weights, so inference computes them once and keeps
        them until the grid changes or the weights change (parameter versions in the key)."""
        params = [*self.net.time.parameters(), *(st.film.weight for st in self.net.stages),
                  *(st.film.bias for st in self.net.stages)]
        key = (tuple(g[0] for g in grid), str(device), tuple(p._version for p in params),
               tuple(p.data_ptr() for p in params))
        # Inside a CUDA-graph capture they are computed in the graph (a cached tensor could be
        # replaced, and freed, while the graph still reads it).
        capturing = torch.device(device).type == "cuda" and torch.cuda.is_current_stream_capturing()
        cached = self.__dict__.get("_film_cache")
        if cached is not None and cached[0] == key and not capturing:
            return cached[1]
        with torch.inference_mode():
            ts = torch.stack([torch.full((), g[0], device=device) for g in grid[:-1]])  # no host copy
            tembs = self.net.time_embedding(ts)  # (steps, W)
            films = [[st.film_of(tembs[i:i + 1]) for st in self.net.stages] for i in range(len(ts))]
        if not capturing:
            self.__dict__["_film_cache"] = (key, films)  # kept out of nn.Module's registries
        return films

    def start_level(self, warm: bool = False) -> float:
        """The noise level inference starts at: ``t_start`` (cold) or ``t_warm`` (warm) times
        ``t_trunc``, always inside the trained range ``(0, t_trunc]``."""
        c = self.config
        frac = c.t_warm if warm else (1.0 if c.t_start is None else c.t_start)
        return frac * self._host_float("t_trunc")  # no device sync: plans stay capturable

    def denoise_anchors(self, obs, goal, noise, steps: int | None = None, prior: torch.Tensor | None = None):
        """obs (B, obs_dim), goal (B, goal_dim)|None, noise (B, H, D) or (B, K, H, D) ->
        normalized x0 chunks (B, K, H, D) and logits (B, K) of the last stage at the last step.
        ``prior`` (B, H, D) normalized (a warm start: the shifted previous chunk) is appended as
        query K + 1 (outputs (B, K + 1, ...)), and all start at the warm level."""
        c = self.config
        steps = c.steps if steps is None else steps
        grid = self._grid(self.start_level(warm=prior is not None), steps)
        kvs = self.context(obs, goal)
        if noise.dim() == 3:  # one noise chunk per env, shared by its K queries (which never interact)
            noise = noise[:, None]
        queries = self.anchors
        if prior is not None:  # the shifted previous chunk joins the K anchors as query K + 1
            queries = torch.cat([self.anchors.expand(prior.shape[0], -1, -1, -1), prior[:, None]], 1)
        _, a0, s0 = grid[0]
        x = torch.add(queries, noise, alpha=s0 / a0).mul_(a0)  # (B, K, H, D): queries noised to the start
        films = self._films(grid, x.device)
        last = len(grid) - 2
        for i, ((t, a, s), (_, a_next, s_next)) in enumerate(zip(grid[:-1], grid[1:])):
            x0, logits = self.net(x, None, kvs, films=films[i], logits="last" if i == last else "none")[-1]
            if i < last:  # DDIM, eta = 0 (the last step's x0 is the answer)
                x = torch.add(x0.mul(a_next - s_next * a / s), x, alpha=s_next / s)
        return x0, logits

    def plan(self, obs, goal, noise, *, warm=None, t_start=1.0, steps=None, generator=None):
        """obs (B, obs_dim), goal (B, goal_dim)|None, noise (B, H_a, act_dim) ->
        unnormalized action chunks (B, H_a, act_dim) of the chosen queries.

        ``warm`` (B, H_a, act_dim) unnormalized: the previous chunk shifted to the present, one more
        query (see :meth:`denoise_anchors`). The runtime's ``t_start`` is ignored: the start level is
        :meth:`start_level`, inside the trained range. With ``temperature > 0`` the query is
        sampled with ``generator`` (one per env, or one)."""
        # inside the action bounds, as executed: a chunk fed back unclipped can grow without end
        prior = None if warm is None else self.action_normalizer.normalize(self.action_to_env(warm))
        x0, logits = self.denoise_anchors(obs, goal, noise, steps=steps, prior=prior)
        critic = self.reranker()
        if critic is not None:  # Q(s, first action) of every candidate, as it would be executed
            from diffplan.policies.critic import rerank

            pick = rerank(critic, obs, self.action_to_env(self.action_normalizer.unnormalize(x0[:, :, 0])))
        elif self.config.temperature > 0:
            cdf = torch.softmax(logits.float() / self.config.temperature, -1).cumsum(-1)
            u = torch.special.ndtr(randn((cdf.shape[0], 1), generator, cdf.device))  # uniform on (0, 1)
            pick = (cdf < u).sum(-1).clamp(max=cdf.shape[1] - 1)  # inverse-CDF draw of a query
        else:
            pick = logits.argmax(-1)
        chosen = x0[torch.arange(x0.shape[0], device=x0.device), pick]
        return self.action_normalizer.unnormalize(chosen)

    def action_at(self, plans, index, obs, goal):
        i = index.clamp(max=plans.shape[1] - 1)
        return plans[torch.arange(plans.shape[0], device=plans.device), i]


def _sigmoid_focal(logits: torch.Tensor, target: torch.Tensor, gamma: float, alpha: float = 0.25) -> torch.Tensor:
    """Sigmoid focal loss (Lin et al. 2017, eq. 5), summed over queries, mean over the batch."""
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = p * target + (1 - p) * (1 - target)
    a_t = alpha * target + (1 - alpha) * (1 - target)
    return (a_t * ce * (1 - p_t) ** gamma).sum(1).mean()


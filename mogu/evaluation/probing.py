"""Layer selection (MoGU v2): which layers' activations tell benign from malicious prompts.

MoGU v2 (arXiv 2509.06807) puts routers only in the layers whose hidden states separate
benign from malicious requests. :func:`probe_layers` measures that separation at the
projection MoGU adapts: for every target module (e.g. each layer's ``o_proj``) it takes
the module's *input* on each prompt, pooled into one feature vector per prompt
([mean over the prompt's tokens, last prompt token], 2K numbers), fits an L2-regularised
logistic-regression probe on the ``train`` prompts and scores its accuracy on the
``heldout`` prompts. Layers are ranked by held-out accuracy (ties: higher held-out
log-likelihood). :func:`select_layers` turns ``MoGUConfig(layers="auto:K")`` into the K
best layer indices.

Beside accuracy, each layer reports the probe's **recall at the dial's operating point**:
the share of held-out malicious prompts it scores above the highest threshold that lets at
most ``benign_rate`` (default 5%) of the held-out benign-label prompts (benign and
borderline, as the dial counts them) above it, overall and per category (plain malicious,
jailbreak, ...). A linear read-out of the layer's input at that operating point is a
yardstick for what MoGU's routers, which see the same inputs, can be expected to reach
after calibration (:mod:`.calibration`); it is not a bound (the routers are small MLPs over
every token), but a model whose every layer reads out, say, 90% of malicious prompts at 5%
benign will not reach 95% by more router training.

The probe's maths is in :func:`fit_probe` / :func:`probe_accuracy` (pure tensors, tested
on synthetic activations); :func:`layer_features` does the forward passes.

:func:`init_routers_from_probe` starts MoGU's stage-2 router heads from such a probe: each
patched layer's unwill router at the probe of its last-prompt-token input, the glad router
at its negation.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from ..checkpoint import atomic_write, atomic_write_text
from ..config import MoGUConfig
from ..patching import all_targets, is_patched, mode, patched_modules
from ..prompting import encode_prompt, format_prompt, pad_id_of
from .common import left_pad
from .prompt_files import LABELS, read_prompt_file

PROBE_FILE = "probe.json"
PROBE_PLOT = "probe.png"

Rows = Union[str, os.PathLike, Sequence[Union[str, os.PathLike, Dict]]]


@dataclass
class ProbeResult:
    """modules: target module names in layer order; accuracy / train_accuracy /
    heldout_nll: per layer; ranking: layer indices, best first; recall: per layer, the
    held-out malicious rows caught at ``benign_rate`` (module docstring), and
    recall_by_category {category: per layer} for the malicious rows' categories (empty
    when the rows carry none); files written."""
    modules: List[str]
    accuracy: List[float]
    train_accuracy: List[float]
    heldout_nll: List[float]
    ranking: List[int]
    n_train: int
    n_heldout: int
    benign_rate: float = 0.05
    recall: List[float] = field(default_factory=list)
    recall_by_category: Dict[str, List[float]] = field(default_factory=dict)
    files: List[str] = field(default_factory=list)

    def best(self, k: int) -> List[int]:
        """The k best layer indices, ascending."""
        if not 1 <= k <= len(self.ranking):
            raise ValueError(f"probe: k must be in 1 .. {len(self.ranking)}, got {k}")
        return sorted(self.ranking[:k])


def _rows(value: Rows, what: str, who: str = "probe_layers") -> List[Dict]:
    """Labelled rows {"instruction", "label", "system"?} from prompt files or dicts.

    A dict's label may also be 0/1 (1 = malicious, as in the stage-2 router data); such a
    row is copied with the label spelled benign/malicious (the caller's dict is untouched).
    Prompt files parse their labels themselves (``prompt_files``: 0/1 accepted there too).
    """
    items = [value] if isinstance(value, (str, os.PathLike)) else list(value)
    rows: List[Dict] = []
    for item in items:
        if isinstance(item, dict):
            label = item.get("label")
            if isinstance(label, int) and not isinstance(label, bool) and label in (0, 1):
                item = {**item, "label": LABELS[label]}
            rows.append(item)
        else:
            rows += read_prompt_file(item)
    for i, r in enumerate(rows):
        if r.get("label") not in ("benign", "malicious"):
            raise ValueError(f"{who}: {what} row {i} ({str(r.get('instruction'))[:50]!r}) needs a label "
                             f"benign/malicious (or 0/1), got {r.get('label')!r}")
    labels = {r["label"] for r in rows}
    if labels != {"benign", "malicious"}:
        raise ValueError(f"{who}: {what} needs both benign and malicious rows, got only {sorted(labels)}")
    return rows


def _probe_modules(model: nn.Module, config: Optional[MoGUConfig]) -> List[Tuple[str, nn.Module]]:
    """Every target module (all layers, selected or not), patched or plain."""
    if is_patched(model):
        patched = patched_modules(model)
        targets = (config or model.mogu_config).resolve_targets(getattr(model.config, "model_type", None))
        return [(n, m) for n, m in model.named_modules()
                if n and any(n == t or n.endswith("." + t) for t in targets)
                and (n in patched or isinstance(m, nn.Linear))]
    return all_targets(model, config or MoGUConfig())


@torch.no_grad()
def layer_features(model: nn.Module, tokenizer, rows: Sequence[Dict], *, config: Optional[MoGUConfig] = None,
                   system: Optional[str] = None, batch_size: int = 8, progress: bool = False
                   ) -> Tuple[List[str], torch.Tensor]:
    """Pooled inputs of every target module: (module names, features (L, n, 2K) fp32 CPU).

    Feature of prompt j at layer l: [mean over its tokens, its last token] of the input
    to target module l. A row's own "system" wins over ``system``. A patched model runs
    in mode "base" (the features are the base model's).
    """
    from tqdm.auto import tqdm

    modules = _probe_modules(model, config)
    pad = pad_id_of(tokenizer)
    device = next(model.parameters()).device
    ids = [encode_prompt(tokenizer, format_prompt(tokenizer, r["instruction"], r.get("system") or system))
           for r in rows]
    feats: List[List[torch.Tensor]] = [[] for _ in modules]
    current: Dict[int, torch.Tensor] = {}

    def hook_for(l):
        def hook(module, args):
            current[l] = args[0].detach()
        return hook

    handles = [m.register_forward_pre_hook(hook_for(l)) for l, (_, m) in enumerate(modules)]
    was_training = model.training
    model.eval()
    ctx = mode(model, "base") if is_patched(model) else contextlib.nullcontext()
    try:
        with ctx:
            for start in tqdm(range(0, len(ids), batch_size), desc="probe: activations", unit="batch",
                              disable=not progress):
                input_ids, mask = left_pad(ids[start:start + batch_size], pad, device)
                current.clear()
                model(input_ids=input_ids, attention_mask=mask)
                w = mask.float().unsqueeze(-1)                                   # (B, T, 1), left padded
                for l in range(len(modules)):
                    x = current[l].float()                                       # (B, T, K)
                    mean = (x * w).sum(1) / w.sum(1)
                    feats[l].append(torch.cat([mean, x[:, -1]], dim=-1).cpu())
    finally:
        for h in handles:
            h.remove()
        if was_training:
            model.train()
    return [n for n, _ in modules], torch.stack([torch.cat(f) for f in feats])


def _fit(train_x: torch.Tensor, train_y: torch.Tensor, l2: float, steps: int
         ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The probe fit shared by :func:`fit_probe` and :func:`probe_accuracy`.

    train_x (L, n, D), train_y (n,) in {0, 1}. Features are standardised with the train
    statistics; one probe per layer minimises mean BCE + l2 * |w|^2 (full-batch L-BFGS,
    float64; the layers' losses are summed and optimised together, each layer's terms
    touch only its own w, b). Returns float64 (mu (L, 1, D), sd (L, 1, D), w (L, D), b (L,))
    with logit = ((x - mu) / sd) . w + b.
    """
    x = train_x.double()
    mu, sd = x.mean(1, keepdim=True), x.std(1, keepdim=True).clamp_min(1e-6)
    x = (x - mu) / sd
    y = train_y.double()
    L, _, D = x.shape
    w = torch.zeros(L, D, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(L, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")
    bce = nn.BCEWithLogitsLoss(reduction="none")

    def closure():
        opt.zero_grad()
        logits = torch.einsum("lnd,ld->ln", x, w) + b[:, None]
        loss = bce(logits, y.expand_as(logits)).mean(1).sum() + l2 * w.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return mu, sd, w.detach(), b.detach()


def fit_probe(train_x: torch.Tensor, train_y: torch.Tensor, l2: float = 1e-2, steps: int = 200
              ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fit one L2 logistic-regression probe per layer; return it in raw feature space.

    train_x (L, n, D) (any float dtype), train_y (n,) in {0, 1} (1 = malicious). The fit
    (:func:`_fit`) runs on standardised features; the result is de-standardised so that
    logit = x . w_raw + b_raw on the raw features: w_raw = w / sd, b_raw = b - w_raw . mu.
    Returns (w_raw (L, D), b_raw (L,)) float64 on the CPU.
    """
    mu, sd, w, b = _fit(train_x.cpu(), train_y.cpu(), l2, steps)
    w_raw = w / sd.squeeze(1)
    b_raw = b - (w_raw * mu.squeeze(1)).sum(-1)
    return w_raw, b_raw


def probe_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                   l2: float = 1e-2, steps: int = 200) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fit one logistic-regression probe per layer; score it on the held-out rows.

    train_x (L, n, D), train_y (n,) in {0, 1}; test_x (L, m, D), test_y (m,). Features are
    standardised with the train statistics; the probe minimises mean BCE + l2 * |w|^2
    (full-batch L-BFGS, float64; the fit of :func:`fit_probe`). Returns (held-out accuracy
    (L,), train accuracy (L,), held-out mean negative log-likelihood (L,)).
    """
    return _scores(*probe_logits(train_x, train_y, test_x, l2, steps), train_y, test_y)


def probe_logits(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, l2: float = 1e-2,
                 steps: int = 200) -> Tuple[torch.Tensor, torch.Tensor]:
    """The fit of :func:`probe_accuracy`; returns its logits on the train rows (L, n) and on
    the held-out rows (L, m), float64 (> 0: malicious)."""
    mu, sd, w, b = _fit(train_x, train_y, l2, steps)
    with torch.no_grad():
        tr = torch.einsum("lnd,ld->ln", (train_x.double() - mu) / sd, w) + b[:, None]
        te = torch.einsum("lnd,ld->ln", (test_x.double() - mu) / sd, w) + b[:, None]
    return tr, te


def _scores(tr: torch.Tensor, te: torch.Tensor, train_y: torch.Tensor, test_y: torch.Tensor
            ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(held-out accuracy, train accuracy, held-out mean NLL), each (L,), from probe logits."""
    y, yt = train_y.double(), test_y.double()
    acc_tr = ((tr > 0).double() == y).double().mean(1)
    acc_te = ((te > 0).double() == yt).double().mean(1)
    nll = nn.functional.binary_cross_entropy_with_logits(te, yt.expand_as(te), reduction="none").mean(1)
    return acc_te, acc_tr, nll


def check_benign_rate(benign_rate: float, who: str) -> None:
    """ValueError naming ``who`` unless 0 <= benign_rate < 1 (the recall read-out's rate)."""
    if not 0.0 <= float(benign_rate) < 1.0:
        raise ValueError(f"{who}: benign_rate must be in [0, 1), got {benign_rate!r}")


def recall_at_benign_rate(logits: torch.Tensor, malicious: torch.Tensor, benign_rate: float = 0.05,
                          among: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per layer, the share of malicious rows a probe catches at a benign refusal rate.

    logits (L, m) probe scores (higher = more malicious); malicious (m,) bool, the label
    (False rows are the benign-label rows, borderline included); among: optional (m,) bool,
    the malicious rows to count (e.g. one category; default all malicious rows).
    The threshold is the highest one that lets at most ``benign_rate`` of the benign rows
    score strictly above it: the (floor(benign_rate * n_benign) + 1)-th highest benign
    score. Returns (L,) float64 in [0, 1]: the share of counted rows strictly above it.
    ValueError without benign rows or counted rows, or for a rate outside [0, 1).
    """
    check_benign_rate(benign_rate, "recall_at_benign_rate")
    malicious = malicious.bool()
    counted = malicious if among is None else (among.bool() & malicious)
    negatives = logits[:, ~malicious]
    if negatives.shape[1] == 0 or int(counted.sum()) == 0:
        raise ValueError("recall_at_benign_rate: needs benign rows and malicious rows to count")
    k = int(math.floor(float(benign_rate) * negatives.shape[1]))
    threshold = negatives.sort(dim=1, descending=True).values[:, k]             # (L,)
    return (logits[:, counted] > threshold[:, None]).double().mean(1)


def rank_layers(accuracy: Sequence[float], heldout_nll: Sequence[float]) -> List[int]:
    """Layer indices, best first: higher held-out accuracy, then lower held-out NLL."""
    return sorted(range(len(accuracy)), key=lambda l: (-accuracy[l], heldout_nll[l], l))


def _plot(result: ProbeResult, path: str, chosen: Optional[List[int]]) -> Optional[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(max(6, 0.25 * len(result.accuracy) + 2), 3.6))
    xs = list(range(len(result.accuracy)))
    colors = ["tab:red" if chosen and l in chosen else "tab:blue" for l in xs]
    ax.bar(xs, [100 * a for a in result.accuracy], color=colors)
    ax.plot(xs, [100 * a for a in result.train_accuracy], color="gray", lw=1, marker=".", label="train accuracy")
    if result.recall:
        ax.plot(xs, [100 * r for r in result.recall], color="black", lw=0, marker="x",
                label=f"held-out malicious caught at {100 * result.benign_rate:g}% benign")
    ax.axhline(50, color="black", lw=0.5, ls=":")
    ax.set_xlabel("layer (target module index)")
    ax.set_ylabel("held-out probe accuracy / recall (%)")
    ax.set_ylim(40, 101)
    ax.set_title(f"benign vs malicious linear probe per layer (train {result.n_train}, held-out "
                 f"{result.n_heldout}" + (f"; red = chosen {chosen}" if chosen else "") + ")", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path


def probe_layers(model: nn.Module, tokenizer, train: Rows, heldout: Rows, *, out=None,
                 config: Optional[MoGUConfig] = None, top: Optional[int] = None, system: Optional[str] = None,
                 batch_size: int = 8, l2: float = 1e-2, benign_rate: float = 0.05, plots: bool = True,
                 progress: bool = True) -> ProbeResult:
    """Rank the target layers by held-out linear-probe accuracy (module docstring).

    train, heldout: labelled prompt files (benign/malicious rows; borderline rows carry
        label benign, jailbreak rows malicious) or lists of row dicts; both classes needed.
    out: optional folder for ``probe.json`` and ``probe.png``; top: K to mark in the plot.
    benign_rate: the operating point of the recall read-out (:func:`recall_at_benign_rate`).
    Returns ProbeResult.
    """
    check_benign_rate(benign_rate, "probe_layers")                  # before the forward passes
    train_rows, heldout_rows = _rows(train, "train"), _rows(heldout, "heldout")
    names, x_tr = layer_features(model, tokenizer, train_rows, config=config, system=system,
                                 batch_size=batch_size, progress=progress)
    _, x_te = layer_features(model, tokenizer, heldout_rows, config=config, system=system,
                             batch_size=batch_size, progress=progress)
    y_tr = torch.tensor([r["label"] == "malicious" for r in train_rows], dtype=torch.float64)
    y_te = torch.tensor([r["label"] == "malicious" for r in heldout_rows], dtype=torch.float64)
    logits_tr, logits_te = probe_logits(x_tr, y_tr, x_te, l2=l2)
    acc, acc_tr, nll = _scores(logits_tr, logits_te, y_tr, y_te)
    malicious = y_te.bool()
    recall = recall_at_benign_rate(logits_te, malicious, benign_rate)
    categories = sorted({r["category"] for r, bad in zip(heldout_rows, malicious.tolist())
                         if bad and r.get("category")})
    by_category = {cat: recall_at_benign_rate(logits_te, malicious, benign_rate,
                                              among=torch.tensor([r.get("category") == cat for r in heldout_rows]))
                   .tolist() for cat in categories}
    result = ProbeResult(modules=names, accuracy=acc.tolist(), train_accuracy=acc_tr.tolist(),
                         heldout_nll=nll.tolist(), ranking=rank_layers(acc.tolist(), nll.tolist()),
                         n_train=len(train_rows), n_heldout=len(heldout_rows), benign_rate=float(benign_rate),
                         recall=recall.tolist(), recall_by_category=by_category)
    if out is not None:
        out = os.fspath(out)
        os.makedirs(out, exist_ok=True)
        chosen = result.best(top) if top else None
        report = {"modules": names, "accuracy": result.accuracy, "train_accuracy": result.train_accuracy,
                  "heldout_nll": result.heldout_nll, "ranking": result.ranking, "chosen": chosen,
                  "benign_rate": result.benign_rate, "recall": result.recall,
                  "recall_by_category": result.recall_by_category,
                  "n_train": result.n_train, "n_heldout": result.n_heldout, "l2": l2,
                  "features": "[mean over prompt tokens, last prompt token] of the target module's input",
                  "recall_rule": "held-out malicious rows scored above the highest threshold that lets at most "
                                 "benign_rate of the held-out benign-label rows (borderline included) above it"}
        path = os.path.join(out, PROBE_FILE)
        atomic_write_text(path, json.dumps(report, indent=1) + "\n")
        result.files.append(path)
        if plots:
            png = _plot(result, os.path.join(out, PROBE_PLOT), chosen)
            if png:
                result.files.append(png)
    return result


def select_layers(model: nn.Module, tokenizer, config: MoGUConfig, train: Rows, heldout: Rows, *, out=None,
                  **probe_kwargs) -> MoGUConfig:
    """Resolve ``config.layers == "auto:K"`` to the K best layers by :func:`probe_layers`.

    A config whose layers are already a list (or None) is returned unchanged.
    """
    k = config.auto_layers
    if k is None:
        return config
    n = len(_probe_modules(model, config))             # every target layer, patched or not
    if k > n:
        raise ValueError(f"select_layers: layers='auto:{k}' but the model has only {n} target modules")
    result = probe_layers(model, tokenizer, train, heldout, out=out, config=config, top=k, **probe_kwargs)
    return MoGUConfig(**{**config.to_dict(), "layers": result.best(k)})


# ------------------------------------------------------ probe-initialised routers
def _set_router_head(head: nn.Module, v: torch.Tensor, c: torch.Tensor) -> None:
    """Set a RouterHead (Linear(d, h, no bias) -> Linear(h, d) -> Linear(d, 1)) so that its
    folded map (``RouterHead.folded``) is exactly logit = v . x + c (up to the head's dtype).

    v (d,), c () float64. W2 = v^T, b2 = c, b1 = 0 and W1 W0 a projection that keeps v:
    h <= d: Q (d, h) orthonormal with v in its span (QR of [v, random]), W0 = Q^T, W1 = Q, so
    v^T Q Q^T = v^T; h > d: P (h, d) with orthonormal columns (QR of a random (h, d)),
    W0 = P, W1 = P^T, so W1 W0 = I_d (every hidden unit stays trainable, none is zeroed).
    The random directions come from the current torch RNG, like fresh heads of patch_model.
    Parameters keep their dtype and device (written in place).
    """
    d, h = head.linear_0.in_features, head.linear_0.out_features
    v = v.detach().double().cpu().reshape(d)
    if h <= d:
        norm = v.norm()
        first = v / norm if norm > 0 else torch.randn(d, dtype=torch.float64)
        q, _ = torch.linalg.qr(torch.cat([first[:, None], torch.randn(d, h - 1, dtype=torch.float64)], dim=1))
        w0, w1 = q.T, q                                                      # (h, d), (d, h)
    else:
        p, _ = torch.linalg.qr(torch.randn(h, d, dtype=torch.float64))      # (h, d), P^T P = I_d
        w0, w1 = p, p.T
    with torch.no_grad():
        head.linear_0.weight.copy_(w0)
        head.linear_1.weight.copy_(w1)
        head.linear_1.bias.zero_()
        head.linear_2.weight.copy_(v[None])
        head.linear_2.bias.copy_(c.detach().double().cpu().reshape(1))


def init_routers_from_probe(model: nn.Module, tokenizer, rows: Rows, *, scale: float = 1.0,
                            logit_std: Optional[float] = None, l2: float = 1e-2, system: Optional[str] = None,
                            batch_size: int = 8, progress: bool = False) -> Dict[str, float]:
    """Start the router heads of a MoGU-patched model from a per-layer linear probe.

    Why: a logistic-regression read-out of the last prompt token of each layer's target-
    module input (what a per-token router sees where it picks the first answer token)
    separated benign from malicious validation prompts better (~91% true positives at 5%
    false positives on SmolLM2) than routers trained from random init (55% after three
    epochs, 88% after five).

    model: already patched (``mogu.patch_model``) with unfolded router heads; ValueError
        otherwise. Only its patched layers' ``alpha_`` (unwill) and ``beta_`` (glad) heads
        are written; base weights, experts and non-patched layers are untouched.
    rows: labelled prompts, as ``probe_layers``' ``train``: prompt files or dicts with
        "instruction" and "label" benign/malicious or 0/1 (1 = malicious), optional
        "system" (wins over ``system``); both classes needed. Use training prompts only.
    For each patched layer, the feature of a prompt is the layer's input (the base
    model's activations, ``layer_features`` in mode "base") at the last prompt token,
    (n, K) fp32; :func:`fit_probe` (l2 as there) gives (w (K,), b) with
    logit = w . x + b > 0 for malicious. The heads are set (:func:`_set_router_head`) so
    that their folded maps are unwill: (scale * w, scale * b) and glad: (-scale * w,
    -scale * b); the gates are then sigmoid(+-scale * logit) and sum to 1.
    logit_std: when given (> 0), each layer's probe is first rescaled so that its logits over
    ``rows`` have this standard deviation (then times ``scale``). Why: the probes separate
    the train prompts almost perfectly (96-100% train accuracy per layer on SmolLM2), so
    their raw weights (weakly regularised) give large logits that saturate the gates; on
    SmolLM2, raw probes made router training diverge. ``logit_std=1`` starts the gates at
    sigmoid of order-1 logits, on the probe's direction (on SmolLM2 the gates still
    collapsed within five router steps: README, SmolLM2 section; experimental).
    The heads keep their dtype and device (a bf16 head holds the probe rounded to bf16).

    Returns {patched module name: train accuracy of its probe} (the share of ``rows``
    the probe's raw-space map w . x + b classifies right; no held-out rows are used, so
    it is an optimistic figure, not a generalisation estimate).
    """
    if not is_patched(model):
        raise ValueError("init_routers_from_probe: the model is not MoGU-patched; call "
                         "mogu.patch_model(model, config) first (its router heads are what this initialises)")
    layers = patched_modules(model)
    folded = [n for n, layer in layers.items() if layer.is_folded]
    if folded:
        raise ValueError(f"init_routers_from_probe: the routers of {folded[0]} (and {len(folded) - 1} more) are "
                         f"folded (deployment state) and have no heads to initialise; patch a fresh model")
    if logit_std is not None and not (math.isfinite(logit_std) and logit_std > 0):
        raise ValueError(f"init_routers_from_probe: logit_std must be a positive number or None, got {logit_std!r}")
    labelled = _rows(rows, "rows", "init_routers_from_probe")
    names, feats = layer_features(model, tokenizer, labelled, system=system, batch_size=batch_size,
                                  progress=progress)
    index = {n: i for i, n in enumerate(names)}
    missing = [n for n in layers if n not in index]
    if missing:                                    # cannot happen for a model patched by patch_model
        raise ValueError(f"init_routers_from_probe: no features for patched modules {missing}")
    order = list(layers)
    K = feats.shape[-1] // 2
    x = feats[[index[n] for n in order]][:, :, K:]                   # (L, n, K): last prompt token only
    y = torch.tensor([r["label"] == "malicious" for r in labelled], dtype=torch.float64)
    w, b = fit_probe(x, y, l2=l2)                                     # (L, K), (L,) float64
    logits = torch.einsum("lnd,ld->ln", x.double(), w) + b[:, None]
    accuracy = ((logits > 0).double() == y).double().mean(1)
    if logit_std is not None:                     # per layer, so that std over rows of the logits = logit_std
        norm = logit_std / logits.std(dim=1).clamp_min(1e-12)
        w, b = w * norm[:, None], b * norm
    for l, name in enumerate(order):
        layer = layers[name]
        _set_router_head(layer.alpha_, scale * w[l], scale * b[l])      # unwill: high on malicious
        _set_router_head(layer.beta_, -scale * w[l], -scale * b[l])     # glad: its complement
    return {name: float(accuracy[l]) for l, name in enumerate(order)}

"""Unlearning objectives as their references compute them: GA, GradDiff, NPO, SimNPO and RMU,
a retain-only fine-tuning objective, the KL retain term, and seed 002's two defenses.

An objective maps (model, forget batch, retain batch or None) to a scalar loss tensor and
nothing else, so one closure serves both kinds of optimizer:

    objective = make_objective("npo")
    objective.prepare(model, forget_batches, retain_batches)    # once, before the first step
    optimizer = AdaZO(objective.parameters(model), lr=1e-5, seed=0)
    closure = lambda: objective(model, forget_batch, retain_batch)
    optimizer.step(closure)   # ZO: called under no_grad; first-order: backward() inside

`prepare` computes what must come from the model before unlearning (NPO's reference
log-likelihoods, RMU's frozen retain activations, the KL term's reference log-probabilities),
in eval mode and under no_grad, from the same model, so no second model stays in memory; the
caches are keyed by example index (`Batch.indices`), so every batch must come from the same
`Batches` (same examples, same max_length) that was prepared. `parameters(model)` is what
the optimizer should update: every trainable parameter, or for RMU only its layers' MLP
output projections.

Micro-batches: every mean an objective takes (over tokens, sequences or positions) divides
by a count of the step's whole batch (`StepCounts`); `objective(model, forget, retain,
counts)` with the counts of the whole batch and (forget, retain) a micro-batch of its rows
(`Batch.split`, the padded width kept) returns that micro-batch's share, and the shares of
the micro-batches sum to the whole batch's loss up to float rounding. Without counts the
batch is the whole step, as before.

CE below is the mean answer-token cross-entropy of a batch (every scored token counts
once, as Hugging Face's loss), log p(y|x) the summed log-likelihood of an answer and |y|
its number of tokens, EOS included (`batches.answer_log_likelihoods`, float32). What each
objective reproduces, line by line, is in docs/unlearning.md.

Defenses (`make_objective(name, weight_distortion=..., weight_dist_reg=...)`, any objective,
any optimizer; "From Dormant to Deleted", Siddiqui et al. 2025, and its code):
- Weight Distortion: before the first step, theta <- theta + sigma eps, eps ~ N(0, I), on every
  parameter of the model (sigma = 0.02, the paper's); the objective's retain term then
  fine-tunes. With the `finetune` objective (retain CE only) this is the paper's method.
- Weight Dist Reg: loss - lambda sqrt(mean((theta_original - theta)^2) + 1e-8), the mean
  over all the model's parameters together, theta_original the model as prepared (lambda = 1,
  the paper's); it pushes the weights away from the original while the retain term keeps
  utility. It keeps a copy of the parameters (one model's memory).
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ..checks import check_choice, check_int, check_range
from .batches import IGNORE, Batch, Batches, answer_log_likelihoods, evaluating, model_device


@dataclass(frozen=True)
class Counts:
    """What a batch's means divide by: its sequences, its scored answer tokens and its positions (rows x padded
    width, padding included: the KL term and WMDP's RMU average over them)."""

    sequences: int
    tokens: int
    positions: int

    @classmethod
    def of(cls, batch: Batch) -> Counts:
        return cls(len(batch), int((batch.labels[:, 1:] != IGNORE).sum()), batch.input_ids.numel())


@dataclass(frozen=True)
class StepCounts:
    """The counts of a step's whole forget and retain batches, which each micro-batch's share divides by."""

    forget: Counts
    retain: Counts | None

    @classmethod
    def of(cls, forget: Batch, retain: Batch | None = None) -> StepCounts:
        return cls(Counts.of(forget), Counts.of(retain) if retain is not None else None)


class Objective:
    """The interface every objective shares; see the module docstring."""

    name: ClassVar[str]

    @property
    def needs_retain(self) -> bool:
        """Whether loss() needs a retain batch."""
        return False

    def prepare(self, model: torch.nn.Module, forget: Batches, retain: Batches | None = None) -> None:
        """Cache what the loss needs from the model before unlearning; nothing by default."""

    def parameters(self, model: torch.nn.Module) -> list[torch.nn.Parameter]:
        """The parameters the optimizer should update: every one that requires grad."""
        return [p for p in model.parameters() if p.requires_grad]

    def loss(self, model: torch.nn.Module, forget: Batch, retain: Batch | None, counts: StepCounts) -> torch.Tensor:
        """The share of (forget, retain) in the loss of the step whose whole batches have these counts."""
        raise NotImplementedError

    def __call__(self, model: torch.nn.Module, forget: Batch, retain: Batch | None = None,
                 counts: StepCounts | None = None) -> torch.Tensor:
        """The loss of (forget, retain); with the counts of a step's whole batches, this micro-batch's share."""
        if self.needs_retain and retain is None:
            raise ValueError(f"{self.name} with these hyperparameters needs a retain batch; pass one, or set the "
                             f"retain term's weight (retain_weight; RMU: alpha) to 0")
        return self.loss(model, forget, retain, counts or StepCounts.of(forget, retain))


def cross_entropy(model: torch.nn.Module, batch: Batch, tokens: int | None = None) -> torch.Tensor:
    """CE: the mean answer-token cross-entropy of the batch; with `tokens`, the answer tokens of the step's whole
    batch, this micro-batch's share of it."""
    log_likelihood, n_tokens = answer_log_likelihoods(model, batch)
    # A tensor on the device, as n_tokens.sum() is: the division is the same kernel either way.
    total = n_tokens.sum() if tokens is None else torch.tensor(tokens, device=n_tokens.device)
    return -log_likelihood.sum() / total


class GA(Objective):
    """Gradient ascent: loss = -CE(forget)."""

    name = "ga"

    def loss(self, model: torch.nn.Module, forget: Batch, retain: Batch | None, counts: StepCounts) -> torch.Tensor:
        return -cross_entropy(model, forget, counts.forget.tokens)


# ---------------------------------------------------------------------------------------
# Caches of a frozen model's values at every position, padding included


def widen(batch: Batch, width: int, pad: int) -> Batch:
    """The batch right-padded to `width` tokens (more padding; the real tokens' values do not change)."""
    extra = width - batch.input_ids.shape[1]
    return Batch(F.pad(batch.input_ids, (0, extra), value=pad), F.pad(batch.attention_mask, (0, extra)),
                 F.pad(batch.labels, (0, extra), value=IGNORE), batch.indices)


class PaddedCache:
    """A frozen model's values (B, T, ...) for every example of a Batches, at every position up to its longest
    example, so that any batch of those examples can be given its rows at its own width, padded positions
    included (the WMDP and TOFU references average over them; a padded position's value depends only on the
    tokens before it, not on how wide the batch is)."""

    def __init__(self, model: torch.nn.Module, batches: Batches, compute: Callable[[Batch], torch.Tensor]) -> None:
        self.width = max(len(t.ids) for t in batches.tokens)
        self.values: dict[int, torch.Tensor] = {}
        self.ids: dict[int, torch.Tensor] = {}
        with torch.no_grad(), evaluating(model):
            for batch in batches.in_order():
                wide = widen(batch, self.width, batches.pad_id)
                values = compute(wide.to(model_device(model)))
                for row, index in enumerate(batch.indices.tolist()):
                    self.values[index], self.ids[index] = values[row], wide.input_ids[row]

    def take(self, batch: Batch, what: str) -> torch.Tensor:
        """The cached rows of the batch's examples, cut to its width; a clear error for a foreign batch."""
        width, indices = batch.input_ids.shape[1], batch.indices.tolist()
        if any(i not in self.values or not torch.equal(self.ids[i][:width], row.cpu())
               for i, row in zip(indices, batch.input_ids)):
            raise ValueError(f"this retain batch is not from the Batches {what} was prepared on (other examples, "
                             f"another max_length or tokenizer); prepare on the retain Batches the loop draws from")
        return torch.stack([self.values[i][:width] for i in indices])


def log_probs(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """log softmax of the logits at every position, float32: (B, T, V)."""
    batch = batch.to(model_device(model))
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    return logits.float().log_softmax(-1)


class KLRetain:
    """KL(p_original || p_theta) on retain batches, as TOFU's KL, NPO-KL and open-unlearning's GradDiff/NPO with
    retain_loss_type KL compute it: kl_div(log p_theta, log p_original, reduction="batchmean", log_target=True)
    over the (B * T, V) log-probabilities of every position, padding and prompt included.

    reference="cache": the original's log-probabilities of every retain example, kept on the model's device
    at full width: (retain examples) x (longest, in tokens) x vocabulary x 4 bytes, e.g. 1,800 examples x 13
    tokens x 505 x 4 B = 47 MB on the embedded model, but 400 examples x 512 x 32,000 x 4 B = 26 GB at 7B.
    reference="model": a frozen copy of the model instead (one more model in memory, one more forward per
    step), which serves any retain batch.
    """

    def __init__(self, reference: str = "cache") -> None:
        check_choice("kl_reference", reference, ("cache", "model"))
        self.reference = reference
        self.cache: PaddedCache | None = None
        self.frozen: torch.nn.Module | None = None

    def prepare(self, model: torch.nn.Module, retain: Batches) -> None:
        if self.reference == "model":
            self.frozen = copy.deepcopy(model).eval().requires_grad_(False)
        else:
            self.cache = PaddedCache(model, retain, lambda batch: log_probs(model, batch))

    def __call__(self, model: torch.nn.Module, retain: Batch, positions: int) -> torch.Tensor:
        """The KL summed over the batch's positions, divided by `positions` (the step's: batchmean's B * T)."""
        if self.cache is None and self.frozen is None:
            raise ValueError("the KL retain term has no reference: call prepare(model, forget_batches, "
                             "retain_batches) before unlearning")
        current = log_probs(model, retain)
        if self.frozen is not None:
            with torch.no_grad():
                original = log_probs(self.frozen, retain)
        else:
            original = self.cache.take(retain, "the KL retain term").to(current.device)
        # batchmean is this sum divided by the rows of the flattened (B * T, V) input.
        return F.kl_div(current.flatten(0, 1), original.flatten(0, 1), reduction="sum", log_target=True) / positions


class _RetainWeighted(Objective):
    """A forget term times forget_weight plus retain_weight times a retain term: CE ("nll") or KLRetain ("kl")."""

    forget_weight: float = 1.0

    def __init__(self, retain_weight: float, retain_loss: str = "nll", kl_reference: str = "cache") -> None:
        check_range("retain_weight", retain_weight, 0.0)
        check_choice("retain_loss", retain_loss, ("nll", "kl"))
        check_choice("kl_reference", kl_reference, ("cache", "model"))
        self.retain_weight, self.retain_loss = retain_weight, retain_loss
        self.kl = KLRetain(kl_reference) if retain_loss == "kl" else None

    @property
    def needs_retain(self) -> bool:
        return self.retain_weight > 0

    def prepare(self, model: torch.nn.Module, forget: Batches, retain: Batches | None = None) -> None:
        if self.kl is not None and self.needs_retain:
            if retain is None:
                raise ValueError(f"{self.name} with retain_loss='kl' needs the retain Batches to cache the original "
                                 f"model's log-probabilities")
            self.kl.prepare(model, retain)

    def loss(self, model: torch.nn.Module, forget: Batch, retain: Batch | None, counts: StepCounts) -> torch.Tensor:
        loss = self.forget_loss(model, forget, counts.forget)
        if self.forget_weight != 1:
            loss = self.forget_weight * loss
        if self.retain_weight > 0:
            term = self.kl(model, retain, counts.retain.positions) if self.kl is not None else \
                cross_entropy(model, retain, counts.retain.tokens)
            loss = loss + self.retain_weight * term
        return loss

    def forget_loss(self, model: torch.nn.Module, forget: Batch, counts: Counts) -> torch.Tensor:
        """The forget term's share for this batch of the step's whole forget batch (whose counts these are)."""
        raise NotImplementedError


class GradDiff(_RetainWeighted):
    """Gradient difference: loss = -CE(forget) + retain_weight * retain term (CE, or with retain_loss="kl" the KL
    to the original model: GradDiff-KL, TOFU's "KL").

    Default retain_weight (lambda) = 1: forget and retain terms weighted equally, as in
    TOFU's grad_diff (Maini et al. 2024) and open-unlearning's GradDiff (alpha = gamma = 1).
    """

    name = "graddiff"

    def __init__(self, retain_weight: float = 1.0, retain_loss: str = "nll", kl_reference: str = "cache") -> None:
        super().__init__(retain_weight, retain_loss, kl_reference)

    def forget_loss(self, model: torch.nn.Module, forget: Batch, counts: Counts) -> torch.Tensor:
        return -cross_entropy(model, forget, counts.tokens)


class FineTune(_RetainWeighted):
    """Fine-tuning on the retain set alone: loss = retain_weight * CE(retain) (no forget term). With
    weight_distortion it is seed 002's Weight Distortion; alone, a control."""

    name = "finetune"

    def __init__(self, retain_weight: float = 1.0) -> None:
        check_range("retain_weight", retain_weight, 0.0, open_low=True)
        super().__init__(retain_weight)

    def forget_loss(self, model: torch.nn.Module, forget: Batch, counts: Counts) -> torch.Tensor:
        return torch.zeros((), device=model_device(model))


class NPO(_RetainWeighted):
    """Negative preference optimization (Zhang et al. 2024, "Negative Preference Optimization"):

        loss = -(2/beta) mean_i log sigmoid(-beta (log p_theta(y_i|x_i) - log p_ref(y_i|x_i)))
               + retain_weight * retain term (CE; retain_loss="kl": NPO-KL)

    log p_ref is the model's own summed log-likelihood of each forget example before
    unlearning, computed once by `prepare` and kept as one float per example. Defaults:
    beta = 0.1, the paper's value on TOFU; retain_weight = 1, its NPO-RT variant (the retain
    NLL added with weight 1, npo_coeff = grad_diff_coeff = 1 in its code). At the start the
    forget term is (2/beta) log 2. This is the TOFU form (per-sequence log-likelihoods), also
    open-unlearning's; MUSE's published NPO numbers come from another loss (docs/unlearning.md).
    """

    name = "npo"

    def __init__(self, beta: float = 0.1, retain_weight: float = 1.0, retain_loss: str = "nll",
                 kl_reference: str = "cache") -> None:
        check_range("beta", beta, 0.0, open_low=True)
        super().__init__(retain_weight, retain_loss, kl_reference)
        self.beta = beta
        self.reference: torch.Tensor | None = None  # (n_forget,) float32, log p_ref per forget example
        self.reference_tokens: torch.Tensor | None = None  # (n_forget,) |y| when it was computed

    def prepare(self, model: torch.nn.Module, forget: Batches, retain: Batches | None = None) -> None:
        reference = torch.empty(len(forget.examples))
        tokens = torch.empty(len(forget.examples), dtype=torch.long)
        with torch.no_grad(), evaluating(model):
            for batch in forget.in_order():
                log_likelihood, n_tokens = answer_log_likelihoods(model, batch)
                reference[batch.indices] = log_likelihood.cpu()
                tokens[batch.indices] = n_tokens.cpu()
        self.reference, self.reference_tokens = reference, tokens
        super().prepare(model, forget, retain)

    def forget_loss(self, model: torch.nn.Module, forget: Batch, counts: Counts) -> torch.Tensor:
        if self.reference is None:
            raise ValueError("NPO has no reference log-likelihoods: call prepare(model, forget_batches) before "
                             "unlearning")
        log_likelihood, n_tokens = answer_log_likelihoods(model, forget)
        indices = forget.indices.cpu()
        if indices.max() >= len(self.reference) or \
                not torch.equal(self.reference_tokens[indices], n_tokens.cpu()):
            raise ValueError("this forget batch is not from the Batches NPO was prepared on (other examples or "
                             "another max_length); prepare on the forget Batches the loop draws from")
        reference = self.reference[indices].to(log_likelihood.device)
        # The mean over the step's sequences (on the CPU, mean() is this sum and division, bit for bit).
        return -(2 / self.beta) * (F.logsigmoid(-self.beta * (log_likelihood - reference)).sum() / counts.sequences)


class SimNPO(_RetainWeighted):
    """Simple NPO (Fan et al. 2024, "Simplicity Prevails"), as the authors' code computes it:

        loss = forget_weight * (-(2/beta) mean_i log sigmoid(beta (NLL_i / |y_i| - delta)))
               + retain_weight * CE(retain)

    NLL_i = -log p_theta(y_i|x_i): NPO without a reference model, length-normalised, with a
    reward margin delta (the authors' `gamma`, open-unlearning's `delta`; the paper's margin
    gamma is beta * delta). Defaults: the authors' TOFU forget10 command (TOFU/README.md of
    OPTML-Group/Unlearn-Simple): beta = 4.5, delta = 0, npo_coeff (forget_weight) = 0.125,
    grad_diff_coeff (retain_weight) = 1. Their MUSE runs use beta 0.7-0.75 and retain weight 0.1.
    """

    name = "simnpo"

    def __init__(self, beta: float = 4.5, delta: float = 0.0, forget_weight: float = 0.125,
                 retain_weight: float = 1.0, retain_loss: str = "nll", kl_reference: str = "cache") -> None:
        check_range("beta", beta, 0.0, open_low=True)
        check_range("delta", delta, 0.0)
        check_range("forget_weight", forget_weight, 0.0, open_low=True)
        super().__init__(retain_weight, retain_loss, kl_reference)
        self.beta, self.delta, self.forget_weight = beta, delta, forget_weight

    def forget_loss(self, model: torch.nn.Module, forget: Batch, counts: Counts) -> torch.Tensor:
        log_likelihood, n_tokens = answer_log_likelihoods(model, forget)
        per_sequence = F.logsigmoid(self.beta * (-log_likelihood / n_tokens - self.delta))
        return -(2 / self.beta) * (per_sequence.sum() / counts.sequences)


# ---------------------------------------------------------------------------------------
# RMU

BLOCK_PATHS = ("layers", "h", "blocks", "decoder.layers")
# The MLP's output projection, the one tensor per block that WMDP's RMU updates (param_ids 6 of Zephyr's
# layers: mlp.down_proj.weight), by architecture: Llama/Mistral/Qwen, GPT-2, GPT-NeoX, GPT-J, OPT, MPT, Phi.
MLP_OUT = ("mlp.down_proj.weight", "mlp.c_proj.weight", "mlp.dense_4h_to_h.weight", "mlp.fc_out.weight",
           "fc2.weight", "ffn.down_proj.weight", "mlp.fc2.weight")
RMU_FORMS = ("wmdp", "open-unlearning")


def transformer_blocks(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The transformer blocks (decoder layers) of a Hugging Face causal LM, in order.

    Looked up on the model's base model (`model.base_model`, the model itself without an LM
    head) as `.layers` (Llama, Mistral, Qwen, Gemma, Phi, GPT-NeoX/Pythia), `.h` (GPT-2,
    GPT-J, GPT-Neo, BLOOM, Falcon), `.blocks` (MPT) or `.decoder.layers` (OPT).
    """
    base = getattr(model, "base_model", model)
    for path in BLOCK_PATHS:
        module: Any = base
        for attr in path.split("."):
            module = getattr(module, attr, None)
        if isinstance(module, torch.nn.ModuleList) and len(module) > 0:
            return module
    raise ValueError(f"cannot find the transformer blocks of {type(model).__name__}: its base model "
                     f"({type(base).__name__}) has none of {', '.join('.' + p for p in BLOCK_PATHS)} as a "
                     f"torch.nn.ModuleList; RMU needs a GPT-2-, Llama-, GPT-NeoX-, OPT- or MPT-style model")


class _Stop(Exception):
    """Raised by the hook once the chosen block has run: the blocks after it are not needed."""


def layer_output(model: torch.nn.Module, batch: Batch, layer: int) -> torch.Tensor:
    """The hidden states (B, T, H) that block `layer` outputs, in the model's dtype.

    Runs the base model (no LM head) and stops after that block.
    """
    blocks = transformer_blocks(model)
    if not 0 <= layer < len(blocks):
        raise ValueError(f"layer {layer} is out of range: {type(model).__name__} has {len(blocks)} blocks "
                         f"(0 to {len(blocks) - 1})")
    captured: list[torch.Tensor] = []

    def hook(module: torch.nn.Module, inputs: Any, output: Any) -> None:
        captured.append(output[0] if isinstance(output, tuple) else output)
        raise _Stop

    batch = batch.to(model_device(model))
    handle = blocks[layer].register_forward_hook(hook)
    try:
        getattr(model, "base_model", model)(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                            use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    return captured[0]


class RMU(Objective):
    """Representation misdirection for unlearning (Li et al. 2024, "The WMDP Benchmark"):

        loss = D(h_theta(forget), c u) + alpha * D(h_theta(retain), h_frozen(retain))

    h is the output of block `layer` (`transformer_blocks`); u a fixed unit vector, its
    entries drawn uniformly from [0, 1) by torch.Generator().manual_seed(seed) and normalised;
    c is `steering_coeff`; h_frozen the model's own activation before unlearning, cached by
    `prepare` for every retain example (in the model's dtype, on its device: (retain examples)
    x (longest, in tokens) x hidden_size x bytes per element, e.g. 10,000 x 256 x 4096 x 2 B =
    21 GB at 7B, so prepare on a retain set of the size you can hold). The distance D:

    - form="wmdp" (default): WMDP's rmu/unlearn.py, torch's mse_loss: the mean over batch,
      every position of the padded batch (padding and prompt included) and hidden unit;
    - form="open-unlearning": its RMU.compute_activation_loss: per sequence, the hidden-unit
      mean summed over answer-token positions (labels != -100) and divided by their number,
      then the mean over sequences.

    params="mlp" (default): the optimizer updates only the MLP output projection weight
    (`MLP_OUT`: GPT-2's mlp.c_proj, Llama's mlp.down_proj) of each of `update_layers`, as both
    references do (WMDP: layer_ids 5,6,7 with param_ids 6); params="block": every parameter of
    those blocks (3.7x the parameters at 7B). Only the blocks up to `layer` run. One control
    vector: WMDP draws one per forget corpus (bio, cyber); here the forget set is one corpus
    (run one RMU per corpus, with its own seed, to match). Defaults: WMDP's Zephyr-7B command,
    c = 6.5, alpha = 1200, layer = 7, update_layers 5, 6, 7 (layer - 2 to layer);
    open-unlearning's RMU config uses c = 300, alpha = 1000.
    """

    name = "rmu"

    def __init__(self, steering_coeff: float = 6.5, alpha: float = 1200.0, layer: int = 7,
                 update_layers: Sequence[int] | None = None, seed: int = 0, form: str = "wmdp",
                 params: str = "mlp") -> None:
        check_range("steering_coeff", steering_coeff, 0.0, open_low=True)
        check_range("alpha", alpha, 0.0)
        check_choice("form", form, RMU_FORMS)
        check_choice("params", params, ("mlp", "block"))
        _check_layer("layer", layer)
        update_layers = tuple(range(max(layer - 2, 0), layer + 1)) if update_layers is None else tuple(update_layers)
        if not update_layers:
            raise ValueError("update_layers is empty; name at least one block to update")
        for i in update_layers:
            _check_layer("update_layers entry", i)
        self.steering_coeff, self.alpha, self.layer, self.update_layers, self.seed = \
            steering_coeff, alpha, layer, update_layers, seed
        self.form, self.params = form, params
        self.frozen: PaddedCache | None = None

    @property
    def needs_retain(self) -> bool:
        return self.alpha > 0

    def parameters(self, model: torch.nn.Module) -> list[torch.nn.Parameter]:
        blocks = transformer_blocks(model)
        if max(self.update_layers) >= len(blocks):
            raise ValueError(f"update_layers {list(self.update_layers)} reach past the {len(blocks)} blocks of "
                             f"{type(model).__name__}; use 0 to {len(blocks) - 1}")
        if self.params == "block":
            return [p for i in self.update_layers for p in blocks[i].parameters() if p.requires_grad]
        chosen = []
        for i in self.update_layers:
            named = dict(blocks[i].named_parameters())
            name = next((n for n in MLP_OUT if n in named), None)
            if name is None:
                raise ValueError(f"block {i} of {type(model).__name__} has no MLP output projection named "
                                 f"{' or '.join(MLP_OUT)}; use params='block' to update whole blocks")
            chosen.append(named[name])
        return [p for p in chosen if p.requires_grad]

    def direction(self, hidden_size: int) -> torch.Tensor:
        """u: the fixed random unit vector (float32, on the CPU)."""
        u = torch.rand(hidden_size, generator=torch.Generator().manual_seed(self.seed))
        return u / u.norm()

    def prepare(self, model: torch.nn.Module, forget: Batches, retain: Batches | None = None) -> None:
        if not self.needs_retain:
            return
        if retain is None:
            raise ValueError("RMU with alpha > 0 needs the retain Batches to cache the frozen activations")
        self.frozen = PaddedCache(model, retain, lambda batch: layer_output(model, batch, self.layer))

    def distance(self, hidden: torch.Tensor, target: torch.Tensor, batch: Batch, counts: Counts) -> torch.Tensor:
        """D of the class docstring, in float32, as the share of this batch in the D of the step's whole batch
        (whose counts these are); target broadcasts against hidden (B, T, H)."""
        squared = (hidden.float() - target.float()).pow(2)
        if self.form == "wmdp":
            return squared.sum() / (counts.positions * squared.shape[-1])
        mask = (batch.labels != IGNORE).to(hidden.device)
        per_sequence = (squared.mean(dim=-1) * mask).sum(dim=1) / mask.sum(dim=1)
        return per_sequence.sum() / counts.sequences

    def loss(self, model: torch.nn.Module, forget: Batch, retain: Batch | None, counts: StepCounts) -> torch.Tensor:
        hidden = layer_output(model, forget, self.layer)
        target = self.steering_coeff * self.direction(hidden.shape[-1]).to(hidden.device)
        loss = self.distance(hidden, target, forget, counts.forget)
        if self.alpha > 0:
            if self.frozen is None:
                raise ValueError("RMU has no frozen retain activations: call prepare(model, forget_batches, "
                                 "retain_batches) before unlearning")
            frozen = self.frozen.take(retain, "RMU")
            hidden = layer_output(model, retain, self.layer)
            loss = loss + self.alpha * self.distance(hidden, frozen.to(hidden.device), retain, counts.retain)
        return loss


# ---------------------------------------------------------------------------------------
# seed 002's defenses, around any objective


class _Defended(Objective):
    """An objective with a defense around it; everything not overridden is the inner objective's."""

    def __init__(self, inner: Objective) -> None:
        self.inner = inner
        self.name = inner.name  # type: ignore[misc]

    @property
    def needs_retain(self) -> bool:
        return self.inner.needs_retain

    def parameters(self, model: torch.nn.Module) -> list[torch.nn.Parameter]:
        return self.inner.parameters(model)

    def prepare(self, model: torch.nn.Module, forget: Batches, retain: Batches | None = None) -> None:
        self.inner.prepare(model, forget, retain)

    def loss(self, model: torch.nn.Module, forget: Batch, retain: Batch | None, counts: StepCounts) -> torch.Tensor:
        return self.inner.loss(model, forget, retain, counts)


class WeightDistortion(_Defended):
    """Gaussian noise of standard deviation `std` on every parameter of the model, added once, after the inner
    objective has prepared (its references are the original model's), from torch.Generator().manual_seed(seed)
    in float32 on the CPU (the same draws on any device)."""

    def __init__(self, inner: Objective, std: float = 0.02, seed: int = 0) -> None:
        check_range("weight_distortion", std, 0.0, open_low=True)
        check_int("distortion_seed", seed, 0)
        super().__init__(inner)
        self.std, self.seed = std, seed

    def prepare(self, model: torch.nn.Module, forget: Batches, retain: Batches | None = None) -> None:
        super().prepare(model, forget, retain)
        generator = torch.Generator().manual_seed(self.seed)
        with torch.no_grad():
            for p in model.parameters():
                noise = torch.randn(p.shape, generator=generator, dtype=torch.float32)
                p.copy_(p.float() + self.std * noise.to(p.device))


class WeightDistReg(_Defended):
    """loss - strength * sqrt(mean((theta_original - theta)^2) + 1e-8) over all the model's parameters together,
    theta_original copied (float32, on the parameters' devices) when prepared."""

    def __init__(self, inner: Objective, strength: float = 1.0) -> None:
        check_range("weight_dist_reg", strength, 0.0, open_low=True)
        super().__init__(inner)
        self.strength = strength
        self.original: list[torch.Tensor] | None = None

    def prepare(self, model: torch.nn.Module, forget: Batches, retain: Batches | None = None) -> None:
        super().prepare(model, forget, retain)
        self.original = [p.detach().float().clone() for p in model.parameters()]

    def loss(self, model: torch.nn.Module, forget: Batch, retain: Batch | None, counts: StepCounts) -> torch.Tensor:
        if self.original is None:
            raise ValueError("Weight Dist Reg has no original weights: call prepare(model, forget_batches, ...) "
                             "before unlearning")
        squares = sum((p.float() - p0).pow(2).sum() for p, p0 in zip(model.parameters(), self.original))
        count = sum(p0.numel() for p0 in self.original)
        # The weights are the step's, not the batch's: each micro-batch takes its forget rows' part (all, at k = 1).
        share = len(forget) / counts.forget.sequences
        distance = torch.sqrt(squares / count + 1e-8)
        return self.inner.loss(model, forget, retain, counts) - self.strength * distance * share


# ---------------------------------------------------------------------------------------
# Registry

OBJECTIVES: dict[str, type[Objective]] = {cls.name: cls for cls in (GA, GradDiff, NPO, SimNPO, RMU, FineTune)}
DEFENSES = ("weight_distortion", "distortion_seed", "weight_dist_reg")


def make_objective(name: str, **hyperparameters: Any) -> Objective:
    """The objective called `name` (case-insensitive: ga, graddiff, npo, simnpo, rmu, finetune) with these
    hyperparameters, and seed 002's defenses around it when asked: weight_distortion=STD (with
    distortion_seed, default 0) and weight_dist_reg=LAMBDA (module docstring)."""
    cls = OBJECTIVES.get(name.lower()) if isinstance(name, str) else None
    if cls is None:
        raise ValueError(f"unknown objective {name!r}; use one of {', '.join(OBJECTIVES)}")
    accepted = list(inspect.signature(cls).parameters)
    unknown = sorted(set(hyperparameters) - set(accepted) - set(DEFENSES))
    if unknown:
        raise ValueError(f"{cls.name} has no hyperparameter {', '.join(unknown)}; "
                         f"its hyperparameters: {', '.join(accepted) or 'none'} (and the defenses "
                         f"{', '.join(DEFENSES)})")
    defenses = {key: hyperparameters.pop(key) for key in DEFENSES if key in hyperparameters}
    if "distortion_seed" in defenses and "weight_distortion" not in defenses:
        raise ValueError("distortion_seed is the seed of weight_distortion; give weight_distortion=STD too")
    objective = cls(**hyperparameters)
    if defenses.get("weight_distortion") is not None:
        objective = WeightDistortion(objective, defenses["weight_distortion"], defenses.get("distortion_seed", 0))
    if defenses.get("weight_dist_reg") is not None:
        objective = WeightDistReg(objective, defenses["weight_dist_reg"])
    return objective


def _check_layer(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"invalid {name}: {value!r}; it must be a block index, an integer >= 0")

"""Unlearning objectives: GA, GradDiff, NPO, SimNPO and RMU, as issue 4 states them.

An objective maps (model, forget batch, retain batch or None) to a scalar loss tensor and
nothing else, so one closure serves both kinds of optimizer:

    objective = make_objective("npo")
    objective.prepare(model, forget_batches, retain_batches)    # once, before the first step
    optimizer = AdaZO(objective.parameters(model), lr=1e-5, seed=0)
    closure = lambda: objective(model, forget_batch, retain_batch)
    optimizer.step(closure)   # ZO: called under no_grad; first-order: backward() inside

`prepare` computes what must come from the model before unlearning (NPO's reference
log-likelihoods, RMU's frozen retain activations), in eval mode and under no_grad, from the
same model, so no second model stays in memory; the caches are keyed by example index
(`Batch.indices`), so every batch must come from the same `Batches` (same examples, same
max_length) that was prepared. `parameters(model)` is what the optimizer should update:
every trainable parameter, or for RMU only its layers.

CE below is the mean answer-token cross-entropy of a batch (every scored token counts
once, as Hugging Face's loss), log p(y|x) the summed log-likelihood of an answer and |y|
its number of tokens, EOS included (`batches.answer_log_likelihoods`, float32).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ..checks import check_range
from .batches import Batch, Batches, answer_log_likelihoods, evaluating, model_device


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

    def loss(self, model: torch.nn.Module, forget: Batch, retain: Batch | None = None) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, model: torch.nn.Module, forget: Batch, retain: Batch | None = None) -> torch.Tensor:
        if self.needs_retain and retain is None:
            raise ValueError(f"{self.name} with these hyperparameters needs a retain batch; pass one, or set the "
                             f"retain term's weight (retain_weight; RMU: alpha) to 0")
        return self.loss(model, forget, retain)


def cross_entropy(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """CE: the mean answer-token cross-entropy of the batch."""
    log_likelihood, n_tokens = answer_log_likelihoods(model, batch)
    return -log_likelihood.sum() / n_tokens.sum()


class GA(Objective):
    """Gradient ascent: loss = -CE(forget)."""

    name = "ga"

    def loss(self, model: torch.nn.Module, forget: Batch, retain: Batch | None = None) -> torch.Tensor:
        return -cross_entropy(model, forget)


class _RetainWeighted(Objective):
    """A forget term plus retain_weight * CE(retain)."""

    def __init__(self, retain_weight: float) -> None:
        check_range("retain_weight", retain_weight, 0.0)
        self.retain_weight = retain_weight

    @property
    def needs_retain(self) -> bool:
        return self.retain_weight > 0

    def loss(self, model: torch.nn.Module, forget: Batch, retain: Batch | None = None) -> torch.Tensor:
        loss = self.forget_loss(model, forget)
        if self.retain_weight > 0:
            loss = loss + self.retain_weight * cross_entropy(model, retain)
        return loss

    def forget_loss(self, model: torch.nn.Module, forget: Batch) -> torch.Tensor:
        raise NotImplementedError


class GradDiff(_RetainWeighted):
    """Gradient difference: loss = -CE(forget) + retain_weight * CE(retain).

    Default retain_weight (lambda) = 1: forget and retain terms weighted equally, as in
    TOFU's grad_diff (Maini et al. 2024) and open-unlearning's GradDiff (alpha = gamma = 1).
    """

    name = "graddiff"

    def __init__(self, retain_weight: float = 1.0) -> None:
        super().__init__(retain_weight)

    def forget_loss(self, model: torch.nn.Module, forget: Batch) -> torch.Tensor:
        return -cross_entropy(model, forget)


class NPO(_RetainWeighted):
    """Negative preference optimization (Zhang et al. 2024, "Negative Preference Optimization"):

        loss = -(2/beta) mean_i log sigmoid(-beta (log p_theta(y_i|x_i) - log p_ref(y_i|x_i)))
               + retain_weight * CE(retain)

    log p_ref is the model's own summed log-likelihood of each forget example before
    unlearning, computed once by `prepare` and kept as one float per example. Defaults:
    beta = 0.1, the paper's value on TOFU; retain_weight = 1, its NPO-RT variant (the retain
    NLL added with weight 1, npo_coeff = grad_diff_coeff = 1 in its code). At the start the
    forget term is (2/beta) log 2.
    """

    name = "npo"

    def __init__(self, beta: float = 0.1, retain_weight: float = 1.0) -> None:
        check_range("beta", beta, 0.0, open_low=True)
        super().__init__(retain_weight)
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

    def forget_loss(self, model: torch.nn.Module, forget: Batch) -> torch.Tensor:
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
        return -(2 / self.beta) * F.logsigmoid(-self.beta * (log_likelihood - reference)).mean()


class SimNPO(_RetainWeighted):
    """Simple NPO (Fan et al. 2024, "Simplicity Prevails"): NPO without a reference model,
    length-normalised, with a reward margin gamma:

        loss = -(2/beta) mean_i log sigmoid(-(beta/|y_i|) log p_theta(y_i|x_i) - gamma)
               + retain_weight * CE(retain)

    Defaults from the authors' TOFU forget10 run (Unlearn-Simple, TOFU/README.md): beta = 4.5,
    gamma = 0, and forget and retain weights 0.125 and 1, i.e. retain_weight = 1 / 0.125 = 8
    here (the same direction, the whole loss 8 times larger: scale the learning rate by 1/8
    to match their steps). Their code subtracts gamma inside the beta scaling
    (beta (NLL/|y| - gamma)); here gamma is the paper's margin, outside it.
    """

    name = "simnpo"

    def __init__(self, beta: float = 4.5, gamma: float = 0.0, retain_weight: float = 8.0) -> None:
        check_range("beta", beta, 0.0, open_low=True)
        check_range("gamma", gamma, 0.0)
        super().__init__(retain_weight)
        self.beta, self.gamma = beta, gamma

    def forget_loss(self, model: torch.nn.Module, forget: Batch) -> torch.Tensor:
        log_likelihood, n_tokens = answer_log_likelihoods(model, forget)
        return -(2 / self.beta) * F.logsigmoid(-(self.beta / n_tokens) * log_likelihood - self.gamma).mean()


# ---------------------------------------------------------------------------------------
# RMU

BLOCK_PATHS = ("layers", "h", "blocks", "decoder.layers")


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

        loss = mean over forget tokens and hidden units of (h_theta(x) - c u)^2
               + alpha * mean over retain tokens and hidden units of (h_theta(x) - h_frozen(x))^2

    h is the output of block `layer` (`transformer_blocks`) at every real (non-padding)
    token, prompt included; u is a fixed unit vector, its entries drawn uniformly from
    [0, 1) by torch.Generator().manual_seed(seed) and normalised, as in the paper; c is
    `steering_coeff`. h_frozen is the model's own activation before unlearning, computed by
    `prepare` for every retain example and kept on the model's device in its dtype: the
    cache costs (tokens in all retain examples) x hidden_size x (bytes per element), e.g.
    10,000 examples of 256 tokens x 4096 x 2 bytes (bfloat16) = 21 GB, so prepare on a
    retain set of the size you can hold.

    `parameters(model)` returns the parameters of `update_layers` (default: layer - 2,
    layer - 1 and layer, as the WMDP code's layer_ids 5,6,7 with layer_id 7). The WMDP code
    updates one tensor of each (param_ids 6, Zephyr's MLP down projection); here every
    parameter of those blocks is updated. Only the blocks up to `layer` run. Defaults: the
    paper's Zephyr-7B setting, c = 6.5, alpha = 1200, layer = 7 (WMDP README command);
    the padding tokens the WMDP code averages over are left out here.
    """

    name = "rmu"

    def __init__(self, steering_coeff: float = 6.5, alpha: float = 1200.0, layer: int = 7,
                 update_layers: Sequence[int] | None = None, seed: int = 0) -> None:
        check_range("steering_coeff", steering_coeff, 0.0, open_low=True)
        check_range("alpha", alpha, 0.0)
        _check_layer("layer", layer)
        update_layers = tuple(range(max(layer - 2, 0), layer + 1)) if update_layers is None else tuple(update_layers)
        if not update_layers:
            raise ValueError("update_layers is empty; name at least one block to update")
        for i in update_layers:
            _check_layer("update_layers entry", i)
        self.steering_coeff, self.alpha, self.layer, self.update_layers, self.seed = \
            steering_coeff, alpha, layer, update_layers, seed
        self.frozen: dict[int, torch.Tensor] | None = None  # retain example index -> (tokens, H)

    @property
    def needs_retain(self) -> bool:
        return self.alpha > 0

    def parameters(self, model: torch.nn.Module) -> list[torch.nn.Parameter]:
        blocks = transformer_blocks(model)
        if max(self.update_layers) >= len(blocks):
            raise ValueError(f"update_layers {list(self.update_layers)} reach past the {len(blocks)} blocks of "
                             f"{type(model).__name__}; use 0 to {len(blocks) - 1}")
        return [p for i in self.update_layers for p in blocks[i].parameters() if p.requires_grad]

    def direction(self, hidden_size: int) -> torch.Tensor:
        """u: the fixed random unit vector (float32, on the CPU)."""
        u = torch.rand(hidden_size, generator=torch.Generator().manual_seed(self.seed))
        return u / u.norm()

    def prepare(self, model: torch.nn.Module, forget: Batches, retain: Batches | None = None) -> None:
        if not self.needs_retain:
            return
        if retain is None:
            raise ValueError("RMU with alpha > 0 needs the retain Batches to cache the frozen activations")
        self.frozen = {}
        with torch.no_grad(), evaluating(model):
            for batch in retain.in_order():
                hidden = layer_output(model, batch, self.layer)
                for row, index in enumerate(batch.indices.tolist()):
                    self.frozen[index] = hidden[row, batch.attention_mask[row].bool().to(hidden.device)]

    def loss(self, model: torch.nn.Module, forget: Batch, retain: Batch | None = None) -> torch.Tensor:
        hidden = _real_tokens(layer_output(model, forget, self.layer), forget)
        target = self.steering_coeff * self.direction(hidden.shape[-1]).to(hidden.device)
        loss = (hidden - target).pow(2).mean()
        if self.alpha > 0:
            if self.frozen is None:
                raise ValueError("RMU has no frozen retain activations: call prepare(model, forget_batches, "
                                 "retain_batches) before unlearning")
            hidden = _real_tokens(layer_output(model, retain, self.layer), retain)
            missing = [i for i in retain.indices.tolist() if i not in self.frozen]
            if missing:
                raise ValueError(f"retain examples {missing[:5]} were not prepared; prepare on the retain Batches "
                                 f"the loop draws from")
            frozen = torch.cat([self.frozen[i] for i in retain.indices.tolist()]).to(hidden.device)
            if frozen.shape != hidden.shape:
                raise ValueError("this retain batch has other tokens than the one RMU was prepared on (another "
                                 "max_length or tokenizer?); prepare on the retain Batches the loop draws from")
            loss = loss + self.alpha * (hidden - frozen.float()).pow(2).mean()
        return loss


def _real_tokens(hidden: torch.Tensor, batch: Batch) -> torch.Tensor:
    """(real tokens, H) in float32: padding left out, rows in order (right padding keeps each row a prefix)."""
    return hidden[batch.attention_mask.bool().to(hidden.device)].float()


# ---------------------------------------------------------------------------------------
# Registry

OBJECTIVES: dict[str, type[Objective]] = {cls.name: cls for cls in (GA, GradDiff, NPO, SimNPO, RMU)}


def make_objective(name: str, **hyperparameters: Any) -> Objective:
    """The objective called `name` (case-insensitive: ga, graddiff, npo, simnpo, rmu) with these hyperparameters."""
    cls = OBJECTIVES.get(name.lower()) if isinstance(name, str) else None
    if cls is None:
        raise ValueError(f"unknown objective {name!r}; use one of {', '.join(OBJECTIVES)}")
    accepted = list(inspect.signature(cls).parameters)
    unknown = sorted(set(hyperparameters) - set(accepted))
    if unknown:
        raise ValueError(f"{cls.name} has no hyperparameter {', '.join(unknown)}; "
                         f"its hyperparameters: {', '.join(accepted) or 'none'}")
    return cls(**hyperparameters)


def _check_layer(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"invalid {name}: {value!r}; it must be a block index, an integer >= 0")
